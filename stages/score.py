"""Stage `score`: Recall@K per style, every configured method side by side (docs/method.md 6).

    fsr-pipe run score

One unit per method of `score.methods` (pipeline/methods). Each encodes every test-split
query (text through the method's text tower, the frozen CLIP's; sketch, art, low-res, ...
images through its image encoder: the trained prompted one, the untrained prompts, the plain
CLIP, VPT), then scores (pipeline/evaluation.py):

- single-style query sets and the fused pairs of `score.fused` (e.g. sketch+text) under
  each rule of `score.fusions`: `softmax-max` (the authors': per gallery item, the larger of
  the two queries' softmax(100 cos) probabilities), `cosine-max` (the larger raw cosine) and
  `mean` (mean of the normalised embeddings);
- protocol `gallery`: each query against the whole gallery through the index (top
  `score.rerank_k` re-ranked exactly); protocol `batch`: the authors' evaluation, the query
  ranked among its own photo and the other photos of its batch of `score.batch_pairs` pairs;
- where the test split holds classes no training photo has (data.split = "class"): the
  zero-shot protocols `zs`, `gzs` and `fg` (pipeline/zero_shot.py) for their queries.

Query images `extract` recorded as bad inputs are skipped (recorded once, there); a query image
that breaks after extract is recorded by every method's unit that meets it.

Writes per method the query embeddings, the top `score.keep_k` results per query, every
query's target rank, and the metrics rows (Recall@K; mAP@map_k and P@map_k where classes
are known) that the `retrieval_metrics` view and the end of `fsr-pipe run all` show.
"""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pipeline import methods
from pipeline.config import Config, ConfigError, fingerprint_fields
from pipeline.records import METRICS, RANKS, RESULTS, FailureRecord, MetricRecord, UnitRow, ViewSpec
from pipeline.stage import PipelineError, PlannedUnit, Stage, StageContext, UnitResult

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from pipeline.index_build import VectorStore

class ScoreStage(Stage):
    name = "score"
    section = "score"
    needs = ("prepare", "extract", "cluster", "train", "index")
    views = (
        ViewSpec("retrieval_metrics", "score", "metrics", METRICS),
        ViewSpec("search_results", "score", "results", RESULTS),
        ViewSpec("query_ranks", "score", "ranks", RANKS),
        ViewSpec("query_embeddings", "score", "query_embeddings",
                 "method VARCHAR, query_id BIGINT, embedding FLOAT[]"),
    )

    def config_values(self, config: Config) -> dict[str, Any]:
        return fingerprint_fields(config.score, config.resolve)

    def check(self, config: Config) -> None:
        from pipeline.models.factory import check_model_config

        check_model_config(config)
        if config.data.test_fraction == 0 and config.data.source in ("demo", "folder"):
            raise ConfigError(
                f"data.test_fraction = 0 puts no {config.data.source} photo in the test split, so "
                "score would have no queries; set it in (0, 1), e.g. 0.2, or run up to "
                "`fsr-pipe run index`")

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return [PlannedUnit(m.name, {}) for m in methods.configured(ctx.config)]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        from pipeline.arrays import vectors_to_arrow
        from pipeline.artifacts import describe, write_parquet
        from pipeline.evaluation import open_index, query_sets, schema, score_set
        from pipeline.index_tune import effective_search
        from pipeline.zero_shot import score_zero_shot

        cfg, method = ctx.config.score, unit.key
        index, store = open_index(ctx, ctx.config, method,
                                  max(max(cfg.ks), cfg.keep_k, cfg.map_k))
        search = effective_search(cfg, store.path.parent)  # once, not per query set
        queries, gallery_labels, unseen = _test_queries(ctx, store)
        if not len(queries):
            raise PipelineError("score: no test-split query has its photo in the gallery; "
                                "check data.test_fraction (and the dataset's test split)")
        started = time.monotonic()
        emb, failures = _encode_queries(ctx, method, queries)
        encode_seconds = time.monotonic() - started
        known = pc.is_in(queries["query_id"], value_set=pa.array(list(emb), pa.int64()))
        queries = queries.filter(known)

        started = time.monotonic()
        metric_rows: list[dict] = []
        result_parts: list[pa.Table] = []
        rank_parts: list[pa.Table] = []
        sets = query_sets(queries, emb, cfg)
        depth = min(store.n, max(max(cfg.ks), cfg.keep_k,
                                 cfg.map_k if gallery_labels is not None else 0))
        zero_shot = _class_gallery(store, gallery_labels, unseen)
        with ctx.progress(f"score {method}", sum(len(s.query_ids) for s in sets)) as tick:
            for qs in sets:
                scored = score_set(method, qs, index, store, depth, cfg, gallery_labels,
                                   search)
                metric_rows += scored.metric_rows
                result_parts.append(scored.results)
                rank_parts += scored.ranks
                if zero_shot is not None and (
                        zs := score_zero_shot(method, qs, zero_shot, cfg)) is not None:
                    metric_rows += zs.metric_rows
                    rank_parts += zs.ranks
                tick(len(qs.query_ids))
        search_seconds = time.monotonic() - started
        n_searched = sum(len(s.query_ids) for s in sets)

        out = ctx.out_dir / unit.key
        ids = np.array(sorted(emb), dtype=np.int64)
        query_table = pa.table({"method": pa.array([method] * len(ids), pa.string()),
                                "query_id": pa.array(ids, pa.int64()),
                                "embedding": vectors_to_arrow(np.stack([emb[i] for i in ids]))})
        metrics_table = pa.Table.from_pylist(metric_rows, schema=schema(METRICS))
        artifacts = [
            describe("metrics", write_parquet(metrics_table, out / "metrics.parquet"),
                     len(metrics_table)),
            describe("results", write_parquet(pa.concat_tables(result_parts),
                                              out / "results.parquet"), None),
            describe("ranks", write_parquet(pa.concat_tables(rank_parts),
                                            out / "ranks.parquet"), None),
            describe("query_embeddings", write_parquet(query_table,
                                                       out / "query_embeddings.parquet"),
                     len(query_table)),
        ]
        metrics = [MetricRecord(f"{r['metric']}@{r['k'] or 'all'}", r["value"],
                                {k: r[k] for k in ("style", "protocol", "fusion", "n_queries")})
                   for r in metric_rows]
        metrics += [MetricRecord("encode_queries_per_s", len(emb) / max(encode_seconds, 1e-9)),
                    MetricRecord("search_queries_per_s", n_searched / max(search_seconds, 1e-9))]
        return UnitResult(rows=len(emb), artifacts=artifacts, failures=failures,
                          good={"query": len(emb)},
                          metrics=metrics)


# ---------------------------------------------------------------- inputs


def _concat(paths: list[str], columns: list[str] | None = None) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])


def _test_queries(ctx: StageContext, store: VectorStore) -> tuple[pa.Table, Any, Any]:
    """Test-split queries whose photo is in the index, sorted by id; the indexed photos'
    (ids, labels) or None; and the classes no training photo has (of every photo, indexed
    or not; None without labels), from one read of the gallery."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.zero_shot import unseen_labels

    queries = _concat(ctx.input_paths("prepare", "queries"),
                      ["query_id", "image_id", "style", "split", "class_label", "path", "text"])
    queries = queries.filter(pc.equal(queries["split"], "test"))
    queries = queries.filter(pc.is_in(queries["image_id"], value_set=pa.array(store.ids)))
    queries = queries.sort_by("query_id")
    every = _concat(ctx.input_paths("prepare", "gallery"), ["image_id", "class_label", "split"])
    gallery = every.filter(pc.is_in(every["image_id"], value_set=pa.array(store.ids)))
    has_labels = gallery["class_label"].null_count == 0 and len(gallery) > 0
    if not has_labels:
        return queries, None, None
    labels = (gallery["image_id"].to_numpy(), np.asarray(gallery["class_label"].to_pylist()))
    unseen = unseen_labels(np.asarray(every["class_label"].to_pylist()),
                           np.asarray(every["split"].to_pylist()))
    return queries, labels, unseen


def _class_gallery(store: VectorStore, labels: Any, unseen: Any) -> Any:
    """The zero-shot protocols' gallery (pipeline/zero_shot.py): every indexed photo with its
    label and vector, and the classes no training photo has; None when there are none."""
    from pipeline.zero_shot import ClassGallery

    if labels is None or not unseen:
        return None
    ids, names = labels
    return ClassGallery(ids, names, store.lookup(ids), unseen)


def _encode_queries(ctx: StageContext, method: str,
                    queries: pa.Table) -> tuple[dict[int, np.ndarray], list[FailureRecord]]:
    """query_id -> L2-normalised embedding; bad query images become failures. The encoding
    itself is evaluation.encode_queries, which `fsr-pipe query` runs too."""
    from pipeline.data.loader import ImageItem
    from pipeline.device import resolve_device
    from pipeline.evaluation import encode_queries

    cfg = ctx.config.score
    device = resolve_device(ctx.config.run.device)
    encoders = methods.get(method).load(ctx.config, ctx, device)
    known_bad = ctx.input_failures("extract", "query")  # recorded there already: skip them
    rows = [r for r in queries.select(["query_id", "path", "text"]).to_pylist()
            if r["query_id"] not in known_bad]
    if skipped := len(queries) - len(rows):
        ctx.log.info("score %s: %d test queries skipped, extract recorded them as bad inputs",
                     method, skipped)
    texts = [(r["query_id"], r["text"] or "") for r in rows if r["path"] is None]
    images = [ImageItem("query", r["query_id"], r["path"]) for r in rows if r["path"]]
    with ctx.progress(f"encode {method} queries", len(rows)) as tick:
        emb, bad = encode_queries(encoders, texts, images, device=device,
                                  image_size=ctx.config.extract.image_size,
                                  max_pixels=ctx.config.data.max_image_pixels,
                                  batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                  amp=cfg.amp, progress=tick)
    failures = [FailureRecord(i.item_kind, i.item_id, i.path, reason) for i, reason in bad]
    return emb, failures
