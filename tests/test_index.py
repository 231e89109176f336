"""FAISS index: auto plans, training, shard-by-shard filling, save/load, search, re-rank, recall."""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids (as in faiss and its docs)

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest

from pipeline import index as index_module
from pipeline.index import (
    IndexPlan,
    add_shard,
    knn_recall,
    load_index,
    plan_index,
    rerank,
    sample_ids,
    save_index,
    search,
    train_index,
)
from pipeline.index_build import release_memory

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, seed: int, d: int = D, clusters: int = 100) -> np.ndarray:
    """Unit vectors around `clusters` random directions (the same directions for every seed)."""
    centres = _unit(np.random.default_rng(1234).normal(size=(clusters, d)))
    rng = np.random.default_rng(seed)
    return _unit(centres[rng.integers(clusters, size=n)] + 0.15 * rng.normal(size=(n, d)))


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """One OpenMP thread: with torch's runtime also loaded and 2 shared cores, spinning FAISS
    threads made these tests 6x slower (7 s instead of 1 s to train IVF64,PQ8)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, xb, xq, exact top-100 ids): 20k gallery vectors under sparse int64 ids, 200 queries."""
    xb = _clustered(20_000, seed=0)
    xq = _clustered(200, seed=1)
    ids = np.arange(20_000, dtype=np.int64) * 7919 + 10**12
    _, rows = faiss.knn(xq, xb, 100, metric=faiss.METRIC_INNER_PRODUCT)
    return ids, xb, xq, ids[rows]


def _filled(plan: IndexPlan, ids: np.ndarray, xb: np.ndarray, shard: int = 5000) -> faiss.Index:
    xt = xb[np.isin(ids, sample_ids(ids, plan.train_size, seed=0))]
    index = train_index(plan, xt)
    for start in range(0, len(ids), shard):
        add_shard(index, ids[start:start + shard], xb[start:start + shard])
    return index


@pytest.fixture(scope="module")
def ivfpq(gallery) -> faiss.Index:
    """The gallery in IVF64,PQ8, trained on a 10k sample (FAISS wants 39 * 256 for 8-bit PQ)."""
    ids, xb, _, _ = gallery
    plan = plan_index(len(ids), D, factory="IVF64,PQ8", max_memory_bytes=10_000 * D * 4)
    assert plan.train_size == 10_000
    return _filled(plan, ids, xb)


# ---------------------------------------------------------------- plans


def test_plan_tiny_gallery_is_exact() -> None:
    plan = plan_index(100, 512)
    assert (plan.factory, plan.nlist, plan.pq_m, plan.train_size) == ("Flat", 0, 0, 0)
    assert "exact" in plan.reason
    assert plan.estimated_bytes >= 100 * 512 * 4


MIB = 1 << 20
# The benchmark's scale (benchmarks/index_scale.py): 1M x 512-d in shards of 10k rows.
BENCH = {"n": 1_000_000, "d": 512, "add_rows": 10_000}
ACCURACY = ["flat", "hnsw", "ivf-flat", "ivf-sq8", "ivf-pq"]  # the order auto tries them in


@pytest.mark.parametrize(("budget_mb", "family", "factory"), [
    (4096, "hnsw", "HNSW32,Flat"),     # the floats + graph (2.2 GiB) fit: no compression
    # HNSW's build (2.6 GiB) does not fit; IVF-Flat's lists (1.5x growth slack) cost more.
    (2048, "ivf-sq8", "IVF4096,SQ8"),
    (1024, "ivf-sq8", "IVF4096,SQ8"),  # 1 byte per dimension, a smaller training sample
    (256, "ivf-pq", "IVF512,PQ32"),    # PQ codes, fewer lists so that training fits
])
def test_auto_plan_by_budget_at_a_million(budget_mb, family, factory) -> None:
    plan = plan_index(**BENCH, max_memory_bytes=budget_mb * MIB)
    assert (plan.family, plan.factory) == (family, factory)
    assert plan.estimated_bytes <= plan.build_bytes <= budget_mb * MIB
    faiss.index_factory(plan.d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if family != "hnsw":  # the reason names what did not fit
        assert "did not fit: HNSW32,Flat needs" in plan.reason
    if plan.nlist:
        assert 39 * plan.nlist <= plan.train_size <= 64 * max(plan.nlist, 256)


def test_build_model_counts_pq_encoding_and_ids() -> None:
    """The add phase counts the id array and one add chunk's PQ distance table, which FAISS
    allocates per add call (n x m x 256 floats for sub-vectors of >= 16 dims): unchunked, 10k
    rows of PQ32 were 328 MB the first 1M build at 256 MiB had not counted (issue 19)."""
    from pipeline.index_plan import (
        ADD_CHUNK_BYTES,
        BUILD_ID_BYTES,
        SHARD_COPIES,
        add_chunk_rows,
        encode_bytes,
    )

    rows = add_chunk_rows(512, 32)
    assert rows * 32 * 256 * 4 <= ADD_CHUNK_BYTES and rows >= 64
    assert encode_bytes(512, 10_000, 32) == rows * 32 * 256 * 4
    assert encode_bytes(512, 10_000, 64) == add_chunk_rows(512, 64) * 512 * 4  # 8-dim: no table
    plan = plan_index(**BENCH, max_memory_bytes=256 * MIB)
    add_phase = (plan.estimated_bytes + SHARD_COPIES * 10_000 * 512 * 4
                 + BUILD_ID_BYTES * plan.n + encode_bytes(512, 10_000, plan.pq_m))
    assert add_phase <= plan.build_bytes <= 256 * MIB


def test_build_model_has_a_read_floor_for_small_shards() -> None:
    """Reading even a tiny shard costs Arrow's pool and reader state and BLAS buffers, ~44 MiB
    (measured at 100k x 64 in 2,000-row shards: 9x the 0.5 MiB shard predicted 4.5 MiB, and a
    build planned at 48 MiB added 96.6), and they stay resident while the same process checks
    and tunes the index. Large shards' reads are as they were."""
    from pipeline.index_plan import READ_FLOOR_BYTES, SHARD_COPIES, _check_bytes, read_bytes

    assert read_bytes(64, 2_000) == READ_FLOOR_BYTES
    assert read_bytes(512, 10_000) == SHARD_COPIES * 10_000 * 512 * 4
    # 99k x 64: tuning's re-rank rows (32 MiB) on top of the floor set the minimum
    with pytest.raises(ValueError, match=r"smallest build \(1-byte PQ codes\) needs ~8\d\.\d MiB"):
        plan_index(99_000, 64, max_memory_bytes=64 * MIB, add_rows=2_000)
    plan = plan_index(99_000, 64, max_memory_bytes=84 * MIB, add_rows=2_000)
    assert plan.family == "ivf-pq"
    assert (READ_FLOOR_BYTES + plan.estimated_bytes + _check_bytes(99_000, 64)
            <= plan.build_bytes <= 84 * MIB)
    # a small gallery: the minimum named is exact search's, and that budget builds it
    with pytest.raises(ValueError, match=r"smallest build \(exact Flat\) needs .* at least 45 "):
        plan_index(160, 64, max_memory_bytes=40 * MIB, add_rows=40)
    assert plan_index(160, 64, max_memory_bytes=45 * MIB, add_rows=40).factory == "Flat"


def test_training_counts_kmeans_distance_block() -> None:
    """FAISS k-means holds a (4096 points x up to 1024 centroids) float block beside the sample;
    SQ / PQ residuals are made after it is freed, so training holds the larger of the two
    (uncounted, a 64 MiB plan of IVF1024,SQ8 at 100k x 64 added 68.0 MiB)."""
    from pipeline.index_plan import READ_FLOOR_BYTES, kmeans_bytes, train_bytes

    assert kmeans_bytes(40_000, 1024) == kmeans_bytes(40_000, 4096) == 16 * MIB
    assert kmeans_bytes(40_000, 256) == 4 * MIB and kmeans_bytes(1_000, 256) == 1_000 * 256 * 4
    assert train_bytes(10 * MIB, 2.0, 16 * MIB) == 26 * MIB  # the block is the larger
    assert train_bytes(30 * MIB, 2.0, 16 * MIB) == 60 * MIB  # the residuals are
    assert train_bytes(10 * MIB, 1.1, 4 * MIB) == 14 * MIB   # IVF-Flat: no residual copy
    plan = plan_index(99_000, 64, max_memory_bytes=120 * MIB, add_rows=2_000)
    assert plan.factory == "IVF1024,Flat"
    sample = plan.train_size * 64 * 4
    assert READ_FLOOR_BYTES + sample + 16 * MIB <= plan.build_bytes <= 120 * MIB


def test_kmeans_peak_stays_within_its_model() -> None:
    """Training IVF1024,Flat on 41k x 64 (sample already held) raises the peak RSS by no more
    than the model's k-means block plus a few MiB of BLAS / OpenMP buffers."""
    from pipeline.index_plan import kmeans_bytes

    x = _clustered(41_000, seed=5, d=64)
    plan = IndexPlan(41_000, 64, "IVF1024,Flat", 1024, 0, 0, 41_000, 0, "test", "ivf-flat")
    release_memory()  # freed heap pages would let k-means' block go unseen
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak RSS")
    before = _status_kib("VmRSS")
    train_index(plan, x)
    assert (_status_kib("VmHWM") - before) << 10 <= kmeans_bytes(41_000, 1024) + 8 * MIB


def _status_kib(field: str) -> int:
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1])


def test_add_shard_in_chunks_matches_one_call_and_bounds_the_pq_table() -> None:
    """IVF-PQ is filled in chunks: the same index as one add_with_ids call, and adding 10k x 512
    rows to PQ32 raises the peak RSS far less than FAISS's 328 MB one-call distance table."""
    xb = _clustered(10_000, seed=3, d=512)
    ids = np.arange(10_000, dtype=np.int64) + 5
    plan = IndexPlan(10_000, 512, "IVF16,PQ32", 16, 32, 8, 10_000, 0, "test", "ivf-pq")
    trained = train_index(plan, xb)
    whole, chunked = faiss.clone_index(trained), faiss.clone_index(trained)
    whole.add_with_ids(xb[:2000], ids[:2000])
    add_shard(chunked, ids[:2000], xb[:2000])
    for ivf in (whole, chunked):
        faiss.extract_index_ivf(ivf).nprobe = 16
    assert np.array_equal(whole.search(xb[:50], 10)[1], chunked.search(xb[:50], 10)[1])
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak RSS")
    before = _status_kib("VmRSS")
    add_shard(chunked, ids[2000:], xb[2000:])  # 8,000 rows: 262 MB of table in one call
    assert (_status_kib("VmHWM") - before) << 10 < 64 * MIB


def test_auto_plan_gets_more_accurate_with_budget() -> None:
    families = [plan_index(**BENCH, max_memory_bytes=mb * MIB).family
                for mb in (256, 512, 1024, 2048, 4096, 8192)]
    ranks = [ACCURACY.index(f) for f in families]
    assert ranks == sorted(ranks, reverse=True)
    assert families[0] == "ivf-pq" and families[-1] == "hnsw"


def test_auto_plan_refuses_up_front_and_names_the_minimum() -> None:
    with pytest.raises(ValueError, match="index.max_memory_mb = 64") as error:
        plan_index(**BENCH, max_memory_bytes=64 * MIB)
    need = int(str(error.value).split("at least ")[1].split()[0])
    assert need > 64
    plan = plan_index(**BENCH, max_memory_bytes=need * MIB)  # the minimum it names is enough
    assert plan.family == "ivf-pq" and plan.build_bytes <= need * MIB


def test_plan_medium_gallery_is_hnsw() -> None:
    plan = plan_index(20_000, 512)
    assert (plan.factory, plan.family, plan.nlist, plan.train_size) == ("HNSW32,Flat", "hnsw", 0, 0)
    # Float vectors (2 KiB each) + 2 x 32 links at level 0 (256 B) and a few upper ones.
    assert 20_000 * (2048 + 256) < plan.estimated_bytes < 20_000 * (2048 + 256 + 128)


def test_plan_large_gallery() -> None:
    plan = plan_index(10_000_000, 512, add_rows=10_000)
    assert (plan.factory, plan.nlist, plan.pq_m, plan.nbits) == ("IVF16384,PQ64", 16384, 64, 8)
    # The 4 GiB budget caps the 2-copy training sample just below 64 per centroid.
    assert 39 * 16384 <= plan.train_size <= 64 * 16384
    assert plan.build_bytes <= 4 << 30


def test_plan_tight_budget_shrinks_pq_codes_and_lists() -> None:
    plan = plan_index(10_000_000, 512, max_memory_bytes=500 * MIB, add_rows=10_000)
    assert plan.family == "ivf-pq" and plan.pq_m < 64 and 512 % plan.pq_m == 0
    assert plan.nlist < 16384 and "halved until training fit" in plan.reason
    assert plan.build_bytes <= 500 * MIB
    assert plan.train_size >= 39 * max(plan.nlist, 256)  # never below FAISS's floor


@pytest.mark.parametrize("n", [10_000, 49_999, 50_000, 300_000, 3_000_000, 100_000_000])
@pytest.mark.parametrize("budget_mb", [256, 4096])
def test_auto_plans_follow_the_rules(n: int, budget_mb: int) -> None:
    try:
        plan = plan_index(n, 768, max_memory_bytes=budget_mb * MIB, add_rows=10_000)
    except ValueError as error:  # refused up front: the minimum it names is over budget
        need = int(str(error).split("at least ")[1].split()[0])
        assert budget_mb == 256 and need > budget_mb
        return
    assert plan.build_bytes <= budget_mb * MIB
    faiss.index_factory(plan.d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    nlist = plan.nlist
    if not nlist:
        assert plan.family in ("flat", "hnsw")
        return
    assert nlist & (nlist - 1) == 0
    assert 39 * nlist <= n and nlist <= 16 * math.sqrt(n)
    assert nlist >= 4 * math.sqrt(n) / 16 or 39 * 2 * nlist > n
    assert 39 <= plan.train_size / nlist <= 256 and plan.train_size <= n
    if plan.pq_m:
        assert 768 % plan.pq_m == 0 and plan.nbits == 8


def test_plan_validates_a_given_factory() -> None:
    plan = plan_index(5000, D, factory="OPQ8,IVF64,PQ8")
    assert (plan.nlist, plan.pq_m, plan.nbits) == (64, 8, 8)
    assert plan.train_size == 5000
    assert plan_index(5000, D, factory="Flat").train_size == 0
    with pytest.raises(ValueError, match="'IVF64,PQ7'"):
        plan_index(5000, D, factory="IVF64,PQ7")
    with pytest.raises(ValueError, match="'Bogus'"):
        plan_index(5000, D, factory="Bogus")
    with pytest.raises(ValueError, match="only 50 vectors"):
        plan_index(50, D, factory="IVF64,Flat")


def test_sample_ids_is_seeded_and_spread() -> None:
    ids = np.arange(1000, dtype=np.int64) + 500
    sample = sample_ids(ids, 100, seed=3)
    assert np.array_equal(sample, sample_ids(ids, 100, seed=3))
    assert not np.array_equal(sample, sample_ids(ids, 100, seed=4))
    assert len(np.unique(sample)) == 100 and np.isin(sample, ids).all()
    assert np.all(np.diff(sample) > 0)  # original order
    assert not np.array_equal(sample, ids[:100]) and sample.max() > 900
    assert np.array_equal(sample_ids(ids, 5000, seed=0), ids)


# ---------------------------------------------------------------- filling and searching


def test_flat_plan_gives_exact_results_under_ids(gallery) -> None:
    ids, xb, xq, exact = gallery
    plan = plan_index(5000, D)
    index = _filled(plan, ids[:5000], xb[:5000], shard=1234)
    assert isinstance(index, faiss.IndexIDMap2) and index.ntotal == 5000
    D_, I = search(index, xq, 10, nprobe=1)
    scores = xq @ xb[:5000].T
    assert np.array_equal(I, ids[:5000][np.argsort(-scores, axis=1)[:, :10]])
    assert np.allclose(D_, np.sort(scores, axis=1)[:, ::-1][:, :10], atol=1e-5)


def test_ivfpq_recall_with_and_without_rerank(gallery, ivfpq) -> None:
    ids, xb, xq, exact = gallery
    _, I = search(ivfpq, xq, 10, nprobe=8)
    # 8 one-byte codes for 32 dims cannot order near neighbours inside a tight cluster:
    # measured 0.305 / 0.567.
    assert knn_recall(I, exact, k_at=1, r=1) > 0.25
    assert knn_recall(I, exact, k_at=10, r=10) > 0.5
    _, shortlist = search(ivfpq, xq, 100, nprobe=8)
    lookup = dict(zip(ids.tolist(), xb))
    D_, I = rerank(xq, shortlist, lookup, k=10)
    # Exact cosines over a 100-long short list: measured 1.0 / 0.9975.
    assert knn_recall(I, exact, k_at=1, r=1) > 0.97
    assert knn_recall(I, exact, k_at=10, r=10) > 0.97
    assert np.all(np.diff(D_, axis=1) <= 0)
    assert np.allclose(D_[:, 0], np.einsum("qd,qd->q", xq, xb[np.searchsorted(ids, I[:, 0])]))


def test_auto_plan_ivf_flat_recall(gallery) -> None:
    ids, xb, xq, exact = gallery
    # 56 MiB: too little for HNSW's links (a 58 MiB build with the 44 MiB read floor), enough
    # for IVF-Flat (49 MiB).
    plan = plan_index(len(ids), D, max_memory_bytes=56 * MIB, add_rows=5000)
    assert plan.family == "ivf-flat" and plan.nlist > 1
    index = _filled(plan, ids, xb)
    _, I = search(index, xq, 10, nprobe=32)
    assert knn_recall(I, exact, k_at=10, r=10) > 0.9


def test_auto_plan_hnsw_recall_grows_with_ef_search(gallery) -> None:
    ids, xb, xq, exact = gallery
    plan = plan_index(len(ids), D, add_rows=5000)
    assert plan.factory == "HNSW32,Flat"
    index = _filled(plan, ids, xb)  # IDMap2 around HNSW, filled shard by shard
    assert index.ntotal == len(ids) and index_module.is_hnsw(index)
    recall = {}
    for ef in (10, 128):
        D_, I = search(index, xq, 10, nprobe=1, ef_search=ef)
        assert set(I.ravel()) <= set(ids)
        recall[ef] = knn_recall(I, exact, k_at=10, r=10)
    assert recall[128] > 0.95 and recall[128] > recall[10]
    # Scores are exact cosines of the returned ids.
    assert np.allclose(D_[:, 0], np.einsum("qd,qd->q", xq, xb[np.searchsorted(ids, I[:, 0])]),
                       atol=1e-5)


def test_reserve_storage_keeps_adds_in_place(gallery) -> None:
    ids, xb, _, _ = gallery
    for factory in ("Flat", "HNSW32,Flat"):
        index = train_index(plan_index(len(ids), D, factory=factory), xb[:0])
        index_module.reserve_storage(index, len(ids))
        inner = index_module._unwrap(index)
        storage = faiss.downcast_index(inner.storage) if factory != "Flat" else inner
        assert storage.codes.size() == 0
        add_shard(index, ids[:100], xb[:100])
        buffer = storage.codes.data()
        add_shard(index, ids[100:], xb[100:])  # grows within the reserved capacity
        assert storage.codes.data() == buffer and index.ntotal == len(ids)
        _, I = search(index, xb[:5], 1, nprobe=1, ef_search=64)
        assert list(I[:, 0]) == list(ids[:5])


def test_shards_fill_the_same_index_as_one_add(gallery) -> None:
    ids, xb, xq, _ = gallery
    ids, xb = ids[:6000], xb[:6000]
    plan = plan_index(len(ids), D, factory="IVF32,PQ8x4")
    assert (plan.pq_m, plan.nbits) == (8, 4)
    trained = train_index(plan, xb[::2])
    whole, sharded = faiss.clone_index(trained), faiss.clone_index(trained)
    add_shard(whole, ids, xb)
    for start in range(0, len(ids), 1700):
        add_shard(sharded, ids[start:start + 1700], xb[start:start + 1700])
    assert np.array_equal(faiss.serialize_index(whole), faiss.serialize_index(sharded))
    for a, b in zip(search(whole, xq, 20, nprobe=4), search(sharded, xq, 20, nprobe=4)):
        assert np.array_equal(a, b)


def test_add_shard_checks_its_inputs(gallery) -> None:
    ids, xb, _, _ = gallery
    index = train_index(plan_index(100, D), xb[:0])
    with pytest.raises(ValueError, match="L2-normalised"):
        add_shard(index, ids[:10], xb[:10] * 2)
    with pytest.raises(ValueError, match=r"\(10,\)"):
        add_shard(index, ids[:9], xb[:10])
    with pytest.raises(ValueError, match=">= 0"):
        add_shard(index, -ids[:10], xb[:10])
    with pytest.raises(ValueError, match=r"\(n, 32\)"):
        add_shard(index, ids[:10], xb[:10, :16])
    with pytest.raises(ValueError, match="at least 64 vectors"):
        train_index(plan_index(10_000, D, factory="IVF64,Flat"), xb[:10])


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path, gallery, ivfpq) -> None:
    ids, _, xq, _ = gallery
    index = ivfpq
    path = save_index(index, tmp_path / "index" / "gallery.faiss")
    assert [p.name for p in path.parent.iterdir()] == ["gallery.faiss"]
    loaded = load_index(path, expect_d=D, expect_ntotal=len(ids))
    for a, b in zip(search(index, xq, 10, nprobe=8), search(loaded, xq, 10, nprobe=8)):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match=f"{path}.*dimension 32, expected 64"):
        load_index(path, expect_d=64)
    with pytest.raises(ValueError, match=f"{path}.*holds 20000 vectors, expected 5"):
        load_index(path, expect_ntotal=5)
    with pytest.raises(FileNotFoundError, match="missing.faiss"):
        load_index(tmp_path / "missing.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="junk.faiss"):
        load_index(tmp_path / "junk.faiss")


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    index = train_index(plan_index(10, D), np.zeros((0, D), np.float32))
    path = save_index(index, tmp_path / "gallery.faiss")
    before = path.read_bytes()

    def broken_write(_index, name):
        with open(name, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(index_module.faiss, "write_index", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        save_index(index, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.faiss"]


# ---------------------------------------------------------------- rerank and recall, by hand


def test_rerank_by_hand() -> None:
    vectors = {10: [1.0, 0.0], 11: [0.0, 1.0], 12: [0.6, 0.8], 13: [0.8, 0.6]}
    xq = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # Query 0's list holds a -1 in the middle; query 1 has ids in the "wrong" order.
    shortlist = np.array([[11, -1, 12, 10], [10, 13, 12, 11]])
    D_, I = rerank(xq, shortlist, vectors, k=3)
    assert I.tolist() == [[10, 12, 11], [11, 12, 13]]
    assert np.allclose(D_, [[1.0, 0.6, 0.0], [1.0, 0.8, 0.6]])
    # k beyond the list: -1 (score -FLT_MAX) at the end, like FAISS; a callable lookup works too.
    table = np.array([vectors[i] for i in (10, 11, 12, 13)], dtype=np.float32)
    D_, I = rerank(xq[:1], shortlist[:1], lambda ids: table[ids - 10], k=5)
    assert I.tolist() == [[10, 12, 11, -1, -1]]
    assert D_[0, 3] == D_[0, 4] == np.finfo(np.float32).min
    with pytest.raises(KeyError, match="99"):
        rerank(xq[:1], np.array([[99]]), vectors, k=1)


def test_knn_recall_by_hand() -> None:
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[2, 1, 9], [9, 8, 4]])
    # 1-recall@1: query 0 has 1 at rank 2 (miss), query 1 misses -> 0.
    assert knn_recall(approx, exact, k_at=1, r=1) == 0.0
    # 1-recall@3: both find their nearest neighbour in the top 3.
    assert knn_recall(approx, exact, k_at=3, r=1) == 1.0
    # 3-recall@3: {1, 2} of {1, 2, 3} and {4} of {4, 5, 6} -> (2/3 + 1/3) / 2.
    assert knn_recall(approx, exact, k_at=3, r=3) == pytest.approx(0.5)
    # -1 never matches.
    assert knn_recall(np.array([[-1]]), np.array([[-1, 7]]), k_at=1, r=2) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss sees no GPU (needs faiss-gpu + CUDA)")
def test_gpu_training_matches_cpu_recall(tmp_path, gallery) -> None:
    ids, xb, xq, exact = gallery
    plan = plan_index(len(ids), D, factory="IVF64,PQ8")
    index = train_index(plan, xb, use_gpu=True)
    add_shard(index, ids, xb)
    _, I = search(index, xq, 10, nprobe=8)
    assert knn_recall(I, exact, k_at=10, r=10) > 0.55
    loaded = load_index(save_index(index, tmp_path / "gpu.faiss"), D, len(ids))
    assert isinstance(loaded, faiss.IndexIVFPQ)
    assert knn_recall(search(loaded, xq, 10, nprobe=8)[1], exact, 10, 10) > 0.55


def test_is_ivf_sees_through_wrappers() -> None:
    xt = _clustered(2_000, seed=3)
    assert index_module.is_ivf(faiss.index_factory(D, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT))
    opq = faiss.index_factory(D, "OPQ8,IVF16,PQ8", faiss.METRIC_INNER_PRODUCT)
    assert index_module.is_ivf(opq) and not index_module._is_gpu(opq)
    flat = train_index(plan_index(len(xt), D, factory="Flat"), xt)  # in an IndexIDMap2
    assert not index_module.is_ivf(flat) and not index_module._is_gpu(flat)


def test_maybe_to_gpu_stays_on_cpu_with_a_warning(monkeypatch, caplog) -> None:
    """What a GPU machine does when faiss-gpu cannot take an index: search it on the CPU."""
    ivf = faiss.index_factory(D, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    flat = faiss.index_factory(D, "Flat", faiss.METRIC_INNER_PRODUCT)
    assert index_module.maybe_to_gpu(ivf) is ivf  # no GPU visible to faiss: silently the CPU
    monkeypatch.setattr(index_module.faiss, "get_num_gpus", lambda: 1)

    def unsupported(index):
        raise RuntimeError("Error in GpuIndexIVFPQ: ...\nBits per code must be 8")

    monkeypatch.setattr(index_module, "to_gpu", unsupported)
    with caplog.at_level("WARNING", logger="pipeline.index"):
        assert index_module.maybe_to_gpu(flat) is flat  # flat search is not copied
        assert not caplog.text
        assert index_module.maybe_to_gpu(ivf, k=4096, nprobe=32) is ivf
        assert "k = 4096" in caplog.text and "GPU limit of 2048" in caplog.text
        assert index_module.maybe_to_gpu(ivf, k=100, nprobe=32) is ivf
        assert "faiss-gpu cannot hold it (Bits per code must be 8)" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss sees no GPU (needs faiss-gpu + CUDA)")
def test_gpu_pretransform_and_unsupported_layouts(tmp_path, caplog) -> None:
    # Unclustered vectors, where nprobe matters (top-10 overlap of nprobe 1 and 64: 0.21).
    rng = np.random.default_rng(0)
    xb, xq = _unit(rng.normal(size=(20_000, D))), _unit(rng.normal(size=(200, D)))
    ids = np.arange(len(xb), dtype=np.int64)
    # OPQ in front: the cloner keeps the rotation on the CPU around a GPU IVF index; nprobe
    # must still reach it, and saving must bring it back to the CPU.
    opq = train_index(plan_index(len(ids), D, factory="OPQ8,IVF64,PQ8"), xb, use_gpu=True)
    assert index_module._is_gpu(opq) and index_module.is_ivf(opq)
    add_shard(opq, ids, xb)
    loaded = load_index(save_index(opq, tmp_path / "opq.faiss"), D, len(ids))
    assert not index_module._is_gpu(loaded)
    on_gpu, on_cpu = (search(opq, xq, 10, 64)[1], search(loaded, xq, 10, 64)[1])
    assert knn_recall(on_gpu, on_cpu, 10, 10) > 0.8  # float16 lookup tables: near, not equal
    assert knn_recall(on_gpu, search(loaded, xq, 10, 1)[1], 10, 10) < 0.5  # nprobe took effect
    with caplog.at_level("WARNING", logger="pipeline.index"):
        pq4 = train_index(plan_index(len(ids), D, factory="IVF64,PQ8x4"), xb, use_gpu=True)
    # 4-bit PQ: classic faiss-gpu has no kernels for it (cuVS builds may): the CPU, and a warning.
    assert index_module._is_gpu(pq4) or "stays on the CPU" in caplog.text
