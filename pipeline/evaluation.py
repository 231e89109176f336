"""Scoring retrieval: query sets (single styles, fused pairs), Recall@K / mAP rows, and the
results and ranks tables the score stage writes (docs/method.md 6). Arrays in, Arrow out."""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.config import Config, ScoreConfig
from pipeline.index import search_fused_max, search_rerank
from pipeline.index_build import VectorStore
from pipeline.index_tune import effective_search
from pipeline.records import RANKS, RESULTS
from pipeline.retrieval import (
    batch_protocol_ranks,
    batch_recall,
    fuse_mean,
    log_partition,
    map_at_k,
    precision_at_k,
    target_ranks,
)

if TYPE_CHECKING:
    import torch

    from pipeline.data.loader import ImageItem
    from pipeline.methods import Artifacts, Encoders

log = logging.getLogger(__name__)

@dataclass
class QuerySet:
    """Queries scored together: one style, or a fused pair (a's query + b's partner)."""

    style: str                   # "sketch" or "sketch+text"
    fusion: str                  # none | softmax-max | cosine-max | mean
    query_ids: np.ndarray        # (n,)
    partner_ids: np.ndarray | None
    targets: np.ndarray          # (n,) the photo each query should find
    labels: np.ndarray | None    # (n,) class labels, where known
    emb: np.ndarray              # (n, d): the query (or `mean`-fused) embedding
    emb_partner: np.ndarray | None = None  # the max fusions: the second query's embedding


def query_sets(queries: pa.Table, emb: dict[int, np.ndarray],
               cfg: ScoreConfig) -> list[QuerySet]:
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
            log.warning("score: no %s queries in the test split (it has %s); skipping "
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
            sets.append(fused_query_set(pair, fusion, ids, partner_ids, targets, labels, xa, xb))
    return sets


def fused_query_set(style: str, fusion: str, ids: np.ndarray, partner_ids: np.ndarray | None,
                    targets: np.ndarray, labels: np.ndarray | None, xa: np.ndarray,
                    xb: np.ndarray) -> QuerySet:
    """Two queries per row (a's and its partner b's) under one fusion rule: `mean` searches
    with their mean embedding; the max rules (softmax-max, cosine-max) search with both."""
    if fusion == "mean":
        return QuerySet(style, "mean", ids, partner_ids, targets, labels, fuse_mean(xa, xb))
    return QuerySet(style, fusion, ids, partner_ids, targets, labels, xa, xb)


def open_index(artifacts: Artifacts, config: Config, method: str,
               depth: int) -> tuple[Any, VectorStore]:
    """(index, vector store) the index stage wrote for `method`, as the score stage and
    `fsr-pipe query` search them: the index on the GPU when index.use_gpu and run.device is
    CUDA (maybe_to_gpu, for searches of up to `depth` results and score.rerank_k)."""
    from pipeline.device import resolve_device
    from pipeline.index import load_index, maybe_to_gpu

    store = VectorStore.open(artifacts.input_path("index", "vectors", method))
    index = load_index(artifacts.input_path("index", "index", method), expect_d=store.d,
                       expect_ntotal=store.n)
    if config.index.use_gpu and resolve_device(config.run.device).type == "cuda":
        nprobe, _, rerank_k = effective_search(config.score, store.path.parent)
        index = maybe_to_gpu(index, k=max(min(store.n, depth), rerank_k), nprobe=nprobe)
    return index, store


def encode_queries(encoders: Encoders, texts: list[tuple[int, str]], images: list[ImageItem], *,
                   device: torch.device, image_size: int, max_pixels: int, batch_size: int,
                   num_workers: int, amp: str, progress: Callable[[int], None] | None = None,
                   ) -> tuple[dict[int, np.ndarray], list[tuple[ImageItem, str]]]:
    """The one query-encoding path (the score stage's and `fsr-pipe query`'s): (id, text)
    pairs through the method's text tower, image items through its image encoder (the Gram
    path reads the pixels: any style goes in as it is), in batches of `batch_size`.
    Returns id -> L2-normalised float32 embedding, and the (item, reason) of bad images."""
    import torch

    from pipeline.data.loader import encode_items
    from pipeline.device import autocast

    emb: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            tokens = encoders.tokenizer([text for _, text in chunk]).to(device)
            with autocast(device, amp):
                out = encoders.text(tokens).float().cpu().numpy()
            emb.update(zip((i for i, _ in chunk), out))
            if progress is not None:
                progress(len(chunk))
    if not images:
        return emb, []
    done = encode_items(images, lambda pixels, _: encoders.query(pixels, None),
                        image_size=image_size, max_pixels=max_pixels, batch_size=batch_size,
                        num_workers=num_workers, device=device, amp=amp, progress=progress)
    if done.items:
        emb.update(zip((i.item_id for i in done.items), done.out))
    return emb, done.failures


@dataclass
class Scored:
    """One query set scored under both protocols: metric rows, results, ranks tables."""

    metric_rows: list[dict]
    results: pa.Table
    ranks: list[pa.Table]


def search_set(qs: QuerySet, index, store: VectorStore, depth: int,  # noqa: ANN001 - faiss
               cfg: ScoreConfig, search: tuple[int, int, int] | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
    """The gallery protocol's (D, I), top `depth` per query, under the set's fusion, with the
    search parameters tuned by the index stage (search_params.json beside the store), or
    score.nprobe / ef_search / rerank_k where set (index_tune.effective_search). `search`:
    those (nprobe, ef_search, rerank_k), when the caller resolved them once per index."""
    nprobe, ef_search, rerank_k = search or effective_search(cfg, store.path.parent)
    if qs.emb_partner is None:  # one query (a style, or the mean of two)
        return search_rerank(index, qs.emb, depth, nprobe, rerank_k, store.lookup, ef_search)
    softmax = qs.fusion == "softmax-max"
    log_z = None
    if softmax and cfg.softmax_over == "gallery":  # both queries in one pass over the store
        both = log_partition(np.concatenate([qs.emb, qs.emb_partner]), store.blocks())
        log_z = (both[:len(qs.emb)], both[len(qs.emb):])
    return search_fused_max(index, qs.emb, qs.emb_partner, depth, nprobe, max(rerank_k, 0),
                            store.lookup, softmax=softmax, log_z=log_z, ef_search=ef_search)


def score_set(method: str, qs: QuerySet, index, store: VectorStore,  # noqa: ANN001 - faiss
              depth: int, cfg: ScoreConfig, gallery_labels,  # noqa: ANN001
              search: tuple[int, int, int] | None = None) -> Scored:
    """Both protocols for one query set: the gallery (through the index, top `depth`) and
    the authors' batch protocol (one query per photo, batches of score.batch_pairs)."""
    D, I = search_set(qs, index, store, depth, cfg, search)
    gallery_ranks = target_ranks(I, qs.targets)
    rows = recall_rows(method, qs, "gallery", gallery_ranks, cfg.ks)
    if gallery_labels is not None and qs.labels is not None:
        rows += class_rows(method, qs, I, gallery_labels, cfg.map_k)
    ranks = [ranks_table(method, qs, "gallery", gallery_ranks, depth)]
    pairs = one_query_per_photo(qs)
    if cfg.batch_drop_last:  # the authors' DataLoader: full batches only
        pairs = subset(pairs, np.arange(len(pairs.query_ids) // cfg.batch_pairs
                                        * cfg.batch_pairs))
    if len(pairs.query_ids):
        batch_ranks = batch_protocol_ranks(
            pairs.emb, store.lookup(pairs.targets), cfg.batch_pairs, pairs.emb_partner,
            fusion=pairs.fusion)
        rows += recall_rows(method, pairs, "batch", batch_ranks, cfg.ks)
        ranks.append(ranks_table(method, pairs, "batch", batch_ranks, None))
    return Scored(rows, results_table(method, qs, D, I, cfg.keep_k), ranks)


def subset(qs: QuerySet, keep: np.ndarray) -> QuerySet:
    """The set's queries at positions `keep`."""
    def pick(x):  # noqa: ANN001, ANN202
        return None if x is None else x[keep]

    return QuerySet(qs.style, qs.fusion, qs.query_ids[keep], pick(qs.partner_ids),
                    qs.targets[keep], pick(qs.labels), qs.emb[keep], pick(qs.emb_partner))


def one_query_per_photo(qs: QuerySet) -> QuerySet:
    """The set's first query (by id) per target photo: the batch protocol's (query, photo)
    pairs. A batch holding two queries of one photo would hold that photo twice, and each
    query would tie with the other's copy (datasets with several sketches per photo)."""
    _, first = np.unique(qs.targets, return_index=True)
    keep = np.sort(first)
    return qs if len(keep) == len(qs.targets) else subset(qs, keep)


def schema(columns: str) -> pa.Schema:
    types = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(),
             "DOUBLE": pa.float64(), "FLOAT": pa.float32()}
    return pa.schema([(c.split()[0], types[c.split()[1]]) for c in columns.split(", ")])


def recall_rows(method: str, qs: QuerySet, protocol: str, ranks: np.ndarray,
                 ks: tuple[int, ...]) -> list[dict]:
    """Recall@K rows from 1-based target ranks (the search depth is >= every K or complete)."""
    return [{"metric": "recall", "method": method, "style": qs.style, "protocol": protocol,
             "fusion": qs.fusion, "k": k, "value": value, "n_queries": len(ranks)}
            for k, value in batch_recall(ranks, ks).items()]


def class_rows(method: str, qs: QuerySet, I: np.ndarray, gallery_labels, k: int) -> list[dict]:
    gallery_ids, labels = gallery_labels
    common = {"method": method, "style": qs.style, "protocol": "gallery", "fusion": qs.fusion,
              "k": k, "n_queries": len(qs.query_ids)}
    return [
        {"metric": "map", "value": map_at_k(I, qs.labels, labels, k, gallery_ids), **common},
        {"metric": "precision", "value": precision_at_k(I, qs.labels, labels, k, gallery_ids),
         **common},
    ]


def results_table(method: str, qs: QuerySet, D: np.ndarray, I: np.ndarray,
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
    ], schema=schema(RESULTS))


def ranks_table(method: str, qs: QuerySet, protocol: str, ranks: np.ndarray,
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
    ], schema=schema(RANKS))
