"""The class-disjoint split and the zero-shot protocols (zs, gzs, fg; issue 18)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation import QuerySet


def _manifest(tmp_path: Path, classes: int = 10, photos: int = 4, split: str = "") -> Path:
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["kind", "key", "path", "style", "target", "class_label", "split"])
        for c in range(classes):
            for p in range(photos):
                key = f"c{c}/p{p}"
                out.writerow(["gallery", key, f"{key}.jpg", "", "", f"class{c}", split])
                out.writerow(["query", "", f"{key}-1.png", "sketch", key, "", ""])
    return path


def _config(tmp_path: Path, data: str):
    from pipeline.config import load_config

    path = tmp_path / "pipeline.toml"
    path.write_text(f'[run]\nwork_dir = "{tmp_path / "run"}"\n\n[data]\n{data}\n')
    return load_config(path)


def _classes_by_split(gallery) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"train": set(), "test": set()}
    for split, label in zip(gallery["split"].to_pylist(), gallery["class_label"].to_pylist()):
        out[split].add(label)
    return out


def test_class_split_puts_no_class_in_both(tmp_path) -> None:
    from pipeline.data.sources import list_source

    config = _config(tmp_path, f'source = "manifest"\npath = "{_manifest(tmp_path)}"\n'
                               'split = "class"\nunseen_fraction = 0.3\ntest_fraction = 0.25')
    gallery, queries = list_source(config)
    by_split = _classes_by_split(gallery)
    unseen = by_split["test"] - by_split["train"]
    assert len(unseen) == 3  # round(0.3 x 10)
    # Every photo of an unseen class is a test photo; seen classes keep some held-out photos.
    assert all(s == "test" for s, c in zip(gallery["split"].to_pylist(),
                                            gallery["class_label"].to_pylist()) if c in unseen)
    assert by_split["train"] == {f"class{c}" for c in range(10)} - unseen
    assert set(zip(queries["split"].to_pylist(), queries["class_label"].to_pylist())) <= {
        (s, c) for s, c in zip(gallery["split"].to_pylist(), gallery["class_label"].to_pylist())}
    again, _ = list_source(config)  # seeded: the same split again
    assert again["split"].to_pylist() == gallery["split"].to_pylist()

    named = _config(tmp_path, f'source = "manifest"\npath = "{_manifest(tmp_path)}"\n'
                              'split = "class"\nunseen_classes = ["class1", "class7"]')
    by_split = _classes_by_split(list_source(named)[0])
    assert by_split["test"] - by_split["train"] == {"class1", "class7"}


def test_class_split_refusals(tmp_path) -> None:
    from pipeline.config import ConfigError
    from pipeline.data.sources import SourceError, list_source

    manifest = _manifest(tmp_path, split="train")
    with pytest.raises(SourceError, match="leave the split column empty"):
        list_source(_config(tmp_path, f'source = "manifest"\npath = "{manifest}"\n'
                                      'split = "class"'))
    with pytest.raises(SourceError, match=r"names class\(es\) \['nope'\]"):
        list_source(_config(tmp_path, f'source = "manifest"\npath = "{_manifest(tmp_path)}"\n'
                                      'split = "class"\nunseen_classes = ["nope"]'))
    with pytest.raises(ConfigError, match="data.split"):
        _config(tmp_path, 'source = "dsr"\npath = "x"\nsplit = "class"')


def test_demo_class_split_holds_out_whole_shape_classes(tmp_path) -> None:
    from pipeline.data.sources import list_source

    gallery, _ = list_source(_config(tmp_path, 'demo_items = 40\nsplit = "class"'))
    by_split = _classes_by_split(gallery)
    assert len(by_split["test"] - by_split["train"]) == 2  # round(0.2 x 8 shape classes)
    assert by_split["train"] and not (by_split["test"] - by_split["train"]) & by_split["train"]


def _set(emb: np.ndarray, targets: list[int], labels: list[str]) -> QuerySet:
    n = len(targets)
    return QuerySet("sketch", "none", np.arange(n), None, np.array(targets), np.array(labels),
                    np.asarray(emb, np.float32))


def test_acc_at_k_and_class_metrics_by_hand() -> None:
    from pipeline.config import ScoreConfig
    from pipeline.retrieval import map_at_k
    from pipeline.zero_shot import ClassGallery, dense_scores, score_zero_shot

    # Gallery: ids 10..15, classes a a a b b s (s seen), on a circle in 2-D.
    angles = np.array([0.0, 0.3, 0.6, 1.0, 1.4, 2.5])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    ids = np.arange(10, 16)
    labels = np.array(["a", "a", "a", "b", "b", "s"])
    # Query 0 (class a, own photo 12) sits at angle 0.05: order 10 11 12 13 14 15 -> rank 3;
    # among class a's photos (10 11 12) also rank 3. Query 1 (class b, own photo 13) at
    # angle 0.9: order 13 12 14 11 10 15 -> rank 1.
    q = np.stack([np.cos([0.05, 0.9]), np.sin([0.05, 0.9])], axis=1)
    qs = _set(q, [12, 13], ["a", "b"])
    ranks, fg, per_query = dense_scores(qs, ids, labels, vectors, (0, 2), (1, 3))
    assert ranks.tolist() == [3, 1]
    # Query 0: all 3 relevant first: AP = 1. Query 1: relevant 13 (rank 1), 14 (rank 3):
    # interpolated precision at hits: max(P@1..) = 1, max(P@3) = 2/3 -> AP@all = (1 + 2/3)/2.
    assert per_query["map@0"] == pytest.approx([1.0, (1 + 2 / 3) / 2])
    assert per_query["map@0"].mean() == pytest.approx(
        map_at_k(np.array([[10, 11, 12, 13, 14, 15], [13, 12, 14, 11, 10, 15]]),
                 np.array(["a", "b"]), labels, 6, ids))
    assert per_query["precision@1"].tolist() == [1.0, 1.0]
    assert per_query["precision@3"] == pytest.approx([1.0, 2 / 3])
    assert fg.tolist() == [3, 1]  # own photo among its class's photos only

    gallery = ClassGallery(ids, labels, vectors, frozenset({"a", "b"}))
    scored = score_zero_shot("m", _set(np.vstack([q, q[:1]]), [12, 13, 15], ["a", "b", "s"]),
                             gallery, ScoreConfig(ks=(1, 5)))
    rows = {(r["protocol"], r["metric"], r["k"]): r for r in scored.metric_rows}
    assert rows[("fg", "recall", 1)]["value"] == 0.5  # Acc@1: query 1 only
    assert rows[("fg", "recall", 5)]["value"] == 1.0  # Acc@5: both
    assert rows[("zs", "recall", 1)]["n_queries"] == 2  # the seen-class query is left out
    assert rows[("zs", "map", 0)]["value"] == pytest.approx(
        (1 + (1 + 2 / 3) / 2) / 2)  # the seen photo 15 is last for both: same as above
    assert {p for p, _, _ in rows} == {"zs", "gzs", "fg"}
    assert [t["protocol"][0].as_py() for t in scored.ranks] == ["zs", "gzs", "fg"]


def test_ties_count_against_the_query() -> None:
    from pipeline.zero_shot import dense_scores

    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    qs = _set(np.array([[1.0, 0.0]]), [1], ["a"])
    ranks, _, _ = dense_scores(qs, np.array([0, 1, 2]), np.array(["a", "a", "a"]), vectors,
                               (), ())
    assert ranks.tolist() == [2]


def check_zero_shot_run(config, methods: tuple[str, ...]) -> None:
    """Every method has zs / gzs / fg rows; splip's sketch zs Recall@1 and mAP@all equal a
    brute-force recomputation from the stored query and gallery embeddings."""
    from pipeline import commands
    from pipeline.catalog import Catalog
    from pipeline.retrieval import map_at_k
    from stages import all_stages

    catalog = Catalog.in_dir(config.work_dir)
    found = set(catalog.rows("SELECT DISTINCT method, protocol FROM retrieval_metrics "
                             "WHERE protocol IN ('zs', 'gzs', 'fg')"))
    assert found == {(m, p) for m in methods for p in ("zs", "gzs", "fg")}
    assert {p for p, in catalog.rows("SELECT DISTINCT protocol FROM query_ranks")} >= {
        "zs", "gzs", "fg", "gallery"}
    assert {r["protocol"] for r in commands.recall_table(all_stages, config)} >= {"zs", "fg"}
    assert {(r["protocol"], r["versus"]) for r in commands.paired_table(all_stages, config)} >= {
        ("fg", m) for m in methods[1:]}

    gallery = catalog.rows("SELECT image_id, class_label, split FROM gallery ORDER BY image_id")
    unseen = {c for _, c, _ in gallery} - {c for _, c, s in gallery if s == "train"}
    photos = [(i, c) for i, c, _ in gallery if c in unseen]
    stored = dict(catalog.rows("SELECT image_id, embedding FROM splip_embeddings"))
    xb = np.array([stored[i] for i, _ in photos], np.float32)
    ids = np.array([i for i, _ in photos])
    labels = np.array([c for _, c in photos])
    queries = catalog.rows(
        "SELECT q.query_id, q.image_id, q.class_label, e.embedding FROM queries q JOIN "
        "query_embeddings e ON e.query_id = q.query_id AND e.method = 'splip' "
        "WHERE q.style = 'sketch' AND q.split = 'test' ORDER BY q.query_id")
    queries = [r for r in queries if r[2] in unseen]
    xq = np.array([r[3] for r in queries], np.float32)
    S = xq @ xb.T
    own = S[np.arange(len(queries)), [int(np.flatnonzero(ids == r[1])[0]) for r in queries]]
    recall1 = float(((S >= own[:, None]).sum(axis=1) <= 1).mean())
    order = ids[np.argsort(-S, axis=1, kind="stable")]
    map_all = map_at_k(order, np.array([r[2] for r in queries]), labels, len(ids), ids)
    [(value, n)] = catalog.rows(
        "SELECT value, n_queries FROM retrieval_metrics WHERE method = 'splip' AND protocol "
        "= 'zs' AND style = 'sketch' AND fusion = 'none' AND metric = 'recall' AND k = 1")
    assert n == len(queries) and value == pytest.approx(recall1)
    [(value,)] = catalog.rows(
        "SELECT value FROM retrieval_metrics WHERE method = 'splip' AND protocol = 'zs' AND "
        "style = 'sketch' AND fusion = 'none' AND metric = 'map' AND k = 0")
    assert value == pytest.approx(map_all)


def test_demo_class_split_scores_every_method_under_the_zero_shot_protocols(tmp_path) -> None:
    """A class-disjoint demo run: freestyle, splip and baseline through every stage, the zero
    -shot protocols in retrieval_metrics, query_ranks, run all's tables and sign tests."""
    from conftest import write_tiny_config

    from pipeline import commands
    from pipeline.config import load_config
    from stages import all_stages

    path = write_tiny_config(tmp_path, tmp_path / "run", items=24, extra=(
        '\n[index]\ncheck_queries = 10\n\n[score]\nmethods = ["freestyle", "splip", "baseline"]\n'
        'fused = []\n\n[splip]\njigsaw_grid = 2\njigsaw_permutations = 6\n'))
    path.write_text(path.read_text().replace("[data]\n", '[data]\nsplit = "class"\n'
                                             'unseen_fraction = 0.4\nstyles = ["sketch"]\n'))
    config = load_config(path)
    commands.run(all_stages, config, ["all"], progress=False)
    check_zero_shot_run(config, ("freestyle", "splip", "baseline"))
    page, written = commands.report(all_stages, config, tmp_path / "report.html")
    assert written and 'id="table-recall-fg"' in page.read_text()  # fg in the report


def _sketchy_manifest(root: Path, out: Path, classes: int = 10, photos: int = 5) -> Path:
    """A manifest of the first `classes` classes of sketchy-mini: per class its first
    `photos` photos that have sketches (one sketch each, `<photo_id>-1.png`: instance ground
    truth) and 2 photos without (distractors); files read in place, nothing copied."""
    path = out / "sketchy.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "key", "path", "style", "target", "class_label"])
        for folder in sorted((root / "photo").iterdir())[:classes]:
            drawn = {p.name.rsplit("-", 1)[0] for p in (root / "sketch" / folder.name).iterdir()}
            files = sorted(folder.iterdir())
            chosen = [p for p in files if p.stem in drawn][:photos]
            chosen += [p for p in files if p.stem not in drawn][:2]
            for photo in chosen:
                key = f"{folder.name}/{photo.stem}"
                writer.writerow(["gallery", key, str(photo), "", "", folder.name])
                sketch = root / "sketch" / folder.name / f"{photo.stem}-1.png"
                if photo.stem in drawn and sketch.is_file():
                    writer.writerow(["query", "", str(sketch), "sketch", key, ""])
    return path


def test_sketchy_mini_class_split_through_every_stage(tmp_path, shared_data) -> None:
    """sketchy-mini (10 classes, 3 unseen), the real VGG-19 for the Gram path, the tiny ViT
    (or FSR_TEST_CLIP's pretrained CLIP):
    freestyle, splip and baseline scored under zs, gzs and fg, checked by brute force."""
    from pipeline import commands
    from pipeline.config import load_config
    from stages import all_stages

    sketchy, vgg = shared_data / "sketchy-mini", shared_data / "vgg19"
    if not (sketchy / "photo").is_dir() or not any(vgg.glob("*.pth")):
        pytest.skip(f"sketchy-mini or the VGG-19 weights not found under {shared_data}")
    manifest = _sketchy_manifest(sketchy, tmp_path)
    # FSR_TEST_CLIP=ARCH:CHECKPOINT (as tests/test_train.py reads it): the same run on a
    # pretrained CLIP; without it the tiny random ViT (mechanics only).
    arch, _, pretrained = os.environ.get("FSR_TEST_CLIP", "").partition(":")
    model = (f'arch = "{arch}"\npretrained = "{pretrained}"' if arch and pretrained
             else 'arch = "fsr-tiny-vit"')
    path = tmp_path / "pipeline.toml"
    path.write_text(f"""
[run]
work_dir = "{tmp_path / 'run'}"
device = "cpu"
[data]
source = "manifest"
path = "{manifest}"
split = "class"
unseen_fraction = 0.3
shard_size = 16
[extract]
vgg_weights = "{next(vgg.glob('*.pth'))}"
image_size = 64
gram_dim = 32
batch_size = 16
num_workers = 0
[cluster]
k = 4
niter = 10
[model]
{model}
[train]
batch_size = 8
epochs = 1
val_fraction = 0.2
num_workers = 0
[embed]
batch_size = 16
num_workers = 0
[index]
check_queries = 10
[score]
methods = ["freestyle", "splip", "baseline"]
fused = []
[splip]
jigsaw_grid = 2
jigsaw_permutations = 6
""")
    config = load_config(path)
    commands.run(all_stages, config, ["all"], progress=False)
    check_zero_shot_run(config, ("freestyle", "splip", "baseline"))
