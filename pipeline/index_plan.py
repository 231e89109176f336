"""Index planning: the most accurate FAISS index family a memory budget allows (docs/method.md 5).

    plan = plan_index(1_000_000, 512, "auto", 4 << 30, add_rows=10_000)
    plan.factory, plan.family, plan.estimated_bytes, plan.build_bytes, plan.reason

"auto" tries the families from most to least accurate and takes the first whose estimated
build peak fits the budget: `Flat` (exact; small galleries only, as exact search is slow at
scale), `HNSW32,Flat` (float vectors + graph), `IVF<nlist>,Flat`, `IVF<nlist>,SQ8` (one byte
per dimension), `IVF<nlist>,PQ<m>` (m bytes per vector). The last two are re-ranked exactly
from the float store on disk, so their final scores are exact cosines.

The memory model counts what the build allocates (not the interpreter and its libraries,
which the benchmark measures as the RSS before the build):
- the index itself: codes, ids (8 bytes; IDMap2 adds a reverse map), centroids, graph links;
- training: the sample, once, plus the larger of the residuals SQ/PQ train on (a second
  copy) and FAISS k-means' distance block (freed before the residuals are made);
- reading a shard (sampling and adding): about SHARD_COPIES times its float32 size (Parquet
  pages, decoded column, copies), and never less than READ_FLOOR_BYTES (the Arrow memory
  pool and reader state, BLAS buffers: a one-off cost whatever the shard's size); freed
  memory is handed back after each shard
  (`index_build.release_memory`); list growth slack for IVF; the HNSW link table growing by
  doubling (the float storage is reserved up front, `reserve_storage`);
- the recall check and tuning: blocks of the store for exact search and gathered re-rank rows,
  in the same process as the build, so on top of READ_FLOOR_BYTES (Arrow's pool and the BLAS
  buffers stay resident after the last shard).
The float store (`vectors.npy`) is not counted: the build writes it with `pwrite` and reads it
back in blocks, and searches map it read-only from disk, so its pages are clean page cache the
kernel drops under pressure (they show in RSS as file pages while mapped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss

# Below this many vectors exact search is cheap (10k x 512 floats = 20 MB) and needs no training.
FLAT_BELOW = 10_000
# HNSW graph degree (2*M links at level 0): autofaiss's and FAISS's usual choice.
HNSW_M = 32
# FAISS k-means uses at most 256 points per centroid and warns below 39.
MAX_POINTS_PER_CENTROID = 256
MIN_POINTS_PER_CENTROID = 39
# Auto plans train on at most 64 per centroid: k-means time grows with sample x nlist. At
# 1M x 512-d (IVF4096) 256 per centroid means all 1M rows: ~11 min of k-means on 2 cores
# (extrapolated from the measured ~60 GFLOP/s) and a 2 GiB sample, held twice while gathered;
# 64 trained in 253 s on a loaded machine, build peak 1.27 GiB (benchmarks/index_scale.py).
AUTO_POINTS_PER_CENTROID = 64
# Fewest lists an auto plan shrinks nlist to (as a fraction of 4*sqrt(n)) to fit training.
NLIST_SHRINK = 16
# Code sizes (bytes = m at 8 bits) and sub-vector sizes the GPU IVFPQ kernels support;
# `plan_index` prefers an m in both so that `use_gpu` works on the planned index.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_SUBDIM = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
# Rough per-entry cost of IndexIDMap2 (id array + reverse hash map), for memory estimates.
IDMAP2_BYTES = 40
# Memory model factors (see the module docstring).
# One shard being read: Parquet pages, the decoded column, the float32 copy, contiguous and
# residual copies (measured: reading a 20 MiB shard, 10k x 512 float32, raised RSS by ~150 MiB;
# with 8, the HNSW and IVF-PQ builds at 100k x 512 came out 2.5-2.7% over their estimates).
SHARD_COPIES = 9
# What the first shard read and the first k-means add even when the shard is tiny (Arrow's
# memory pool and reader state ~31 MiB, BLAS / OpenMP buffers ~8 MiB; measured at 100k x 64
# in 2,000-row shards, where 9x a 0.5 MiB shard predicted 4.5 MiB and a 48 MiB plan's build
# added 96.6 MiB; with a 40 MiB floor the next 48 MiB plan added 50.9, hence 44). For large
# shards SHARD_COPIES x the shard is the larger and holds them.
READ_FLOOR_BYTES = 44 << 20
# IVF inverted lists grow by doubling, list by list, from the heap: measured 1.45x the codes
# resident after adding 100k x 512 floats to 2048 lists in 10k-row shards.
LIST_SLACK = 1.5
CHECK_BLOCK_ROWS = 1 << 13  # store rows per exact-search block in the recall check
# FAISS k-means assigns the sample to the centroids by exact search in blocks of 4096 points x
# 1024 centroids (distance_compute_blas_query_bs / _database_bs): a float block of up to 16 MiB
# while the coarse quantizer (and PQ's 256-centroid codebooks) train, freed before the
# residuals are computed. Measured at 100k x 64 (sample added, 2 threads): k-means alone +7.3
# MiB at 256 lists, +20 at 1024 and 2048; SQ8 at 256 lists +13.4 (its 9.9 MiB residual copy).
# Uncounted, the 64 MiB plan IVF1024,SQ8 added 68.0 MiB.
KMEANS_BLOCK_ROWS, KMEANS_BLOCK_CENTROIDS = 4096, 1024
# Encoding a batch of n rows with PQ of m sub-quantizers of >= 16 dims makes FAISS allocate an
# (n, m, 256) float distance table (ProductQuantizer::compute_codes, its BLAS path): 10k rows
# of PQ32 are 328 MB, which the first 1M x 512 build at 256 MiB spent on top of its estimate
# (559 MiB added). IVF indexes are therefore filled in chunks of at most this much table or
# residuals (`add_chunk_rows`), which the model counts; the results are the same.
ADD_CHUNK_BYTES = 8 << 20
# Per gallery vector outside the index: the build's id array (`ids.npy`, 8 bytes), and while
# checking and tuning the store's ids, their argsort and sorted copy (`VectorStore`, 24 bytes).
BUILD_ID_BYTES = 8
STORE_ID_BYTES = 24
TUNE_GATHER_BYTES = 16 << 20  # re-rank rows gathered per query batch while tuning


@dataclass(frozen=True)
class IndexPlan:
    """A FAISS factory string for n vectors of d dims and what it implies (0 = not used)."""

    n: int
    d: int
    factory: str
    nlist: int
    pq_m: int
    nbits: int
    train_size: int
    estimated_bytes: int  # the index in RAM
    reason: str
    family: str = ""      # flat | hnsw | ivf-flat | ivf-sq8 | ivf-pq | other
    build_bytes: int = 0  # estimated build peak (train, add, check), beyond the interpreter


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def auto_nlist(n: int) -> int:
    """4*sqrt(n) rounded up to a power of two (in [4, 8]*sqrt(n)), halved to keep 39 per list."""
    nlist = 2 ** math.ceil(math.log2(max(1.0, 4 * math.sqrt(n))))
    while nlist > 1 and MIN_POINTS_PER_CENTROID * nlist > n:
        nlist //= 2
    return nlist


def hnsw_bytes(n: int, d: int, m: int) -> int:
    """Float vectors + links (2M at level 0, M per upper level, 1/(M-1) upper levels per
    vector on average) + offsets and levels + IDMap2 ids."""
    links = 4 * (2 * m + m / max(1, m - 1))
    return int(n * (4 * d + links + 12 + 8 + IDMAP2_BYTES))


def ivf_bytes(n: int, d: int, nlist: int, code_size: int, pq_bytes: int = 0) -> int:
    """Codes + 8-byte ids with list growth slack, coarse centroids, PQ centroids."""
    return int(n * (code_size + 8) * LIST_SLACK) + nlist * d * 4 + pq_bytes


def _encode_row_bytes(d: int, pq_m: int, ksub: int) -> int:
    """Per row added to an IVF index: its residual (d floats) or, for PQ with sub-vectors of
    >= 16 dims, FAISS's (m, ksub) float distance table, whichever is larger."""
    return 4 * max(d, pq_m * ksub if pq_m and d // pq_m >= 16 else 0)


def add_chunk_rows(d: int, pq_m: int = 0, ksub: int = 256) -> int:
    """Rows per add call into an IVF index, so one call's encoding buffers stay within
    ADD_CHUNK_BYTES."""
    return max(1, ADD_CHUNK_BYTES // _encode_row_bytes(d, pq_m, ksub))


def _check_bytes(n: int, d: int) -> int:
    # Exact search streams blocks (two in flight); tuning gathers re-rank rows per batch; the
    # store's ids are held with their argsort and sorted copy.
    return (2 * min(n, CHECK_BLOCK_ROWS) * 4 * d + min(2 * TUNE_GATHER_BYTES, 2 * n * 4 * d)
            + STORE_ID_BYTES * n)


def kmeans_bytes(train_size: int, centroids: int) -> int:
    """FAISS k-means' distance block for `train_size` points and `centroids` centroids."""
    return 4 * min(train_size, KMEANS_BLOCK_ROWS) * min(centroids, KMEANS_BLOCK_CENTROIDS)


def train_bytes(sample_bytes: int, copies: float, kmeans: int) -> int:
    """The training sample, plus the larger of its extra copies (residuals) and k-means' block."""
    return sample_bytes + max(int(sample_bytes * (copies - 1)), kmeans)


def read_bytes(d: int, add_rows: int) -> int:
    """What reading one shard of `add_rows` float32 vectors adds (see READ_FLOOR_BYTES)."""
    return max(SHARD_COPIES * add_rows * 4 * d, READ_FLOOR_BYTES)


def build_bytes(index_bytes: int, growth: int, training: int, n: int, d: int,
                add_rows: int, encode_bytes: int = 0) -> int:
    """Peak of the three phases: train (sample + copies, one shard being read), add (index +
    growth + one shard in flight + the id array + one add chunk's encoding buffers), check
    (index + exact-search blocks + re-rank rows + the store's ids, and the read floor that
    stays resident after the shards)."""
    shard = read_bytes(d, add_rows)
    return max(training + shard,
               index_bytes + growth + shard + BUILD_ID_BYTES * n + encode_bytes,
               index_bytes + _check_bytes(n, d) + READ_FLOOR_BYTES)


def encode_bytes(d: int, add_rows: int, pq_m: int = 0, ksub: int = 256) -> int:
    """Residuals and PQ distance table of one add chunk into an IVF index (see ADD_CHUNK_BYTES)."""
    return min(add_rows, add_chunk_rows(d, pq_m, ksub)) * _encode_row_bytes(d, pq_m, ksub)


def _train_size(n: int, d: int, nlist: int, ksub: int, sample_budget: int,
                per_centroid: int) -> int:
    """min(n, per_centroid per centroid), capped by the sample budget; 0 when even 39 per
    centroid (FAISS's floor) does not fit."""
    wanted = min(n, per_centroid * max(nlist, ksub))
    floor = min(n, MIN_POINTS_PER_CENTROID * max(nlist, ksub))
    cap = sample_budget // (4 * d)
    return 0 if cap < floor else min(wanted, cap)


def train_note(train_size: int, n: int, nlist: int) -> str:
    if train_size >= n:
        return f"train on all {n} ({n // nlist} per centroid)"
    capped = ("" if train_size >= AUTO_POINTS_PER_CENTROID * nlist else ", memory-capped")
    return (f"train on {train_size} ({train_size // nlist} per centroid{capped}; auto plans "
            f"use at most {AUTO_POINTS_PER_CENTROID})")


def pq_m_candidates(d: int) -> list[int]:
    """Divisors m of d with m <= d/4, largest first, GPU-supported sizes before the others."""
    divisors = [m for m in range(max(1, d // 4), 0, -1) if d % m == 0]
    gpu_ok = [m for m in divisors if m in GPU_PQ_M and d // m in GPU_PQ_SUBDIM]
    return gpu_ok + [m for m in divisors if m not in gpu_ok]


def _nlists(n: int) -> list[int]:
    top = auto_nlist(n)
    return [top >> i for i in range(NLIST_SHRINK.bit_length()) if top >> i >= 1]


def _ivf_costs(n: int, d: int, nlist: int, code: str, add_rows: int) -> dict:
    """What IVF<nlist>,<code> (Flat, SQ8 or PQ<m>) costs besides its training sample: the
    index, the centroids (and PQ codebooks), the sample's copies, its add phase's encoding."""
    if code == "Flat":
        family, code_size, ksub, copies, pq_extra, m = "ivf-flat", 4 * d, 0, 1.1, 0, 0
    elif code == "SQ8":
        family, code_size, ksub, copies, pq_extra, m = "ivf-sq8", d, 0, 2.0, 0, 0
    else:
        m = int(code[2:])
        family, code_size, ksub, copies, pq_extra = "ivf-pq", m, 256, 2.0, 256 * d * 4
    return {"family": family, "ksub": ksub, "copies": copies, "m": m,
            "index": ivf_bytes(n, d, nlist, code_size, pq_extra),
            "coarse": nlist * d * 4 + pq_extra, "encode": encode_bytes(d, add_rows, m)}


def _kmeans(nlist: int, cost: dict, train_size: int) -> int:
    return kmeans_bytes(train_size, max(nlist, cost["ksub"]))


def _ivf_peak(n: int, d: int, add_rows: int, nlist: int, cost: dict, train_size: int) -> int:
    training = train_bytes(train_size * 4 * d, cost["copies"], _kmeans(nlist, cost, train_size))
    return build_bytes(cost["index"], 0, training + cost["coarse"], n, d, add_rows,
                       cost["encode"])


def _ivf_candidate(n: int, d: int, budget: int, add_rows: int, nlist: int, code: str,
                   ) -> IndexPlan | None:
    """IVF<nlist>,<code> (Flat, SQ8 or PQ<m>) if its build fits the budget, else None."""
    cost = _ivf_costs(n, d, nlist, code, add_rows)
    # The sample may use what the train phase has left after the centroids and shard reads,
    # held `copies` times or beside k-means' block (`train_bytes`).
    left = budget - cost["coarse"] - read_bytes(d, add_rows)
    sample_budget = int(min(left / cost["copies"], left - _kmeans(nlist, cost, n)))
    train_size = _train_size(n, d, nlist, cost["ksub"], sample_budget, AUTO_POINTS_PER_CENTROID)
    if not train_size:
        return None
    peak = _ivf_peak(n, d, add_rows, nlist, cost, train_size)
    if peak > budget:
        return None
    return IndexPlan(n, d, f"IVF{nlist},{code}", nlist, cost["m"], 8 if cost["m"] else 0,
                     train_size, cost["index"], "", cost["family"], peak)


def _smallest_build(n: int, d: int, add_rows: int, codes: list[str],
                    flat_peak: int | None) -> tuple[int, str]:
    """(bytes, what) of the cheapest build auto could plan: each IVF code at the fewest lists
    and FAISS's floor of 39 training points per centroid, or exact Flat (`flat_peak`, small
    galleries), which wins a tie."""
    nlist = _nlists(n)[-1]
    builds = []
    for code in codes:
        cost = _ivf_costs(n, d, nlist, code, add_rows)
        floor = min(n, MIN_POINTS_PER_CENTROID * max(nlist, cost["ksub"]))
        what = "1-byte PQ codes" if code == "PQ1" else f"IVF{nlist},{code}"
        builds.append((_ivf_peak(n, d, add_rows, nlist, cost, floor), what))
    need, what = min(builds)
    if flat_peak is not None and math.ceil(flat_peak / 2**20) <= math.ceil(need / 2**20):
        return flat_peak, "exact Flat"
    return need, what


def plan_auto(n: int, d: int, budget: int, add_rows: int) -> IndexPlan:
    """The first family, most accurate first, whose build fits `budget` bytes."""
    shard = f"add batches of {add_rows} rows"
    skipped: list[str] = []
    flat = n * (4 * d + 8 + IDMAP2_BYTES)
    if n < FLAT_BELOW:
        peak = build_bytes(flat, 0, 0, n, d, add_rows)
        if peak <= budget:
            reason = (f"n={n} < {FLAT_BELOW}: exact search over float vectors (Flat, ids kept by "
                      f"IDMap2), no training; {gib(flat)}, build peak ~{gib(peak)}")
            return IndexPlan(n, d, "Flat", 0, 0, 0, 0, flat, reason, "flat", peak)
        skipped.append(f"Flat needs ~{gib(peak)}")
    else:
        hnsw = hnsw_bytes(n, d, HNSW_M)
        # The link table grows by doubling while adding: up to one more copy of it.
        peak = build_bytes(hnsw, hnsw - flat, 0, n, d, add_rows)
        if peak <= budget:
            reason = (f"n={n}: HNSW{HNSW_M} graph over the float vectors (exact scores, the "
                      f"fastest family at high recall; no training), {gib(hnsw)} in RAM, build "
                      f"peak ~{gib(peak)} with {shard}, within {gib(budget)}")
            return IndexPlan(n, d, f"HNSW{HNSW_M},Flat", 0, 0, 0, 0, hnsw, reason, "hnsw", peak)
        skipped.append(f"HNSW{HNSW_M},Flat needs ~{gib(peak)}")
    codes = ["Flat", "SQ8"] + [f"PQ{m}" for m in pq_m_candidates(d)]
    for code in codes:
        for nlist in _nlists(n):
            plan = _ivf_candidate(n, d, budget, add_rows, nlist, code)
            if plan is not None:
                return _explain(plan, budget, skipped, shard)
        if code in ("Flat", "SQ8"):
            floor = ivf_bytes(n, d, 1, 4 * d if code == "Flat" else d)
            skipped.append(f"IVF,{code} needs over {gib(floor)}")
    need, smallest = _smallest_build(n, d, add_rows, codes,
                                     peak if n < FLAT_BELOW else None)
    raise ValueError(
        f"{n} vectors of dimension {d} fit no index family within index.max_memory_mb = "
        f"{budget >> 20}: the smallest build ({smallest}) needs ~{gib(need)}; raise "
        f"index.max_memory_mb to at least {math.ceil(need / 2**20)} (or give index.factory)")


def _explain(plan: IndexPlan, budget: int, skipped: list[str], shard: str) -> IndexPlan:
    what = {"ivf-flat": "over full float vectors (exact scores)",
            "ivf-sq8": "with 8-bit scalar codes (d bytes per vector), re-ranked from the store",
            "ivf-pq": f"with PQ{plan.pq_m}x8 codes ({plan.pq_m} bytes per vector, the largest "
                      f"GPU-friendly m <= d/4 that fits), re-ranked from the store"}[plan.family]
    coarse = f"IVF{plan.nlist} (4*sqrt(n) rounded up to a power of two"
    coarse += (", halved until training fit)" if plan.nlist < auto_nlist(plan.n) else ")")
    reason = (f"n={plan.n}: {coarse} {what}; {train_note(plan.train_size, plan.n, plan.nlist)}; "
              f"{gib(plan.estimated_bytes)} in RAM, build peak ~{gib(plan.build_bytes)} with "
              f"{shard}, within {gib(budget)}")
    if skipped:
        reason += "; did not fit: " + ", ".join(skipped)
    return IndexPlan(plan.n, plan.d, plan.factory, plan.nlist, plan.pq_m, plan.nbits,
                     plan.train_size, plan.estimated_bytes, reason, plan.family,
                     plan.build_bytes)


def parse_factory(d: int, factory: str) -> faiss.Index:
    """The empty, untrained index a factory string describes; ValueError if FAISS rejects it."""
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1]
        raise ValueError(
            f"index factory string {factory!r} is not valid for d={d}: {message}") from error


def unwrap(index: faiss.Index) -> faiss.Index:
    """The index inside IDMap / IDMap2 / pre-transform wrappers, downcast."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def family_of(index: faiss.Index) -> str:
    """flat | hnsw | ivf-flat | ivf-sq8 | ivf-pq | other, for an index or a factory's index."""
    inner = unwrap(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if isinstance(ivf, faiss.IndexIVFFlat):
            return "ivf-flat"
        if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
            return "ivf-sq8"
        return "ivf-pq" if hasattr(ivf, "pq") else "other"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    return "flat" if isinstance(inner, faiss.IndexFlat) else "other"


def plan_given(n: int, d: int, factory: str, budget: int, add_rows: int) -> IndexPlan:
    """The plan of an explicit factory string: checked against n, costed, never refused for
    memory (an estimate over budget is noted in the reason)."""
    index = parse_factory(d, factory)
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 0
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else index), "pq", None)
    m, nbits = (pq.M, pq.nbits) if pq is not None else (0, 0)
    if nlist > n:
        raise ValueError(f"index factory string {factory!r} has {nlist} lists but the gallery has "
                         f"only {n} vectors to train them; use fewer lists or 'auto'")
    family = family_of(index)
    pq_extra = 2**nbits * d * 4 if pq else 0
    if ivf is not None:
        code_bytes = ivf_bytes(n, d, nlist, ivf.code_size, pq_extra)
    elif family == "hnsw":
        code_bytes = hnsw_bytes(n, d, unwrap(index).hnsw.nb_neighbors(1))
    else:
        code_bytes = n * (index.sa_code_size() + 8 + IDMAP2_BYTES)
    # Up to 256 per centroid, capped by the budget, never below FAISS's floor of 39.
    ksub = max(nlist, 2**nbits if pq else 0, 1)
    train_size = 0 if index.is_trained else max(
        min(n, MIN_POINTS_PER_CENTROID * ksub),
        min(n, MAX_POINTS_PER_CENTROID * ksub, budget // (4 * d)))
    encode = encode_bytes(d, add_rows, m, 2**nbits) if ivf is not None else 0
    training = train_bytes(train_size * 4 * d, 2.0, kmeans_bytes(train_size, ksub))
    peak = build_bytes(code_bytes, 0, training + nlist * d * 4 + pq_extra, n, d, add_rows, encode)
    notes = [f"given factory {factory!r} ({family})"]
    if train_size and nlist and train_size < MIN_POINTS_PER_CENTROID * nlist:
        notes.append(f"only {train_size // nlist} training points per centroid "
                     f"(FAISS wants >= {MIN_POINTS_PER_CENTROID})")
    if peak > budget:
        notes.append(f"build estimate ~{gib(peak)} exceeds index.max_memory_mb = {budget >> 20}")
    notes.append(f"train on {train_size}" if train_size else "no training")
    reason = "; ".join(notes) + f"; {gib(code_bytes)} in RAM, build peak ~{gib(peak)}"
    return IndexPlan(n, d, factory, nlist, m, nbits, train_size, code_bytes, reason, family,
                     peak)


def plan_index(n: int, d: int, factory: str = "auto", max_memory_bytes: int = 4 << 30,
               add_rows: int = 1 << 16) -> IndexPlan:
    """Index structure for n unit vectors of d dims (inner product): "auto" or a factory string.

    add_rows: the most rows added at once (the largest embed shard).
    """
    if n < 1 or d < 1:
        raise ValueError(f"an index needs n >= 1 vectors of d >= 1 dims; got n={n}, d={d}")
    add_rows = max(1, min(add_rows, n))
    if factory != "auto":
        return plan_given(n, d, factory, max_memory_bytes, add_rows)
    return plan_auto(n, d, max_memory_bytes, add_rows)
