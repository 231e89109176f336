"""Stages train and embed on the tiny demo: results, determinism, kill + resume, early stop,
fingerprints, shard processes, bad inputs; and a real check that training helps (sketchy-mini).

Most tests share one trained work dir (module fixture). Each test runs its own config first,
which is a no-op for finished work but makes that config the current plan (views follow it),
so the tests do not depend on their order. Variants that only one test runs use a setting no
other test uses (e.g. `score.methods = ["freestyle"]` for the shard processes).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import shared_data_dir, start_cli, wait_for, write_tiny_config
from PIL import Image

from pipeline import commands
from pipeline.arrays import arrow_to_vectors, stable_uniform
from pipeline.catalog import Catalog
from pipeline.config import Config, load_config, to_dict
from pipeline.data.images import load_rgb, to_tensor
from pipeline.device import amp_dtype, grad_scaler
from pipeline.models.clip import DEMO_ARCHS
from pipeline.models.factory import build_model
from pipeline.plans import fingerprints
from pipeline.training import (
    History,
    Query,
    decode,
    load_checkpoint,
    optimizer_step,
    save_checkpoint,
    validate,
    validation_gallery,
)
from stages import all_stages

ITEMS = 16  # 4 prepare shards of 4 photos; 16 text + 48 image queries
EPOCHS = 4
BASE = (f"train.epochs={EPOCHS}", "train.patience=10")  # no early stop in the reference run
STAGES = ("ingest", "prepare", "extract", "cluster", "train", "embed")
EMBED_DIM = DEMO_ARCHS["fsr-tiny-vit"]["embed_dim"]


def ran(reports) -> dict[str, int]:
    return {r.stage: r.ran for r in reports}


def nothing_ran(*stages: str, **ran_units: int) -> dict[str, int]:
    return {**dict.fromkeys(stages or STAGES, 0), **ran_units}


def train_dir(config: Config) -> Path:
    """The freestyle train unit's folder (work_dir/train/<fingerprint>/freestyle)."""
    return config.work_dir / "train" / fingerprints(all_stages(), config)["train"] / "freestyle"


def history(config: Config) -> list[tuple[int, float, float]]:
    """(epoch, loss, validation R@1) per epoch, from the run's history artifact."""
    table = pq.read_table(train_dir(config) / "history.parquet")
    return list(zip(*(table[c].to_pylist() for c in ("epoch", "loss", "val_recall_at_1"))))


def assert_same_history(got: list[tuple], expected: list[tuple]) -> None:
    # Exact: same seed, same batches, same float ops; the epoch 0 loss (None) compares as NaN.
    np.testing.assert_array_equal(np.array(got, dtype=np.float64),
                                  np.array(expected, dtype=np.float64))


def trained_state(config: Config, name: str = "model.pt") -> dict[str, torch.Tensor]:
    """Trainable tensors of model.pt (the best epoch) or of a checkpoint file."""
    return torch.load(train_dir(config) / name, map_location="cpu", weights_only=False)["model"]


def last_state(config: Config) -> dict[str, torch.Tensor]:
    # The tiny demo's validation R@1 may never beat epoch 0, so model.pt can be the untrained
    # prompts; the last checkpoint always holds trained tensors.
    return trained_state(config, f"epoch-{EPOCHS:03d}.pt")


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    differ = [name for name in got if not torch.equal(got[name], expected[name])]
    assert not differ, f"trainable tensors differ: {differ}"


def set_args(overrides) -> list[str]:
    return [arg for text in overrides for arg in ("--set", text)]


def test_validation_gallery_adds_seeded_distractors():
    held_out = {1: "a", 2: "b"}
    others = {i: f"p{i}" for i in range(10, 30)}
    gallery = validation_gallery(held_out, others, 5, seed=0)
    assert len(gallery) == 7 and held_out.items() <= gallery.items()
    assert gallery.items() - held_out.items() <= others.items()
    assert validation_gallery(held_out, others, 5, seed=0) == gallery
    assert validation_gallery(held_out, others, 0, seed=0) == held_out
    assert validation_gallery(held_out, others, 100, seed=0) == {**held_out, **others}
    # A smaller budget keeps a subset of a larger one's choice; another seed chooses others.
    assert validation_gallery(held_out, others, 3, seed=0).items() <= gallery.items()
    assert validation_gallery(held_out, others, 5, seed=1) != gallery


class GramAsEmbedding(torch.nn.Module):
    """A stand-in model whose image embedding is the image's Gram vector."""

    def encode_image(self, pixels: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        return gram


def image_file(path: Path) -> str:
    """A small valid PNG at `path` (its pixels do not matter to GramAsEmbedding)."""
    Image.new("RGB", (8, 8), (120, 60, 30)).save(path)
    return str(path)


def test_validation_ranks_queries_against_the_distractors_too(tmp_path):
    # Query 100 targets photo 1; distractor 9 looks more like the query than photo 1 does.
    grams = {1: np.array([0.8, 0.6]), 2: np.array([0.0, 1.0]), 9: np.array([1.0, 0.0]),
             100: np.array([1.0, 0.0])}
    queries = [Query(100, 1, "art", image_file(tmp_path / "q100.png"), None)]

    def recall(photos: dict[int, str]) -> float:
        return validate(GramAsEmbedding(), queries, photos, grams, tokenize=None, image_size=8,
                        max_pixels=10**6, device=torch.device("cpu"), amp="off",
                        batch_size=4)["val_recall@1"]

    p1, p2, p9 = (image_file(tmp_path / f"p{i}.png") for i in (1, 2, 9))
    assert recall({1: p1, 2: p2}) == 1.0
    assert recall({1: p1, 2: p2, 9: p9}) == 0.0


def test_validation_leaves_out_images_that_do_not_decode(tmp_path):
    grams = {1: np.array([1.0, 0.0]), 2: np.array([0.0, 1.0]), 3: np.array([0.6, 0.8]),
             100: np.array([1.0, 0.0]), 101: np.array([0.0, 1.0]), 102: np.array([0.6, 0.8])}
    photos = {i: image_file(tmp_path / f"p{i}.png") for i in (1, 2)}
    photos[3] = str(tmp_path / "gone.png")  # broken photo: it and its query are left out
    broken_query = tmp_path / "q101.png"
    broken_query.write_bytes(b"not an image")
    queries = [Query(100, 1, "art", image_file(tmp_path / "q100.png"), None),
               Query(101, 2, "art", str(broken_query), None),
               Query(102, 3, "art", image_file(tmp_path / "q102.png"), None)]
    bad: list[list] = []
    result = validate(GramAsEmbedding(), queries, photos, grams, tokenize=None, image_size=8,
                      max_pixels=10**6, device=torch.device("cpu"), amp="off", batch_size=2,
                      bad=bad)
    assert result == {"val_recall@1/art": 1.0, "val_recall@1": 1.0}  # query 100 alone
    assert [(kind, item_id, path) for kind, item_id, path, _ in bad] == [
        ("gallery", 3, photos[3]), ("query", 101, str(broken_query))]
    assert bad[0][3].startswith("missing") and bad[1][3].startswith("corrupt"), bad


def test_mixed_precision_dtype_per_device_and_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert [amp_dtype(cpu, amp) for amp in ("auto", "bf16", "fp16", "off")] == [None] * 4
    assert amp_dtype(cuda, "bf16") == torch.bfloat16 and amp_dtype(cuda, "fp16") == torch.float16
    assert amp_dtype(cuda, "off") is None
    assert not grad_scaler(cpu, "fp16").is_enabled()  # CPU trains in fp32: nothing to scale


def _sgd_layer() -> tuple[torch.nn.Linear, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    return layer, torch.optim.SGD(layer.parameters(), lr=0.1), torch.randn(8, 4)


def test_loss_scaler_steps_on_unscaled_gradients_and_skips_overflow():
    # SGD moves by lr * gradient: a step on the scaled gradient would move 4096 times as far.
    layer, optimizer, x = _sgd_layer()
    start = layer.weight.detach().clone()
    optimizer_step(layer(x).square().mean(), optimizer, torch.amp.GradScaler("cpu", enabled=False))
    plain = layer.weight.detach().clone()
    assert not torch.equal(plain, start)

    layer, optimizer, x = _sgd_layer()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    optimizer_step(layer(x).square().mean(), optimizer, scaler)
    torch.testing.assert_close(layer.weight.detach(), plain)
    # fp16 overflow shows as inf gradients: that step is skipped and the scale halves
    optimizer_step(layer(x).square().mean() * float("inf"), optimizer, scaler)
    torch.testing.assert_close(layer.weight.detach(), plain)
    assert scaler.get_scale() == 2.0**11


class _Trainable(torch.nn.Linear):
    """The two methods checkpoints use, on a plain layer."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


def test_checkpoint_keeps_the_loss_scale(tmp_path):
    def checkpoint(epoch: int, scaler: torch.amp.GradScaler) -> None:
        layer = _Trainable(4, 1)
        save_checkpoint(tmp_path, epoch, layer, torch.optim.SGD(layer.parameters(), lr=0.1),
                        scaler, History(), {})

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    layer, optimizer, x = _sgd_layer()
    for _ in range(3):  # three overflowed steps halve the scale three times
        optimizer_step(layer(x).sum() * float("inf"), optimizer, scaler)
    checkpoint(1, scaler)
    checkpoint(2, torch.amp.GradScaler("cpu", enabled=False))  # a CPU / bf16 run's checkpoint

    def resumed(epoch: int) -> float:
        layer, fresh = _Trainable(4, 1), torch.amp.GradScaler("cpu", init_scale=2.0**16)
        load_checkpoint(tmp_path, epoch, layer, torch.optim.SGD(layer.parameters(), lr=0.1),
                        fresh)
        return fresh.get_scale()

    assert resumed(1) == 2.0**9
    assert resumed(2) == 2.0**16  # resumed under fp16: starts from the default scale


def test_checkpoint_keeps_the_bad_inputs_met_so_far(tmp_path):
    history = History()
    assert history.add_bad_inputs([["gallery", 3, "p3.png", "corrupt"],
                                   ["gallery", 3, "p3.png", "corrupt"]]) == [
        ["gallery", 3, "p3.png", "corrupt"]]  # once per item
    assert history.add_bad_inputs([["gallery", 3, "p3.png", "corrupt"],
                                   ["query", 3, "q3.png", "missing"]]) == [
        ["query", 3, "q3.png", "missing"]]  # a query and a photo may share an id
    layer = _Trainable(4, 1)
    save_checkpoint(tmp_path, 1, layer, torch.optim.SGD(layer.parameters(), lr=0.1),
                    torch.amp.GradScaler("cpu", enabled=False), history, {})
    resumed = load_checkpoint(tmp_path, 1, _Trainable(4, 1))
    assert resumed.bad_inputs == [["gallery", 3, "p3.png", "corrupt"],
                                  ["query", 3, "q3.png", "missing"]]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A tiny demo run through embed with BASE (the reference for several tests)."""
    directory = tmp_path_factory.mktemp("shared")
    path = write_tiny_config(directory, directory / "run", items=ITEMS)
    commands.run(all_stages, load_config(path, BASE), ["embed"], progress=False)
    return path


def test_train_and_embed_end_to_end(shared):
    config = load_config(shared, BASE)
    assert ran(commands.run(all_stages, config, ["embed"], progress=False)) == nothing_ran()
    catalog = Catalog.in_dir(config.work_dir)

    rows = catalog.rows("SELECT epoch, loss, val_recall_at_1 FROM train_history ORDER BY epoch")
    assert [r[0] for r in rows] == list(range(EPOCHS + 1))
    assert rows[0][1] is None, "epoch 0 is the untrained model: no loss"
    assert all(math.isfinite(loss) and loss > 0 for _, loss, _ in rows[1:])
    assert all(0.0 <= recall <= 1.0 for _, _, recall in rows)
    assert_same_history(rows, history(config))

    def metric(name: str) -> list[tuple]:
        return catalog.rows("SELECT value, labels_json FROM current_metrics "
                            "WHERE stage = 'train' AND name = ? ORDER BY labels_json", [name])

    per_style: dict[str, list[int]] = {}
    for _, labels in metric("val_recall@1"):
        labels = json.loads(labels)
        if "style" in labels:
            per_style.setdefault(labels["style"], []).append(labels["epoch"])
    assert set(per_style) == {"sketch", "art", "lowres", "text"}
    assert all(sorted(e) == list(range(EPOCHS + 1)) for e in per_style.values())
    (trainable, _), = metric("trainable_parameters")
    (frozen, _), = metric("frozen_parameters")
    (best_epoch, _), = metric("best_epoch")
    recalls = [r[2] for r in rows]
    assert best_epoch == recalls.index(max(recalls))  # the first epoch with the best R@1
    assert 0 < trainable < frozen
    # Validation ranks the held-out photos' queries against every training-split photo (the
    # default train.val_distractors exceeds them), as score's gallery protocol does.
    (held_out, _), = metric("validation_photos")
    (val_gallery, _), = metric("validation_gallery")
    (train_photos,), = catalog.rows("SELECT count(*) FROM gallery WHERE split = 'train'")
    assert 2 <= held_out < val_gallery == train_photos

    kinds = dict(catalog.rows(
        "SELECT kind, path FROM artifacts JOIN stages USING (stage, fingerprint) "
        "WHERE stage = 'train'"))
    assert set(kinds) == {"model", "model_meta", "history"}
    assert Path(kinds["model"]) == train_dir(config) / "model.pt"
    state = trained_state(config)
    assert sum(t.numel() for t in state.values()) == trainable
    meta = json.loads(Path(kinds["model_meta"]).read_text())
    assert meta["config"] == json.loads(json.dumps(to_dict(config), default=str))
    assert meta["best_epoch"] == best_epoch
    assert (meta["trainable_parameters"], meta["frozen_parameters"]) == (trainable, frozen)
    meta_rows = [(e["epoch"], e["loss"], e["val_recall@1"]) for e in meta["history"]["epochs"]]
    assert_same_history(meta_rows, rows)  # the whole run, not only up to the best epoch

    gallery_ids = [r[0] for r in catalog.rows("SELECT image_id FROM gallery ORDER BY image_id")]
    assert len(gallery_ids) == ITEMS
    prompted = catalog.query("SELECT * FROM gallery_embeddings ORDER BY image_id")
    baseline = catalog.query("SELECT * FROM baseline_embeddings ORDER BY image_id")
    assert prompted["image_id"].to_pylist() == gallery_ids == baseline["image_id"].to_pylist()
    x, b = arrow_to_vectors(prompted["embedding"]), arrow_to_vectors(baseline["embedding"])
    assert x.shape == b.shape == (ITEMS, EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.abs(x - b).max() > 1e-2, "prompted and plain CLIP embeddings are the same"

    # float16 storage: only embed re-runs; half floats on disk, read back through the view.
    half = load_config(shared, [*BASE, "embed.dtype=float16"])
    assert ran(commands.run(all_stages, half, ["embed"], progress=False)) == nothing_ran(embed=4)
    for (path,) in catalog.rows("SELECT path FROM artifacts JOIN stages USING (stage, "
                                "fingerprint) WHERE stage = 'embed'"):
        assert pq.read_schema(path).field("embedding").type.value_type == pa.float16()
    x16 = arrow_to_vectors(catalog.query(
        "SELECT embedding FROM gallery_embeddings ORDER BY image_id")["embedding"])
    assert x16.shape == x.shape
    np.testing.assert_allclose(x16, x, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(x16, axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("device,amp", [
    ("cpu", "off"),
    pytest.param("cuda", "bf16", marks=pytest.mark.gpu),
    pytest.param("cuda", "fp16", marks=pytest.mark.gpu),  # the GradScaler path
])
def test_train_embed_score_on_the_device_match_fp32_cpu(tmp_path, device, amp):
    """The stages' device paths (autocast, loss scaling, pinned non-blocking copies) end to end:
    training moves the prompts with finite losses, and the gallery embeddings embed wrote equal
    an fp32 CPU encode of the same trained weights."""
    # lr 0.01: validation improves after epoch 0 here, so model.pt (what embed uses) is trained
    overrides = [*BASE, "train.lr=0.01", f"run.device={device}",
                 *(f"{stage}.amp={amp}" for stage in ("train", "embed", "score"))]
    config = load_config(write_tiny_config(tmp_path, tmp_path / "run", items=ITEMS), overrides)
    commands.run(all_stages, config, ["score"], progress=False)
    catalog = Catalog.in_dir(config.work_dir)

    losses = [loss for _, loss, _ in history(config)[1:]]
    assert len(losses) == EPOCHS and all(math.isfinite(x) and x > 0 for x in losses), losses
    centres = arrow_to_vectors(catalog.query("SELECT centre FROM style_centres "
                                             "ORDER BY cluster")["centre"])
    model, _ = build_model(config, centres, torch.device("cpu"))
    untrained = model.trainable_state_dict()
    moved = [k for k, t in last_state(config).items() if not torch.equal(t, untrained[k])]
    assert moved, "no trainable tensor changed in training"

    model.load_trainable_state_dict(trained_state(config))
    model.eval()
    rows = catalog.rows("SELECT image_id, path FROM gallery ORDER BY image_id")
    pixels = torch.stack([decode(path, config.extract.image_size, config.data.max_image_pixels)
                          for _, path in rows])
    with torch.inference_mode():
        reference = model.encode_image(pixels).numpy()
    stored = catalog.query("SELECT image_id, embedding FROM gallery_embeddings ORDER BY image_id")
    assert stored["image_id"].to_pylist() == [i for i, _ in rows]
    cosine = np.sum(arrow_to_vectors(stored["embedding"]) * reference, axis=1)
    assert cosine.min() > (1 - 1e-5 if amp == "off" else 0.99), cosine.min()

    (n_queries,), = catalog.rows("SELECT count(*) FROM queries WHERE split = 'test'")
    scored = catalog.rows("SELECT method, count(*) FROM retrieval_metrics WHERE metric = "
                          "'recall' AND k = 1 AND protocol = 'gallery' AND fusion = 'none' "
                          "AND value BETWEEN 0 AND 1 GROUP BY method ORDER BY method")
    assert n_queries > 0 and scored == [("baseline", 4), ("freestyle", 4)], scored


@pytest.mark.slow
def test_training_is_deterministic(shared, tmp_path):
    reference = load_config(shared, BASE)
    fresh = load_config(write_tiny_config(tmp_path, tmp_path / "run", items=ITEMS), BASE)
    commands.run(all_stages, fresh, ["train"], progress=False)
    assert_same_history(history(fresh), history(reference))
    assert_same_state(trained_state(fresh), trained_state(reference))
    assert_same_state(last_state(fresh), last_state(reference))
    # Byte for byte too (the RNG state it stores, the archive name inside): the two runs drew
    # different amounts from torch's global RNG before training, in this one process.
    same = (train_dir(fresh) / "model.pt").read_bytes() == (
        train_dir(reference) / "model.pt").read_bytes()
    assert same, "identical runs wrote different model.pt files"


@pytest.mark.slow
def test_train_resumes_after_sigkill(shared, tmp_path):
    config_path = write_tiny_config(tmp_path, tmp_path / "run", items=ITEMS)
    config = load_config(config_path, BASE)
    out = train_dir(config)
    proc = start_cli(config_path, "run", "train", *set_args(BASE))
    wait_for(lambda: (out / "epoch-002.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.pt").exists(), "the run finished before it was killed"

    proc = start_cli(config_path, "run", "train", *set_args(BASE))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    resumed = re.search(r"train freestyle: resuming after epoch (\d+)", output)
    assert resumed and int(resumed.group(1)) >= 2, output
    # Same batches (seeded per epoch), optimizer state restored: the same run exactly.
    reference = load_config(shared, BASE)
    assert_same_history(history(config), history(reference))
    assert_same_state(trained_state(config), trained_state(reference))
    assert_same_state(last_state(config), last_state(reference))
    assert not list(config.work_dir.rglob("*.tmp.*")), "temporary files were left behind"
    best = json.loads((out / "model.json").read_text())["best_epoch"]
    left = {p.name for p in out.glob("epoch-*")}
    assert left == {f"epoch-{e:03d}.{ext}" for e in {best, EPOCHS} for ext in ("pt", "json")}


def test_early_stopping(shared, caplog):
    # A learning rate this small cannot change any ranking: no epoch beats epoch 0.
    config = load_config(shared, [*BASE, "train.lr=1e-9", "train.patience=1"])
    with caplog.at_level(logging.INFO, logger="stages.train"):
        reports = commands.run(all_stages, config, ["train"], progress=False)
    assert ran(reports) == nothing_ran(*STAGES[:5], train=1)
    epochs = [e for e, _, _ in history(config)]
    assert epochs in ([0, 1], [0, 1, 2]) and len(epochs) < EPOCHS + 1
    assert "early stop" in caplog.text
    assert json.loads((train_dir(config) / "model.json").read_text())["best_epoch"] == 0
    warned = [r for r in caplog.records if r.levelno == logging.WARNING
              and "no epoch beat the untrained prompts" in r.getMessage()]
    assert len(warned) == 1, caplog.text


def test_fingerprints_rerun_only_what_changed(shared):
    commands.run(all_stages, load_config(shared, BASE), ["embed"], progress=False)
    tokens = [*BASE, "model.n_tokens=2"]

    def run(*overrides: str) -> dict[str, int]:
        return ran(commands.run(all_stages, load_config(shared, [*tokens, *overrides]), ["embed"],
                                progress=False))

    assert run() == nothing_ran(train=1, embed=4)
    assert run("embed.batch_size=3") == nothing_ran()
    assert run("embed.dtype=float16") == nothing_ran(embed=4)
    state = trained_state(load_config(shared, tokens))
    generator = next(t for name, t in state.items() if name.startswith("generators."))
    assert generator.shape[0] == 2 * 64  # n_tokens * ViT width: the model really changed


@pytest.mark.slow
def test_embed_shard_processes_all_land(shared):
    overrides = [*BASE, 'score.methods=["freestyle"]']  # an embed plan no other test runs
    config = load_config(shared, overrides)
    assert ran(commands.run(all_stages,
                            config, ["train"], progress=False)) == nothing_ran(*STAGES[:5])
    catalog = Catalog.in_dir(config.work_dir)
    shards = catalog.rows("SELECT count(*) FROM current_units WHERE stage = 'prepare'")[0][0]
    commands.run(all_stages, config, ["embed"], plan_only=True, progress=False)
    procs = [start_cli(shared, "stage", "embed", "--shard", str(i), *set_args(overrides))
             for i in range(shards)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * shards, outputs
    assert {s.stage: s for s in commands.status(all_stages, config)}["embed"].ingested == shards
    assert catalog.rows("SELECT count(*), sum(rows) FROM units WHERE stage = 'embed' AND "
                        "status = 'done' AND fingerprint = ?",
                        [fingerprints(all_stages(), config)["embed"]]) == [(shards, ITEMS)]
    assert ran(commands.run(all_stages, config, ["embed"], progress=False)) == nothing_ran()
    assert catalog.rows("SELECT count(DISTINCT image_id) FROM gallery_embeddings") == [(ITEMS,)]
    assert catalog.rows("SELECT count(*) FROM baseline_embeddings") == [(0,)]


def test_corrupt_gallery_photo_is_recorded_at_embed(shared):
    overrides = [*BASE, "embed.dtype=float16", 'score.methods=["freestyle"]',
                 "data.max_failure_ratio=1.0"]  # 1 of 16 is over the default 5%
    config = load_config(shared, overrides)
    assert ran(commands.run(all_stages,
                            config, ["train"], progress=False)) == nothing_ran(*STAGES[:5])
    catalog = Catalog.in_dir(config.work_dir)
    image_id, path = catalog.rows("SELECT image_id, path FROM gallery ORDER BY image_id")[3]
    photo = Path(path)
    original = photo.read_bytes()
    try:
        photo.write_bytes((b"not an image " * len(original))[:len(original)])
        assert ran(commands.run(all_stages,
                                config, ["embed"], progress=False)) == nothing_ran(embed=4)
    finally:
        photo.write_bytes(original)  # the other tests embed this photo too
    failures = catalog.rows(
        "SELECT item_kind, item_id, path, reason FROM item_failures "
        "JOIN stages USING (stage, fingerprint) WHERE stage = 'embed'")
    assert len(failures) == 1, failures
    kind, item_id, failed_path, reason = failures[0]
    assert (kind, item_id, failed_path) == ("gallery", image_id, path)
    assert reason.startswith("corrupt"), reason
    embedded = {r[0] for r in catalog.rows("SELECT image_id FROM gallery_embeddings")}
    all_ids = {r[0] for r in catalog.rows("SELECT image_id FROM gallery")}
    assert embedded == all_ids - {image_id}


def test_images_broken_after_extract_are_recorded_by_train(shared, caplog):
    # A training photo and a sketch that break after extract read them: train records each
    # once (not once per epoch), trains on the other triplets, and embed does not record the
    # photo again.
    overrides = [*BASE, "train.epochs=2", "train.margin=0.9", 'score.methods=["freestyle"]',
                 "train.num_workers=1",  # failures come back from a DataLoader worker
                 "data.max_failure_ratio=1.0"]  # 1 of 16 photos is over the default 5%
    config = load_config(shared, overrides)
    assert ran(commands.run(all_stages,
                            config, ["cluster"], progress=False)) == nothing_ran(*STAGES[:4])
    catalog = Catalog.in_dir(config.work_dir)
    photos = catalog.rows("SELECT image_id, path FROM gallery WHERE split = 'train' "
                          "ORDER BY image_id")
    photo_id, photo_path = photos[0]
    sketch_id, sketch_path = catalog.rows(
        "SELECT query_id, path FROM queries WHERE style = 'sketch' AND image_id = ?",
        [photos[1][0]])[0]
    originals = {Path(p): Path(p).read_bytes() for p in (photo_path, sketch_path)}
    try:
        for path, data in originals.items():
            path.write_bytes((b"not an image " * len(data))[:len(data)])
        with caplog.at_level(logging.WARNING, logger="stages.train"):
            reports = commands.run(all_stages, config, ["embed"], progress=False)
    finally:
        for path, data in originals.items():
            path.write_bytes(data)  # the other tests use these files too
    assert ran(reports) == nothing_ran(*STAGES[:4], train=1, embed=4)
    failures = catalog.rows(
        "SELECT stage, item_kind, item_id, path, reason FROM item_failures "
        "JOIN stages USING (stage, fingerprint) ORDER BY stage, item_kind")
    assert [f[:4] for f in failures] == [("train", "gallery", photo_id, photo_path),
                                         ("train", "query", sketch_id, sketch_path)]
    assert all(f[4].startswith("corrupt") for f in failures), failures
    warned = [r.getMessage() for r in caplog.records if "is a bad input now" in r.getMessage()]
    assert len(warned) == 2, warned
    rows = history(config)
    assert [e for e, _, _ in rows] == [0, 1, 2]
    assert all(math.isfinite(loss) for _, loss, _ in rows[1:])
    embedded = {r[0] for r in catalog.rows("SELECT image_id FROM gallery_embeddings")}
    all_ids = {r[0] for r in catalog.rows("SELECT image_id FROM gallery")}
    assert embedded == all_ids - {photo_id}


# -- real data: does training help? -------------------------------------------------------

SKETCHY_CLASSES = 15
SKETCHES_PER_PHOTO = 2  # of ~5; extraction at 224 px is most of this test's time
VGG_WEIGHTS = "vgg19/vgg19_conv1_1-conv3_4_adain_layout.pth"

SKETCHY_CONFIG = """
[run]
work_dir = "run"
device = "cpu"

[data]
source = "manifest"
path = "manifest.csv"
shard_size = 1000

[extract]
vgg_weights = "{weights}"
image_size = 224
batch_size = 16
num_workers = 0

[cluster]
k = 2

[model]
arch = "{arch}"
pretrained = "{pretrained}"

[train]
lr = {lr}
batch_size = 8
epochs = {epochs}
patience = 6
val_fraction = 0.15
num_workers = 0
"""
# FSR_TEST_CLIP=ARCH:PRETRAINED (an open_clip architecture and a checkpoint file or tag, e.g.
# "ViT-B-32:/data/clip/vit-b-32-laion2b.bin") runs the sketchy-mini test on real CLIP weights,
# the paper's setting; without it that test skips. No weights can be fetched here.
PRETRAINED_ENV = "FSR_TEST_CLIP"


def sketchy_manifest(root: Path, path: Path) -> None:
    """Photos that have sketches (gallery) and their sketches (queries) from the first
    SKETCHY_CLASSES classes; the 30% of photos with the smallest seeded hash are the test split."""
    photos: list[tuple[str, Path, list[Path]]] = []
    for folder in sorted((root / "sketch").iterdir())[:SKETCHY_CLASSES]:
        by_photo: dict[str, list[Path]] = {}
        for sketch in sorted(folder.glob("*.png")):
            by_photo.setdefault(sketch.stem.rsplit("-", 1)[0], []).append(sketch)
        photos += [(f"{folder.name}/{photo_id}", root / "photo" / folder.name / f"{photo_id}.jpg",
                    sketches) for photo_id, sketches in sorted(by_photo.items())]
    ranked = sorted(photos, key=lambda p: stable_uniform(0, f"split:{p[0]}"))
    test = {key for key, _, _ in ranked[:round(0.3 * len(ranked))]}
    rows = []
    for key, photo, sketches in photos:
        rows.append({"kind": "gallery", "key": key, "path": photo, "class_label": key.split("/")[0],
                     "split": "test" if key in test else "train"})
        rows += [{"kind": "query", "path": s, "style": "sketch", "target": key}
                 for s in sketches[:SKETCHES_PER_PHOTO]]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["kind", "key", "path", "style", "target", "split",
                                         "class_label"])
        writer.writeheader()
        writer.writerows(rows)


def sketch_recall_at_1(model, sketches: list[tuple[int, str]], photos: list[tuple[int, str]],
                       grams: dict[str, torch.Tensor]) -> float:
    """Sketch -> photo Recall@1 over `photos`, images encoded at 224 px."""
    def encode(paths: list[str]) -> np.ndarray:
        pixels = torch.stack([to_tensor(load_rgb(p, 10**8), 224) for p in paths])
        with torch.inference_mode():
            return model.encode_image(pixels, torch.stack([grams[p] for p in paths])).numpy()

    gallery_ids = np.array([i for i, _ in photos])
    best = np.argmax(encode([p for _, p in sketches]) @ encode([p for _, p in photos]).T, axis=1)
    return float(np.mean(gallery_ids[best] == np.array([i for i, _ in sketches])))


# An offline stand-in for a pretrained CLIP was tried too (2026-11-23): contrastive training of
# the whole tiny ViT from scratch on the other 110 sketchy-mini classes (sketch <-> its photo,
# and photo <-> the project's generated sketch of it; lr 1e-4..1e-3, logit scale 10..14, up to
# 20 epochs) sits at the collapsed InfoNCE loss ln(batch) from the first epoch, while the same
# loop on photo <-> flipped photo learns at once. So no cheap offline CLIP rescues this test.
# Where the signal is (2026-11-23, this test's split: 21 test photos, chance 0.048): centring the
# untrained model's sketch and photo embeddings finds no photo (test R@1 0.0); centred Gram
# vectors alone reach 0.15 on test but 0.05 on train (chance 0.021); 200 Adam steps (lr 1e-2)
# on cached tensors de-collapse the sketches (pairwise cosine 0.9996 -> 0.44) yet train R@1 stays
# at chance. docs/benchmarks.md ("What prompt training adds") has the demo's per-style picture.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "random-init fsr-tiny-vit maps all sketches to nearly one embedding (mean pairwise cosine "
    "0.9996; photos 0.88): the triplet loss stays at the margin, validation R@1 never beats "
    "epoch 0, so model.pt is the untrained prompts (test R@1 0.05 both). Tried lr 1e-3..1e-1, "
    "up to 40 epochs, batch 4..16, cluster.temperature 0.05, 8 tokens / all-deep prompts. "
    "Needs a pretrained CLIP; strict: an XPASS means it works now, drop this mark"))
def test_training_improves_sketch_retrieval_on_sketchy_mini(tmp_path):
    """Real sketches and photos, real VGG Gram features, the random demo ViT: after a few
    epochs the trained prompts must retrieve held-out photos from their sketches better than
    the untrained ones."""
    untrained, trained, config = sketchy_mini_gain(tmp_path, "fsr-tiny-vit", "", lr=0.01,
                                                   epochs=6)
    assert trained > untrained, (untrained, trained, history(config))


@pytest.mark.slow
def test_training_improves_sketch_retrieval_with_pretrained_clip(tmp_path):
    """The same on a pretrained CLIP (FSR_TEST_CLIP), at the paper's learning rate."""
    arch, _, pretrained = os.environ.get(PRETRAINED_ENV, "").partition(":")
    if not (arch and pretrained):
        pytest.skip(f"needs pretrained CLIP weights: set {PRETRAINED_ENV}=ARCH:CHECKPOINT "
                    "(e.g. ViT-B-32:/path/to/open_clip_model.bin); none can be downloaded here")
    untrained, trained, config = sketchy_mini_gain(tmp_path, arch, pretrained, lr=1e-5,
                                                   epochs=3)
    assert trained > untrained, (untrained, trained, history(config))


def sketchy_mini_gain(tmp_path: Path, arch: str, pretrained: str, lr: float,
                      epochs: int) -> tuple[float, float, Config]:
    """Train on sketchy-mini's train split (skips when the shared data is absent); return the
    test split's sketch -> photo Recall@1 before and after, and the config."""
    data = shared_data_dir()
    root, weights = data / "sketchy-mini", data / VGG_WEIGHTS
    if not root.is_dir() or not weights.is_file():
        pytest.skip(f"needs {root} and {weights} (shared test data, not in the project)")
    sketchy_manifest(root, tmp_path / "manifest.csv")
    (tmp_path / "pipeline.toml").write_text(SKETCHY_CONFIG.format(
        weights=weights, arch=arch, pretrained=pretrained, lr=lr, epochs=epochs))
    config = load_config(tmp_path / "pipeline.toml")
    commands.run(all_stages, config, ["train"], progress=False)

    catalog = Catalog.in_dir(config.work_dir)
    photos = catalog.rows("SELECT image_id, path FROM gallery WHERE split = 'test' "
                          "ORDER BY image_id")
    sketches = catalog.rows("SELECT image_id, path FROM queries WHERE split = 'test' "
                            "ORDER BY query_id")
    centres = arrow_to_vectors(catalog.query("SELECT centre FROM style_centres "
                                             "ORDER BY cluster")["centre"])
    model, _ = build_model(config, centres, torch.device("cpu"))  # epoch 0: untrained prompts
    model.eval()
    # The Gram path is frozen and shared by both models: compute it once (what encode_image
    # computes when given no Gram vector).
    paths = [p for _, p in photos + sketches]
    with torch.inference_mode():
        grams = dict(zip(paths, model.gram_encoder(
            torch.stack([to_tensor(load_rgb(p, 10**8), 224) for p in paths]))))
    untrained = sketch_recall_at_1(model, sketches, photos, grams)
    model.load_trainable_state_dict(trained_state(config))
    trained = sketch_recall_at_1(model, sketches, photos, grams)
    print(f"sketchy-mini test split ({arch}): {len(sketches)} sketches, {len(photos)} photos; "
          f"R@1 untrained {untrained:.3f}, trained {trained:.3f}; history {history(config)}")
    return untrained, trained, config



def test_fit_checkpoints_stops_early_and_resumes(tmp_path, caplog):
    """training.fit on a toy model: epoch 0 is the untrained score, early stop after
    `patience` epochs without a better one, the latest and best checkpoints kept, a second
    call resumes after the last checkpoint, bad inputs recorded once."""
    import logging

    from pipeline.training import Fit, fit, latest_checkpoint

    class Toy(torch.nn.Linear):  # the checkpoint interface of FreestyleRet
        def trainable_state_dict(self):  # noqa: ANN202
            return {k: v.detach().clone() for k, v in self.state_dict().items()}

        def load_trainable_state_dict(self, state):  # noqa: ANN001, ANN202
            self.load_state_dict(state)

    def state(out):  # noqa: ANN001, ANN202
        torch.manual_seed(0)
        model = Toy(2, 1)
        return Fit(model, torch.optim.Adam(model.parameters(), lr=0.1),
                   grad_scaler(torch.device("cpu"), "off"), out, {"run": {}})

    scores = {0: 0.1, 1: 0.5, 2: 0.4, 3: 0.3, 4: 0.9}
    ran: list[int] = []
    s = state(tmp_path / "a")
    s.out.mkdir()

    def run_epoch(epoch: int) -> float:
        ran.append(epoch)
        s.bad.append(["gallery", 7, "/x.png", "corrupt"])  # met every epoch, recorded once
        return 1.0 / epoch

    log = logging.getLogger("test.fit")
    with caplog.at_level(logging.INFO, logger="test.fit"):
        history = fit(s, 10, 2, run_epoch, lambda: {"val_recall@1": scores[len(ran)]}, log)
    assert ran == [1, 2, 3] and [e["epoch"] for e in history.epochs] == [0, 1, 2, 3]
    assert history.best_epoch == 1 and history.bad_epochs == 2
    assert history.epochs[0]["loss"] is None and history.bad_inputs == [
        ["gallery", 7, "/x.png", "corrupt"]]
    assert sorted(p.name for p in s.out.glob("epoch-*.json")) == ["epoch-001.json",
                                                                   "epoch-003.json"]
    assert "train: early stop, no better validation R@1 for 2 epochs" in caplog.text
    # A second call resumes after epoch 3: already stopped, nothing runs.
    again = fit(state(s.out), 10, 2, run_epoch, lambda: {"val_recall@1": 1.0}, log)
    assert ran == [1, 2, 3] and again.epochs == history.epochs
    # Stopped after epoch 2 of 4, then resumed: the same history as one call to epoch 4.
    ran.clear()
    whole = state(tmp_path / "b")
    whole.out.mkdir()
    s = whole
    one = fit(whole, 4, 10, run_epoch, lambda: {"val_recall@1": scores[len(ran)]}, log)
    ran.clear()
    s = state(tmp_path / "c")
    s.out.mkdir()
    fit(s, 2, 10, run_epoch, lambda: {"val_recall@1": scores[len(ran)]}, log)
    assert latest_checkpoint(s.out) == 2
    s = state(s.out)
    two = fit(s, 4, 10, run_epoch, lambda: {"val_recall@1": scores[len(ran)]}, log)
    assert ran == [1, 2, 3, 4] and two.epochs == one.epochs and two.best_epoch == 4
