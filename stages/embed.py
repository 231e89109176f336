"""Stage `embed`: gallery embeddings from the trained prompted encoder, sharded (docs/method.md 4).

    fsr-pipe stage embed --shard 3

Each shard's photos are decoded in DataLoader workers and go through every method of
`score.methods` (pipeline/methods: the trained prompted encoder, the same as the queries', its
untrained prompts, the plain CLIP, VPT), L2-normalised, and are written as (image_id, embedding),
one file per method. The VGG Gram path runs once per batch for the methods that read it.
Photos `extract` (or `train`) recorded as bad inputs are skipped, not decoded and recorded
again. On CUDA: autocast, pinned memory, non-blocking copies; memory stays at one batch plus
one shard's embeddings.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pipeline import methods
from pipeline.config import Config, fingerprint_fields
from pipeline.records import FailureRecord, MetricRecord, UnitRow, ViewSpec
from pipeline.stage import PlannedUnit, Stage, StageContext, UnitResult

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.methods import Encoders

EMPTY = "image_id BIGINT, embedding FLOAT[]"


def encode_batch(gram_encoder: torch.nn.Module | None, encoders: dict[str, Encoders],
                 pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch through every method. The Gram path runs once: it is frozen and the same in
    every method that has one, and on CPU it is most of the time."""
    gram = gram_encoder(pixels) if gram_encoder is not None else None
    return {name: enc.image(pixels, gram if enc.gram_encoder is not None else None)
            for name, enc in encoders.items()}


class EmbedStage(Stage):
    name = "embed"
    section = "embed"
    needs = ("prepare", "extract", "cluster", "train")
    views = tuple(ViewSpec(m.view, "embed", m.kind, EMPTY)
                  for m in methods.registered().values())

    def __init__(self) -> None:
        self._models: tuple[tuple, tuple[torch.nn.Module | None, dict[str, Encoders]]] | None \
            = None

    def config_values(self, config: Config) -> dict:
        return {**fingerprint_fields(config.embed, config.resolve),
                "methods": list(config.score.methods)}

    def check(self, config: Config) -> None:
        from pipeline.models.factory import check_model_config

        check_model_config(config)

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return ctx.input_units("prepare")

    def models(self, ctx: StageContext) -> tuple[torch.nn.Module | None, dict[str, Encoders]]:
        """(the shared Gram encoder or None, {method: Encoders}) for the configured methods,
        built once per process and fingerprint."""
        from pipeline.device import resolve_device

        key = (ctx.fingerprint, ctx.config.run.device)
        if self._models is None or self._models[0] != key:
            config, device = ctx.config, resolve_device(ctx.config.run.device)
            encoders = {m.name: m.load(config, ctx, device) for m in methods.configured(config)}
            gram = next((e.gram_encoder for e in encoders.values()
                         if e.gram_encoder is not None), None)
            self._models = (key, (gram, encoders))
        return self._models[1]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        import pyarrow.parquet as pq

        from pipeline.artifacts import describe, write_parquet
        from pipeline.data.loader import ImageItem, encode_items
        from pipeline.device import resolve_device

        cfg = ctx.config.embed
        gram_encoder, encoders = self.models(ctx)
        device = resolve_device(ctx.config.run.device)
        gallery = pq.read_table(ctx.input_path("prepare", "gallery", unit.key),
                                columns=["image_id", "path"])
        # recorded there already (train: photos that broke after extract read them)
        known_bad = ctx.input_failures("extract", "gallery") | ctx.input_failures("train",
                                                                                 "gallery")
        items = [ImageItem("gallery", i, p) for i, p in zip(gallery["image_id"].to_pylist(),
                                                           gallery["path"].to_pylist())
                 if i not in known_bad]
        started = time.monotonic()
        with ctx.progress(f"embed {unit.key}", len(items)) as advance:
            done = encode_items(items, lambda pixels, _: encode_batch(gram_encoder, encoders,
                                                                       pixels),
                                image_size=ctx.config.extract.image_size,
                                max_pixels=ctx.config.data.max_image_pixels,
                                batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                device=device, amp=cfg.amp, progress=advance)
        failures = [FailureRecord(item.item_kind, item.item_id, item.path, reason)
                    for item, reason in done.failures]
        ids = [item.item_id for item in done.items]
        seconds = time.monotonic() - started
        out = ctx.out_dir / unit.key
        artifacts = [describe(m.kind, write_parquet(
            self._table(ids, done.out[m.name] if done.out else None, cfg.dtype), out / m.file),
            len(ids)) for m in map(methods.get, encoders)]
        return UnitResult(
            rows=len(ids), artifacts=artifacts, failures=failures, good={"gallery": len(ids)},
            metrics=[MetricRecord("images_per_s", len(ids) / max(seconds, 1e-9)),
                     MetricRecord("shard_seconds", seconds)],
        )

    @staticmethod
    def _table(ids: list[int], x: np.ndarray | None, dtype: str) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        from pipeline.arrays import vectors_to_arrow

        x = x if x is not None else np.zeros((0, 1), np.float32)
        return pa.table({"image_id": pa.array(ids, pa.int64()),
                         "embedding": vectors_to_arrow(x, dtype)})
