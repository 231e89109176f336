"""Stage `train`: style-initialised prompt tuning on a frozen CLIP (docs/method.md section 3).

    fsr-pipe run train

One unit per trained method of `score.methods` (pipeline/methods: `freestyle`, `vpt`), each
with its own model and loss, on the same data and schedule. Queries of every style from the
training split (text included) are paired with their photo and a random other photo;
symmetric triplet loss, Adam. A seeded share of the
training photos (`train.val_fraction`) is held out for the per-epoch validation Recall@1,
measured before training too (epoch 0 = the untrained prompts). Checkpoints after every epoch
(weights + JSON sidecar); a killed run resumes from the last one. Early stopping after
`train.patience` epochs without a better validation Recall@1; the best epoch is the result.
An image that no longer decodes (it changed after extract read it) is left out and recorded as
the unit's failure, once, even across a resume (docs/datasets.md "Bad inputs").
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pipeline import methods
from pipeline.config import Config, fingerprint_fields, to_dict
from pipeline.records import FailureRecord, MetricRecord, UnitRow, ViewSpec
from pipeline.stage import PipelineError, PlannedUnit, Stage, StageContext, UnitResult

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.training import History, Query


def _concat(paths: list[str], columns: list[str] | None = None) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])


def load_training_data(ctx: StageContext) -> tuple[list[Query], dict[int, str], dict[int, Any]]:
    """Training-split queries, photos (id -> path) and Gram vectors (id -> vector)."""
    import pyarrow.compute as pc

    from pipeline.arrays import arrow_to_vectors
    from pipeline.training import Query

    queries = _concat(ctx.input_paths("prepare", "queries"))
    gallery = _concat(ctx.input_paths("prepare", "gallery"), ["image_id", "path", "split"])
    grams: dict[int, Any] = {}
    for kind, id_name in (("gram_queries", "query_id"), ("gram_gallery", "image_id")):
        table = _concat(ctx.input_paths("extract", kind))
        grams.update(zip(table[id_name].to_pylist(), arrow_to_vectors(table["gram"])))
    photos = {i: p for i, p, s in zip(*(gallery[c].to_pylist() for c in
                                        ("image_id", "path", "split")))
              if s == "train" and i in grams}
    if len(photos) < 4:
        raise PipelineError(
            f"train: {len(photos)} training photos have Gram vectors; need at least 4 (set "
            "extract.gallery = 'train' or 'all', and check data.test_fraction)"
        )
    rows = queries.filter(pc.equal(queries["split"], "train")).to_pylist()
    chosen = [Query(r["query_id"], r["image_id"], r["style"], r["path"], r["text"]) for r in rows
              if r["image_id"] in photos and (r["path"] is None or r["query_id"] in grams)]
    return chosen, photos, grams


def training_classes(ctx: StageContext, photos: dict[int, str],
                     method: str) -> tuple[list[str], dict[int, int]]:
    """The sorted class names of the training photos, and photo id -> index into them (a
    class-aware method's negatives and labels)."""
    gallery = _concat(ctx.input_paths("prepare", "gallery"), ["image_id", "class_label"])
    labels = {i: c for i, c in zip(gallery["image_id"].to_pylist(),
                                   gallery["class_label"].to_pylist()) if i in photos}
    unlabelled = sorted(i for i, c in labels.items() if not c)
    if unlabelled:
        raise PipelineError(
            f"train {method}: {len(unlabelled)} training photos have no class label (e.g. "
            f"image_id {unlabelled[0]}); {method} needs classes: use a source that labels "
            "photos (demo, folder, or a manifest's class_label column), or drop it from "
            "score.methods")
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise PipelineError(f"train {method}: the training photos hold {len(classes)} class; "
                            "class-aware negatives need at least 2")
    index = {name: k for k, name in enumerate(classes)}
    return classes, {i: index[c] for i, c in labels.items()}


class TrainStage(Stage):
    name = "train"
    section = "train"
    needs = ("prepare", "extract", "cluster")
    version = "2"  # 2: epoch 0 loss is NULL (was NaN)
    views = (ViewSpec("train_history", "train", "history",
                      "method VARCHAR, epoch INTEGER, loss DOUBLE, val_recall_at_1 DOUBLE"),)

    def config_values(self, config: Config) -> dict[str, Any]:
        trained = methods.trained(config)
        return {"train": fingerprint_fields(config.train, config.resolve),
                "model": fingerprint_fields(config.model, config.resolve),
                "methods": [m.name for m in trained],
                **{m.section: fingerprint_fields(config.section(m.section), config.resolve)
                   for m in trained if m.section}}

    def notes(self, config: Config) -> str | None:
        if not config.model.pretrained:
            return (f"CLIP {config.model.arch}: seeded random init (model.pretrained is empty); "
                    "set an open_clip pretrained tag or a checkpoint file for real weights")
        return None

    def check(self, config: Config) -> None:
        from pipeline.models.factory import check_model_config

        check_model_config(config)

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return [PlannedUnit(m.name, {}) for m in methods.trained(ctx.config)]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        from pipeline.device import resolve_device
        from pipeline.training import seeded_rng

        with seeded_rng(ctx.config.run.seed, resolve_device(ctx.config.run.device)):
            return self._train(ctx, unit)

    def _train(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        import pyarrow.parquet as pq
        import torch

        from pipeline.arrays import arrow_to_vectors, stable_uniform
        from pipeline.device import grad_scaler, resolve_device
        from pipeline.training import (
            Fit,
            TripletData,
            fit,
            train_epoch,
            triplet_batches,
            validate,
            validation_gallery,
        )

        cfg, seed = ctx.config.train, ctx.config.run.seed
        device = resolve_device(ctx.config.run.device)
        queries, photos, grams = load_training_data(ctx)
        val_photos = {i: p for i, p in photos.items()
                      if stable_uniform(seed, f"val:{i}") < cfg.val_fraction}
        if len(val_photos) < 2 or len(val_photos) > len(photos) - 2:
            raise PipelineError(f"train: {len(val_photos)} of {len(photos)} training photos "
                                "fall in the validation share; adjust train.val_fraction")
        train_photos = {i: p for i, p in photos.items() if i not in val_photos}
        train_queries = [q for q in queries if q.image_id in train_photos]
        val_queries = [q for q in queries if q.image_id in val_photos]
        val_gallery = validation_gallery(val_photos, train_photos, cfg.val_distractors, seed)

        centres = arrow_to_vectors(pq.read_table(ctx.input_path("cluster", "centres"))["centre"])
        method = methods.get(unit.key)
        classes, class_index = None, None
        if method.class_aware:
            classes, class_index = training_classes(ctx, photos, unit.key)
        model, tokenizer = method.build(ctx.config, centres, device,
                                        **({"classes": classes} if classes else {}))
        trainable, frozen = model.parameter_counts()
        ctx.log.info("train %s: %d queries (%d validation, ranked against %d photos), %s "
                     "trainable / %s frozen parameters", unit.key, len(train_queries),
                     len(val_queries), len(val_gallery), f"{trainable:,}", f"{frozen:,}")
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                     lr=cfg.lr)
        scaler = grad_scaler(device, cfg.amp)
        image_size = model.clip_image_size
        max_pixels = ctx.config.data.max_image_pixels
        out = ctx.out_dir / unit.key
        out.mkdir(parents=True, exist_ok=True)

        state = Fit(model, optimizer, scaler, out, to_dict(ctx.config))

        def evaluate() -> dict[str, float]:
            return validate(model, val_queries, val_gallery, grams, tokenizer, image_size,
                            max_pixels, device, cfg.amp, cfg.batch_size, bad=state.bad)

        def run_epoch(epoch: int) -> float:
            data = TripletData(train_queries, train_photos, grams, image_size, max_pixels,
                               seed, epoch, classes=class_index)
            loader = triplet_batches(data, cfg.batch_size, cfg.num_workers,
                                     pin_memory=device.type == "cuda")
            with ctx.progress(f"train {unit.key} epoch {epoch}", len(data)) as advance:
                return train_epoch(model, loader, optimizer, scaler, tokenizer, method.loss,
                                   cfg.margin, device, cfg.amp, advance, bad=state.bad,
                                   step_loss=method.batch_loss)

        history = fit(state, cfg.epochs, cfg.patience, run_epoch, evaluate, ctx.log,
                      name=f"train {unit.key}")
        if history.best_epoch == 0 and len(history.epochs) > 1:
            ctx.log.warning(
                "train %s: no epoch beat the untrained prompts' validation R@1 (%.3f), so "
                "model.pt holds them and the method scores as its untrained prompts; try another "
                "train.lr, more train.epochs, or pretrained weights (model.pretrained)",
                unit.key, history.epochs[0]["val_recall@1"])
        sizes = {"validation_photos": len(val_photos), "validation_gallery": len(val_gallery)}
        used = {"gallery": len(photos), "query": len(queries)}
        return self._result(out, unit.key, model, history, trainable, frozen, sizes, used)

    def _result(self, out, method: str, model, history: History, trainable: int, frozen: int,
                sizes: dict[str, int], used: dict[str, int]) -> UnitResult:
        import pyarrow as pa

        from pipeline.artifacts import atomic_path, describe, write_parquet
        from pipeline.training import checkpoint_paths

        best_weights, best_sidecar = checkpoint_paths(out, history.best_epoch)
        model_path = out / "model.pt"
        with atomic_path(model_path) as tmp:
            shutil.copyfile(best_weights, tmp)
        # The best checkpoint's sidecar holds the history up to that epoch; record all of it.
        meta = {**json.loads(best_sidecar.read_text()), "history": asdict(history),
                "best_epoch": history.best_epoch,
                "trainable_parameters": trainable, "frozen_parameters": frozen}
        with atomic_path(out / "model.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        table = pa.table({
            "method": pa.array([method] * len(history.epochs), pa.string()),
            "epoch": pa.array([e["epoch"] for e in history.epochs], pa.int32()),
            "loss": pa.array([e["loss"] for e in history.epochs], pa.float64()),
            "val_recall_at_1": pa.array([e["val_recall@1"] for e in history.epochs],
                                        pa.float64()),
        })
        metrics = [m for e in history.epochs for m in _epoch_metrics(e)]
        metrics += [MetricRecord("best_epoch", float(history.best_epoch)),
                    MetricRecord("trainable_parameters", float(trainable)),
                    MetricRecord("frozen_parameters", float(frozen))]
        metrics += [MetricRecord(name, float(value)) for name, value in sizes.items()]
        return UnitResult(
            rows=len(history.epochs),
            artifacts=[describe("model", model_path, None),
                       describe("model_meta", out / "model.json", None),
                       describe("history", write_parquet(table, out / "history.parquet"),
                                len(table))],
            metrics=metrics,
            failures=[FailureRecord(*item) for item in history.bad_inputs],
            good={kind: n - sum(item[0] == kind for item in history.bad_inputs)
                  for kind, n in used.items()},
        )


def _epoch_metrics(epoch: dict[str, Any]) -> list[MetricRecord]:
    labels = {"epoch": epoch["epoch"]}
    records = [MetricRecord("val_recall@1", epoch["val_recall@1"], labels)]
    if epoch["loss"] is not None:  # epoch 0 (the untrained prompts) has no training loss
        records.append(MetricRecord("loss", epoch["loss"], labels))
    for name, value in epoch.items():
        if name.startswith("val_recall@1/"):
            records.append(MetricRecord("val_recall@1", value,
                                        {**labels, "style": name.split("/", 1)[1]}))
    return records
