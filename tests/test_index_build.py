"""Index builds from Parquet shards: training sample, vector store, checkpoints and resume
(an exception and a SIGKILL mid-build), recall check, and the two-query `max` search."""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids (as in faiss and its docs)

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT

from pipeline.arrays import vectors_to_arrow
from pipeline.index import plan_index, search, search_fused_max, search_rerank
from pipeline.index_build import (
    PARTIAL,
    PARTIAL_STATE,
    TRAINED,
    Shard,
    VectorStore,
    build_index,
    exact_search,
)
from pipeline.index_tune import (
    SearchParams,
    effective_search,
    load_search_params,
    save_search_params,
    tune_search,
)
from pipeline.retrieval import log_partition

D = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shards(directory: Path, n: int, per_shard: int, seed: int = 0) -> list[Shard]:
    """Clustered unit vectors under sparse ids, as the embed stage writes them."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(20, D)))
    x = _unit(centres[rng.integers(20, size=n)] + 0.2 * rng.normal(size=(n, D)))
    ids = np.arange(n, dtype=np.int64) * 7919 + 10**12
    shards = []
    for number, start in enumerate(range(0, n, per_shard)):
        path = directory / f"shard-{number:05d}.parquet"
        part = slice(start, start + per_shard)
        pq.write_table(pa.table({"image_id": pa.array(ids[part]),
                                 "embedding": vectors_to_arrow(x[part])}), path)
        shards.append(Shard(f"shard-{number:05d}", str(path), len(ids[part])))
    return shards


def all_vectors(shards: list[Shard]) -> tuple[np.ndarray, np.ndarray]:
    tables = [pq.read_table(s.path) for s in shards]
    table = pa.concat_tables(tables)
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    return table["image_id"].to_numpy(), x


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Shard]:
    return write_shards(tmp_path_factory.mktemp("shards"), 3000, 250)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def same_index(a: faiss.Index, b: faiss.Index, xq: np.ndarray) -> None:
    assert a.ntotal == b.ntotal
    assert np.array_equal(faiss.serialize_index(a), faiss.serialize_index(b))
    for x, y in zip(search(a, xq, 10, nprobe=4), search(b, xq, 10, nprobe=4)):
        assert np.array_equal(x, y)


def test_build_writes_index_and_vector_store(tmp_path, shards) -> None:
    plan = plan_index(3000, D, "IVF16,Flat")
    build = build_index(shards, plan, tmp_path, seed=0)
    ids, x = all_vectors(shards)
    assert build.index.ntotal == 3000
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ids.npy", "index.faiss", TRAINED, "vectors.npy"]
    store = VectorStore.open(build.vectors_path)
    assert np.array_equal(store.ids, ids)
    np.testing.assert_array_equal(store.lookup(ids[::-7]), x[::-7])
    with pytest.raises(KeyError, match="no stored vector"):
        store.lookup(np.array([5], dtype=np.int64))
    blocks = list(store.blocks(rows=1000))
    assert [len(b) for b in blocks] == [1000, 1000, 1000]
    np.testing.assert_array_equal(np.concatenate(blocks), x)
    # Every id lands under its own vector: an item's nearest neighbour is itself.
    _, I = search(build.index, x[:50], 1, nprobe=16)
    assert np.array_equal(I[:, 0], ids[:50])


def test_training_sample_is_seeded_and_spread(tmp_path, shards, monkeypatch) -> None:
    seen = []
    import pipeline.index_build as module

    real = module.train_index
    monkeypatch.setattr(module, "train_index",
                        lambda plan, xt, use_gpu=False: seen.append(xt.copy()) or real(plan, xt))
    plan = dataclasses.replace(plan_index(3000, D, "IVF16,Flat"), train_size=1000)
    build_index(shards, plan, tmp_path / "a", seed=0)
    build_index(shards, plan, tmp_path / "b", seed=0)
    build_index(shards, plan, tmp_path / "c", seed=1)
    _, x = all_vectors(shards)
    assert len(seen[0]) == plan.train_size
    assert np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[0], seen[2])
    # Not the first rows: the sample reaches into the last shard.
    rows = [int(np.flatnonzero((x == v).all(axis=1))[0]) for v in seen[0]]
    assert max(rows) >= 2750 and min(rows) < 250


class Crash(RuntimeError):
    pass


def test_crashed_build_resumes_without_double_or_lost_shards(tmp_path, shards) -> None:
    plan = plan_index(3000, D, "IVF16,PQ4x4")
    reference = build_index(shards, plan, tmp_path / "ref", seed=0, checkpoint_s=0)

    added = []

    def crash_after_five(phase: str, n: int) -> None:
        if phase == "add" and n:
            added.append(n)
            if len(added) == 5:
                raise Crash

    work = tmp_path / "crashed"
    with pytest.raises(Crash):
        build_index(shards, plan, work, seed=0, checkpoint_s=0, progress=crash_after_five)
    state = json.loads((work / PARTIAL_STATE).read_text())
    # Checkpoints are taken after a shard is added; the crash came before the 5th's.
    assert state["shards"] == [s.key for s in shards[:4]] and state["ntotal"] == 1000
    resumed = build_index(shards, plan, work, seed=0, checkpoint_s=0)
    assert resumed.resumed_shards == 4
    assert not (work / PARTIAL).exists() and not (work / PARTIAL_STATE).exists()
    ids, x = all_vectors(shards)
    same_index(resumed.index, reference.index, x[:100])
    np.testing.assert_array_equal(np.load(resumed.vectors_path), np.load(reference.vectors_path))
    np.testing.assert_array_equal(VectorStore.open(resumed.vectors_path).ids, ids)


def test_checkpoint_newer_than_its_list_restarts_the_add_phase(tmp_path, shards) -> None:
    plan = plan_index(3000, D, "IVF16,Flat")
    reference = build_index(shards, plan, tmp_path / "ref", seed=0)
    work = tmp_path / "w"

    calls = []

    def crash(phase: str, n: int) -> None:
        calls.append((phase, n))
        if phase == "add" and n and len([c for c in calls if c[0] == "add" and c[1]]) == 3:
            raise Crash

    with pytest.raises(Crash):
        build_index(shards, plan, work, seed=0, checkpoint_s=0, progress=crash)
    # Killed between the two renames: the index holds more than the JSON lists.
    state = json.loads((work / PARTIAL_STATE).read_text())
    (work / PARTIAL_STATE).write_text(json.dumps(
        {"shards": state["shards"][:-1], "ntotal": state["ntotal"] - 250}))
    resumed = build_index(shards, plan, work, seed=0)
    assert resumed.resumed_shards == 0
    _, x = all_vectors(shards)
    same_index(resumed.index, reference.index, x[:100])


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from pipeline.index import plan_index
from pipeline.index_build import Shard, build_index
shards = [Shard(*s) for s in {shards!r}]
plan = plan_index(sum(s.rows for s in shards), {d}, "IVF16,PQ4x4")
build_index(shards, plan, {work!r}, seed=0, checkpoint_s=0,
            progress=lambda phase, n: time.sleep(0.2) if phase == "add" and n else None)
"""


def test_sigkilled_build_resumes_to_the_same_index(tmp_path, shards) -> None:
    plan = plan_index(3000, D, "IVF16,PQ4x4")
    reference = build_index(shards, plan, tmp_path / "ref", seed=0)
    work = tmp_path / "killed"
    script = KILL_SCRIPT.format(root=str(REPO_ROOT), d=D, work=str(work),
                                shards=[(s.key, s.path, s.rows) for s in shards])
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not (work / PARTIAL_STATE).exists() or len(
            json.loads((work / PARTIAL_STATE).read_text())["shards"]) < 3:
        assert proc.poll() is None, "the build ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "index.faiss").exists()
    resumed = build_index(shards, plan, work, seed=0)
    assert 3 <= resumed.resumed_shards < len(shards)
    _, x = all_vectors(shards)
    same_index(resumed.index, reference.index, x[:100])


def test_killed_after_the_final_renames_still_finishes(tmp_path, shards) -> None:
    """A kill after vectors.npy was renamed but before the checkpoint was cleared."""
    plan = plan_index(3000, D, "IVF16,Flat")
    reference = build_index(shards, plan, tmp_path / "ref", seed=0)
    work = tmp_path / "w"
    build = build_index(shards, plan, work, seed=0)
    # Recreate the state such a kill leaves: a checkpoint of all but the last shard.
    index = faiss.read_index(str(reference.trained_path))
    ids, x = all_vectors(shards)
    index.add_with_ids(x[:2750], ids[:2750])
    faiss.write_index(index, str(work / PARTIAL))
    (work / PARTIAL_STATE).write_text(json.dumps(
        {"shards": [s.key for s in shards[:-1]], "ntotal": 2750}))
    with open(work / "ids.npy.partial", "wb") as f:
        np.save(f, np.concatenate([ids[:2750], np.full(250, -1)]))
    resumed = build_index(shards, plan, work, seed=0)
    assert resumed.resumed_shards == len(shards) - 1
    same_index(resumed.index, build.index, x[:100])
    np.testing.assert_array_equal(np.load(resumed.vectors_path), x)


def test_check_flat_is_exact_and_ivfpq_reranks_better(tmp_path, shards) -> None:
    flat = build_index(shards, plan_index(3000, D, "Flat"), tmp_path / "flat", seed=0)
    store = VectorStore.open(flat.vectors_path)
    rows, _ = tune_search(flat.index, store, 200, 0, (1, 4), (), 20, 0.95)
    # no lists to probe, and exact scores: nothing to re-rank
    assert [(r.nprobe, r.rerank_k) for r in rows] == [(0, 0)]
    assert all(r.recall_1_at_1 == 1.0 and r.recall_10_at_10 == 1.0 for r in rows)

    pq_build = build_index(shards, plan_index(3000, D, "IVF16,PQ8x4"), tmp_path / "pq", seed=0)
    store = VectorStore.open(pq_build.vectors_path)
    rows, _ = tune_search(pq_build.index, store, 200, 0, (1, 16), (), 50, 0.95, 16)
    by = {(r.nprobe, r.rerank_k): r for r in rows}
    assert set(by) == {(p, k) for p in (1, 16) for k in (0, 12, 25, 50)}
    # 4-byte codes rank poorly (~0.5); exact re-ranking of the top 50 fixes most of it (~0.96).
    assert by[16, 0].recall_10_at_10 < 0.7
    assert by[16, 50].recall_10_at_10 >= 0.9
    assert by[1, 50].recall_10_at_10 < by[16, 50].recall_10_at_10
    assert all(r.n_queries == 200 and r.queries_per_s > 0 for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss sees no GPU (needs faiss-gpu + CUDA)")
def test_gpu_build_checks_recall_at_every_nprobe(tmp_path, shards) -> None:
    # faiss's GPU IVF classes are not CPU IndexIVF subclasses: nprobe must still be swept.
    gpu = build_index(shards, plan_index(3000, D, "IVF16,PQ8"), tmp_path / "gpu", seed=0,
                      use_gpu=True)
    rows, _ = tune_search(gpu.index, VectorStore.open(gpu.vectors_path), 200, 0, (1, 16), (), 50,
                          0.95, 16, family="ivf-pq")
    assert [(r.nprobe, r.rerank_k) for r in rows] == [
        (p, k) for p in (1, 16) for k in (0, 12, 25, 50)]
    by = {(r.nprobe, r.rerank_k): r for r in rows}
    assert by[16, 50].recall_10_at_10 >= 0.9 > by[1, 0].recall_10_at_10


def test_check_leaves_the_query_out(tmp_path) -> None:
    """Duplicated vectors: the self-match must not count, its twin must."""
    x = _unit(np.random.default_rng(0).normal(size=(50, D)))
    x = np.concatenate([x, x])
    ids = np.arange(100, dtype=np.int64)
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"image_id": pa.array(ids), "embedding": vectors_to_arrow(x)}), path)
    build = build_index([Shard("s", str(path), 100)], plan_index(100, D, "Flat"), tmp_path / "w",
                        seed=0)
    store = VectorStore.open(build.vectors_path)
    _, I = exact_search(store, x[:3], 2)
    assert set(I[0]) == {0, 50}
    ([row], _) = tune_search(build.index, store, 100, 0, (1,), (), 10, 0.95)
    assert row.recall_1_at_1 == 1.0


def test_fused_max_search_equals_brute_force_max(tmp_path, shards) -> None:
    build = build_index(shards, plan_index(3000, D, "Flat"), tmp_path, seed=0)
    store = VectorStore.open(build.vectors_path)
    ids, x = all_vectors(shards)
    rng = np.random.default_rng(3)
    xa, xb = _unit(rng.normal(size=(40, D))), _unit(rng.normal(size=(40, D)))
    scores, I = search_fused_max(build.index, xa, xb, 10, nprobe=1, short_k=10,
                                 lookup=store.lookup)
    sim = np.maximum(xa @ x.T, xb @ x.T)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    assert np.array_equal(I, ids[top])
    np.testing.assert_allclose(scores, np.take_along_axis(sim, top, axis=1), rtol=1e-5, atol=1e-6)
    # An id found by both queries appears once.
    assert all(len(set(row)) == len(row) for row in I)
    # The authors' rule, against a dense implementation over the whole gallery: per item the
    # larger of the two queries' softmax(100 cos) probabilities.
    def softmax(logits):
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    xb = _unit(rng.normal(size=(40, D)) * 0.3 + xa)  # queries that score on other scales
    dense = np.log(np.maximum(softmax(100 * (xa @ x.T).astype(np.float64)),
                              softmax(100 * (xb @ x.T).astype(np.float64))))
    top = np.argsort(-dense, axis=1, kind="stable")[:, :10]
    log_z = (log_partition(xa, store.blocks()), log_partition(xb, store.blocks()))
    scores, I = search_fused_max(build.index, xa, xb, 10, nprobe=1, short_k=10,
                                 lookup=store.lookup, softmax=True, log_z=log_z)
    assert np.array_equal(I, ids[top])
    np.testing.assert_allclose(scores, np.take_along_axis(dense, top, axis=1), atol=1e-3)
    # Over the union of the short lists instead: the same top-k when the lists hold the whole
    # gallery; with short lists of 10, offsets from 20 items at most, the order still mostly.
    _, I_all = search_fused_max(build.index, xa, xb, 10, nprobe=1, short_k=3000,
                                lookup=store.lookup, softmax=True)
    assert np.array_equal(I_all, ids[top])
    _, I_short = search_fused_max(build.index, xa, xb, 10, nprobe=1, short_k=10,
                                  lookup=store.lookup, softmax=True)
    assert np.mean(I_short[:, 0] == ids[top][:, 0]) >= 0.9
    # search_rerank with rerank_k = 0 is the index's own search.
    plain = search_rerank(build.index, xa, 5, 1, 0, store.lookup)
    for a, b in zip(plain, search(build.index, xa, 5, 1)):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- tuning to a recall target


def _independent_recall(build, store: VectorStore, params, n_queries: int, seed: int) -> float:
    """10-recall@10 at `params` on other held-out gallery vectors, against brute force by hand."""
    ids, x = store.ids, np.asarray(store.x)
    rows = np.random.default_rng(seed).choice(len(ids), n_queries, replace=False)
    exact = np.argsort(-(x[rows] @ x.T), axis=1, kind="stable")[:, :11]
    exact = np.array([[ids[j] for j in r if j != q][:10] for q, r in zip(rows, exact)])
    _, I = search_rerank(build.index, x[rows], 11, params.nprobe, params.rerank_k, store.lookup,
                         params.ef_search)
    found = np.array([[i for i in r if i != ids[q]][:10] for q, r in zip(rows, I)])
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))


@pytest.mark.parametrize(("factory", "knob"), [("IVF32,PQ4x4", "nprobe"),
                                               ("HNSW8,Flat", "ef_search")])
def test_tuner_reaches_the_target_at_the_fastest_setting(tmp_path, shards, factory, knob) -> None:
    build = build_index(shards, plan_index(3000, D, factory), tmp_path, seed=0)
    store = VectorStore.open(build.vectors_path)
    rows, params = tune_search(build.index, store, 300, seed=0, nprobes=(1, 2, 4, 8, 32),
                               ef_searches=(4, 8, 16, 64), rerank_cap=100, target=0.9,
                               nlist=32)
    assert params.reached and params.recall_10_at_10 >= 0.9
    chosen = [r for r in rows if r.chosen]
    assert len(chosen) == 1 and getattr(chosen[0], knob) == getattr(params, knob)
    # The fastest of the settings that reach the target; some cheaper settings do not.
    reaching = [r for r in rows if r.recall_10_at_10 >= 0.9]
    assert chosen[0].queries_per_s == max(r.queries_per_s for r in reaching)
    assert any(r.recall_10_at_10 < 0.9 for r in rows)
    if knob == "nprobe":  # 4-bit PQ codes need re-ranking; nprobe beyond 32 lists is dropped
        assert params.rerank_k > 0 and {r.nprobe for r in rows} == {1, 2, 4, 8, 32}
    else:  # exact scores: no re-ranking tried
        assert {r.rerank_k for r in rows} == {0} and params.family == "hnsw"
    # Measured again, independently, on other queries: the chosen setting holds (within noise).
    assert _independent_recall(build, store, params, 300, seed=7) >= 0.88


def test_tuner_falls_back_to_the_most_accurate_setting(tmp_path, shards, caplog) -> None:
    build = build_index(shards, plan_index(3000, D, "IVF32,PQ4x4"), tmp_path, seed=0)
    store = VectorStore.open(build.vectors_path)
    with caplog.at_level("WARNING", logger="pipeline.index_tune"):
        rows, params = tune_search(build.index, store, 200, seed=0, nprobes=(1,),
                                   ef_searches=(16,), rerank_cap=11, target=1.0)
    assert not params.reached and "no setting reached" in params.note
    assert params.recall_10_at_10 == max(r.recall_10_at_10 for r in rows)
    assert "no setting reached" in caplog.text


def test_score_searches_with_the_stored_parameters(tmp_path, shards) -> None:
    """search_set (score and query) reads search_params.json beside the store; score.* set
    explicitly override it."""
    from pipeline.config import ScoreConfig
    from pipeline.evaluation import QuerySet, search_set

    build = build_index(shards, plan_index(3000, D, "IVF32,PQ4x4"), tmp_path, seed=0)
    store = VectorStore.open(build.vectors_path)
    xq = store.lookup(store.ids[:50])
    qs = QuerySet("sketch", "none", np.arange(50), None, store.ids[:50], None, xq)
    expected = {(p, r): search_rerank(build.index, xq, 10, p, r, store.lookup)
                for p, r in ((16, 60), (1, 0))}
    assert not np.array_equal(expected[16, 60][1], expected[1, 0][1])
    save_search_params(tmp_path, SearchParams(nprobe=16, rerank_k=60))
    assert load_search_params(build.index_path) == SearchParams(nprobe=16, rerank_k=60)
    assert effective_search(ScoreConfig(), tmp_path) == (16, 0, 60)
    assert effective_search(ScoreConfig(nprobe=1, rerank_k=0), tmp_path) == (1, 0, 0)
    for cfg, key in ((ScoreConfig(), (16, 60)), (ScoreConfig(nprobe=1, rerank_k=0), (1, 0))):
        D_, I = search_set(qs, build.index, store, 10, cfg)
        assert np.array_equal(I, expected[key][1])
