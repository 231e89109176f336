"""Stage `ingest`: list the dataset (ids, splits, shards) once; nothing is decoded here.

    fsr-pipe run ingest

One unit writes the listing; `prepare` then materialises it shard by shard.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config, fingerprint_fields
from pipeline.records import UnitRow
from pipeline.stage import PlannedUnit, Stage, StageContext, UnitResult


class IngestStage(Stage):
    name = "ingest"
    section = "data"

    def config_values(self, config: Config) -> dict[str, Any]:
        from pipeline.data.sources import source_stamp

        # The listing files' size and mtime join the fingerprint: an edited train.json or
        # manifest (or a class folder gaining photos) re-lists the dataset.
        return {**fingerprint_fields(config.data, config.resolve),
                "source_stamp": source_stamp(config)}

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return [PlannedUnit("listing", {})]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        from pipeline.artifacts import describe, write_parquet
        from pipeline.data.sources import list_source

        gallery, queries = list_source(ctx.config)
        out = ctx.out_dir / unit.key
        return UnitResult(
            rows=len(gallery),
            artifacts=[
                describe("gallery_listing", write_parquet(gallery, out / "gallery.parquet"),
                         len(gallery)),
                describe("query_listing", write_parquet(queries, out / "queries.parquet"),
                         len(queries)),
            ],
        )
