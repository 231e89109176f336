"""Stage `prepare`: materialise one shard of the listing into the dataset tables.

    fsr-pipe stage prepare --shard 3

Generated items (demo photos, sketch/art/low-res versions for demo and folder sources) are
rendered to PNG; existing files are checked (missing, empty); captions are read and checked.
Bad inputs become failure rows; a photo that fails takes its queries with it (they have no
target). Writes per shard `gallery.parquet` and `queries.parquet`: the `gallery` and
`queries` catalog views.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.records import FailureRecord, UnitRow, ViewSpec
from pipeline.stage import PlannedUnit, Stage, StageContext, UnitResult, shard_key

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image


@cache
def gallery_schema() -> pa.Schema:
    """Schema of `gallery.parquet`."""
    import pyarrow as pa

    return pa.schema([
        ("image_id", pa.int64()), ("key", pa.string()), ("path", pa.string()),
        ("split", pa.string()), ("class_label", pa.string()), ("caption", pa.string()),
        ("shard", pa.int32()),
    ])


@cache
def queries_schema() -> pa.Schema:
    """Schema of `queries.parquet`."""
    import pyarrow as pa

    return pa.schema([
        ("query_id", pa.int64()), ("image_id", pa.int64()), ("style", pa.string()),
        ("split", pa.string()), ("class_label", pa.string()), ("path", pa.string()),
        ("text", pa.string()), ("shard", pa.int32()),
    ])


# Real photos are scaled to this shorter side before sketch/art/low-res versions are drawn
# from them: enough for the 224 px encoders, and bounded work per photo.
GENERATED_SHORT_SIDE = 256


def save_png(image: Image.Image, path: Path) -> str:
    """Write a PNG under a temporary name, then rename (a killed run leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    image.save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)
    return str(path)


def check_file(path: str) -> None:
    """Raise BadInput for a missing or empty file (decoding is checked where it is decoded)."""
    from pipeline.data.images import BadInput

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise BadInput(f"missing: {exc.strerror}", path) from exc
    if size == 0:
        raise BadInput("empty file", path)


def _scaled(photo: Image.Image) -> Image.Image:
    from PIL import Image

    short = min(photo.size)
    if short <= GENERATED_SHORT_SIDE:
        return photo
    scale = GENERATED_SHORT_SIDE / short
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    return photo.resize(size, Image.Resampling.BILINEAR)


class PrepareStage(Stage):
    name = "prepare"
    section = "data"
    needs = ("ingest",)
    views = (
        ViewSpec("gallery", "prepare", "gallery",
                 "image_id BIGINT, key VARCHAR, path VARCHAR, split VARCHAR, "
                 "class_label VARCHAR, caption VARCHAR, shard INTEGER"),
        ViewSpec("queries", "prepare", "queries",
                 "query_id BIGINT, image_id BIGINT, style VARCHAR, split VARCHAR, "
                 "class_label VARCHAR, path VARCHAR, text VARCHAR, shard INTEGER"),
    )

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        import pyarrow.parquet as pq

        listing = pq.read_table(ctx.input_path("ingest", "gallery_listing"), columns=["shard"])
        shards = sorted(set(listing["shard"].to_pylist()))
        return [PlannedUnit(shard_key(s), {"shard": s}) for s in shards]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.artifacts import describe, write_parquet
        from pipeline.data.images import BadInput

        shard = unit.params["shard"]
        where = [("shard", "=", shard)]
        photos = pq.read_table(ctx.input_path("ingest", "gallery_listing"), filters=where)
        queries = pq.read_table(ctx.input_path("ingest", "query_listing"), filters=where)
        out = ctx.out_dir / unit.key
        queries_by_photo: dict[int, list[dict]] = {}
        for row in queries.to_pylist():
            queries_by_photo.setdefault(row["image_id"], []).append(row)

        gallery_rows, query_rows, failures = [], [], []
        with ctx.progress(f"prepare {unit.key}", len(photos)) as advance:
            for photo in photos.to_pylist():
                try:
                    image, photo_row = self._photo(ctx, photo, out)
                except BadInput as exc:
                    failures.append(FailureRecord("gallery", photo["image_id"], exc.path,
                                                  exc.reason))
                    advance(1)
                    continue
                gallery_rows.append(photo_row)
                for query in queries_by_photo.get(photo["image_id"], []):
                    try:
                        query_rows.append(self._query(ctx, query, photo_row, image, out))
                    except BadInput as exc:
                        failures.append(FailureRecord("query", query["query_id"], exc.path,
                                                      exc.reason))
                advance(1)

        gallery_table = pa.Table.from_pylist(gallery_rows, schema=gallery_schema())
        query_table = pa.Table.from_pylist(query_rows, schema=queries_schema())
        return UnitResult(
            rows=len(gallery_rows) + len(query_rows),
            good={"gallery": len(gallery_rows), "query": len(query_rows)},
            artifacts=[
                describe("gallery", write_parquet(gallery_table, out / "gallery.parquet"),
                         len(gallery_table)),
                describe("queries", write_parquet(query_table, out / "queries.parquet"),
                         len(query_table)),
            ],
            failures=failures,
        )

    def _photo(self, ctx: StageContext, photo: dict, out: Path) -> tuple[Image.Image | None,
                                                                         dict]:
        """(decoded photo when queries are drawn from it, gallery row)."""
        from pipeline.data.images import load_rgb
        from pipeline.data.synth import render_photo

        data = ctx.config.data
        row = {k: photo[k] for k in ("image_id", "key", "split", "class_label", "shard")}
        row["caption"] = None
        if photo["source"] is None:  # demo: the photo itself is generated
            image, caption, label = render_photo(ctx.config.run.seed, int(photo["key"]),
                                                 data.demo_image_size)
            row.update(path=save_png(image, out / "photo" / f"{photo['key']}.png"),
                       caption=caption, class_label=label)
            return image, row
        row["path"] = photo["source"]
        if data.source == "folder":  # style versions are drawn from the decoded photo
            return _scaled(load_rgb(photo["source"], data.max_image_pixels)), row
        check_file(photo["source"])
        return None, row

    def _query(self, ctx: StageContext, query: dict, photo_row: dict,
               image: Image.Image | None, out: Path) -> dict:
        from pipeline.arrays import stable_id
        from pipeline.data.images import check_caption, read_caption
        from pipeline.data.synth import STYLE_TRANSFORMS

        row = {k: query[k] for k in ("query_id", "image_id", "style", "split", "shard")}
        row.update(class_label=photo_row["class_label"], path=None, text=None)
        if query["generate"] and query["style"] != "text":
            assert image is not None, "generated queries need their decoded photo"
            seed = stable_id(f"{ctx.config.run.seed}:{query['query_id']}") % 2**31
            styled = STYLE_TRANSFORMS[query["style"]](image, seed)
            name = Path(photo_row["key"]).with_suffix(".png")
            row["path"] = save_png(styled, out / query["style"] / name)
            return row
        if query["source"] is not None:
            check_file(query["source"])
            row["path"] = query["source"]
            return row
        # No image to draw or read: a text query, whatever its style is called (a manifest
        # may name it anything, docs/datasets.md).
        if query["caption_path"]:
            row["text"] = read_caption(query["caption_path"])
        else:
            row["text"] = check_caption(query["text"] or photo_row["caption"])
        return row
