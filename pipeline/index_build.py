"""Build a gallery index from embedding shards on disk: resumable, memory bounded by one shard.

The I/O side of the index stage (docs/method.md 5); `pipeline.index` holds the array functions.

    shards = [Shard("shard-00000", "embed/.../embeddings.parquet", 40), ...]
    plan = plan_index(sum(s.rows for s in shards), d, "auto", budget)
    build = build_index(shards, plan, work_dir, seed=0)        # resumes from work_dir
    store = VectorStore.open(build.vectors_path)               # exact vectors, by id
    rows, params = tune_search(build.index, store, 1000, 0, (8, 32), (), 100, 0.95)

`build_index` trains the empty index once on a seeded sample of all rows (saved as
`trained.faiss`), then adds the shards in order with their int64 ids. Every `checkpoint_s`
seconds it saves the partly filled index with the list of shards in it (`partial.faiss` +
`partial.json`, each written atomically, the JSON last): a killed build reloads that and adds
exactly the shards not listed, so none is added twice or lost. The float vectors are copied
into one `.npy` (row order = shard order, with a matching ids file) for exact re-ranking
and the recall check; rows are written at fixed offsets, so a resumed build rewrites them
idempotently.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipeline.arrays import arrow_to_vectors
from pipeline.artifacts import atomic_path
from pipeline.index import (
    IndexPlan,
    add_shard,
    load_index,
    maybe_to_gpu,
    reserve_storage,
    sample_ids,
    save_index,
    train_index,
)
from pipeline.index_plan import CHECK_BLOCK_ROWS

log = logging.getLogger(__name__)

TRAINED = "trained.faiss"
PARTIAL = "partial.faiss"
PARTIAL_STATE = "partial.json"
VECTORS = "vectors.npy"
IDS = "ids.npy"
# Rows per block when streaming the vector store (exact search): 64k x 512 float32 = 128 MiB.
BLOCK_ROWS = 1 << 16


@dataclass(frozen=True)
class Shard:
    """One embedding Parquet file (`image_id`, `embedding`) and its row count."""

    key: str
    path: str
    rows: int


def read_shard(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (n,), vectors float32 (n, d)) of one shard, checked against its row count."""
    table = pq.read_table(shard.path, columns=["image_id", "embedding"])
    if len(table) != shard.rows:
        raise ValueError(f"{shard.path} has {len(table)} rows, the catalog says {shard.rows}; "
                         "the file changed after it was written (reset the embed stage)")
    ids = table["image_id"].to_numpy().astype(np.int64, copy=False)
    return ids, arrow_to_vectors(table["embedding"]).astype(np.float32, copy=False)


def release_memory() -> None:
    """Hand freed memory back to the OS after a shard: Arrow's pool (mimalloc / jemalloc) and
    glibc's heap keep freed shard-sized buffers resident otherwise (measured at 100k x 512:
    +175 MiB of RSS after reading 10 shards of 20 MB), which the build's budget cannot afford."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    if (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim():  # noqa: ANN202 - a ctypes function or None
    """glibc's malloc_trim, looked up once (find_library runs `ldconfig -p`); None elsewhere."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None


def shard_dim(shard: Shard) -> int:
    """Embedding dimension of a shard, from its Parquet schema."""
    field = pq.read_schema(shard.path).field("embedding")
    return int(field.type.list_size)


def _offsets(shards: Sequence[Shard]) -> list[int]:
    return np.concatenate([[0], np.cumsum([s.rows for s in shards])]).astype(int).tolist()


# ---------------------------------------------------------------- exact vectors on disk


class VectorStore:
    """Gallery vectors in a `.npy` file (row order = shard order) and their ids beside it."""

    def __init__(self, vectors_path: Path, ids: np.ndarray, x: np.ndarray) -> None:
        self.path = vectors_path
        self.ids = ids
        self.x = x  # read-only memmap (n, d)
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def d(self) -> int:
        return int(self.x.shape[1])

    @classmethod
    def open(cls, vectors_path: str | os.PathLike) -> VectorStore:
        vectors_path = Path(vectors_path)
        ids_path = vectors_path.with_name(IDS)
        for path in (vectors_path, ids_path):
            if not path.is_file():
                raise FileNotFoundError(f"no vector store file {path} (run the index stage)")
        x = np.load(vectors_path, mmap_mode="r")
        ids = np.load(ids_path)
        if x.ndim != 2 or ids.shape != (len(x),):
            raise ValueError(f"{vectors_path} {x.shape} and {ids_path} {ids.shape} do not match")
        return cls(vectors_path, ids, x)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors (len(ids), d) of the given ids (any order); KeyError if unknown."""
        ids = np.asarray(ids, dtype=np.int64)
        where = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        missing = self._sorted[where] != ids
        if missing.any():
            raise KeyError(f"no stored vector for gallery id {int(ids[missing][0])}")
        rows = self._order[where]
        # Gather in row order (sequential reads), then put back in the asked order.
        by_row = np.argsort(rows, kind="stable")
        out = np.empty((len(ids), self.d), dtype=np.float32)
        out[by_row] = self.x[rows[by_row]]
        return out

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
        """float32 blocks of consecutive rows, read into fresh buffers (no growing mapping)."""
        header = self.x.offset
        row_bytes = self.d * self.x.dtype.itemsize
        with open(self.path, "rb") as f:
            for start in range(0, self.n, rows):
                count = min(rows, self.n - start)
                f.seek(header + start * row_bytes)
                block = np.fromfile(f, dtype=self.x.dtype, count=count * self.d)
                yield block.reshape(count, self.d).astype(np.float32, copy=False)


class _StoreWriter:
    """Writes rows of a preallocated `.npy` at fixed offsets (idempotent on resume)."""

    def __init__(self, path: Path, n: int, d: int, dtype: np.dtype) -> None:
        self.path = path
        if not path.exists() or np.load(path, mmap_mode="r").shape != (n, d):
            created = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, d))
            del created  # sparse file with the header; rows are written below
        mapped = np.load(path, mmap_mode="r")
        self.header, self.dtype, self.d = mapped.offset, mapped.dtype, d
        del mapped

    def write(self, start_row: int, x: np.ndarray) -> None:
        # A view of the rows, not a bytes copy: the add phase holds one shard already.
        data = memoryview(np.ascontiguousarray(x, dtype=self.dtype)).cast("B")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            offset = self.header + start_row * self.d * self.dtype.itemsize
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- build


@dataclass
class BuildResult:
    index: faiss.Index
    trained_path: Path
    index_path: Path
    vectors_path: Path
    train_seconds: float
    add_seconds: float
    resumed_shards: int  # shards found in a checkpoint, not added again


def _training_sample(shards: Sequence[Shard], size: int, seed: int,
                     on_shard: Callable[[int], None]) -> np.ndarray:
    """The vectors of a seeded uniform sample of `size` rows of all shards, streamed."""
    n = sum(s.rows for s in shards)
    rows = sample_ids(np.arange(n, dtype=np.int64), size, seed)  # sorted row numbers
    xt = np.empty((len(rows), shard_dim(shards[0])), dtype=np.float32)  # held once, filled
    filled = 0
    for shard, start in zip(shards, _offsets(shards)):
        mine = rows[(rows >= start) & (rows < start + shard.rows)] - start
        if len(mine):
            xt[filled:filled + len(mine)] = read_shard(shard)[1][mine]
            filled += len(mine)
            release_memory()
        on_shard(1)
    assert filled == len(rows)
    return xt


def _save_npy(path: Path, x: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, x)


def _save_checkpoint(index: faiss.Index, work_dir: Path, added: list[str], ntotal: int) -> None:
    save_index(index, work_dir / PARTIAL)
    with atomic_path(work_dir / PARTIAL_STATE) as tmp:
        tmp.write_text(json.dumps({"shards": added, "ntotal": ntotal}))


def _load_checkpoint(work_dir: Path, d: int) -> tuple[faiss.Index, list[str]] | None:
    state_path, index_path = work_dir / PARTIAL_STATE, work_dir / PARTIAL
    if not state_path.is_file() or not index_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    index = load_index(index_path, expect_d=d)
    if index.ntotal != state["ntotal"]:
        # The JSON is written after the index: a mismatch means the index is newer than
        # the list (killed between the two renames). Start the add phase over.
        return None
    return index, list(state["shards"])


def build_index(
    shards: Sequence[Shard],
    plan: IndexPlan,
    work_dir: str | os.PathLike,
    seed: int,
    store_dtype: str = "float32",
    use_gpu: bool = False,
    checkpoint_s: float = 60.0,
    progress: Callable[[str, int], object] | None = None,
) -> BuildResult:
    """Train (once), fill shard by shard, save: `index.faiss`, `vectors.npy`, `ids.npy`.

    `progress(phase, n)` is called with ("sample", shards read), ("add", rows added).
    Resumes from what a killed call left in `work_dir`.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tick = progress or (lambda phase, n: None)
    n = sum(s.rows for s in shards)
    if n != plan.n:
        raise ValueError(f"the plan is for {plan.n} vectors but the shards hold {n}")
    gpu = use_gpu and faiss.get_num_gpus() > 0
    if use_gpu and not gpu:
        log.warning("faiss sees no GPU (faiss-cpu installed?): the index is built on the CPU; "
                    "install fsr-pipe[gpu] instead of fsr-pipe[cpu] for GPU indexes")

    started = time.monotonic()
    trained_path = work_dir / TRAINED
    if trained_path.is_file():
        trained = load_index(trained_path, expect_d=plan.d)
        tick("sample", len(shards))
    else:
        xt = _training_sample(shards, plan.train_size, seed, lambda k: tick("sample", k)) \
            if plan.train_size else np.zeros((0, plan.d), np.float32)
        trained = train_index(plan, xt, use_gpu=gpu)
        del xt
        save_index(trained, trained_path)
    train_seconds = time.monotonic() - started

    started = time.monotonic()
    resumed = _load_checkpoint(work_dir, plan.d)
    index, added = resumed if resumed else (load_index(trained_path, expect_d=plan.d), [])
    reserve_storage(index, n)  # Flat / HNSW: no reallocation of the float storage while adding
    if gpu:
        index = maybe_to_gpu(index)
    done, resumed_shards = set(added), len(added)
    vectors_path = work_dir / VECTORS
    if added and vectors_path.is_file() and not (work_dir / f"{VECTORS}.partial").exists():
        # Killed after the final renames but before the checkpoint was cleared: the
        # finished store holds every row the checkpoint relies on.
        os.replace(vectors_path, work_dir / f"{VECTORS}.partial")
    store = _StoreWriter(work_dir / f"{VECTORS}.partial", n, plan.d, np.dtype(store_dtype))
    ids_path = work_dir / f"{IDS}.partial"
    all_ids = np.load(ids_path) if ids_path.is_file() and added else np.full(n, -1, np.int64)
    tick("add", sum(s.rows for s in shards if s.key in done))
    last_checkpoint = time.monotonic()
    for shard, start in zip(shards, _offsets(shards)):
        if shard.key in done:
            continue
        ids, x = read_shard(shard)
        store.write(start, x)
        all_ids[start:start + len(ids)] = ids
        add_shard(index, ids, x)
        del x
        release_memory()
        added.append(shard.key)
        tick("add", len(ids))
        if time.monotonic() - last_checkpoint >= checkpoint_s and len(added) < len(shards):
            _save_npy(ids_path, all_ids)  # before the index state that relies on it
            _save_checkpoint(index, work_dir, added, index.ntotal)
            last_checkpoint = time.monotonic()
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} vectors after adding every shard, "
                           f"expected {n}; reset the index stage and run it again")
    index_path = save_index(index, work_dir / "index.faiss")
    _save_npy(work_dir / IDS, all_ids)
    os.replace(store.path, vectors_path)
    for leftover in (PARTIAL, PARTIAL_STATE, f"{IDS}.partial"):
        (work_dir / leftover).unlink(missing_ok=True)
    return BuildResult(index, trained_path, index_path, vectors_path, train_seconds,
                       time.monotonic() - started, resumed_shards)


# ---------------------------------------------------------------- recall against exact search


def exact_search(store: VectorStore, xq: np.ndarray, k: int,
                 block_rows: int = CHECK_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (D, ids) by inner product over the whole store, streamed block by block
    (small blocks: the recall check runs inside the index build's memory budget)."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    D, rows = knn_ground_truth(np.ascontiguousarray(xq, dtype=np.float32),
                               store.blocks(block_rows), k,
                               metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
    return D, np.where(rows >= 0, store.ids[np.maximum(rows, 0)], -1)


def _drop_self(lists: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row of `lists` without the query's own id, cut to k (padded with -1)."""
    out = np.full((len(lists), k), -1, dtype=np.int64)
    for row, (ids, own) in enumerate(zip(lists, self_ids)):
        kept = ids[ids != own][:k]
        out[row, :len(kept)] = kept
    return out


def held_out_queries(store: VectorStore, n_queries: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query ids, their vectors, exact top-10 lists without the query's own id) for a seeded
    sample of `n_queries` stored gallery vectors (n_queries <= store.n): a vector finding
    itself would flatter the index, so checks measure finding *other* neighbours."""
    query_ids = sample_ids(store.ids, n_queries, seed)
    xq = store.lookup(query_ids)
    _, I_exact = exact_search(store, xq, min(11, store.n))
    return query_ids, xq, _drop_self(I_exact, query_ids, 10)
