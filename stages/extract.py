"""Stage `extract`: VGG Gram style vectors per image, one Parquet pair per shard (docs/method.md 1).

    fsr-pipe stage extract --shard 3

Encodes every image query of the shard and the gallery photos `extract.gallery` asks for.
Images are decoded in DataLoader workers; the encoder runs batched on the GPU when present.
Writes `gram_queries.parquet` (query_id, gram) and `gram_gallery.parquet` (image_id, gram).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import Config
from pipeline.records import FailureRecord, UnitRow, ViewSpec
from pipeline.stage import PlannedUnit, Stage, StageContext, UnitResult

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.data.loader import ImageItem


def _items(ctx: StageContext, key: str) -> list[ImageItem]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.data.loader import ImageItem

    queries = pq.read_table(ctx.input_path("prepare", "queries", key),
                            columns=["query_id", "path"])
    queries = queries.filter(pc.is_valid(queries["path"]))
    items = [ImageItem("query", q, p) for q, p in zip(queries["query_id"].to_pylist(),
                                                      queries["path"].to_pylist())]
    which = ctx.config.extract.gallery
    if which != "none":
        gallery = pq.read_table(ctx.input_path("prepare", "gallery", key),
                                columns=["image_id", "path", "split"])
        if which == "train":
            gallery = gallery.filter(pc.equal(gallery["split"], "train"))
        items += [ImageItem("gallery", i, p) for i, p in zip(gallery["image_id"].to_pylist(),
                                                            gallery["path"].to_pylist())]
    return items


def _table(id_name: str, ids: list[int], vectors: list[np.ndarray], dim: int) -> pa.Table:
    import numpy as np
    import pyarrow as pa

    from pipeline.arrays import vectors_to_arrow

    x = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return pa.table({id_name: pa.array(ids, pa.int64()), "gram": vectors_to_arrow(x)})


class ExtractStage(Stage):
    name = "extract"
    section = "extract"
    needs = ("prepare",)
    views = (
        ViewSpec("gram_features", "extract", "gram_queries", "query_id BIGINT, gram FLOAT[]"),
        ViewSpec("gallery_gram", "extract", "gram_gallery", "image_id BIGINT, gram FLOAT[]"),
    )

    def __init__(self) -> None:
        self._encoder: tuple[tuple, torch.nn.Module] | None = None

    def notes(self, config: Config) -> str | None:
        if not config.extract.vgg_weights:
            return ("VGG weights: seeded random init; set extract.vgg_weights to real weights "
                    "(random filters tell sketch from photo, finer styles less well)")
        return None

    def check(self, config: Config) -> None:
        from pipeline.models.style import check_vgg_weights

        check_vgg_weights(config)

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return ctx.input_units("prepare")

    def encoder(self, config: Config) -> torch.nn.Module:
        """The Gram encoder for this config, built once per process."""
        from pipeline.device import resolve_device
        from pipeline.models.style import build_gram_encoder

        key = (config.extract, config.run.seed, config.run.device)
        if self._encoder is None or self._encoder[0] != key:
            device = resolve_device(config.run.device)
            self._encoder = (key, build_gram_encoder(config, device))
        return self._encoder[1]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        from pipeline.artifacts import describe, write_parquet
        from pipeline.data.loader import encode_items

        cfg = ctx.config.extract
        encoder = self.encoder(ctx.config)
        device = next(encoder.parameters()).device
        items = _items(ctx, unit.key)
        with ctx.progress(f"extract {unit.key}", len(items)) as advance:
            done = encode_items(items, lambda pixels, _: encoder(pixels),
                                image_size=cfg.image_size,
                                max_pixels=ctx.config.data.max_image_pixels,
                                batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                device=device, progress=advance)
        failures = [FailureRecord(item.item_kind, item.item_id, item.path, reason)
                    for item, reason in done.failures]
        ids: dict[str, list[int]] = {}
        vectors: dict[str, list[np.ndarray]] = {}
        for kind in ("query", "gallery"):
            rows = [i for i, item in enumerate(done.items) if item.item_kind == kind]
            ids[kind] = [done.items[i].item_id for i in rows]
            vectors[kind] = [done.out[rows]] if rows else []
        dim = encoder.out_dim
        out_dir = ctx.out_dir / unit.key
        query_table = _table("query_id", ids["query"], vectors["query"], dim)
        gallery_table = _table("image_id", ids["gallery"], vectors["gallery"], dim)
        return UnitResult(
            rows=len(query_table) + len(gallery_table),
            good={"query": len(query_table), "gallery": len(gallery_table)},
            artifacts=[
                describe("gram_queries",
                         write_parquet(query_table, out_dir / "gram_queries.parquet"),
                         len(query_table)),
                describe("gram_gallery",
                         write_parquet(gallery_table, out_dir / "gram_gallery.parquet"),
                         len(gallery_table)),
            ],
            failures=failures,
        )
