"""The zero-shot protocols (issue 18; docs/method.md 9): queries of classes no training photo
belongs to (data.split = "class"), scored exactly (dense cosine, no index) against

- `zs`: the photos of the unseen classes (zero-shot SBIR: Recall@K of the own photo,
  class-level mAP@k / P@k, score.zs_map_ks / zs_precision_ks, 0 = @all);
- `gzs`: every photo of the gallery, seen and unseen classes (generalised zero-shot);
- `fg`: the photos of the query's own class (fine-grained zero-shot SBIR: Acc@K, stored as
  the `recall` rows of protocol fg: the own photo among the photos of its class).

A rank counts ties against the query (as the batch protocol does). Arrays in, rows out.
"""

# ruff: noqa: E741 - I: FAISS's name for ids

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.config import ScoreConfig
from pipeline.evaluation import QuerySet, Scored, ranks_table, recall_rows, subset
from pipeline.retrieval import average_precision_at_k, fuse_max, fuse_softmax_max

# Scores held at once per chunk of queries: (queries x photos) float64.
CHUNK_CELLS = 1 << 22
PROTOCOLS = ("zs", "gzs", "fg")


@dataclass(frozen=True)
class ClassGallery:
    """The whole gallery (the index's photos) with labels, and which classes are unseen."""

    ids: np.ndarray        # (N,) photo ids
    labels: np.ndarray     # (N,) class labels
    vectors: np.ndarray    # (N, d) unit rows, as the index holds them
    unseen: frozenset[str]  # classes with no training photo


def unseen_labels(labels: np.ndarray, splits: np.ndarray) -> frozenset[str]:
    """Classes of the gallery none of whose photos is in the train split."""
    return frozenset(set(labels.tolist()) - set(labels[splits == "train"].tolist()))


def similarities(qs: QuerySet, vectors: np.ndarray) -> np.ndarray:
    """(n, m) scores of the set's queries against `vectors` under its fusion (softmax-max:
    softmax over these m photos, the gallery the protocol ranks)."""
    sim = qs.emb.astype(np.float32) @ vectors.T
    if qs.emb_partner is None:
        return sim.astype(np.float64)
    other = qs.emb_partner.astype(np.float32) @ vectors.T
    if qs.fusion == "softmax-max":
        return fuse_softmax_max(sim, other)
    return fuse_max(sim, other).astype(np.float64)


def dense_scores(qs: QuerySet, ids: np.ndarray, labels: np.ndarray, vectors: np.ndarray,
                 map_ks: tuple[int, ...], precision_ks: tuple[int, ...],
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(1-based rank of each query's own photo; its rank among the photos of the query's
    class only (fg); {"map@k" / "precision@k": per-query values}) over the gallery (ids,
    labels, vectors), in one pass over chunks of queries."""
    column = {int(i): c for c, i in enumerate(ids.tolist())}
    own = np.array([column[int(t)] for t in qs.targets])
    # Classes as integer codes: a (queries x gallery) compare of strings is 15-150x slower
    # (str / object arrays; measured at 400 x 20,000).
    names, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    where = np.minimum(np.searchsorted(names, qs.labels), len(names) - 1)
    query_codes = np.where(names[where] == qs.labels, where, -1)  # -1: no such gallery class
    query_counts = np.where(query_codes >= 0, counts[where], 0)  # photos of the query's class
    m = len(ids)
    ranks = np.empty(len(own), dtype=np.int64)
    class_ranks = np.empty(len(own), dtype=np.int64)
    per_query = {f"{n}@{k}": np.empty(len(own)) for n, ks in (("map", map_ks),
                 ("precision", precision_ks)) for k in ks}
    step = max(1, CHUNK_CELLS // max(m, 1))
    for start in range(0, len(own), step):
        part = subset(qs, np.arange(start, min(start + step, len(own))))
        S = similarities(part, vectors)
        rows = np.arange(len(S))
        at_least = S >= S[rows, own[start:start + len(S)]][:, None]
        part_codes = query_codes[start:start + len(S), None]
        same = codes[None, :] == part_codes
        ranks[start:start + len(S)] = at_least.sum(axis=1)
        class_ranks[start:start + len(S)] = (at_least & same).sum(axis=1)
        if not per_query:
            continue
        I = np.argsort(-S, axis=1, kind="stable")
        relevant = codes[I] == part_codes
        num_relevant = query_counts[start:start + len(S)]
        for k in map_ks:
            per_query[f"map@{k}"][start:start + len(S)] = average_precision_at_k(
                relevant, num_relevant, k or m)
        for k in precision_ks:
            depth = min(k or m, m)
            per_query[f"precision@{k}"][start:start + len(S)] = (
                relevant[:, :depth].sum(axis=1) / depth)
    return ranks, class_ranks, per_query


def class_metric_rows(method: str, qs: QuerySet, protocol: str,
                      per_query: dict[str, np.ndarray]) -> list[dict]:
    """mAP@k / P@k rows (k = 0: @all), means over the queries."""
    return [{"metric": name.split("@")[0], "method": method, "style": qs.style,
             "protocol": protocol, "fusion": qs.fusion, "k": int(name.split("@")[1]),
             "value": float(np.mean(values)), "n_queries": len(values)}
            for name, values in per_query.items()]


def score_zero_shot(method: str, qs: QuerySet, gallery: ClassGallery,
                    cfg: ScoreConfig) -> Scored | None:
    """The zs, gzs and fg protocols for the set's queries of unseen classes; None when it has
    none (or no labels)."""
    if qs.labels is None or not gallery.unseen:
        return None
    keep = np.flatnonzero(np.isin(qs.labels, list(gallery.unseen)))
    if not len(keep):
        return None
    queries = subset(qs, keep)
    in_unseen = np.isin(gallery.labels, list(gallery.unseen))
    zs, fg, zs_per_query = dense_scores(
        queries, gallery.ids[in_unseen], gallery.labels[in_unseen], gallery.vectors[in_unseen],
        cfg.zs_map_ks, cfg.zs_precision_ks)  # fg: the same pass, own class only
    gzs, _, gzs_per_query = dense_scores(queries, gallery.ids, gallery.labels, gallery.vectors,
                                         cfg.zs_map_ks, cfg.zs_precision_ks)
    rows: list[dict] = []
    ranks: list[pa.Table] = []
    for protocol, found, per_query in (("zs", zs, zs_per_query), ("gzs", gzs, gzs_per_query),
                                       ("fg", fg, {})):
        rows += recall_rows(method, queries, protocol, found, cfg.ks)
        rows += class_metric_rows(method, queries, protocol, per_query)
        ranks.append(ranks_table(method, queries, protocol, found, None))
    return Scored(rows, pa.table({}), ranks)
