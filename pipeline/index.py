"""FAISS gallery index: plan, train on a sample, fill shard by shard, save, search, re-rank.

Arrays in, arrays out (docs/method.md section 5). Every stored vector is float32 and L2-normalised,
and the metric is inner product, so scores are cosines. Ids are the gallery's int64 image ids
(-1 is FAISS's "no result" and never a real id).

    plan = plan_index(n, d)                 # "auto": Flat / HNSW / IVF-Flat / IVF-SQ8 / IVF-PQ
    index = train_index(plan, xt)                           # xt: rows picked by sample_ids
    add_shard(index, ids, x)                                # once per embed shard, in order
    save_index(index, path); index = load_index(path, expect_d=d, expect_ntotal=n)
    D, I = search(index, xq, k=100, nprobe=32)              # short list (ef_search for HNSW)
    D, I = rerank(xq, I, lookup, k=10)                      # exact cosines from float vectors
    knn_recall(I, I_exact, k_at=10, r=10)                   # 10-recall@10 against brute force

The index structure is a FAISS factory string; `plan_index` (pipeline/index_plan.py) picks one
from the gallery size and a memory budget and says why in `IndexPlan.reason` (the stage logs it
and stores the plan); pipeline/index_tune.py tunes nprobe / efSearch / rerank_k to a recall target.
"""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids (as in faiss and its docs)

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import faiss
import numpy as np

from pipeline.artifacts import atomic_path

# Kept here for callers of pipeline.index; the planner and its memory model live in
# pipeline/index_plan.py.
from pipeline.index_plan import (  # noqa: F401 - re-exported
    IndexPlan,
    add_chunk_rows,
    family_of,
    parse_factory,
    plan_index,
)
from pipeline.index_plan import unwrap as _unwrap
from pipeline.retrieval import SOFTMAX_SCALE, logsumexp_rows

log = logging.getLogger(__name__)

# FAISS's distance for a missing result under inner product (-FLT_MAX); `rerank` uses it too.
MISSING_SCORE = float(np.finfo(np.float32).min)
# Tolerance of the unit-norm check on gallery vectors (float16 storage rounds norms by ~1e-3).
NORM_TOLERANCE = 1e-2


def sample_ids(ids: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of `size` ids without replacement, in their original order."""
    ids = np.asarray(ids)
    if size < 0:
        raise ValueError(f"sample size must be >= 0; got {size}")
    if size >= len(ids):
        return ids.copy()
    rows = np.random.default_rng(seed).choice(len(ids), size=size, replace=False)
    # Original order keeps reads of the sampled rows sequential over the shards.
    return ids[np.sort(rows)]


def _vectors(name: str, x: np.ndarray, d: int, unit: bool) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must be a (n, {d}) array; got shape {x.shape}")
    if unit and len(x):
        # einsum, not np.linalg.norm: no (n, d) temporary (x * x) the size of a training sample.
        worst = float(np.abs(np.sqrt(np.einsum("ij,ij->i", x, x)) - 1.0).max())
        if worst > NORM_TOLERANCE:
            raise ValueError(f"{name} rows must be L2-normalised (inner product = cosine); "
                             f"the largest |norm - 1| is {worst:.3g}")
    return x


def _is_gpu(index: faiss.Index) -> bool:
    """Whether the index, or the IVF part behind an OPQ / PCA pre-transform (which the GPU
    cloner leaves on the CPU around it), lives on a GPU."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _is_gpu(index.index)
    return type(index).__name__.startswith("Gpu") or isinstance(
        index, (faiss.IndexReplicas, faiss.IndexShards))


def is_ivf(index: faiss.Index) -> bool:
    """Whether nprobe applies: an IVF index on the CPU, or any index on a GPU (`to_gpu` only
    copies IVF indexes; faiss's GPU classes are not CPU IndexIVF subclasses)."""
    return faiss.try_extract_index_ivf(index) is not None or _is_gpu(index)


def to_cpu(index: faiss.Index) -> faiss.Index:
    """The index itself if it lives on the CPU, else a CPU copy (for saving)."""
    return faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index


# faiss's GPU search takes k and nprobe up to this.
GPU_MAX_K = 2048


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of an IVF index on all visible GPUs (PQ lookup tables in float16, which large m
    needs). Raises RuntimeError where faiss-gpu cannot hold it (see `maybe_to_gpu`)."""
    if faiss.get_num_gpus() == 0:
        raise RuntimeError("no GPU visible to faiss (install fsr-pipe[gpu] and check CUDA)")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError("only IVF indexes are copied to the GPU; search a flat one on the CPU")
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = hasattr(faiss.downcast_index(ivf), "pq")
    return faiss.index_cpu_to_all_gpus(index, co=options)


def maybe_to_gpu(index: faiss.Index, k: int = 0, nprobe: int = 0) -> faiss.Index:
    """A GPU copy of an IVF index when faiss sees a GPU and can hold and search it; otherwise the
    index itself (CPU search gives the same results, slower), with a warning saying why.

    k and nprobe: the largest the caller will search with (faiss's GPU limit is GPU_MAX_K).
    faiss-gpu rejects some layouts the CPU takes (e.g. PQ codes of other than 8 bits).
    """
    if faiss.get_num_gpus() == 0 or faiss.try_extract_index_ivf(index) is None:
        return index
    if max(k, nprobe) > GPU_MAX_K:
        log.warning("index stays on the CPU: searches need k = %d, nprobe = %d, above faiss's "
                    "GPU limit of %d", k, nprobe, GPU_MAX_K)
        return index
    try:
        return to_gpu(index)
    except RuntimeError as error:
        log.warning("index stays on the CPU: faiss-gpu cannot hold it (%s)",
                    str(error).strip().splitlines()[-1])
        return index


def train_index(plan: IndexPlan, xt: np.ndarray, use_gpu: bool = False) -> faiss.Index:
    """An empty index built from the plan and trained on xt; accepts add_with_ids.

    IVF indexes take ids natively; anything else is wrapped in IndexIDMap2. With `use_gpu` and a
    GPU visible to faiss, an IVF index is trained (and later filled and searched) on the GPU;
    `save_index` copies it back to the CPU.
    """
    index = faiss.index_factory(plan.d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    base = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(base, "do_polysemous_training"):
        # index_factory turns it on for PQ; it only serves Hamming pre-filtering, which
        # `search` never uses, and it was most of the training time.
        base.do_polysemous_training = False
    if not index.is_trained:
        xt = _vectors("xt", xt, plan.d, unit=True)
        if len(xt) < max(plan.nlist, 1):
            raise ValueError(f"training {plan.factory!r} needs at least {plan.nlist} vectors; "
                             f"got {len(xt)}")
        if use_gpu:
            index = maybe_to_gpu(index)
        index.train(xt)
    if ivf is None and not isinstance(
            faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def add_shard(index: faiss.Index, ids: np.ndarray, x: np.ndarray) -> None:
    """Add one shard: unit vectors x (n, d) under int64 ids (n,) >= 0."""
    x = _vectors("x", x, index.d, unit=True)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != (len(x),):
        raise ValueError(f"ids must be a ({len(x)},) array matching x; got shape {ids.shape}")
    if len(ids) and ids.min() < 0:
        raise ValueError("ids must be >= 0 (-1 means 'no result' in FAISS)")
    ivf = faiss.try_extract_index_ivf(index) if not _is_gpu(index) else None
    if ivf is None:
        index.add_with_ids(x, ids)
        return
    # In chunks: FAISS's residuals and PQ distance tables scale with the rows of one call
    # (index_plan.ADD_CHUNK_BYTES); IVF codes do not depend on how the rows are split.
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    rows = add_chunk_rows(index.d, pq.M if pq is not None else 0,
                          pq.ksub if pq is not None else 256)
    for start in range(0, len(x), rows):
        index.add_with_ids(x[start:start + rows], ids[start:start + rows])


def save_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write the index (a CPU copy) to path atomically: a temporary name, then os.replace."""
    path = Path(path)
    with atomic_path(path) as tmp:
        faiss.write_index(to_cpu(index), str(tmp))
    return path


def load_index(
    path: str | os.PathLike, expect_d: int | None = None, expect_ntotal: int | None = None
) -> faiss.Index:
    """Read an index written by save_index, checking dimension, size and metric."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index at {path} (run the index stage first)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path} is not a readable FAISS index: {error}") from error
    if expect_d is not None and index.d != expect_d:
        raise ValueError(f"index {path} has dimension {index.d}, expected {expect_d}")
    if expect_ntotal is not None and index.ntotal != expect_ntotal:
        raise ValueError(f"index {path} holds {index.ntotal} vectors, expected {expect_ntotal}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"index {path} does not use the inner-product metric")
    return index


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int = 0) -> None:
    """nprobe on an IVF index (CPU or GPU), efSearch on an HNSW one; 0 leaves a value as is."""
    ivf = faiss.try_extract_index_ivf(index)
    if nprobe and ivf is not None:
        ivf.nprobe = nprobe
    elif nprobe and _is_gpu(index):  # GPU IVF classes, also behind a pre-transform
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    inner = _unwrap(index)
    if ef_search and isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = ef_search


def is_hnsw(index: faiss.Index) -> bool:
    """Whether efSearch applies (an HNSW index, also inside IDMap / a pre-transform)."""
    return isinstance(_unwrap(index), faiss.IndexHNSW)


def reserve_storage(index: faiss.Index, n: int) -> None:
    """Size a Flat / HNSW-Flat index's float storage for n vectors up front, so adding shard by
    shard never reallocates it (a std::vector grown by doubling holds the old and the new
    buffer while copying: up to 2x the storage at the build's peak)."""
    inner = _unwrap(index)
    storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    if not isinstance(storage, faiss.IndexFlatCodes) or n <= storage.ntotal:
        return
    size = storage.ntotal * storage.code_size
    storage.codes.resize(n * storage.code_size)  # capacity for n ...
    storage.codes.resize(size)                   # ... size back; add() grows within it


def search(
    index: faiss.Index, xq: np.ndarray, k: int, nprobe: int, ef_search: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (D, I) by inner product, visiting nprobe lists (IVF only; GPU: k, nprobe <= 2048),
    with an HNSW search depth of ef_search (0 = the index's own; FAISS uses max(ef, k))."""
    if k < 1 or nprobe < 1 or ef_search < 0:
        raise ValueError(f"k and nprobe must be >= 1 and ef_search >= 0; got k={k}, "
                         f"nprobe={nprobe}, ef_search={ef_search}")
    xq = _vectors("xq", xq, index.d, unit=False)
    set_search_params(index, nprobe, ef_search)
    return index.search(xq, k)


VectorLookup = Callable[[np.ndarray], np.ndarray] | Mapping[int, np.ndarray]


def _fetch(lookup: VectorLookup, ids: np.ndarray, d: int) -> np.ndarray:
    if callable(lookup):
        xb = np.asarray(lookup(ids), dtype=np.float32)
    else:
        try:
            xb = np.stack([np.asarray(lookup[int(i)], dtype=np.float32) for i in ids])
        except KeyError as error:
            raise KeyError(f"no stored vector for gallery id {error.args[0]}") from error
    if xb.shape != (len(ids), d):
        raise ValueError(f"lookup returned shape {xb.shape} for {len(ids)} ids; expected "
                         f"({len(ids)}, {d})")
    return xb


def rerank(
    xq: np.ndarray, I: np.ndarray, lookup: VectorLookup, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking of short lists I (nq, k') by xq . stored vector -> top-k (D, I).

    `lookup` maps sorted unique ids (int64 array) to their float vectors (n, d), or is a
    mapping id -> vector. Ties keep short-list order; -1 entries (and padding when k > k') come
    last with D = -FLT_MAX, as in FAISS.
    """
    return _exact_top_k([xq], I, lookup, k)


def _exact_top_k(
    xqs: list[np.ndarray], I: np.ndarray, lookup: VectorLookup, k: int,
    softmax: bool = False, log_z: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of I by the max over `xqs` of the exact inner products; with
    `softmax`, of the log-softmax values SOFTMAX_SCALE * (x . v) - log Z, log Z per query row
    and array from `log_z`, or (None) over the row's own candidates in I."""
    xqs = [np.ascontiguousarray(x, dtype=np.float32) for x in xqs]
    xq = xqs[0]
    I = np.asarray(I, dtype=np.int64)
    if xq.ndim != 2 or any(x.shape != xq.shape for x in xqs):
        raise ValueError(f"query arrays must be (nq, d) and alike; got {[x.shape for x in xqs]}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if I.ndim != 2 or len(I) != len(xq):
        raise ValueError(f"I must be ({len(xq)}, k') for {len(xq)} queries; got {I.shape}")
    if log_z is not None and len(log_z) != len(xqs):
        raise ValueError(f"need one log_z array per query array; got {len(log_z)}")
    nq, width = I.shape
    D_out = np.full((nq, k), MISSING_SCORE, dtype=np.float32)
    I_out = np.full((nq, k), -1, dtype=np.int64)
    ids = np.unique(I[I >= 0])
    if ids.size == 0:
        return D_out, I_out
    xb = _fetch(lookup, ids, xq.shape[1])
    rows = np.searchsorted(ids, np.maximum(I, ids[0]))
    keep = min(k, width)
    # Blocks of queries keep the gathered (block, k', d) array near 16 MB.
    block = max(1, (1 << 22) // max(1, width * xq.shape[1]))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        gathered = xb[rows[start:stop]]
        invalid = I[start:stop] < 0
        scores = None
        for j, x in enumerate(xqs):
            s = np.einsum("qd,qwd->qw", x[start:stop], gathered)
            if softmax:
                s = np.where(invalid, -np.inf, SOFTMAX_SCALE * s.astype(np.float64))
                z = logsumexp_rows(s) if log_z is None else np.asarray(log_z[j])[start:stop]
                s = s - np.where(np.isfinite(z), z, 0.0)[:, None]
            scores = s if scores is None else np.maximum(scores, s)
        scores[invalid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        top = np.take_along_axis(scores, order, axis=1)
        missing = ~np.isfinite(top)
        D_out[start:stop, :keep] = np.where(missing, MISSING_SCORE, top)
        I_out[start:stop, :keep] = np.where(missing, -1, np.take_along_axis(
            I[start:stop], order, axis=1))
    return D_out, I_out


def knn_recall(I_approx: np.ndarray, I_exact: np.ndarray, k_at: int, r: int) -> float:
    """R-recall@k (FAISS convention): mean fraction of the top-r exact ids found in the top-k_at.

    r=1, k_at=1 is "1-recall@1"; r=k_at=10 is "10-recall@10" (FAISS's 10-intersection@10).
    -1 entries never match; queries are averaged with denominator min(r, valid exact ids).
    """
    I_approx = np.asarray(I_approx)
    I_exact = np.asarray(I_exact)
    if I_approx.ndim != 2 or I_exact.ndim != 2 or len(I_approx) != len(I_exact):
        raise ValueError(f"I_approx {I_approx.shape} and I_exact {I_exact.shape} must be "
                         "(nq, k) arrays with the same nq")
    if not 1 <= k_at <= I_approx.shape[1] or not 1 <= r <= I_exact.shape[1]:
        raise ValueError(f"need 1 <= k_at <= {I_approx.shape[1]} and 1 <= r <= "
                         f"{I_exact.shape[1]}; got k_at={k_at}, r={r}")
    exact = I_exact[:, :r]
    valid = exact >= 0
    found = np.empty(len(exact), dtype=np.int64)
    block = max(1, (1 << 24) // (k_at * r))  # the (block, k_at, r) comparison stays ~16 MB
    for start in range(0, len(exact), block):
        rows = slice(start, start + block)
        match = (I_approx[rows, :k_at, None] == exact[rows, None, :]).any(axis=1)
        found[rows] = (match & valid[rows]).sum(axis=1)
    counts = valid.sum(axis=1)
    scored = counts > 0
    if not scored.any():
        raise ValueError("I_exact has no valid ids to recall")
    return float((found[scored] / counts[scored]).mean())


def search_rerank(
    index: faiss.Index, xq: np.ndarray, k: int, nprobe: int, rerank_k: int,
    lookup: VectorLookup | None, ef_search: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (D, I): the index's top max(k, rerank_k) re-ranked exactly, or plain top-k.

    rerank_k = 0 (or no lookup) returns the index's own scores, which for PQ are approximate.
    """
    if rerank_k <= 0 or lookup is None:
        return search(index, xq, k, nprobe, ef_search)
    _, I = search(index, xq, max(k, rerank_k), nprobe, ef_search)
    return rerank(xq, I, lookup, k)



def search_fused_max(
    index: faiss.Index, xa: np.ndarray, xb: np.ndarray, k: int, nprobe: int, short_k: int,
    lookup: VectorLookup, softmax: bool = False,
    log_z: tuple[np.ndarray, np.ndarray] | None = None, ef_search: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery items of a two-query search, fused per gallery item by a max.

    softmax=False (`cosine-max`): max(xa . v, xb . v). softmax=True (`softmax-max`, the
    authors'): max of the two queries' softmax(SOFTMAX_SCALE * cos) probabilities, as
    log-probabilities; `log_z` = each query's log-partition over the whole gallery
    (retrieval.log_partition), or None to take it over the union of the two short lists.

    Each query's short list of max(k, short_k) comes from the index; their union is scored
    exactly from the stored vectors. With exact short lists this equals the max over the
    whole gallery, for either rule: each query's score is increasing in its cosine, so an
    item in the fused top-k is in the top-k of one of the two queries.
    """
    width = max(k, short_k)
    _, I_a = search(index, xa, width, nprobe, ef_search)
    _, I_b = search(index, xb, width, nprobe, ef_search)
    I = np.sort(np.concatenate([I_a, I_b], axis=1), axis=1)
    I[:, 1:][I[:, 1:] == I[:, :-1]] = -1  # an id in both lists counts once
    return _exact_top_k([xa, xb], I, lookup, k, softmax=softmax,
                        log_z=None if log_z is None else list(log_z))
