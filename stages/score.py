"""Stage `score`: Recall@K per style, FreestyleRet vs the plain-CLIP baseline (docs/method.md 6).

    fsr-pipe run score

Units `freestyle` and, with `embed.untrained` / `embed.baseline`, `untrained` / `baseline`.
Each encodes every test-split query (text through the frozen CLIP text encoder; sketch, art,
low-res, ... images through the trained prompted encoder, the untrained one, or the plain
CLIP for the baseline), then scores:

- single-style query sets and the fused pairs of `score.fused` (e.g. sketch+text) under
  both fusion rules: `max` (per gallery item, the larger of the two similarities, the
  authors' code) and `mean` (mean of the normalised embeddings);
- protocol `gallery`: each query against the whole gallery through the index (top
  `score.rerank_k` re-ranked exactly); protocol `batch`: the authors' evaluation, the query
  ranked among its own photo and the other photos of its batch of `score.batch_pairs` pairs.

Query images `extract` recorded as bad inputs are skipped (recorded once, there); a query image
that breaks after extract is recorded by every method's unit that meets it.

Writes per method the query embeddings, the top `score.keep_k` results per query, every
query's target rank, and the metrics rows (Recall@K; mAP@map_k and P@map_k where classes
are known) that the `retrieval_metrics` view and the end of `fsr-pipe run all` show.
"""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids (STYLE.md field vocabulary)

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.arrays import vectors_to_arrow
from pipeline.artifacts import describe, write_parquet
from pipeline.catalog import FailureRecord, MetricRecord, UnitRow, ViewSpec
from pipeline.config import Config, ConfigError, ScoreConfig, fingerprint_fields
from pipeline.data.loader import ImageItem, iter_batches
from pipeline.device import resolve_device
from pipeline.index import load_index, maybe_to_gpu, search_fused_max, search_rerank
from pipeline.index_build import VectorStore
from pipeline.models.clip import encode_image_baseline, encode_text, load_clip
from pipeline.models.factory import check_model_config, pretrained_source
from pipeline.retrieval import (
    batch_protocol_ranks,
    batch_recall,
    fuse_mean,
    map_at_k,
    precision_at_k,
    target_ranks,
)
from pipeline.stage import PipelineError, PlannedUnit, Stage, StageContext, UnitResult
from pipeline.training import autocast
from stages.embed import load_trained, load_untrained, methods

METRICS = ("metric VARCHAR, method VARCHAR, style VARCHAR, protocol VARCHAR, fusion VARCHAR, "
           "k INTEGER, value DOUBLE, n_queries BIGINT")
RESULTS = ("method VARCHAR, style VARCHAR, fusion VARCHAR, query_id BIGINT, partner_id BIGINT, "
           "rank INTEGER, image_id BIGINT, score FLOAT")
RANKS = ("method VARCHAR, style VARCHAR, protocol VARCHAR, fusion VARCHAR, query_id BIGINT, "
         "partner_id BIGINT, target_id BIGINT, class_label VARCHAR, rank INTEGER")


@dataclass
class QuerySet:
    """Queries scored together: one style, or a fused pair (a's query + b's partner)."""

    style: str                   # "sketch" or "sketch+text"
    fusion: str                  # none | max | mean
    query_ids: np.ndarray        # (n,)
    partner_ids: np.ndarray | None
    targets: np.ndarray          # (n,) the photo each query should find
    labels: np.ndarray | None    # (n,) class labels, where known
    emb: np.ndarray              # (n, d): the query (or `mean`-fused) embedding
    emb_partner: np.ndarray | None = None  # `max` fusion: the second query's embedding


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
        check_model_config(config)
        if config.data.test_fraction == 0 and config.data.source in ("demo", "folder"):
            raise ConfigError(
                f"data.test_fraction = 0 puts no {config.data.source} photo in the test split, so "
                "score would have no queries; set it in (0, 1), e.g. 0.2, or run up to "
                "`fsr-pipe run index`")

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return [PlannedUnit(m, {}) for m in methods(ctx.config)]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        cfg, method = ctx.config.score, unit.key
        index_dir = ctx.input_path("index", "index", unit.key)
        store = VectorStore.open(ctx.input_path("index", "vectors", unit.key))
        index = load_index(index_dir, expect_d=store.d, expect_ntotal=store.n)
        queries, gallery_labels = _test_queries(ctx, store)
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
        query_sets = _query_sets(queries, emb, cfg, ctx)
        depth = min(store.n, max(max(cfg.ks), cfg.keep_k,
                                 cfg.map_k if gallery_labels is not None else 0))
        if ctx.config.index.use_gpu and resolve_device(ctx.config.run.device).type == "cuda":
            index = maybe_to_gpu(index, k=max(depth, cfg.rerank_k), nprobe=cfg.nprobe)
        with ctx.progress(f"score {method}", sum(len(s.query_ids) for s in query_sets)) as tick:
            for qs in query_sets:
                if qs.fusion == "max":
                    D, I = search_fused_max(index, qs.emb, qs.emb_partner, depth, cfg.nprobe,
                                            cfg.rerank_k, store.lookup)
                else:
                    D, I = search_rerank(index, qs.emb, depth, cfg.nprobe, cfg.rerank_k,
                                         store.lookup)
                gallery_ranks = target_ranks(I, qs.targets)
                metric_rows += _recall_rows(method, qs, "gallery", gallery_ranks, cfg.ks)
                if gallery_labels is not None and qs.labels is not None:
                    metric_rows += _class_rows(method, qs, I, gallery_labels, cfg.map_k)
                pairs = _one_query_per_photo(qs)
                batch_ranks = batch_protocol_ranks(
                    pairs.emb, store.lookup(pairs.targets), cfg.batch_pairs,
                    pairs.emb_partner if pairs.fusion == "max" else None)
                metric_rows += _recall_rows(method, pairs, "batch", batch_ranks, cfg.ks)
                result_parts.append(_results_table(method, qs, D, I, cfg.keep_k))
                rank_parts.append(_ranks_table(method, qs, "gallery", gallery_ranks, depth))
                rank_parts.append(_ranks_table(method, pairs, "batch", batch_ranks, None))
                tick(len(qs.query_ids))
        search_seconds = time.monotonic() - started
        n_searched = sum(len(s.query_ids) for s in query_sets)

        out = ctx.out_dir / unit.key
        ids = np.array(sorted(emb), dtype=np.int64)
        query_table = pa.table({"method": pa.array([method] * len(ids), pa.string()),
                                "query_id": pa.array(ids, pa.int64()),
                                "embedding": vectors_to_arrow(np.stack([emb[i] for i in ids]))})
        metrics_table = pa.Table.from_pylist(metric_rows, schema=_schema(METRICS))
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
        metrics = [MetricRecord(f"{r['metric']}@{r['k']}", r["value"],
                                {k: r[k] for k in ("style", "protocol", "fusion", "n_queries")})
                   for r in metric_rows]
        metrics += [MetricRecord("encode_queries_per_s", len(emb) / max(encode_seconds, 1e-9)),
                    MetricRecord("search_queries_per_s", n_searched / max(search_seconds, 1e-9))]
        return UnitResult(rows=len(emb), artifacts=artifacts, failures=failures,
                          good={"query": len(emb)},
                          metrics=metrics)


# ---------------------------------------------------------------- inputs


def _concat(paths: list[str], columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])


def _test_queries(ctx: StageContext, store: VectorStore) -> tuple[pa.Table, Any]:
    """Test-split queries whose photo is in the index, sorted by id; gallery labels or None."""
    queries = _concat(ctx.input_paths("prepare", "queries"),
                      ["query_id", "image_id", "style", "split", "class_label", "path", "text"])
    queries = queries.filter(pc.equal(queries["split"], "test"))
    queries = queries.filter(pc.is_in(queries["image_id"], value_set=pa.array(store.ids)))
    queries = queries.sort_by("query_id")
    gallery = _concat(ctx.input_paths("prepare", "gallery"), ["image_id", "class_label"])
    gallery = gallery.filter(pc.is_in(gallery["image_id"], value_set=pa.array(store.ids)))
    has_labels = gallery["class_label"].null_count == 0 and len(gallery) > 0
    labels = None
    if has_labels:
        labels = (gallery["image_id"].to_numpy(), np.asarray(gallery["class_label"].to_pylist()))
    return queries, labels


def _encoders(ctx: StageContext, method: str, device: torch.device):
    """(encode_image(pixels), encode_text(tokens), tokenizer) for the method."""
    config = ctx.config
    if method in ("freestyle", "untrained"):
        load = load_trained if method == "freestyle" else load_untrained
        model, tokenizer = load(config, ctx, device)
        return model.encode_image, model.encode_text, tokenizer
    clip, tokenizer = load_clip(config.model.arch, pretrained_source(config),
                                seed=config.run.seed, device=device)
    return (lambda pixels: encode_image_baseline(clip, pixels),
            lambda tokens: encode_text(clip, tokens), tokenizer)


@torch.inference_mode()
def _encode_queries(ctx: StageContext, method: str,
                    queries: pa.Table) -> tuple[dict[int, np.ndarray], list[FailureRecord]]:
    """query_id -> L2-normalised embedding; bad query images become failures."""
    cfg = ctx.config.score
    device = resolve_device(ctx.config.run.device)
    image_fn, text_fn, tokenizer = _encoders(ctx, method, device)
    known_bad = ctx.input_failures("extract", "query")  # recorded there already: skip them
    rows = [r for r in queries.select(["query_id", "path", "text"]).to_pylist()
            if r["query_id"] not in known_bad]
    if skipped := len(queries) - len(rows):
        ctx.log.info("score %s: %d test queries skipped, extract recorded them as bad inputs",
                     method, skipped)
    texts = [r for r in rows if r["path"] is None]
    images = [ImageItem("query", r["query_id"], r["path"]) for r in rows if r["path"]]
    emb: dict[int, np.ndarray] = {}
    failures: list[FailureRecord] = []
    with ctx.progress(f"encode {method} queries", len(rows)) as tick:
        for start in range(0, len(texts), cfg.batch_size):
            chunk = texts[start:start + cfg.batch_size]
            tokens = tokenizer([r["text"] or "" for r in chunk]).to(device)
            with autocast(device, cfg.amp):
                out = text_fn(tokens).float().cpu().numpy()
            emb.update(zip((r["query_id"] for r in chunk), out))
            tick(len(chunk))
        for batch in iter_batches(images, ctx.config.extract.image_size,
                                  ctx.config.data.max_image_pixels, cfg.batch_size,
                                  cfg.num_workers, pin_memory=device.type == "cuda"):
            failures += [FailureRecord(i.item_kind, i.item_id, i.path, reason)
                         for i, reason in batch.failures]
            if batch.pixels is not None:
                with autocast(device, cfg.amp):
                    out = image_fn(batch.pixels.to(device, non_blocking=True))
                emb.update(zip((i.item_id for i in batch.items), out.float().cpu().numpy()))
            tick(len(batch.items) + len(batch.failures))
    return emb, failures


def _query_sets(queries: pa.Table, emb: dict[int, np.ndarray], cfg: ScoreConfig,
                ctx: StageContext) -> list[QuerySet]:
    """Single-style sets for every style present, then each fused pair under each fusion."""
    cols = {c: queries[c].to_pylist() for c in ("query_id", "image_id", "style", "class_label")}
    by_style: dict[str, list[int]] = {}
    for row, style in enumerate(cols["style"]):
        by_style.setdefault(style, []).append(row)
    labelled = all(v is not None for v in cols["class_label"])

    def arrays(rows: list[int]):
        ids = np.array([cols["query_id"][r] for r in rows], dtype=np.int64)
        targets = np.array([cols["image_id"][r] for r in rows], dtype=np.int64)
        labels = np.array([cols["class_label"][r] for r in rows]) if labelled else None
        return ids, targets, labels, np.stack([emb[int(i)] for i in ids])

    sets = []
    for style in sorted(by_style):
        ids, targets, labels, x = arrays(by_style[style])
        sets.append(QuerySet(style, "none", ids, None, targets, labels, x))
    for pair in cfg.fused:
        a, b = pair.split("+")
        if a not in by_style or b not in by_style:
            ctx.log.warning("score: no %s queries in the test split (it has %s); skipping "
                            "score.fused pair %s", a if a not in by_style else b,
                            ", ".join(sorted(by_style)), pair)
            continue
        # One pair per photo: its first query of each style (the authors' sketch+text data
        # has one of each per photo).
        first_b: dict[int, int] = {}
        for r in by_style[b]:
            first_b.setdefault(cols["image_id"][r], r)
        rows_a, seen = [], set()
        for r in by_style[a]:
            target = cols["image_id"][r]
            if target in first_b and target not in seen:
                seen.add(target)
                rows_a.append(r)
        if not rows_a:
            continue
        ids, targets, labels, xa = arrays(rows_a)
        partner_ids, _, _, xb = arrays([first_b[t] for t in targets.tolist()])
        for fusion in cfg.fusions:
            if fusion == "max":
                sets.append(QuerySet(pair, "max", ids, partner_ids, targets, labels, xa, xb))
            else:
                sets.append(QuerySet(pair, "mean", ids, partner_ids, targets, labels,
                                     fuse_mean(xa, xb)))
    return sets


def _one_query_per_photo(qs: QuerySet) -> QuerySet:
    """The set's first query (by id) per target photo: the batch protocol's (query, photo)
    pairs. A batch holding two queries of one photo would hold that photo twice, and each
    query would tie with the other's copy (datasets with several sketches per photo)."""
    _, first = np.unique(qs.targets, return_index=True)
    keep = np.sort(first)
    if len(keep) == len(qs.targets):
        return qs

    def pick(x):
        return None if x is None else x[keep]

    return QuerySet(qs.style, qs.fusion, qs.query_ids[keep], pick(qs.partner_ids),
                    qs.targets[keep], pick(qs.labels), qs.emb[keep], pick(qs.emb_partner))


# ---------------------------------------------------------------- outputs


def _schema(columns: str) -> pa.Schema:
    types = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(),
             "DOUBLE": pa.float64(), "FLOAT": pa.float32()}
    return pa.schema([(c.split()[0], types[c.split()[1]]) for c in columns.split(", ")])


def _recall_rows(method: str, qs: QuerySet, protocol: str, ranks: np.ndarray,
                 ks: tuple[int, ...]) -> list[dict]:
    """Recall@K rows from 1-based target ranks (the search depth is >= every K or complete)."""
    return [{"metric": "recall", "method": method, "style": qs.style, "protocol": protocol,
             "fusion": qs.fusion, "k": k, "value": value, "n_queries": len(ranks)}
            for k, value in batch_recall(ranks, ks).items()]


def _class_rows(method: str, qs: QuerySet, I: np.ndarray, gallery_labels, k: int) -> list[dict]:
    gallery_ids, labels = gallery_labels
    common = {"method": method, "style": qs.style, "protocol": "gallery", "fusion": qs.fusion,
              "k": k, "n_queries": len(qs.query_ids)}
    return [
        {"metric": "map", "value": map_at_k(I, qs.labels, labels, k, gallery_ids), **common},
        {"metric": "precision", "value": precision_at_k(I, qs.labels, labels, k, gallery_ids),
         **common},
    ]


def _results_table(method: str, qs: QuerySet, D: np.ndarray, I: np.ndarray,
                   keep: int) -> pa.Table:
    keep = min(keep, I.shape[1])
    n = len(qs.query_ids)
    valid = I[:, :keep] >= 0
    rank = np.broadcast_to(np.arange(1, keep + 1, dtype=np.int32), (n, keep))[valid]
    repeat = valid.sum(axis=1)
    partner = (pa.array(np.repeat(qs.partner_ids, repeat), pa.int64())
               if qs.partner_ids is not None else pa.nulls(int(repeat.sum()), pa.int64()))
    return pa.Table.from_arrays([
        pa.array([method] * int(repeat.sum()), pa.string()),
        pa.array([qs.style] * int(repeat.sum()), pa.string()),
        pa.array([qs.fusion] * int(repeat.sum()), pa.string()),
        pa.array(np.repeat(qs.query_ids, repeat), pa.int64()),
        partner,
        pa.array(rank, pa.int32()),
        pa.array(I[:, :keep][valid], pa.int64()),
        pa.array(D[:, :keep][valid].astype(np.float32), pa.float32()),
    ], schema=_schema(RESULTS))


def _ranks_table(method: str, qs: QuerySet, protocol: str, ranks: np.ndarray,
                 depth: int | None) -> pa.Table:
    """One row per query: its target's 1-based rank (null: not in the top `depth`)."""
    n = len(qs.query_ids)
    found = ranks <= depth if depth is not None else np.ones(n, dtype=bool)
    return pa.Table.from_arrays([
        pa.array([method] * n, pa.string()),
        pa.array([qs.style] * n, pa.string()),
        pa.array([protocol] * n, pa.string()),
        pa.array([qs.fusion] * n, pa.string()),
        pa.array(qs.query_ids, pa.int64()),
        pa.array(qs.partner_ids, pa.int64()) if qs.partner_ids is not None
        else pa.nulls(n, pa.int64()),
        pa.array(qs.targets, pa.int64()),
        pa.array(qs.labels.tolist() if qs.labels is not None else [None] * n, pa.string()),
        pa.array(ranks.astype(np.int32), pa.int32(), mask=~found),
    ], schema=_schema(RANKS))
