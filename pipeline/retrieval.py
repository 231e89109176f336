"""Retrieval scores: Recall@K, mAP@200 / P@200, two-query fusion, the authors' batch protocol.

Arrays in, arrays out (docs/method.md section 6). `I` is a (nq, k) array of gallery ids per query,
best first, -1 for "no result" (what `pipeline.index.search` / `rerank` return). Scores are
fractions in [0, 1], not percentages.

    recall_at_k(I, targets)                                   # {1: .., 5: .., 10: ..}
    map_at_k(I, query_labels, gallery_labels, k=200, gallery_ids=ids)
    precision_at_k(I, query_labels, gallery_labels, k=200, gallery_ids=ids)
    fuse_softmax_max(sim_sketch, sim_text)          # the authors' two-query fusion
    fuse_max(sim_sketch, sim_text); fuse_mean(emb_sketch, emb_text)
    batch_recall(batch_protocol_ranks(q_emb, g_emb, batch_size=24))
    sign_test_p(wins=9, losses=2)                              # paired: is method A better?
"""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids (as in faiss and its docs)

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.stats import sign_test_p  # noqa: F401 - part of this module's API

RECALL_KS = (1, 5, 10)
# The authors turn cosines into probabilities as softmax(100 * cos) (CLIP's logit scale).
SOFTMAX_SCALE = 100.0


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check_I(I: np.ndarray, nq: int | None = None) -> np.ndarray:
    I = np.asarray(I)
    if I.ndim != 2 or (nq is not None and len(I) != nq):
        expected = f"({nq}, k)" if nq is not None else "(nq, k)"
        raise ValueError(f"I must be a {expected} array of gallery ids; got shape {I.shape}")
    return I


def target_ranks(I: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based position of each query's target id in its row of I; k + 1 where absent."""
    targets = np.asarray(targets)
    I = _check_I(I, len(targets))
    hit = I == targets[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, I.shape[1] + 1).astype(np.int64)


def recall_at_k(
    I: np.ndarray,
    targets: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
    gallery_size: int | None = None,
) -> dict[int, float]:
    """Recall@K: fraction of queries whose own photo (targets, (nq,)) is in the top K of I.

    K larger than I's width is allowed only when the lists are complete
    (`gallery_size` <= width), where Recall@K = Recall@width.
    """
    I = _check_I(I)
    complete = gallery_size is not None and gallery_size <= I.shape[1]
    for k in ks:
        if k < 1 or (k > I.shape[1] and not complete):
            raise ValueError(f"Recall@{k} needs short lists of at least {k} ids; I has "
                             f"{I.shape[1]} (search with a larger k)")
    return batch_recall(target_ranks(I, targets), ks)


def batch_recall(ranks: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """{K: fraction of 1-based ranks <= K} for each K."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array; got shape {ranks.shape}")
    return {int(k): float((ranks <= k).mean()) for k in ks}


# ---------------------------------------------------------------- class-level: mAP@k, P@k


def relevance(
    I: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    gallery_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(relevant (nq, k) bool: I's item has the query's label, num_relevant (nq,) in gallery).

    `gallery_labels` (N,) labels the whole gallery; its rows are named by `gallery_ids` (N,),
    or, with None, I holds row numbers. -1 entries of I are never relevant.
    """
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    I = _check_I(I, len(query_labels)).astype(np.int64)
    if gallery_labels.ndim != 1 or gallery_labels.size == 0:
        raise ValueError(
            f"gallery_labels must be a non-empty 1-D array; got shape {gallery_labels.shape}")
    valid = I >= 0
    if gallery_ids is None:
        if (I >= len(gallery_labels)).any():
            raise ValueError(f"I has row numbers >= the gallery size {len(gallery_labels)}")
        rows = np.where(valid, I, 0)
    else:
        gallery_ids = np.asarray(gallery_ids, dtype=np.int64)
        if gallery_ids.shape != gallery_labels.shape:
            raise ValueError(f"gallery_ids {gallery_ids.shape} and gallery_labels "
                             f"{gallery_labels.shape} must have the same length")
        order = np.argsort(gallery_ids, kind="stable")
        where = np.minimum(np.searchsorted(gallery_ids[order], I), len(order) - 1)
        if (valid & (gallery_ids[order][where] != I)).any():
            raise ValueError("I holds ids that are not in gallery_ids")
        rows = order[np.where(valid, where, 0)]
    relevant = valid & (gallery_labels[rows] == query_labels[:, None])
    names, counts = np.unique(gallery_labels, return_counts=True)
    slot = np.minimum(np.searchsorted(names, query_labels), len(names) - 1)
    num_relevant = np.where(names[slot] == query_labels, counts[slot], 0).astype(np.int64)
    return relevant, num_relevant


def average_precision_at_k(
    relevant: np.ndarray, num_relevant: np.ndarray, k: int = 200, interpolated: bool = True
) -> np.ndarray:
    """Per-query AP@k (nq,), the SBIR convention; NaN for queries with no relevant item.

    AP@k = sum over relevant hits at ranks i <= k of p(i), divided by min(R, k), where R is
    the number of relevant gallery items. With `interpolated` (default), p(i) is the
    interpolated precision max_{j >= i, j <= k} P@j, as in the VOC-style `eval_AP_inner(...,
    top=200)` evaluation code shared by the zero-shot SBIR literature (SAKE, ZSE-SBIR and
    later CLIP-based works; Sketchy-ext / TU-Berlin mAP@200). With `interpolated=False`, p(i) =
    P@i: the plain "mean precision at each hit, over min(R, k)" (GLDv2's mAP@100 form).
    """
    relevant = np.asarray(relevant, dtype=bool)
    num_relevant = np.asarray(num_relevant)
    if relevant.ndim != 2 or num_relevant.shape != (len(relevant),):
        raise ValueError(f"relevant (nq, k) and num_relevant (nq,) do not match: "
                         f"{relevant.shape}, {num_relevant.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    hits = relevant[:, :k]
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    if interpolated:
        precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * hits).sum(axis=1) / np.minimum(num_relevant, k)
    return np.where(num_relevant > 0, ap, np.nan)


def _class_level_inputs(I, query_labels, gallery_labels, k, gallery_ids):
    relevant, num_relevant = relevance(I, query_labels, gallery_labels, gallery_ids)
    depth = min(k, len(np.asarray(gallery_labels)))
    if relevant.shape[1] < depth:
        raise ValueError(f"@{k} scores need short lists of at least {depth} ids; I has "
                         f"{relevant.shape[1]} (search with a larger k)")
    scored = num_relevant > 0
    if not scored.any():
        raise ValueError("no query label occurs in gallery_labels; nothing to score")
    return relevant, num_relevant, depth, scored


def map_at_k(
    I: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    k: int = 200,
    gallery_ids: np.ndarray | None = None,
    interpolated: bool = True,
) -> float:
    """mAP@k: mean of `average_precision_at_k` over queries whose label is in the gallery."""
    relevant, num_relevant, _, scored = _class_level_inputs(
        I, query_labels, gallery_labels, k, gallery_ids)
    ap = average_precision_at_k(relevant, num_relevant, k, interpolated)
    return float(ap[scored].mean())


def precision_at_k(
    I: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    k: int = 200,
    gallery_ids: np.ndarray | None = None,
) -> float:
    """P@k: relevant items in the top min(k, N) over min(k, N), N = gallery size (SBIR code).

    Averaged over the queries whose label is in the gallery, like `map_at_k`.
    """
    relevant, _, depth, scored = _class_level_inputs(
        I, query_labels, gallery_labels, k, gallery_ids)
    return float((relevant[:, :depth].sum(axis=1)[scored] / depth).mean())


# ---------------------------------------------------------------- two-query fusion


def fuse_max(sim_a: np.ndarray, sim_b: np.ndarray) -> np.ndarray:
    """Per gallery item, the larger of two raw cosine rows (fusion `cosine-max`). Not the
    authors' rule (fuse_softmax_max): with a real CLIP, text-image cosines sit far below
    image-image ones, so the image query decides almost every ranking."""
    sim_a = np.asarray(sim_a)
    sim_b = np.asarray(sim_b)
    if sim_a.shape != sim_b.shape:
        raise ValueError(f"similarities must have the same shape; got {sim_a.shape}, {sim_b.shape}")
    return np.maximum(sim_a, sim_b)


def log_partition(x: np.ndarray, blocks: Iterable[np.ndarray],
                  scale: float = SOFTMAX_SCALE) -> np.ndarray:
    """(n,) float64 log sum_j exp(scale * x_i . v_j) over the vectors of `blocks` (e.g. a
    VectorStore's, the whole gallery), streamed: the offset that turns row i's scaled cosines
    into log-softmax values."""
    x = np.asarray(x, dtype=np.float32)
    total = np.full(len(x), -np.inf)
    for block in blocks:
        logits = scale * (x @ np.asarray(block, dtype=np.float32).T).astype(np.float64)
        total = np.logaddexp(total, logsumexp_rows(logits))
    return total


def logsumexp_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log sum exp of a 2-D array (-inf for rows with no finite value)."""
    if logits.shape[1] == 0:
        return np.full(len(logits), -np.inf)
    top = np.max(logits, axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    return (safe + np.log(np.exp(logits - safe).sum(axis=1, keepdims=True)))[:, 0]


def fuse_softmax_max(sim_a: np.ndarray, sim_b: np.ndarray, log_z_a: np.ndarray | None = None,
                     log_z_b: np.ndarray | None = None,
                     scale: float = SOFTMAX_SCALE) -> np.ndarray:
    """The authors' two-query fusion (`softmax-max`): per gallery item, the larger of the two
    queries' softmax(scale * cos) probabilities, as log-probabilities (same order).

    sim_a, sim_b: (n, m) cosines of each query against m gallery items. log_z_a, log_z_b: each
    row's log-partition over the gallery the softmax runs over (`log_partition`); None = over
    these m columns (the batch protocol's batch, a dense gallery).
    """
    sim_a = np.asarray(sim_a, dtype=np.float64)
    sim_b = np.asarray(sim_b, dtype=np.float64)
    if sim_a.shape != sim_b.shape or sim_a.ndim != 2:
        raise ValueError(f"similarities must be the same (n, m) shape; got {sim_a.shape}, "
                         f"{sim_b.shape}")
    a, b = scale * sim_a, scale * sim_b
    log_z_a = logsumexp_rows(a) if log_z_a is None else np.asarray(log_z_a, dtype=np.float64)
    log_z_b = logsumexp_rows(b) if log_z_b is None else np.asarray(log_z_b, dtype=np.float64)
    return np.maximum(a - log_z_a[:, None], b - log_z_b[:, None])


def fuse_mean(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Mean of the two L2-normalised query embeddings, renormalised -> float32 unit rows."""
    emb_a = np.asarray(emb_a)
    emb_b = np.asarray(emb_b)
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"embeddings must have the same shape; got {emb_a.shape}, {emb_b.shape}")
    return _unit_rows((_unit_rows(emb_a) + _unit_rows(emb_b)) / 2)


# ---------------------------------------------------------------- the authors' batch protocol


def batch_protocol_ranks(
    q_emb: np.ndarray,
    g_emb: np.ndarray,
    batch_size: int = 24,
    q_emb_extra: np.ndarray | None = None,
    fusion: str = "softmax-max",
) -> np.ndarray:
    """Rank (1-based) of each query's own photo within its batch of `batch_size` pairs.

    Row i of q_emb and g_emb is a (query, photo) pair; consecutive batches of `batch_size`
    pairs (the last one possibly smaller) are scored by cosine, as in the authors' evaluation
    (docs/method.md 6, only for comparison with published numbers). rank = number of photos in the
    batch at least as similar as the own photo, so ties count against the query. With
    `q_emb_extra` (e.g. the text of a sketch+text query), the two similarity rows are fused by
    `fusion`: `softmax-max` (the authors': softmax over the batch's photos) or `cosine-max`.
    """
    if q_emb_extra is not None and fusion not in ("softmax-max", "cosine-max"):
        raise ValueError(f"fusion must be 'softmax-max' or 'cosine-max'; got {fusion!r}")
    q = _unit_rows(q_emb)
    g = _unit_rows(g_emb)
    extra = None if q_emb_extra is None else _unit_rows(q_emb_extra)
    if q.ndim != 2 or q.shape != g.shape or (extra is not None and extra.shape != q.shape):
        raise ValueError(f"q_emb {q.shape}, g_emb {g.shape} (and q_emb_extra) must be the same "
                         "(n, d) shape: row i is a (query, photo) pair")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    ranks = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), batch_size):
        stop = min(start + batch_size, len(q))
        sim = q[start:stop] @ g[start:stop].T
        if extra is not None:
            other = extra[start:stop] @ g[start:stop].T
            sim = (fuse_softmax_max(sim, other) if fusion == "softmax-max"
                   else fuse_max(sim, other))
        own = np.diagonal(sim)[:, None]
        ranks[start:stop] = (sim >= own).sum(axis=1)
    return ranks
