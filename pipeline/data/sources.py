"""Dataset listings: which gallery photos and queries a source has (no decoding here).

A listing is two Arrow tables (schemas `gallery_listing()`, `query_listing()`). Ids are stable
hashes of keys; shards are assigned by sorted gallery key, and a query lives in its photo's
shard.
Sources (docs/datasets.md):
- demo: generated from the seed (`pipeline.data.synth`), nothing read from disk;
- dsr: `images/ sketch/ art/ mosaic/ text/` + `train.json` / `test.json`;
- folder: `<root>/<class>/<photo>`; generated sketch/art/low-res queries, text
  "a photo of a <class>";
- manifest: a Parquet or CSV file of gallery rows and query rows (docs/datasets.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Config

if TYPE_CHECKING:  # pyarrow loads when a listing is built: ingest's fingerprint needs none
    import pyarrow as pa

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
DSR_STYLE_DIRS = {"sketch": "sketch", "art": "art", "lowres": "mosaic"}



@cache
def gallery_listing() -> pa.Schema:
    """The gallery listing's columns."""
    import pyarrow as pa

    return pa.schema([
        ("image_id", pa.int64()), ("key", pa.string()), ("split", pa.string()),
        ("class_label", pa.string()), ("shard", pa.int32()),
        ("source", pa.string()),  # existing photo file; null when generated (demo)
    ])


@cache
def query_listing() -> pa.Schema:
    """The query listing's columns."""
    import pyarrow as pa

    return pa.schema([
        ("query_id", pa.int64()), ("image_id", pa.int64()), ("style", pa.string()),
        ("split", pa.string()), ("class_label", pa.string()), ("shard", pa.int32()),
        ("source", pa.string()),        # existing query image file
        ("text", pa.string()),          # known caption text
        ("caption_path", pa.string()),  # caption file to read (dsr)
        ("generate", pa.bool_()),       # rendered from the photo by `prepare`
    ])


class SourceError(ValueError):
    """A dataset source is missing or malformed; the message names the path."""


@dataclass
class ListingBuilder:
    """Collects rows, then assigns stable ids and shards."""

    shard_size: int
    gallery: list[dict] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)

    def add_photo(self, key: str, split: str, class_label: str | None,
                  source: str | None) -> None:
        self.gallery.append({"key": key, "split": split, "class_label": class_label,
                             "source": source})

    def add_query(self, image_key: str, style: str, *, source: str | None = None,
                  text: str | None = None, caption_path: str | None = None,
                  generate: bool = False, tag: str = "") -> None:
        self.queries.append({"image_key": image_key, "style": style, "source": source,
                             "text": text, "caption_path": caption_path,
                             "generate": generate, "tag": tag})

    def build(self) -> tuple[pa.Table, pa.Table]:
        import pyarrow as pa

        from pipeline.arrays import stable_id

        photos = sorted(self.gallery, key=lambda r: r["key"])
        by_key: dict[str, dict] = {}
        for position, row in enumerate(photos):
            if row["key"] in by_key:
                raise SourceError(f"gallery key {row['key']!r} appears twice")
            row["image_id"] = stable_id("image:" + row["key"])
            row["shard"] = position // self.shard_size
            by_key[row["key"]] = row
        if len({r["image_id"] for r in photos}) != len(photos):
            raise SourceError("two gallery keys hash to one id; rename one of them")
        query_rows = []
        for row in self.queries:
            photo = by_key.get(row["image_key"])
            if photo is None:
                raise SourceError(f"query targets unknown gallery key {row['image_key']!r}")
            qkey = f"{row['image_key']}|{row['style']}|{row['tag']}"
            query_rows.append({
                "query_id": stable_id("query:" + qkey), "image_id": photo["image_id"],
                "style": row["style"], "split": photo["split"],
                "class_label": photo["class_label"], "shard": photo["shard"],
                "source": row["source"], "text": row["text"],
                "caption_path": row["caption_path"], "generate": row["generate"],
            })
        if len({r["query_id"] for r in query_rows}) != len(query_rows):
            raise SourceError("two queries share a key (same photo, style and file)")
        gallery = pa.Table.from_pylist(photos, schema=gallery_listing())
        queries = pa.Table.from_pylist(query_rows, schema=query_listing())
        return gallery, queries


def _split(seed: int, key: str, test_fraction: float) -> str:
    from pipeline.arrays import stable_uniform

    return "test" if stable_uniform(seed, "split:" + key) < test_fraction else "train"


def unseen_classes(labels: list[str], config: Config) -> set[str]:
    """The classes a class-disjoint split (data.split = "class") keeps out of training:
    data.unseen_classes, or the first round(unseen_fraction x C) classes (at least 1, at most
    C - 1) in a seeded order of their names: pure in (seed, class names)."""
    from pipeline.arrays import stable_uniform

    data, names = config.data, sorted(set(labels))
    if data.unseen_classes:
        missing = sorted(set(data.unseen_classes) - set(names))
        if missing:
            raise SourceError(f"data.unseen_classes names class(es) {missing[:5]} that the "
                              f"dataset has not; its classes are e.g. {names[:5]}")
        if len(data.unseen_classes) == len(names):
            raise SourceError("data.unseen_classes lists every class: training would see none")
        return set(data.unseen_classes)
    if len(names) < 2:
        raise SourceError(f"data.split = 'class' needs at least 2 classes; the dataset has "
                          f"{len(names)}")
    count = min(max(1, round(data.unseen_fraction * len(names))), len(names) - 1)
    order = sorted(names, key=lambda c: stable_uniform(config.run.seed, "unseen:" + c))
    return set(order[:count])


def apply_class_split(builder: ListingBuilder, config: Config) -> None:
    """data.split = "class": every photo of an unseen class goes to test; the photos of seen
    classes keep their photo-level split (test_fraction), so training sees seen classes only."""
    missing = [r["key"] for r in builder.gallery if r["class_label"] is None]
    if missing:
        raise SourceError(f"data.split = 'class' needs a class label for every photo; "
                          f"{len(missing)} have none (e.g. {missing[0]!r}); give the manifest "
                          "a class_label column, or set data.split = 'photo'")
    unseen = unseen_classes([r["class_label"] for r in builder.gallery], config)
    for row in builder.gallery:
        if row["class_label"] in unseen:
            row["split"] = "test"


def list_demo(config: Config) -> ListingBuilder:
    data = config.data
    builder = ListingBuilder(data.shard_size)
    if data.split == "class":  # the label prepare draws the photo from (pure in seed, index)
        from pipeline.data.synth import _demo_class as label_of
    for index in range(data.demo_items):
        key = f"{index:08d}"
        label = label_of(config.run.seed, index) if data.split == "class" else None
        builder.add_photo(key, _split(config.run.seed, key, data.test_fraction), label, None)
        builder.add_query(key, "text", generate=True)
        for style in data.styles:
            builder.add_query(key, style, generate=True)
    return builder


def list_dsr(config: Config) -> ListingBuilder:
    root = config.resolve(config.data.path)
    builder = ListingBuilder(config.data.shard_size)
    seen: dict[str, str] = {}
    for split in ("train", "test"):
        listing = root / f"{split}.json"
        if not listing.is_file():
            raise SourceError(f"DSR listing {listing} not found (data.path = {root})")
        try:  # bytes: json detects UTF-8 (with or without BOM), -16, -32 itself
            entries = json.loads(listing.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{listing}: not valid JSON ({exc})") from exc
        if not isinstance(entries, list):
            raise SourceError(f"{listing}: expected a list of {{'image': ..., 'caption': ...}}")
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                    and isinstance(entry.get("caption"), str)):
                raise SourceError(f"{listing}[{i}]: expected {{'image': <file name>, "
                                  f"'caption': <file name>}}, got {entry!r:.100}")
            name = entry["image"]
            if name in seen:
                raise SourceError(f"{listing}[{i}]: image {name!r} is listed twice (also in "
                                  f"{seen[name]}.json)")
            seen[name] = split
            builder.add_photo(name, split, None, str(root / "images" / name))
            builder.add_query(name, "text", caption_path=str(root / "text" / entry["caption"]))
            for style, folder in DSR_STYLE_DIRS.items():
                builder.add_query(name, style, source=str(root / folder / name))
    return builder


# Dot files and folders (.DS_Store, .thumbnails, macOS ._ forks) and NAS system folders
# (Synology's @eaDir) are never photos or classes.
HIDDEN = (".", "@")


def _log_left_out(root: Path, left_out: dict[str, list[str]]) -> None:
    for what, names in left_out.items():
        if names:
            log.warning("folder %s: %d %s left out (e.g. %s)", root, len(names), what,
                        ", ".join(names[:3]))


LEFT_OUT = ("files directly in the root (not in a class folder)",
            "sub-folders inside class folders (not searched)",
            f"files that are not {'/'.join(sorted(IMAGE_SUFFIXES))} images")


def folder_photos(root: Path) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """(class label, file name) of the photos of `<root>/<class>/<photo>` in key order, and
    what the layout leaves out (LEFT_OUT -> names). Plain strings and os.scandir (no stat per
    file): it runs for every command's fingerprints too: 0.3 s per 100k photos on a local disk."""
    def entries(folder: str) -> list[os.DirEntry]:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(HIDDEN)),
                          key=lambda e: e.name)

    loose, nested, other = LEFT_OUT
    left_out: dict[str, list[str]] = {loose: [], nested: [], other: []}
    photos = []
    for entry in entries(str(root)):
        if not entry.is_dir():
            left_out[loose].append(entry.name)
            continue
        for photo in entries(entry.path):
            if photo.is_dir():
                left_out[nested].append(f"{entry.name}/{photo.name}")
            elif os.path.splitext(photo.name)[1].lower() not in IMAGE_SUFFIXES:
                left_out[other].append(f"{entry.name}/{photo.name}")
            else:
                photos.append((entry.name, photo.name))
    return photos, left_out


def list_folder(config: Config) -> ListingBuilder:
    root = config.resolve(config.data.path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise SourceError(f"photo folder {root} {what} (data.path; expected "
                          "<root>/<class>/<photo>)")
    photos, left_out = folder_photos(root)
    if not photos:
        raise SourceError(f"{root} has no class sub-folders with photos (expected "
                          "<root>/<class>/<photo>)")
    builder = ListingBuilder(config.data.shard_size)
    for label, name in photos:
        key = f"{label}/{name}"
        split = _split(config.run.seed, key, config.data.test_fraction)
        builder.add_photo(key, split, label, str(root / label / name))
        builder.add_query(key, "text", text=f"a photo of a {label.replace('_', ' ')}")
        for style in config.data.styles:
            builder.add_query(key, style, generate=True)
    _log_left_out(root, left_out)
    return builder


MANIFEST_COLUMNS = {"kind", "key", "path", "text", "style", "target", "class_label", "split"}


def _read_manifest(path: Path) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise SourceError(f"manifest {path} not found (data.path)")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise SourceError(f"manifest {path}: expected a .parquet or .csv file")
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in MANIFEST_COLUMNS}, strings_can_be_null=True))
    except pa.ArrowException as exc:  # not Parquet, a CSV parse error, ...
        raise SourceError(f"manifest {path}: cannot read ({exc})") from exc


def list_manifest(config: Config) -> ListingBuilder:
    import pyarrow as pa
    import pyarrow.compute as pc

    path = config.resolve(config.data.path)
    table = _read_manifest(path)
    missing = {"kind", "path"} - set(table.column_names)
    if missing:
        raise SourceError(f"manifest {path}: missing column(s) {sorted(missing)}; "
                          f"columns are {sorted(MANIFEST_COLUMNS)} (docs/datasets.md)")
    for name in MANIFEST_COLUMNS - set(table.column_names):
        table = table.append_column(name, pa.nulls(len(table), pa.string()))
    table = table.select(sorted(MANIFEST_COLUMNS)).cast(
        pa.schema([(c, pa.string()) for c in sorted(MANIFEST_COLUMNS)]))
    kinds = set(pc.unique(table["kind"]).to_pylist())
    if not kinds <= {"gallery", "query"}:
        # repr: an empty cell is None, which does not sort with strings.
        found = sorted(repr(k) for k in kinds - {"gallery", "query"})
        raise SourceError(f"manifest {path}: column kind must be 'gallery' or 'query', "
                          f"found {', '.join(found)}")
    base = path.parent
    builder = ListingBuilder(config.data.shard_size)
    rows = table.to_pylist()
    keys: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row["kind"] != "gallery":
            continue
        if not row["path"]:
            raise SourceError(f"manifest {path} row {i}: a gallery row needs a path")
        key = row["key"] or row["path"]
        if key in keys:
            raise SourceError(f"manifest {path} row {i}: gallery key {key!r} is also on row "
                              f"{keys[key]}; keys (default: path) must be unique")
        keys[key] = i
        if row["split"] and config.data.split == "class":
            raise SourceError(f"manifest {path} row {i}: has a split, and data.split = "
                              "'class' assigns splits by class; leave the split column "
                              "empty, or set data.split = 'photo'")
        split = row["split"] or _split(config.run.seed, row["path"], config.data.test_fraction)
        if split not in ("train", "test"):
            raise SourceError(f"manifest {path} row {i}: split must be train or test")
        builder.add_photo(key, split, row["class_label"], str(base / row["path"]))
    for i, row in enumerate(rows):
        if row["kind"] != "query":
            continue
        if not row["style"] or not row["target"]:
            raise SourceError(f"manifest {path} row {i}: a query row needs style and target")
        if row["target"] not in keys:
            raise SourceError(f"manifest {path} row {i}: target {row['target']!r} is not a "
                              "gallery key (a gallery row's key, default its path)")
        if row["path"] and row["text"]:
            raise SourceError(f"manifest {path} row {i}: a query row has a path (image query) "
                              "or a text (text query), not both")
        if not row["path"] and not row["text"] and row["style"] != "text":
            raise SourceError(f"manifest {path} row {i}: a query row needs a path (image "
                              "query) or a text (text query)")
        # No path: a text query. An empty text is a bad input (`prepare` records "empty
        # caption"), not a malformed manifest: one blank caption must not stop a run.
        source = str(base / row["path"]) if row["path"] else None
        text = None if source else (row["text"] or "")
        # The tag keeps ids stable when rows move: the file, or the text itself.
        builder.add_query(row["target"], row["style"], source=source, text=text,
                          tag=row["path"] or f"text:{text}")
    return builder


def source_stamp(config: Config) -> list[tuple[str, int, int | str]]:
    """What defines a source's listing, for ingest's fingerprint: (path, size, mtime_ns) of
    DSR's listing files or the manifest; (root, photos, sha256 of their keys) of a folder."""
    data = config.data
    if data.source == "demo":
        return []
    root = config.resolve(data.path)
    if data.source == "dsr":
        paths = [root / "train.json", root / "test.json"]
    elif data.source == "manifest":
        paths = [root]
    else:  # folder: the photos it lists, by name (stray files and .DS_Store do not count)
        if not root.is_dir():
            return []
        photos = folder_photos(root)[0]
        keys = "\n".join(f"{label}/{name}" for label, name in photos)
        return [(str(root), len(photos), hashlib.sha256(keys.encode()).hexdigest()[:16])]
    stamp = []
    for path in paths:
        if path.exists():
            info = path.stat()
            stamp.append((str(path), info.st_size if path.is_file() else 0, info.st_mtime_ns))
    return stamp


LISTERS = {"demo": list_demo, "dsr": list_dsr, "folder": list_folder, "manifest": list_manifest}


def list_source(config: Config) -> tuple[pa.Table, pa.Table]:
    """The (gallery, queries) listing of `config.data.source`."""
    builder = LISTERS[config.data.source](config)
    if config.data.split == "class":
        apply_class_split(builder, config)
    return builder.build()
