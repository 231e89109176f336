"""Search parameters tuned to a recall target on the index stage's own check queries.

    rows, chosen = tune_search(index, store, n_queries=1000, seed=0, nprobes=(8, 32),
                               ef_searches=(32, 64), rerank_cap=200, target=0.95)
    save_search_params(index_dir, chosen)         # search_params.json beside index.faiss
    params = load_search_params(index_dir)        # score and `fsr-pipe query` search with it
    nprobe, ef_search, rerank_k = effective_search(score_config, index_dir)

The sweep (docs/method.md 5): nprobe (IVF) or efSearch (HNSW) times rerank_k (lossy codes
only: SQ8, PQ; Flat, HNSW-Flat and IVF-Flat scores are exact already), each setting measured
for 1-recall@1, 10-recall@10 and queries/s on check queries that are gallery vectors searched
with their own id left out of both lists (`_drop_self`). The chosen setting is the fastest
reaching `target` 10-recall@10; if none does, the most accurate one, flagged `reached=False`.
"""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.artifacts import atomic_path

if TYPE_CHECKING:
    import faiss

    from pipeline.config import ScoreConfig
    from pipeline.index_build import VectorStore

log = logging.getLogger(__name__)

SEARCH_PARAMS = "search_params.json"


@dataclass(frozen=True)
class RecallRow:
    nprobe: int          # 0 = not IVF
    rerank_k: int        # 0 = straight from the codes
    recall_1_at_1: float
    recall_10_at_10: float
    queries_per_s: float
    n_queries: int
    ef_search: int = 0   # 0 = not HNSW
    chosen: bool = False


@dataclass(frozen=True)
class SearchParams:
    """What score and query search an index with; stored as search_params.json beside it."""

    nprobe: int = 1
    ef_search: int = 0
    rerank_k: int = 0
    target_recall: float = 0.0
    recall_10_at_10: float = 0.0
    queries_per_s: float = 0.0
    reached: bool = False
    family: str = ""
    note: str = ""


def _grid(values: Sequence[int], cap: int) -> list[int]:
    kept = sorted({v for v in values if v <= cap})
    return kept or [min(values)]


def rerank_grid(cap: int, n: int) -> list[int]:
    """0, then cap, cap/2, cap/4, cap/8 (each >= 11, the 10-recall@10 minimum), <= n."""
    cap = min(max(cap, 11), n)
    return [0] + sorted({cap >> i for i in range(4) if cap >> i >= 11})


def _measure(index, store: VectorStore, xq: np.ndarray, query_ids: np.ndarray,  # noqa: ANN001
             I_exact: np.ndarray, nprobe: int, ef_search: int, rerank_k: int) -> RecallRow:
    from pipeline.index import knn_recall, search_rerank
    from pipeline.index_build import _drop_self
    from pipeline.index_plan import TUNE_GATHER_BYTES  # what the plan's memory model counts

    k = min(11, store.n)
    width = max(k, rerank_k)
    batch = max(1, TUNE_GATHER_BYTES // (width * 4 * store.d)) if rerank_k else len(xq)
    parts = []
    started = time.perf_counter()
    for start in range(0, len(xq), batch):
        parts.append(search_rerank(index, xq[start:start + batch], k, max(nprobe, 1), rerank_k,
                                   store.lookup, ef_search)[1])
    seconds = max(time.perf_counter() - started, 1e-9)
    found = _drop_self(np.concatenate(parts), query_ids, 10)
    return RecallRow(nprobe, rerank_k if rerank_k else 0, knn_recall(found, I_exact, 1, 1),
                     knn_recall(found, I_exact, 10, 10), len(xq) / seconds, len(xq), ef_search)


def exact_scores(family: str) -> bool:
    """Whether an index of this family scores with the float vectors themselves (re-ranking
    adds nothing)."""
    return family in ("flat", "hnsw", "ivf-flat")


def sweep(index: faiss.Index, family: str, nlist: int, nprobes: Sequence[int],
          ef_searches: Sequence[int], rerank_cap: int, n: int) -> list[tuple[int, int, int]]:
    """(nprobe, ef_search, rerank_k) settings to measure for this index of `family`."""
    from pipeline.index import is_hnsw, is_ivf

    probes = _grid(nprobes, max(nlist, 1)) if is_ivf(index) else [0]
    efs = sorted(set(ef_searches)) if is_hnsw(index) else [0]
    reranks = [0] if exact_scores(family) else rerank_grid(rerank_cap, n)
    return [(p, e, r) for p in probes for e in efs for r in reranks]


def choose(rows: Sequence[RecallRow], target: float) -> tuple[int, bool]:
    """Index of the fastest row reaching `target` 10-recall@10 (True), or of the most accurate
    one, the faster on ties (False)."""
    reaching = [i for i, r in enumerate(rows) if r.recall_10_at_10 >= target]
    if reaching:
        return max(reaching, key=lambda i: rows[i].queries_per_s), True
    return max(range(len(rows)), key=lambda i: (rows[i].recall_10_at_10,
                                                 rows[i].queries_per_s)), False


def tune_search(index: faiss.Index, store: VectorStore, n_queries: int, seed: int,
                nprobes: Sequence[int], ef_searches: Sequence[int], rerank_cap: int,
                target: float, nlist: int = 0,
                family: str | None = None) -> tuple[list[RecallRow], SearchParams]:
    """Measure every setting of the sweep on `n_queries` held-out gallery vectors; the rows
    (the chosen one flagged) and the chosen SearchParams. `family`: the plan's (read from a
    CPU index when not given; faiss's GPU classes do not show it)."""
    from pipeline.index import family_of
    from pipeline.index_build import held_out_queries

    family = family or family_of(index)
    n_queries = min(n_queries, store.n)
    if n_queries == 0 or store.n < 2:
        return [], SearchParams(1, 0, 0, target, family=family,
                                note="no check queries: FAISS's defaults, no re-ranking")
    query_ids, xq, I_exact = held_out_queries(store, n_queries, seed)
    rows = [_measure(index, store, xq, query_ids, I_exact, p, e, r)
            for p, e, r in sweep(index, family, nlist, nprobes, ef_searches, rerank_cap,
                                 store.n)]
    best, reached = choose(rows, target)
    rows[best] = RecallRow(**{**asdict(rows[best]), "chosen": True})
    r = rows[best]
    note = (f"fastest setting with 10-recall@10 >= {target}" if reached else
            f"no setting reached 10-recall@10 {target}; the most accurate one "
            f"({r.recall_10_at_10:.3f}): widen index.check_nprobe / index.ef_search / "
            "index.check_rerank_k or raise index.max_memory_mb")
    if not reached:
        log.warning("index: %s", note)
    params = SearchParams(max(r.nprobe, 1), r.ef_search, r.rerank_k, target, r.recall_10_at_10,
                          r.queries_per_s, reached, family, note)
    return rows, params


def _params_path(index_path: str | os.PathLike) -> Path:
    path = Path(index_path)
    return (path if path.is_dir() else path.parent) / SEARCH_PARAMS


def save_search_params(index_path: str | os.PathLike, params: SearchParams) -> Path:
    """Write search_params.json beside the index (index file or its folder), atomically."""
    path = _params_path(index_path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(params), indent=2))
    return path


def load_search_params(index_path: str | os.PathLike) -> SearchParams | None:
    """The tuned parameters stored beside an index (its file or folder); None if there are none
    (an index built before tuning existed)."""
    path = _params_path(index_path)
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(SearchParams)}
    return SearchParams(**{k: v for k, v in raw.items() if k in known})


# Used when an index folder has no search_params.json (built before tuning): the old defaults.
LEGACY_NPROBE, LEGACY_RERANK_K = 32, 200


def effective_search(cfg: ScoreConfig, index_path: str | os.PathLike) -> tuple[int, int, int]:
    """(nprobe, ef_search, rerank_k) to search with: score.nprobe / score.ef_search /
    score.rerank_k where set (>= 0 for rerank_k, >= 1 for the others), else the tuned values
    stored with the index."""
    params = load_search_params(index_path)
    if params is None:
        log.warning("no %s beside %s (index built before tuning): nprobe %d, rerank_k %d; "
                    "rerun the index stage to tune", SEARCH_PARAMS, index_path, LEGACY_NPROBE,
                    LEGACY_RERANK_K)
        params = SearchParams(LEGACY_NPROBE, 0, LEGACY_RERANK_K)
    nprobe = cfg.nprobe if cfg.nprobe >= 1 else params.nprobe
    ef_search = cfg.ef_search if cfg.ef_search >= 1 else params.ef_search
    rerank_k = cfg.rerank_k if cfg.rerank_k >= 0 else params.rerank_k
    return nprobe, ef_search, rerank_k
