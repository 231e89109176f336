"""benchmarks/index_scale.py on given vectors (issue 19's real-embedding check), on tiny data."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.index_build import VectorStore, exact_search

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "index_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("index_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_split_is_disjoint_and_seeded(bench) -> None:
    gallery, queries = bench.split_vectors(1000, 50, seed=0)
    assert len(queries) == 50 and len(gallery) == 950
    assert not set(gallery) & set(queries)
    assert sorted({*gallery, *queries}) == list(range(1000))
    assert np.array_equal(queries, bench.split_vectors(1000, 50, seed=0)[1])
    assert not np.array_equal(queries, bench.split_vectors(1000, 50, seed=1)[1])
    with pytest.raises(ValueError, match="--queries"):
        bench.split_vectors(10, 10, seed=0)


def test_data_from_vectors_leaves_the_queries_out(bench, tmp_path: Path) -> None:
    x = unit_rows(300, 8)
    np.save(tmp_path / "emb.npy", x)
    data = bench.ensure_data_from(tmp_path / "work", tmp_path / "emb.npy", None, 3, 20, 0)
    gallery = np.concatenate([np.load(p) for p in sorted((data / "npy").glob("*.npy"))])
    queries = np.load(data / "queries.npy")
    rows, query_rows = bench.split_vectors(300, 20, 0)
    assert np.array_equal(gallery, x[rows]) and np.array_equal(queries, x[query_rows])
    assert [s.rows for s in bench.shard_list(data)] == [93, 93, 94]
    assert bench.ensure_data_from(tmp_path / "work", tmp_path / "emb.npy", None, 3, 20, 0) == data
    np.save(tmp_path / "raw.npy", 2 * x)
    with pytest.raises(ValueError, match="L2-normalised"):
        bench.ensure_data_from(tmp_path / "work", tmp_path / "raw.npy", None, 3, 20, 0)


def test_runs_on_vectors_and_retunes_a_kept_build(bench, tmp_path: Path) -> None:
    """The whole script on 12,100 x 16 vectors (ours only), then the same build re-tuned to
    another target without a rebuild, and (`--match-autofaiss`) to an autofaiss row's recall."""
    np.save(tmp_path / "emb.npy", unit_rows(12_100, 16))
    common = [sys.executable, str(SCRIPT), "--vectors", str(tmp_path / "emb.npy"),
              "--queries", "100", "--shards", "2", "--budgets-mb", "64", "--skip-autofaiss",
              "--wait-max-s", "0", "--work-dir", str(tmp_path / "work")]
    first = subprocess.run(common, capture_output=True, text=True, check=True).stdout
    assert "12000 x 16 gallery vectors" in first and "HNSW32,Flat" in first
    assert "duplicate in the gallery (top-1 score >= 1 - 1e-6): 0" in first
    again = subprocess.run([*common, "--reuse-builds", "--target-recall", "0.99",
                            "--ef-search", "16", "64"], capture_output=True, text=True,
                           check=True).stdout
    assert "re-tuning it to" in again and "target=0.99" in again
    assert "data: reusing" in again
    assert "anonymous RSS the stage added" in first

    work = tmp_path / "work"
    data = next(work.glob("data-*"))
    xq = np.load(data / "queries.npy")[:100]
    first_row = {"budget_mb": 64, "who": "ours", "r10": 0.9}
    autofaiss_row = {"budget_mb": 64, "who": "autofaiss", "r10": 0.98765}
    args = argparse.Namespace(reuse_builds=False, target_recall=0.95, ef_search=[16, 64],
                              n=12_000, d=16, throughput_queries=0)
    store = VectorStore.open(next(work.glob("ours-*-b64")) / "vectors.npy")
    I_exact = exact_search(store, xq, 10)[1]
    assert bench.ours_matched(work, data, args, 64, xq, I_exact, [first_row]) == []
    [matched] = bench.ours_matched(work, data, args, 64, xq, I_exact,
                                   [first_row, autofaiss_row])
    assert matched["who"] == "ours@match" and "target=0.9877" in matched["setting"]
    assert args.target_recall == 0.95 and not args.reuse_builds  # the caller's are untouched
