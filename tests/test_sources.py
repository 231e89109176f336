"""Dataset sources end to end on tiny data: dsr, folder (with every kind of bad photo), manifest.

Each test builds its dataset with PIL in a temp folder, runs the pipeline on CPU with tiny
images and a tiny Gram, and checks the `gallery`, `queries` and `item_failures` tables.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import commands
from pipeline.catalog import Catalog
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.sources import SourceError
from pipeline.plans import fingerprints
from stages import all_stages

SIZE = 48  # photo side in pixels: tiny, but enough for the style transforms
STYLES = {"text", "sketch", "art", "lowres"}


# -- helpers --------------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def write_config(directory: Path, work_dir: Path, **data: object) -> Path:
    """A complete pipeline.toml: `[data]` from keyword arguments, tiny extract and cluster."""
    lines = ["[run]", f"work_dir = {_toml(work_dir)}", "seed = 0", 'device = "cpu"', "",
             "[data]", *(f"{key} = {_toml(value)}" for key, value in data.items()), "",
             "[extract]", "image_size = 64", "gram_dim = 32", "batch_size = 8",
             "num_workers = 0", "", "[cluster]", "k = 2", "niter = 5", ""]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.toml"
    path.write_text("\n".join(lines))
    return path


def photo(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """Seeded RGB noise over a colour gradient (incompressible: a cut JPEG loses pixels)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.integers(0, 256, 3)[None, None, :]
    noise = rng.integers(0, 96, (height, width, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8), mode="RGB")


def save(image: Image.Image, path: Path, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def catalog_of(config_path: Path) -> Catalog:
    return Catalog.in_dir(load_config(config_path).work_dir)


def failures(catalog: Catalog, stage: str) -> dict[str, str]:
    """File name -> reason of a stage's bad inputs in the current plan."""
    rows = catalog.rows(
        "SELECT f.path, f.reason FROM item_failures f JOIN stages s "
        "ON f.stage = s.stage AND f.fingerprint = s.fingerprint WHERE f.stage = ?", [stage])
    return {Path(path).name: reason for path, reason in rows}


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    """A CliRunner; the root log handlers the CLI installs (on the runner's soon-closed
    stderr) are put back afterwards, so later tests do not log to a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield CliRunner()
    root.handlers[:] = handlers
    root.setLevel(level)


# -- dsr ------------------------------------------------------------------------------------

DSR_TRAIN = [f"img{i}.jpg" for i in range(6)]
DSR_TEST = ["img6.jpg", "img7.jpg"]


def make_dsr(root: Path) -> Path:
    """The DSR layout (docs/datasets.md) with 8 photos, 6 train and 2 test."""
    for i, name in enumerate(DSR_TRAIN + DSR_TEST):
        save(photo(i), root / "images" / name, quality=90)
        save(photo(i).convert("L").convert("RGB"), root / "sketch" / name, quality=90)
        save(photo(100 + i), root / "art" / name, quality=90)
        save(photo(i).resize((8, 8)).resize((SIZE, SIZE)), root / "mosaic" / name, quality=90)
        (root / "text").mkdir(exist_ok=True)
        (root / "text" / f"cap{i}.txt").write_text(f"  caption of photo {i}\n", encoding="utf-8")
    for split, names in (("train", DSR_TRAIN), ("test", DSR_TEST)):
        entries = [{"image": n, "caption": f"cap{n[3]}.txt"} for n in names]
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def test_dsr_end_to_end(tmp_path: Path) -> None:
    root = make_dsr(tmp_path / "data" / "dsr")
    # A relative data.path is resolved against the config file's folder.
    config_path = write_config(tmp_path / "data", tmp_path / "run1", source="dsr", path="dsr",
                               shard_size=4)
    reports = commands.run(all_stages, load_config(config_path), ["cluster"], progress=False)
    assert {r.stage: r.ran for r in reports} == {"ingest": 1, "prepare": 2, "extract": 2,
                                                 "cluster": 1}
    catalog = catalog_of(config_path)

    gallery = {key: (split, path) for key, split, path in catalog.rows(
        "SELECT key, split, path FROM gallery")}
    assert gallery == {n: ("train" if n in DSR_TRAIN else "test", str(root / "images" / n))
                       for n in DSR_TRAIN + DSR_TEST}
    rows = catalog.rows("SELECT g.key, q.style, q.split, q.path, q.text FROM queries q "
                        "JOIN gallery g USING (image_id) ORDER BY ALL")
    assert len(rows) == 32
    for name in DSR_TRAIN + DSR_TEST:
        mine = {style: (split, path, text) for key, style, split, path, text in rows
                if key == name}
        assert set(mine) == STYLES, name
        split = gallery[name][0]
        assert mine["text"] == (split, None, f"caption of photo {name[3]}")  # stripped
        for style, folder in (("sketch", "sketch"), ("art", "art"), ("lowres", "mosaic")):
            assert mine[style] == (split, str(root / folder / name), None)
    assert catalog.rows("SELECT count(*) FROM item_failures") == [(0,)]
    # Every image query was encoded, and the training photos for the style space.
    assert catalog.rows("SELECT count(*) FROM gram_features") == [(24,)]
    assert catalog.rows("SELECT count(*) FROM gallery_gram") == [(len(DSR_TRAIN),)]
    assert catalog.rows("SELECT count(*) FROM style_centres") == [(2,)]
    assert catalog.rows("SELECT count(*) FROM style_assignments") == [(24 + len(DSR_TRAIN),)]

    # Ids are hashes of the keys: another run elsewhere, on a copy, gives the same ids.
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "dsr")
    other_path = write_config(tmp_path / "other", tmp_path / "run2", source="dsr", path=copy,
                              shard_size=4)
    commands.run(all_stages, load_config(other_path), ["prepare"], progress=False)
    other = catalog_of(other_path)
    for sql in ("SELECT key, image_id, shard FROM gallery ORDER BY key",
                "SELECT query_id, image_id, style, shard FROM queries ORDER BY query_id"):
        assert catalog.rows(sql) == other.rows(sql)
    assert len({r[0] for r in catalog.rows("SELECT query_id FROM queries")}) == 32


def test_dsr_missing_listing_names_the_path(tmp_path: Path, cli: CliRunner) -> None:
    root = make_dsr(tmp_path / "dsr")
    (root / "test.json").unlink()
    config = load_config(write_config(tmp_path, tmp_path / "run", source="dsr", path=root))
    with pytest.raises(SourceError, match="DSR listing .*test.json not found") as caught:
        commands.run(all_stages, config, ["extract"], progress=False)
    assert str(root / "test.json") in str(caught.value)
    # The CLI turns it into one line and exit code 1.
    result = cli.invoke(app, ["run", "extract", "--config", str(tmp_path / "pipeline.toml")])
    assert result.exit_code == 1, result.output
    assert str(root / "test.json") in one_line(result.output)


def test_dsr_malformed_listing(tmp_path: Path) -> None:
    root = make_dsr(tmp_path / "dsr")
    config = load_config(write_config(tmp_path, tmp_path / "run", source="dsr", path=root))
    for text, message in [
        ('[{"image": "img6.jpg"}]', r"test.json\[0\]: expected"),
        ('[{"image": "img6.jpg", "caption": "cap6.txt"}, {"image": 7, "caption": "c"}]',
         r"test.json\[1\]: expected"),
        ('{"image": "img6.jpg", "caption": "cap6.txt"}', "test.json: expected a list"),
        ('[{"image": "img0.jpg", "caption": "cap0.txt"}]',
         r"test.json\[0\]: image 'img0.jpg' is listed twice \(also in train.json\)"),
        ("[{", "test.json: not valid JSON"),
    ]:
        (root / "test.json").write_text(text)
        with pytest.raises(SourceError, match=message):
            commands.run(all_stages, config, ["ingest"], progress=False)
    # A UTF-8 byte order mark is fine.
    (root / "test.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(
        [{"image": "img6.jpg", "caption": "cap6.txt"}]).encode())
    commands.run(all_stages, config, ["ingest"], progress=False)


def test_dsr_bad_captions_are_failures(tmp_path: Path) -> None:
    root = make_dsr(tmp_path / "dsr")
    (root / "text" / "cap1.txt").write_text(" \n\t\n")
    (root / "text" / "cap2.txt").write_bytes("café au lait".encode("latin-1"))
    (root / "text" / "cap3.txt").write_bytes("\ufeffcafé ok\n".encode())  # UTF-8 with BOM
    (root / "text" / "cap4.txt").unlink()
    (root / "sketch" / "img5.jpg").unlink()
    config_path = write_config(tmp_path, tmp_path / "run", source="dsr", path=root,
                               max_failure_ratio=0.5)
    commands.run(all_stages, load_config(config_path), ["extract"], progress=False)
    catalog = catalog_of(config_path)

    bad = failures(catalog, "prepare")
    assert bad.keys() == {"cap1.txt", "cap2.txt", "cap4.txt", "img5.jpg"}
    assert bad["cap1.txt"] == "empty caption"
    assert bad["cap2.txt"] == "undecodable caption: invalid utf-8 at byte 3"
    assert bad["cap4.txt"].startswith("missing: ")
    assert bad["img5.jpg"].startswith("missing: ")
    assert catalog.rows("SELECT DISTINCT item_kind FROM item_failures") == [("query",)]
    assert failures(catalog, "extract") == {}
    # A bad query drops only itself: its photo and the photo's other queries stay.
    assert catalog.rows("SELECT count(*) FROM gallery") == [(8,)]
    assert catalog.rows("SELECT count(*) FROM queries") == [(32 - 4,)]
    texts = dict(catalog.rows("SELECT g.key, q.text FROM queries q JOIN gallery g "
                              "USING (image_id) WHERE q.style = 'text'"))
    assert set(texts) == {f"img{i}.jpg" for i in (0, 3, 5, 6, 7)}
    assert texts["img3.jpg"] == "café ok"


# -- folder ---------------------------------------------------------------------------------

MAX_PIXELS = 10_000  # data.max_image_pixels in the folder tests: the 120 px photo is a bomb
GOOD = {  # file -> how it is written; all must decode to RGB
    "golden_retriever/plain.jpg": "jpeg",
    "golden_retriever/plain.png": "png",
    "golden_retriever/cmyk.jpg": "cmyk",
    "golden_retriever/deep.png": "16-bit",
    "cat/palette.png": "palette+transparency",
    "cat/alpha.png": "rgba",
    "cat/grey.jpg": "greyscale",
}
BAD = {  # file -> reason prefix
    "cat/missing.jpg": "missing: ",
    "cat/empty.jpg": "empty file",
    "cat/corrupt.png": "corrupt: ",
    "golden_retriever/truncated.jpg": "truncated: ",
    "golden_retriever/bomb.png": "too large: 120x120 px > max_pixels 10000",
}


def make_folder(root: Path) -> Path:
    """`<root>/<class>/<photo>` with good, oddly encoded and bad photos (GOOD, BAD)."""
    for i, (name, kind) in enumerate(GOOD.items()):
        image, path = photo(i), root / name
        if kind == "cmyk":
            save(image.convert("CMYK"), path, format="JPEG", quality=90)
            assert Image.open(path).mode == "CMYK"
        elif kind == "16-bit":
            grey = (np.asarray(image.convert("L"), np.uint16) * 257).astype(np.uint16)
            save(Image.fromarray(grey), path, format="PNG")
            assert Image.open(path).mode in {"I;16", "I"}
        elif kind == "palette+transparency":
            save(image.quantize(16), path, format="PNG", transparency=0)
            assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
        elif kind == "rgba":
            rgba = image.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(image.size))
            save(rgba, path, format="PNG")
        elif kind == "greyscale":
            save(image.convert("L"), path, format="JPEG", quality=90)
        else:
            save(image, path, format=kind.upper(), quality=90)
    os.symlink(root / "cat" / "nowhere.jpg", root / "cat" / "missing.jpg")  # listed, dangling
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "corrupt.png").write_bytes(b"not a png at all\n" * 40)
    cut = save(photo(50), root / "golden_retriever" / "truncated.jpg", quality=95)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    save(photo(51, (120, 120)), root / "golden_retriever" / "bomb.png")
    (root / "cat" / "notes.txt").write_text("not a photo: skipped by its suffix")
    return root


def folder_config(tmp_path: Path, work: str, **data: object) -> Path:
    return write_config(tmp_path / work, tmp_path / work / "run", source="folder",
                        path=tmp_path / "photos", shard_size=4, test_fraction=0.0,
                        max_image_pixels=MAX_PIXELS, **data)


def test_folder_bad_photos_are_recorded_and_odd_modes_converted(tmp_path: Path) -> None:
    make_folder(tmp_path / "photos")
    config_path = folder_config(tmp_path, "lenient", max_failure_ratio=1.0)
    commands.run(all_stages, load_config(config_path), ["extract"], progress=False)
    catalog = catalog_of(config_path)

    # For folder photos `prepare` decodes (the styles are drawn from them), so it catches all.
    bad = failures(catalog, "prepare")
    assert bad.keys() == {Path(n).name for n in BAD}
    for name, prefix in BAD.items():
        assert bad[Path(name).name].startswith(prefix), (name, bad[Path(name).name])
    assert catalog.rows("SELECT count(*) FROM item_failures WHERE stage = 'prepare' "
                        "AND item_kind = 'gallery'") == [(len(BAD),)]
    assert dict(catalog.rows("SELECT reason, items FROM failures_by_reason")) == {
        "missing": 1, "empty file": 1, "corrupt": 1, "truncated": 1, "too large": 1}
    assert failures(catalog, "extract") == {}  # what prepare let through decodes again

    gallery = dict(catalog.rows("SELECT key, class_label FROM gallery"))
    assert gallery == {name: name.split("/")[0] for name in GOOD}
    rows = catalog.rows("SELECT g.key, q.style, q.path, q.text FROM queries q "
                        "JOIN gallery g USING (image_id)")
    assert len(rows) == 4 * len(GOOD)  # a bad photo takes its queries with it
    for name in GOOD:
        mine = {style: (path, text) for key, style, path, text in rows if key == name}
        assert set(mine) == STYLES, name
        label = name.split("/")[0].replace("_", " ")
        assert mine["text"] == (None, f"a photo of a {label}")
        for style in ("sketch", "art", "lowres"):
            path = Path(mine[style][0])
            assert path.is_file() and path.is_relative_to(tmp_path / "lenient" / "run")
            with Image.open(path) as generated:
                assert generated.mode == "RGB" and min(generated.size) == SIZE
    # Image queries and all (train) photos, odd modes included, have Gram vectors.
    assert catalog.rows("SELECT count(*) FROM gram_features") == [(3 * len(GOOD),)]
    assert catalog.rows("SELECT count(*) FROM gallery_gram") == [(len(GOOD),)]


def test_folder_too_many_bad_photos_stop_the_run(tmp_path: Path, cli: CliRunner) -> None:
    make_folder(tmp_path / "photos")
    config_path = folder_config(tmp_path, "strict")  # default data.max_failure_ratio, 0.05
    with pytest.raises(commands.PipelineError) as caught:
        commands.run(all_stages, load_config(config_path), ["extract"], progress=False)
    message = str(caught.value)
    # Photos are judged against photos: 5 of the 12 (the 7 good ones' 28 queries do not
    # dilute the share; counted with them it was "5 of 40", 12.5%).
    assert ("stage prepare: 5 of 12 gallery items are bad inputs (41.67%, over "
            "data.max_failure_ratio = 0.05)") in message
    assert "failures_by_reason" in message and "data.max_failure_ratio" in message
    assert "fsr-pipe reset prepare -y" in message
    # The bad items are there to look at, and status says why the run stops.
    assert len(failures(catalog_of(config_path), "prepare")) == len(BAD)
    prepare = commands.status(all_stages, load_config(config_path))[1]
    assert prepare.failed == 0 and "5 of 12 gallery items are bad inputs" in prepare.notes
    # `plan extract` (before a scheduler's array tasks) refuses too: prepare's units are all
    # done, but what they produced is over the limit.
    with pytest.raises(commands.PipelineError, match="stage prepare: 5 of 12 gallery items"):
        commands.run(all_stages,
                     load_config(config_path), ["extract"], plan_only=True, progress=False)
    # 41.67% of the photos is over a 30% limit (with queries counted as items it passed).
    with pytest.raises(commands.PipelineError, match=r"\(41.67%, over data.max_failure_ratio"):
        commands.run(all_stages,
                     load_config(config_path, ["data.max_failure_ratio=0.3"]), ["extract"],
                     progress=False)

    result = cli.invoke(app, ["run", "extract", "--config",
                               str(folder_config(tmp_path, "cli"))])
    assert result.exit_code == 1, result.output
    output = one_line(result.output)
    assert "failures_by_reason" in output and "data.max_failure_ratio" in output
    assert "Traceback" not in output


def test_folder_without_class_folders(tmp_path: Path) -> None:
    save(photo(0), tmp_path / "flat" / "a.jpg")
    config = load_config(write_config(tmp_path, tmp_path / "run", source="folder",
                                      path=tmp_path / "flat"))
    with pytest.raises(SourceError, match="has no class sub-folders"):
        commands.run(all_stages, config, ["ingest"], progress=False)
    config = load_config(write_config(tmp_path, tmp_path / "run", source="folder",
                                      path=tmp_path / "nope"))
    with pytest.raises(SourceError, match=f"photo folder {tmp_path / 'nope'} not found"):
        commands.run(all_stages, config, ["ingest"], progress=False)
    config = load_config(write_config(tmp_path, tmp_path / "run", source="folder",
                                      path=tmp_path / "flat" / "a.jpg"))
    with pytest.raises(SourceError, match="a.jpg is a file, not a folder"):
        commands.run(all_stages, config, ["ingest"], progress=False)


def test_folder_skips_hidden_entries_and_says_what_it_left_out(tmp_path: Path, caplog) -> None:
    """Hidden and NAS system entries are never photos or classes; photos the folder layout
    cannot take (loose in the root, nested deeper, other formats) are named in a warning."""
    root = tmp_path / "photos"
    for name in ["cat/a.jpg", "dog/b.png", ".thumbnails/t.jpg", "@eaDir/SYNO_THUMB.jpg",
                 "cat/.hidden.jpg", "cat/._a.jpg", "loose.jpg", "cat/sub/nested.jpg"]:
        save(photo(len(name)), root / name)
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "dog" / "IMG_1.HEIC").write_bytes(b"\0" * 64)  # no HEIC decoder here
    config = load_config(write_config(tmp_path, tmp_path / "run", source="folder", path=root))
    with caplog.at_level("WARNING", logger="pipeline.data.sources"):
        commands.run(all_stages, config, ["prepare"], progress=False)
    catalog = catalog_of(tmp_path / "pipeline.toml")
    assert catalog.rows("SELECT key, class_label FROM gallery ORDER BY key") == [
        ("cat/a.jpg", "cat"), ("dog/b.png", "dog")]
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    assert "1 files directly in the root (not in a class folder) left out (e.g. loose.jpg)" in (
        warnings)
    assert "1 sub-folders inside class folders (not searched) left out (e.g. cat/sub)" in warnings
    assert "images left out (e.g. dog/IMG_1.HEIC)" in warnings
    assert ".thumbnails" not in warnings and "eaDir" not in warnings and "._a" not in warnings

    # The listing defines ingest's fingerprint: stray files do not re-run the pipeline (a
    # Finder .DS_Store used to), a new photo does.
    def ingest_fingerprint() -> str:
        return fingerprints(all_stages(), config)["ingest"]

    before = ingest_fingerprint()
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "dog" / "notes.txt").write_text("x")
    (root / "._root_fork").write_bytes(b"\0")
    assert ingest_fingerprint() == before
    save(photo(99), root / "dog" / "c.jpg")
    assert ingest_fingerprint() != before


# -- manifest -------------------------------------------------------------------------------

COLUMNS = ["kind", "key", "path", "text", "style", "target", "class_label", "split"]


def manifest_rows() -> list[dict]:
    """Gallery photos p0..p5 and their queries, two of them bad (a missing file, no text)."""
    def gallery(i: int, key: str | None, label: str, split: str | None) -> dict:
        return {"kind": "gallery", "key": key, "path": f"photos/p{i}.png",
                "class_label": label, "split": split}

    def query(style: str, target: str, path: str | None = None,
              text: str | None = None) -> dict:
        return {"kind": "query", "style": style, "target": target, "path": path, "text": text}

    return [
        gallery(0, "p0", "cat", "train"), gallery(1, "p1", "dog", "test"),
        gallery(2, None, "cat", None),  # key defaults to the path, split is seeded
        gallery(3, "p3", "dog", "train"), gallery(4, "p4", "cat", "train"),
        gallery(5, "p5", None, "train"),
        query("sketch", "p0", path="sketches/p0.png"),
        query("sketch", "p1", path="sketches/p1.png"),
        query("art", "photos/p2.png", path="art/p2.png"),
        query("text", "p0", text="a cat on a mat"),
        query("text", "p1", text="a dog"),
        query("caption", "p3", text="a dog, described"),  # any style name can be text
        query("sketch", "p3", path="sketches/gone.png"),  # missing file
        query("text", "p4", text=""),  # empty caption
        query("text", "p5", text="   "),  # whitespace caption
    ]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """`rows` as CSV (empty cells for None) or Parquet (nulls; empty strings stay empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        columns = [c for c in COLUMNS if any(c in row for row in rows)]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows([{c: row.get(c) or "" for c in columns} for row in rows])
    else:
        columns = [c for c in COLUMNS if any(c in row for row in rows)]
        table = pa.table({c: pa.array([row.get(c) for row in rows], pa.string())
                          for c in columns})
        pq.write_table(table, path)
    return path


def make_manifest_files(root: Path) -> None:
    for i in range(6):
        save(photo(i), root / "photos" / f"p{i}.png")
    save(photo(0).convert("L"), root / "sketches" / "p0.png")
    save(photo(1).convert("L"), root / "sketches" / "p1.png")
    save(photo(200), root / "art" / "p2.png")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_end_to_end(tmp_path: Path, suffix: str) -> None:
    root = tmp_path / "dataset"
    make_manifest_files(root)
    manifest = write_manifest(root / f"manifest{suffix}", manifest_rows())
    config_path = write_config(tmp_path, tmp_path / "run", source="manifest", path=manifest,
                               shard_size=4, max_failure_ratio=0.5)
    commands.run(all_stages, load_config(config_path), ["extract"], progress=False)
    catalog = catalog_of(config_path)

    bad = catalog.rows("SELECT item_kind, path, reason FROM item_failures "
                       "WHERE stage = 'prepare' ORDER BY reason")
    assert [(kind, reason.split(":")[0]) for kind, _, reason in bad] == [
        ("query", "empty caption"), ("query", "empty caption"), ("query", "missing")]
    assert bad[2][1] == str(root / "sketches" / "gone.png")
    assert failures(catalog, "extract") == {}

    gallery = {key: (path, label, split) for key, path, label, split in catalog.rows(
        "SELECT key, path, class_label, split FROM gallery")}
    assert set(gallery) == {"p0", "p1", "photos/p2.png", "p3", "p4", "p5"}
    assert gallery["p0"] == (str(root / "photos" / "p0.png"), "cat", "train")
    assert gallery["p1"][1:] == ("dog", "test")
    assert gallery["photos/p2.png"][0] == str(root / "photos" / "p2.png")
    assert gallery["photos/p2.png"][2] in {"train", "test"}
    assert gallery["p5"][1:] == (None, "train")

    queries = sorted(catalog.rows(
        "SELECT g.key, q.style, q.path, q.text, q.class_label, q.split FROM queries q "
        "JOIN gallery g USING (image_id)"), key=lambda r: (r[0], r[1]))
    p2_split = gallery["photos/p2.png"][2]
    assert queries == [
        ("p0", "sketch", str(root / "sketches" / "p0.png"), None, "cat", "train"),
        ("p0", "text", None, "a cat on a mat", "cat", "train"),
        ("p1", "sketch", str(root / "sketches" / "p1.png"), None, "dog", "test"),
        ("p1", "text", None, "a dog", "dog", "test"),
        ("p3", "caption", None, "a dog, described", "dog", "train"),
        ("photos/p2.png", "art", str(root / "art" / "p2.png"), None, "cat", p2_split),
    ]
    assert catalog.rows("SELECT count(*) FROM gram_features") == [(3,)]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"path": "photos/p0.png"}], r"missing column\(s\) \['kind'\]"),
    ([{"kind": "gallery", "path": "photos/p0.png", "key": "p0"},
      {"kind": "query", "style": "sketch", "path": "sketches/p0.png"}],
     "row 1: a query row needs style and target"),
    ([{"kind": "gallery", "path": "photos/p0.png", "key": "p0"},
      {"kind": "query", "style": "sketch", "path": "sketches/p0.png", "target": "p9"}],
     "row 1: .*'p9'.* not a gallery key"),
    ([{"kind": "gallery", "path": "photos/p0.png", "key": "p0"},
      {"kind": "query", "style": "sketch", "target": "p0"}],
     "row 1: a query row needs a path"),
    ([{"kind": "gallery", "path": "photos/p0.png", "key": "p0"},
      {"kind": "query", "style": "text", "target": "p0", "path": "sketches/p0.png",
       "text": "both"}],
     "row 1: .*not both"),
    ([{"kind": "gallery", "path": "photos/p0.png"},
      {"kind": "gallery", "path": "photos/p0.png"}],
     "row 1: gallery key 'photos/p0.png' is also on row 0"),
    ([{"kind": "gallery", "path": "photos/p0.png"}, {"kind": "photo", "path": "x.png"},
      {"kind": None, "path": "y.png"}],
     "column kind must be 'gallery' or 'query'"),
    ([{"kind": "gallery", "path": "photos/p0.png"}, {"kind": "gallery", "path": None}],
     "row 1: a gallery row needs a path"),
    ([{"kind": "gallery", "path": "photos/p0.png", "split": "val"}],
     "row 0: split must be train or test"),
])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_malformed(tmp_path: Path, rows: list[dict], message: str,
                            suffix: str) -> None:
    manifest = write_manifest(tmp_path / f"manifest{suffix}", rows)
    config = load_config(write_config(tmp_path, tmp_path / "run", source="manifest",
                                      path=manifest))
    with pytest.raises(SourceError, match=message) as caught:
        commands.run(all_stages, config, ["ingest"], progress=False)
    assert str(manifest) in str(caught.value)


def test_manifest_unreadable_files(tmp_path: Path) -> None:
    def ingest(path: Path) -> None:
        config = load_config(write_config(tmp_path, tmp_path / "run", source="manifest",
                                          path=path))
        commands.run(all_stages, config, ["ingest"], progress=False)

    with pytest.raises(SourceError, match="manifest .*nope.csv not found"):
        ingest(tmp_path / "nope.csv")
    (tmp_path / "m.json").write_text("[]")
    with pytest.raises(SourceError, match="expected a .parquet or .csv file"):
        ingest(tmp_path / "m.json")
    (tmp_path / "m.parquet").write_text("not parquet")
    with pytest.raises(SourceError, match="m.parquet: cannot read"):
        ingest(tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text('kind,path\n"gallery,a.png\n')
    with pytest.raises(SourceError, match="m.csv: cannot read"):
        ingest(tmp_path / "m.csv")
