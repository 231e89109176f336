"""Ask a finished run's index: `fsr-pipe query` (README, "Ask the index").

    searcher = open_searcher(all_stages, config, "freestyle", k=10)  # model + index, once
    [answer] = searcher.search([Query(text="a red car", image="sketch.png")], "softmax-max")
    searcher.rows(answer)       # [{rank, image_id, path, class, score}, ...]
    search_file(searcher, "queries.csv", "results.parquet", "softmax-max")   # batch mode

Queries take the score stage's own path: the method's encoders (pipeline.methods) loaded from
the same upstream artifacts, evaluation.encode_queries, evaluation.open_index and
evaluation.search_set (the index, the exact re-ranking of score.rerank_k, the fusion rules).
A text-and-image query is the score stage's fused pair with the image as the first query
and the text as its partner ("sketch+text"), under one rule of config.FUSIONS.

Scores: cosine similarity (text, image, `mean`, `cosine-max`); for `softmax-max` the
log-probability of the larger of the two queries' softmax(100 cos) over the gallery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import methods
from pipeline.config import FUSIONS, Config, ConfigError
from pipeline.stage import PipelineError, StageContext, StageFactory

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

log = logging.getLogger(__name__)

READS = "score"  # query reads what the score stage reads (the same StageContext inputs)
FINISHED_BY = "index"  # ... and needs that stage and the stages before it done
COLUMNS = ("text", "image")  # batch files: either or both; `id` is copied to the output
RESULT_SCHEMA = "query_row BIGINT, rank INTEGER, image_id BIGINT, score FLOAT, error VARCHAR"


@dataclass(frozen=True)
class Query:
    """Free text, an image file (a sketch, a painting, a photo: any style), or both."""

    text: str | None = None
    image: str | None = None

    @property
    def kind(self) -> str:
        return "image+text" if self.text is not None and self.image else (
            "image" if self.image else "text")

    def problem(self) -> str | None:
        """Why this query cannot be searched, or None."""
        if self.text is None and not self.image:
            return "empty query: give a text, an image or both"
        if self.text is not None and not self.text.strip():
            return "empty text: give words to search for, e.g. 'a red car'"
        return None


@dataclass
class Answer:
    """One query's top k: gallery ids and scores, best first; or why it failed."""

    ids: np.ndarray | None = None
    scores: np.ndarray | None = None
    error: str | None = None


# ---------------------------------------------------------------- choosing and opening


def check_method(config: Config, method: str | None) -> str:
    """The method to query (default: the first of score.methods); errors name the fix."""
    configured = list(config.score.methods)
    if method is None:
        return configured[0]
    if method not in methods.registered():
        raise ConfigError(f"unknown method {method!r}; this config's methods (score.methods): "
                          f"{', '.join(configured)}")
    if method not in configured:
        wanted = ", ".join(f'"{m}"' for m in [*configured, method])
        raise ConfigError(
            f"method {method!r} was not indexed in this config (score.methods = "
            f"{configured}); add it, e.g. --set 'score.methods=[{wanted}]', and run "
            f"`fsr-pipe run index` with the same --set (a new plan: embed, index and, for "
            f"trained methods, train run again)")
    return method


def check_fusion(fusion: str) -> str:
    if fusion not in FUSIONS:
        raise ConfigError(f"unknown fusion {fusion!r}; fusions: {', '.join(FUSIONS)} "
                          "(softmax-max is the authors' rule)")
    return fusion


def check_finished(factory: StageFactory, config: Config) -> None:
    """PipelineError naming the stage to run unless every stage query reads from is done
    for this config (the index stage and what it needs)."""
    from pipeline.commands import status
    from pipeline.plans import stage_closure

    needed = {s.name for s in stage_closure(factory(), [FINISHED_BY])}
    for st in status(factory, config):
        if st.stage not in needed:
            continue
        missing = st.pending + st.failed + st.running + st.lost
        if st.planned and not missing:  # done (train plans no unit when nothing trains)
            continue
        state = ("has not run" if not st.planned
                 else f"has {st.done} of {st.done + missing} units done")
        raise PipelineError(
            f"no finished run for this config in {config.work_dir}: stage {st.stage} "
            f"{state}; run `fsr-pipe run {FINISHED_BY}` (or `fsr-pipe run all`) with the same "
            "--config/--set first")


def stage_context(factory: StageFactory, config: Config, stage: str = READS) -> StageContext:
    """The inputs `stage` would read under `config` (resolved from the catalog), as its
    StageContext: what methods.get(m).load and evaluation.open_index read."""
    import contextlib

    from pipeline.catalog import Catalog
    from pipeline.plans import fingerprints
    from pipeline.runner import upstream_inputs

    stages = factory()
    fps = fingerprints(stages, config)
    inputs = upstream_inputs(Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s),
                             next(s for s in stages if s.name == stage), fps, config.work_dir)

    @contextlib.contextmanager
    def no_progress(_description: str, _total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    return StageContext(config, inputs, stage, fps[stage], no_progress,
                        logging.getLogger(f"pipeline.query.{stage}"))


def open_searcher(factory: StageFactory, config: Config, method: str | None = None,
                  k: int = 10) -> Searcher:
    """Check the run is finished, then load the method's encoders, index and gallery."""
    method = check_method(config, method)
    check_finished(factory, config)
    return Searcher(stage_context(factory, config), method, k)


class Searcher:
    """One method's encoders, index, stored vectors and gallery metadata, loaded once."""

    def __init__(self, ctx: StageContext, method: str, k: int) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from pipeline.device import resolve_device
        from pipeline.evaluation import open_index
        from pipeline.index_tune import effective_search

        if k < 1:
            raise ConfigError(f"k must be >= 1; got {k}")
        started = time.monotonic()
        self.config, self.method = ctx.config, method
        self.device = resolve_device(ctx.config.run.device)
        self.encoders = methods.get(method).load(ctx.config, ctx, self.device)
        self.index, self.store = open_index(ctx, ctx.config, method, k)
        # The tuned search parameters, read once (not per batch of queries).
        self.search_params = effective_search(ctx.config.score, self.store.path.parent)
        self.k = min(k, self.store.n)
        gallery = pa.concat_tables([
            pq.read_table(p, columns=["image_id", "path", "class_label"])
            for p in ctx.input_paths("prepare", "gallery")])
        gallery = gallery.filter(pc.is_in(gallery["image_id"], value_set=pa.array(
            self.store.ids))).sort_by("image_id")
        self._gallery_ids = gallery["image_id"].to_numpy()
        self._gallery = gallery
        self.load_seconds = time.monotonic() - started

    # -------------------------------------------------------------- encoding and search

    def encode(self, queries: list[Query]) -> tuple[dict[int, np.ndarray],
                                                    dict[int, np.ndarray], dict[int, str]]:
        """Row -> text embedding, row -> image embedding, row -> why it failed."""
        from pipeline.data.loader import ImageItem
        from pipeline.evaluation import encode_queries

        errors = {row: why for row, q in enumerate(queries) if (why := q.problem())}
        texts = [(row, q.text) for row, q in enumerate(queries)
                 if row not in errors and q.text is not None]
        images = [ImageItem("query", row, q.image) for row, q in enumerate(queries)
                  if row not in errors and q.image]
        common = {"device": self.device, "image_size": self.config.extract.image_size,
                  "max_pixels": self.config.data.max_image_pixels,
                  "batch_size": self.config.score.batch_size,
                  "num_workers": self.config.score.num_workers, "amp": self.config.score.amp}
        text_emb, _ = encode_queries(self.encoders, texts, [], **common)
        image_emb, bad = encode_queries(self.encoders, [], images, **common)
        for item, reason in bad:
            errors[item.item_id] = f"cannot read image {item.path}: {reason}"
        return text_emb, image_emb, errors

    def search(self, queries: list[Query], fusion: str = "softmax-max") -> list[Answer]:
        """Each query's top k, as the score stage searches: one query set per kind."""
        import numpy as np

        from pipeline.evaluation import QuerySet, fused_query_set, search_set

        check_fusion(fusion)
        text_emb, image_emb, errors = self.encode(queries)
        answers = [Answer(error=errors.get(row)) for row in range(len(queries))]
        by_kind: dict[str, list[int]] = {}
        for row, q in enumerate(queries):
            if row not in errors:
                by_kind.setdefault(q.kind, []).append(row)
        for kind, rows in sorted(by_kind.items()):
            ids = np.asarray(rows, dtype=np.int64)
            none = np.full(len(rows), -1, dtype=np.int64)  # no target photo: nothing scored
            if kind == "image+text":
                qs = fused_query_set(kind, fusion, ids, ids, none, None,
                                     np.stack([image_emb[r] for r in rows]),
                                     np.stack([text_emb[r] for r in rows]))
            else:
                emb = text_emb if kind == "text" else image_emb
                qs = QuerySet(kind, "none", ids, None, none, None,
                              np.stack([emb[r] for r in rows]))
            scores, found = search_set(qs, self.index, self.store, self.k, self.config.score,
                                       self.search_params)
            for pos, row in enumerate(rows):
                keep = found[pos] >= 0
                answers[row] = Answer(found[pos][keep], scores[pos][keep].astype(np.float32))
        return answers

    # -------------------------------------------------------------- gallery metadata

    def rows(self, answer: Answer) -> list[dict[str, Any]]:
        """The answer as table rows: rank, image_id, path, class, score."""
        import numpy as np
        import pyarrow as pa

        if answer.error is not None:
            raise PipelineError(answer.error)
        where = np.searchsorted(self._gallery_ids, answer.ids)  # every hit is in the gallery
        meta = self._gallery.take(pa.array(where, pa.int64())).to_pylist()
        return [{"rank": rank, "image_id": int(i), "path": m["path"], "class": m["class_label"],
                 "score": float(s)}
                for rank, (i, s, m) in enumerate(zip(answer.ids, answer.scores, meta), start=1)]


def check_query(query: Query) -> None:
    """The errors a single query shows before anything loads: empty, a missing image."""
    if (why := query.problem()) is not None:
        raise PipelineError(why)
    if query.image and not Path(query.image).is_file():
        raise FileNotFoundError(f"cannot read image {query.image}: no such file")


def search_one(searcher: Searcher, query: Query, fusion: str = "softmax-max") -> list[dict]:
    """One query's result rows; its problem (empty text, unreadable image) as an error."""
    check_query(query)
    [answer] = searcher.search([query], fusion)
    return searcher.rows(answer)


# ---------------------------------------------------------------- batch mode


@dataclass
class BatchReport:
    out: Path
    queries: int
    failed: list[tuple[int, str]]  # (query row, why)
    seconds: float

    @property
    def per_s(self) -> float:
        return self.queries / max(self.seconds, 1e-9)


def default_out(queries_path: str | Path) -> Path:
    """queries.csv -> queries.results.parquet, beside it."""
    path = Path(queries_path)
    return path.with_name(f"{path.stem}.results.parquet")


def query_columns(path: str | Path) -> list[str]:
    """The columns batch mode reads of a .csv or .parquet query file (`text` and/or `image`,
    and `id` when present); errors name the file and what it lacks."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no query file {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        names = pq.read_schema(path).names
    elif suffix == ".csv":
        names = pacsv.open_csv(path).schema.names
    else:
        raise ConfigError(f"--queries {path}: a .csv or .parquet file with a `text` and/or "
                          "`image` column, one query per row")
    present = [c for c in COLUMNS if c in names]
    if not present:
        raise ConfigError(f"--queries {path} has no `text` or `image` column (it has "
                          f"{names}); one query per row: text, image path or both")
    return present + (["id"] if "id" in names else [])


def read_batches(path: str | Path, batch_size: int) -> tuple[int, Iterator[pa.Table]]:
    """(rows, batches of up to batch_size rows) of a .csv or .parquet query file, streamed."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    columns = query_columns(path)
    path = Path(path)
    suffix = path.suffix.lower()
    present = [c for c in columns if c in COLUMNS]
    types = {c: pa.string() for c in present}

    def open_stream() -> Iterator[pa.RecordBatch]:
        if suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size, columns=columns)
        else:
            yield from pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=columns))

    if suffix == ".parquet":
        total = pq.ParquetFile(path).metadata.num_rows
    else:
        total = sum(len(b) for b in open_stream())

    def rebatch() -> Iterator[pa.Table]:
        pending: list[pa.RecordBatch] = []
        size = 0
        for batch in open_stream():
            pending.append(batch)
            size += len(batch)
            while size >= batch_size:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, batch_size)
                rest = table.slice(batch_size).to_batches()
                pending, size = rest, size - batch_size
        if size:
            yield pa.Table.from_batches(pending)

    return total, rebatch()


def rows_to_queries(table: pa.Table, base: Path) -> list[Query]:
    """Batch rows -> queries; image paths relative to the query file's folder; a null or
    blank cell means the row has no text (or no image)."""
    n = len(table)
    texts = table["text"].to_pylist() if "text" in table.column_names else [None] * n
    images = table["image"].to_pylist() if "image" in table.column_names else [None] * n
    return [Query(text if text is not None and text.strip() else None,
                  str(base / image) if image and image.strip() else None)
            for text, image in zip(texts, images)]


def result_table(answers: list[Answer], first_row: int, ids: pa.Array | None) -> pa.Table:
    """(query_row, rank, image_id, score, error[, id]) rows: k per good query, one with
    `error` set per bad one."""
    import numpy as np
    import pyarrow as pa

    from pipeline.evaluation import schema

    counts = np.array([len(a.ids) if a.error is None else 1 for a in answers], dtype=np.int64)
    rows = np.repeat(np.arange(first_row, first_row + len(answers), dtype=np.int64), counts)
    rank, image_id, score, error = [], [], [], []
    for a in answers:
        if a.error is None:
            rank += range(1, len(a.ids) + 1)
            image_id += a.ids.tolist()
            score += a.scores.tolist()
            error += [None] * len(a.ids)
        else:
            rank.append(None)
            image_id.append(None)
            score.append(None)
            error.append(a.error)
    out = pa.Table.from_arrays([pa.array(rows, pa.int64()), pa.array(rank, pa.int32()),
                                pa.array(image_id, pa.int64()), pa.array(score, pa.float32()),
                                pa.array(error, pa.string())], schema=schema(RESULT_SCHEMA))
    if ids is not None:
        out = out.append_column("id", ids.take(pa.array(rows - first_row)))
    return out


def search_file(searcher: Searcher, queries_path: str | Path, out: str | Path | None = None,
                fusion: str = "softmax-max",
                progress: Callable[[str, int | None], Any] | None = None) -> BatchReport:
    """Batch mode: every row of a .csv/.parquet query file, in batches of score.batch_size,
    into a Parquet of (query_row, rank, image_id, score, error[, id]) written as it goes and
    renamed into place at the end. Bad rows (empty, unreadable image) get one row with their
    `error` and do not stop the batch. `progress(description, total)`: a context manager
    yielding advance(n) (ProgressBoard.task)."""
    import contextlib

    import pyarrow.parquet as pq

    from pipeline.artifacts import atomic_path

    check_fusion(fusion)
    queries_path = Path(queries_path)
    out = Path(out) if out is not None else default_out(queries_path)
    total, batches = read_batches(queries_path, searcher.config.score.batch_size)
    if progress is None:
        def progress(_d: str, _t: int | None):  # noqa: ANN202
            return contextlib.nullcontext(lambda n=1: None)
    failed: list[tuple[int, str]] = []
    started = time.monotonic()
    first = 0
    with atomic_path(out) as tmp, progress(f"query {searcher.method}", total) as tick:
        writer = None
        try:
            for table in batches:
                answers = searcher.search(rows_to_queries(table, queries_path.parent), fusion)
                failed += [(first + i, a.error) for i, a in enumerate(answers) if a.error]
                part = result_table(answers, first,
                                    table["id"].combine_chunks()
                                    if "id" in table.column_names else None)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, part.schema, compression="zstd")
                writer.write_table(part)
                first += len(table)
                tick(len(table))
            if writer is None:  # an empty query file: an empty result file
                pq.write_table(result_table([], 0, None), tmp)
        finally:
            if writer is not None:
                writer.close()
    return BatchReport(out, first, failed, time.monotonic() - started)
