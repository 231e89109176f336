"""Index stage at gallery scale, by memory budget: ours vs autofaiss on 1M x 512-d vectors.

    python benchmarks/index_scale.py --work-dir /tmp/index-scale          # 1M, 3 budgets, long
    python benchmarks/index_scale.py --n 100000 --work-dir /tmp/index-scale --skip-autofaiss
    python benchmarks/index_scale.py --work-dir /tmp/index-scale --budgets-mb 4096
    python benchmarks/index_scale.py --vectors emb.npy --budgets-mb 50 12 3 --work-dir /tmp/is
    python benchmarks/index_scale.py --work-dir /tmp/index-scale --budgets-mb 4096 \
        --reuse-builds --skip-autofaiss --target-recall 0.9998 --ef-search 16 32 ... 2048

Data: `--n` synthetic unit vectors written as `--shards` Parquet shards the way the embed stage
writes them (`image_id` int64 from `stable_id`, `embedding` fixed-size list of float32 via
`vectors_to_arrow`), and queries drawn from the same distribution but not in the gallery. Both
are seeded and kept under `--work-dir`, so a second run regenerates nothing. The distribution
(`sample_rows`): a mixture of 1,000 overlapping Gaussian clusters in a random 64-dim subspace
(axis scales falling as 1/i), plus isotropic noise in all d dims, L2-normalised: clustered, of
low intrinsic dimension like real image embeddings, and not trivially separable.
Or real vectors, `--vectors FILE.npy` ((n, d) float32, unit rows: e.g. the embed stage's gallery
embeddings): `--query-vectors FILE.npy` holds the queries, or else `--queries` rows drawn from
FILE with `--seed` are the queries and are left out of the gallery (`split_vectors`); the rest
is written as the gallery shards the same way, ids `stable_id("real-<row>")`.

Per budget in `--budgets-mb` (default 4096, 1024, 256 = `index.max_memory_mb`):
- ours, in a fresh subprocess, exactly what the index stage runs: `plan_index(n, d, "auto",
  budget, add_rows=shard rows)`, `build_index(...)`, then `tune_search` with the shipped sweep
  to 10-recall@10 >= `--target-recall` (0.95, the shipped `index.target_recall`) on 1,000
  gallery vectors (own id left out), over `--ef-search` (the shipped sweep). It reports build
  time, peak RSS after the build (VmHWM, not `ru_maxrss`, which Linux carries over from the
  parent process; and the RSS before planning), the sampled peak of anonymous RSS through the
  build and the tuning (benchmarks/rss.py: what "within budget" is judged on), index bytes,
  the tuned setting. Back here: 1-recall@1, 10-recall@10 and queries/s at the tuned setting
  on the held-out `--queries` (not in the gallery) against exact brute force over the float
  store. With `--reuse-builds`, a build tuned to another target or sweep is re-tuned (in a child, no
  rebuild) and the result kept beside it (`bench-tune-*.json`).
- autofaiss with the same budget (`current_memory_available` = the budget, its index budget
  90% of it, the most it accepts), in its own environment (`benchmarks/autofaiss_build.py`, see
  benchmarks/README.md); its index is loaded here and measured on the same queries at its own
  tuned setting (and a small grid, for reference). With `--match-autofaiss`, ours' build is
  then re-tuned (no rebuild) to the 10-recall@10 autofaiss reached and measured again.
One table at the end: build time, build peak RSS, index bytes, 10-recall@10 and queries/s per
budget for both, the ratios ours / autofaiss and whether each target is met.
"""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids (as in faiss and its docs)

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # also when loaded by path (the tests)

from rss import AnonPeak, rss_kib  # noqa: E402 - benchmarks/rss.py, beside this script

AUTOFAISS_PYTHON = REPO_ROOT / ".venv-autofaiss" / "bin" / "python"
CLUSTERS = 1000
SUBSPACE = 64          # intrinsic dimension: everything but the noise lies in this subspace
SPREAD = 0.7           # within-cluster spread relative to the spread of the centres
NOISE = 0.3            # isotropic noise relative to the subspace part
TARGET_RECALL = 0.95
MAP_K = 200            # score.map_k in pipeline.toml


# ---------------------------------------------------------------- data


def sample_rows(seed: int, stream: int, block: int, rows: int, d: int) -> np.ndarray:
    """`rows` unit vectors of block `block` of stream `stream` (0 gallery, 1 queries), seeded."""
    structure = np.random.default_rng([seed, 2])
    # Per-axis scale 1/i (normalised): a few directions dominate, as in real embeddings.
    scale = 1.0 / np.arange(1, SUBSPACE + 1, dtype=np.float32)
    scale /= np.sqrt(np.mean(scale**2))
    centres = structure.normal(size=(CLUSTERS, SUBSPACE)).astype(np.float32) * scale
    basis = np.linalg.qr(structure.normal(size=(d, SUBSPACE)))[0].T.astype(np.float32)
    rng = np.random.default_rng([seed, stream, block])
    z = centres[rng.integers(CLUSTERS, size=rows)]
    z += SPREAD * scale * rng.standard_normal((rows, SUBSPACE), dtype=np.float32)
    x = z @ basis
    x += NOISE * np.sqrt(SUBSPACE / d) * rng.standard_normal((rows, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shard(data: Path, shard: int, keys: list[str], x: np.ndarray) -> None:
    """One gallery shard the way the embed stage writes it (ids `stable_id(key)`), and the same
    rows as `.npy` for autofaiss."""
    import pyarrow as pa

    from pipeline.arrays import stable_id, vectors_to_arrow
    from pipeline.artifacts import write_parquet

    ids = pa.array([stable_id(key) for key in keys], pa.int64())
    table = pa.table({"image_id": ids, "embedding": vectors_to_arrow(x)})
    write_parquet(table, data / "parquet" / f"shard-{shard:05d}.parquet")
    np.save(data / "npy" / f"emb-{shard:05d}.npy", x)


def ensure_data(root: Path, n: int, d: int, shards: int, n_queries: int, seed: int) -> Path:
    """Gallery shards (Parquet + .npy copies for autofaiss) and queries; reused when present."""
    if d < SUBSPACE:
        raise SystemExit(f"synthetic data needs d >= {SUBSPACE} (its clusters lie in a "
                         f"{SUBSPACE}-dim subspace); got d = {d}")
    data = root / f"data-v2-n{n}-d{d}-s{shards}-seed{seed}"
    meta_path = data / "meta.json"  # written last: its existence means the data is complete
    if meta_path.is_file() and json.loads(meta_path.read_text())["queries"] >= n_queries:
        print(f"data: reusing {data}")
        return data
    started = time.perf_counter()
    (data / "parquet").mkdir(parents=True, exist_ok=True)
    (data / "npy").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for shard in range(shards):
        start, stop = bounds[shard], bounds[shard + 1]
        write_shard(data, shard, [f"bench-{row}" for row in range(start, stop)],
                    sample_rows(seed, 0, shard, stop - start, d))
    queries = np.concatenate([sample_rows(seed, 1, block, min(10_000, n_queries - start), d)
                              for block, start in enumerate(range(0, n_queries, 10_000))])
    np.save(data / "queries.npy", queries)
    meta_path.write_text(json.dumps({"n": n, "d": d, "shards": shards, "queries": n_queries,
                                     "seed": seed, "clusters": CLUSTERS, "subspace": SUBSPACE,
                                     "spread": SPREAD, "noise": NOISE}))
    print(f"data: generated {n} x {d} in {shards} shards + {n_queries} queries in "
          f"{time.perf_counter() - started:.0f}s -> {data}")
    return data


def split_vectors(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gallery rows, query rows) of n rows: n_queries drawn with `seed`, the rest in file
    order. Disjoint, so no query is in the gallery."""
    if not 0 < n_queries < n:
        raise ValueError(f"--queries {n_queries}: need 0 < queries < {n} rows of --vectors")
    is_query = np.zeros(n, bool)
    is_query[np.random.default_rng([seed, 3]).choice(n, n_queries, replace=False)] = True
    return np.flatnonzero(~is_query), np.flatnonzero(is_query)


def check_unit_rows(x: np.ndarray, path: Path) -> None:
    """Ours and autofaiss search by inner product: the vectors must be L2-normalised."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    if x.ndim != 2 or not np.all(np.abs(norms - 1) < 1e-3):
        raise ValueError(f"{path}: need (n, d) L2-normalised rows (got shape {x.shape}, norms "
                         f"{norms.min():.4f}..{norms.max():.4f}); normalise them first")


def ensure_data_from(root: Path, vectors: Path, query_vectors: Path | None, shards: int,
                     n_queries: int, seed: int) -> Path:
    """Gallery shards and queries from given vectors (`--vectors`, `--query-vectors`), in a
    data folder per distinct input file (named by its digest)."""
    from pipeline.artifacts import sha256_file

    xb = np.load(vectors, mmap_mode="r")
    tag = f"{vectors.stem}-{sha256_file(vectors)[:12]}"
    if query_vectors is not None:
        tag += f"-q{sha256_file(query_vectors)[:12]}"
    data = root / f"data-{tag}-s{shards}-q{n_queries}-seed{seed}"
    meta_path = data / "meta.json"  # written last: its existence means the data is complete
    if meta_path.is_file():
        print(f"data: reusing {data}")
        return data
    if query_vectors is not None:
        gallery_rows, queries = np.arange(len(xb)), np.load(query_vectors)[:n_queries]
        if len(queries) < n_queries:
            raise ValueError(f"{query_vectors}: {len(queries)} rows, --queries {n_queries}")
    else:
        gallery_rows, query_rows = split_vectors(len(xb), n_queries, seed)
        queries = xb[query_rows]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    check_unit_rows(queries, query_vectors or vectors)
    (data / "parquet").mkdir(parents=True, exist_ok=True)
    (data / "npy").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(gallery_rows), shards + 1).astype(int)
    for shard in range(shards):
        rows = gallery_rows[bounds[shard]:bounds[shard + 1]]
        x = np.ascontiguousarray(xb[rows], dtype=np.float32)
        check_unit_rows(x, vectors)
        write_shard(data, shard, [f"real-{row}" for row in rows], x)
    np.save(data / "queries.npy", queries)
    meta_path.write_text(json.dumps({
        "n": len(gallery_rows), "d": xb.shape[1], "shards": shards, "queries": n_queries,
        "seed": seed, "vectors": str(vectors.resolve()),
        "query_vectors": str(query_vectors.resolve()) if query_vectors else None}))
    source = f"from {query_vectors}" if query_vectors else "split off, not in the gallery"
    print(f"data: {len(gallery_rows)} x {xb.shape[1]} gallery vectors from {vectors} in "
          f"{shards} shards + {n_queries} queries ({source}) -> {data}")
    return data


def shard_list(data: Path) -> list:
    import pyarrow.parquet as pq

    from pipeline.index_build import Shard

    paths = sorted((data / "parquet").glob("shard-*.parquet"))
    return [Shard(p.stem, str(p), pq.read_metadata(p).num_rows) for p in paths]


# ---------------------------------------------------------------- builds (subprocesses)


def child_build(data: Path, out: Path, budget: int, target: float,
                ef_searches: list[int]) -> None:
    """In a fresh process: the index stage's plan + build + tuning; one JSON line on stdout.

    Peak RSS (VmHWM) is read after the build (train + add) and again after tuning (which maps
    the float store read-only: its clean file pages count in RSS, not in the budget); the
    anonymous RSS is sampled through both (`AnonPeak`), the memory the budget is for."""
    from pipeline.index import plan_index
    from pipeline.index_build import VectorStore, build_index, shard_dim

    shards = shard_list(data)
    rss_before = rss_kib("VmRSS")
    n, d = sum(s.rows for s in shards), shard_dim(shards[0])
    started = time.perf_counter()
    with AnonPeak() as anon_build:
        plan = plan_index(n, d, "auto", budget, add_rows=max(s.rows for s in shards))
        build = build_index(shards, plan, out, seed=0, store_dtype="float32", checkpoint_s=60)
    seconds = time.perf_counter() - started
    peak_build = rss_kib()
    with AnonPeak() as anon_tune:
        tuned = tune(build.index, VectorStore.open(build.vectors_path), plan.nlist, target,
                     ef_searches)
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    print(json.dumps({
        "plan": plan.__dict__, "seconds": seconds, "train_s": build.train_seconds,
        "add_s": build.add_seconds, "rss_after_imports_kib": rss_before,
        "peak_rss_kib": peak_build, **tuned, "peak_rss_after_tune_kib": rss_kib(),
        "anon_before_kib": anon_build.start_kib, "anon_build_peak_kib": anon_build.peak_kib,
        "anon_tune_peak_kib": anon_tune.peak_kib, "sizes": sizes}))


def tune(index, store, nlist: int, target: float, ef_searches: list[int]) -> dict:  # noqa: ANN001
    """The index stage's tuning (the shipped nprobe / rerank_k sweep and check queries) to
    `target` over `ef_searches`: params, the sweep's rows, seconds."""
    from pipeline.config import IndexConfig
    from pipeline.index_tune import tune_search

    cfg = IndexConfig()
    started = time.perf_counter()
    rows, params = tune_search(index, store, cfg.check_queries, 0, cfg.check_nprobe,
                               ef_searches, cfg.check_rerank_k, target, nlist)
    return {"params": params.__dict__, "tune_rows": [r.__dict__ for r in rows],
            "tune_s": time.perf_counter() - started,
            "tune_key": {"target": target, "ef_search": sorted(ef_searches)}}


def child_tune(out: Path, nlist: int, target: float, ef_searches: list[int]) -> None:
    """In a fresh process: re-tune an earlier build (index.faiss + vectors.npy in `out`)."""
    from pipeline.index import load_index
    from pipeline.index_build import VectorStore

    store = VectorStore.open(out / "vectors.npy")
    index = load_index(out / "index.faiss", expect_d=store.d, expect_ntotal=store.n)
    print(json.dumps(tune(index, store, nlist, target, ef_searches)))


def tune_key(target: float, ef_searches, family: str) -> dict:  # noqa: ANN001
    """What a tuning depends on: the target, and the efSearch sweep for HNSW plans only."""
    return {"target": target, "ef_search": sorted(set(ef_searches)) if family == "hnsw" else None}


def tune_key_of(result: dict) -> dict:
    """What a build's tuning was run with (builds from before `tune_key`: read off its rows)."""
    key = result.get("tune_key") or {
        "target": result["params"]["target_recall"],
        "ef_search": [r["ef_search"] for r in result["tune_rows"]]}
    return tune_key(key["target"], key["ef_search"] or (), result["plan"]["family"])


def run_json(command: list[str], log_path: Path) -> dict:
    """Run a child, its stderr to log_path; its last stdout line parsed as JSON."""
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"{command[:3]} failed ({done.returncode}); log {log_path}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_ours(root: Path, data: Path, budget: int, args) -> tuple[dict, Path]:  # noqa: ANN001
    out = root / f"ours-{data.name}-b{budget >> 20}"
    result_path = out / "bench-build.json"
    tuning = ["--target-recall", str(args.target_recall), "--ef-search",
              *map(str, args.ef_search)]
    if args.reuse_builds and result_path.is_file():
        print(f"ours: reusing the build in {out} (its numbers are from its build)")
        result = json.loads(result_path.read_text())
        key, was = tune_key(args.target_recall, args.ef_search, result["plan"]["family"]), \
            tune_key_of(result)
        if was != key:  # re-tune the same build: no rebuild
            tune_path = out / (f"bench-tune-t{args.target_recall}-ef"
                               f"{'-'.join(map(str, key['ef_search'] or [0]))}.json")
            if not tune_path.is_file():
                print(f"ours: re-tuning it to {key} (was {was})")
                tuned = run_json([sys.executable, __file__, "--child-tune", str(out),
                                  str(result["plan"]["nlist"]), "--work-dir", str(root),
                                  *tuning], out / "bench-tune.log")
                tune_path.write_text(json.dumps(tuned))
            result = {**result, **json.loads(tune_path.read_text()), "retuned": True}
        return result, out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = run_json([sys.executable, __file__, "--child-build", str(data), str(out),
                       "--budget-mb", str(budget >> 20), "--work-dir", str(root), *tuning],
                      root / f"ours-{data.name}-b{budget >> 20}.log")
    result_path.write_text(json.dumps(result))
    return result, out


def build_autofaiss(root: Path, data: Path, index_memory: str, available: str,
                    reuse: bool) -> dict:
    out = root / f"autofaiss-{data.name}-{available}"
    result_path = out / "bench-build.json"
    if reuse and result_path.is_file():
        print(f"autofaiss: reusing the build in {out} (--reuse-builds; its numbers are from then)")
        return json.loads(result_path.read_text())
    if not AUTOFAISS_PYTHON.is_file():
        raise FileNotFoundError(f"no {AUTOFAISS_PYTHON}: create the autofaiss environment "
                                "(benchmarks/README.md) or pass --skip-autofaiss")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = run_json([str(AUTOFAISS_PYTHON), str(Path(__file__).with_name("autofaiss_build.py")),
                       str(data / "npy"), str(out), "--max-index-memory-usage", index_memory,
                       "--current-memory-available", available, "--nb-cores", str(os.cpu_count())],
                      root / f"autofaiss-{data.name}-{available}.log")
    result_path.write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------- search


def set_params(index, nprobe: int | None, ef_search: int | None) -> None:
    """nprobe on the IVF part and efSearch on an HNSW index or HNSW coarse quantizer."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = nprobe
    hnsw_owner = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    if ivf is None:
        base = index
        while isinstance(base, faiss.IndexPreTransform):
            base = faiss.downcast_index(base.index)
        hnsw_owner = faiss.downcast_index(base)
    if ef_search is not None and isinstance(hnsw_owner, faiss.IndexHNSW):
        hnsw_owner.hnsw.efSearch = ef_search


def measure(search_fn, xq: np.ndarray, I_exact: np.ndarray) -> tuple[float, float, float]:
    """(1-recall@1, 10-recall@10, queries/s) of search_fn(xq) -> I (nq, >= 10)."""
    from pipeline.index import knn_recall

    started = time.perf_counter()
    I = search_fn(xq)
    qps = len(xq) / (time.perf_counter() - started)
    return knn_recall(I, I_exact, 1, 1), knn_recall(I, I_exact, 10, 10), qps


def recall_table_autofaiss(index, store, xq, I_exact, settings, rerank_ks) -> list[dict]:
    """Its index holds positions 0..n-1 in file order (= store row order): map them to ids."""
    from pipeline.index import rerank

    def search(q: np.ndarray, k: int) -> np.ndarray:
        _, rows = index.search(q, k)
        return np.where(rows >= 0, store.ids[np.maximum(rows, 0)], -1)

    rows = []
    for label, nprobe, ef in settings:
        set_params(index, nprobe, ef)
        for rerank_k in (0, *rerank_ks):
            if rerank_k:
                fn = lambda q, kk=rerank_k: rerank(q, search(q, kk), store.lookup, 10)[1]  # noqa: E731
            else:
                fn = lambda q: search(q, 10)  # noqa: E731
            r1, r10, qps = measure(fn, xq, I_exact)
            rows.append({"index": "autofaiss", "setting": label, "nprobe": nprobe,
                         "rerank_k": rerank_k, "r1": r1, "r10": r10, "qps": qps})
    return rows


def autofaiss_settings(index, index_param: str | None, nprobes) -> list[tuple]:
    """(label, nprobe, efSearch): its own tuned parameters, then a grid like ours."""
    import faiss

    settings = []
    if index_param:
        params = dict(p.split("=") for p in index_param.split(",") if "=" in p)
        settings.append((f"tuned {index_param}", int(params["nprobe"]) if "nprobe" in params
                         else None, int(params["efSearch"]) if "efSearch" in params else None))
    if faiss.try_extract_index_ivf(index) is not None:
        settings += [(f"nprobe={p},efSearch={max(16, 2 * p)}", p, max(16, 2 * p))
                     for p in nprobes]
    else:  # a graph index (HNSW): efSearch is its speed/recall knob
        settings += [(f"efSearch={ef}", None, ef) for ef in (16, 32, 64, 128, 256)]
    return settings


# ---------------------------------------------------------------- report


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def print_rows(rows: list[dict]) -> None:
    print(f"{'index':<10} {'setting':<34} {'rerank_k':>8} {'1-R@1':>7} {'10-R@10':>8} "
          f"{'queries/s':>10}")
    for row in rows:
        print(f"{row['index']:<10} {row['setting']:<34} {row['rerank_k']:>8} {row['r1']:>7.4f} "
              f"{row['r10']:>8.4f} {row['qps']:>10.0f}")


def wait_for_quiet(threshold: float, max_s: float) -> None:
    started = time.monotonic()
    while os.getloadavg()[0] > threshold and time.monotonic() - started < max_s:
        time.sleep(15)
    print(f"load average before the build {os.getloadavg()} (waited "
          f"{time.monotonic() - started:.0f}s for the 1-min value to drop below {threshold})")


def ours_at_budget(root: Path, data: Path, args, budget_mb: int, xq: np.ndarray,
                   I_exact: np.ndarray) -> dict:
    """Build (plan + build + tune, in a child) and measure ours at its tuned setting."""
    from pipeline.index import load_index, search_rerank
    from pipeline.index_build import VectorStore

    budget = budget_mb << 20
    ours, ours_dir = build_ours(root, data, budget, args)
    plan, params = ours["plan"], ours["params"]
    peak = ours["peak_rss_kib"] << 10
    added = peak - (ours["rss_after_imports_kib"] << 10)
    print(f"\n== budget {budget_mb} MiB ==\nours: plan {plan['factory']} -- {plan['reason']}")
    print(f"ours: build {ours['seconds']:.1f}s (train {ours['train_s']:.1f}s, add "
          f"{ours['add_s']:.1f}s), peak RSS {gib(peak)} (before planning "
          f"{gib(ours['rss_after_imports_kib'] << 10)}, so the build added {gib(added)} "
          f"against an estimate of {gib(plan['build_bytes'])}; budget {gib(budget)}: "
          f"{'within' if added <= budget else 'OVER'}), index "
          f"{gib(ours['sizes']['index.faiss'])} (estimate {gib(plan['estimated_bytes'])})")
    anon = anon_added(ours)
    if anon is not None:
        print(f"ours: anonymous RSS the stage added (sampled, build then tuning): "
              f"{gib(anon)} against the estimate {gib(plan['build_bytes'])}: "
              f"{'within' if anon <= budget else 'OVER'} the budget")
    print(f"ours: tuned in {ours['tune_s']:.1f}s on 1,000 gallery vectors (own id left out): "
          f"nprobe {params['nprobe']}, efSearch {params['ef_search']}, rerank_k "
          f"{params['rerank_k']} -> 10-recall@10 {params['recall_10_at_10']:.4f} "
          f"({params['note']}); peak RSS after tuning "
          f"{gib(ours['peak_rss_after_tune_kib'] << 10)} (incl. the mapped float store's pages)")
    for r in ours["tune_rows"]:
        print(f"  tune nprobe={r['nprobe']:<4} ef={r['ef_search']:<4} rerank={r['rerank_k']:<4} "
              f"1-R@1 {r['recall_1_at_1']:.4f} 10-R@10 {r['recall_10_at_10']:.4f} "
              f"{r['queries_per_s']:8.0f} q/s{'  <- chosen' if r['chosen'] else ''}")
    store = VectorStore.open(ours_dir / "vectors.npy")
    index = load_index(ours_dir / "index.faiss", expect_d=args.d, expect_ntotal=args.n)

    def run(q: np.ndarray) -> np.ndarray:
        return search_rerank(index, q, 10, params["nprobe"], params["rerank_k"], store.lookup,
                             params["ef_search"])[1]

    run(xq)  # untimed: the timed pass sees warm caches
    r1, r10, qps = measure(run, xq, I_exact)
    print(f"ours at the tuned setting on {len(xq)} queries not in the gallery: 1-recall@1 "
          f"{r1:.4f}, 10-recall@10 {r10:.4f}, {qps:.0f} queries/s")
    if args.throughput_queries:
        xt = np.ascontiguousarray(np.load(data / "queries.npy", mmap_mode="r")
                                  [:args.throughput_queries])
        started = time.perf_counter()
        for start in range(0, len(xt), args.batch):
            run(xt[start:start + args.batch])
        print(f"ours: score-stage throughput k=10: {len(xt) / (time.perf_counter() - started):.0f}"
              f" queries/s over {len(xt)} queries")
    return {"budget_mb": budget_mb, "who": "ours", "index": plan["factory"],
            "setting": f"nprobe={params['nprobe']},ef={params['ef_search']},"
                       f"rerank={params['rerank_k']},target={params['target_recall']}",
            "build_s": ours["seconds"], "peak": peak, "index_bytes": ours["sizes"]["index.faiss"],
            "added": added, "anon": anon,
            "r10": r10, "qps": qps}


def anon_added(result: dict) -> int | None:
    """Bytes of anonymous RSS a child's build (and tuning) added at its sampled peak; None for
    results from before it was sampled."""
    if "anon_before_kib" not in result:
        return None
    peak = max(result.get(k, 0) for k in ("anon_build_peak_kib", "anon_tune_peak_kib",
                                          "anon_peak_kib"))
    return (peak - result["anon_before_kib"]) << 10


def ours_matched(root: Path, data: Path, args, budget_mb: int, xq: np.ndarray,  # noqa: ANN001
                 I_exact: np.ndarray, summary: list[dict]) -> list[dict]:
    """Ours' build at this budget re-tuned (in a child, no rebuild) to the 10-recall@10
    autofaiss measured here, then measured on the same queries: [row 'ours@match'], or [] when
    ours built nothing at this budget."""
    rows = {r["who"]: r for r in summary if r["budget_mb"] == budget_mb}
    if "ours" not in rows or "autofaiss" not in rows:
        return []
    matched = argparse.Namespace(**{**vars(args), "reuse_builds": True,
                                    "target_recall": round(rows["autofaiss"]["r10"], 4)})
    print(f"ours@match: re-tuning ours to autofaiss's 10-recall@10 {matched.target_recall}")
    return [{**ours_at_budget(root, data, matched, budget_mb, xq, I_exact), "who": "ours@match"}]


def autofaiss_at_budget(root: Path, data: Path, args, budget_mb: int, store, xq: np.ndarray,
                        I_exact: np.ndarray) -> dict:
    """Build autofaiss with the same budget and measure it at its own tuned setting."""
    import faiss

    # autofaiss refuses to plan an index above 90% of current_memory_available.
    index_memory = args.autofaiss_index_memory or f"{budget_mb * 9 // 10}M"
    af = build_autofaiss(root, data, index_memory, f"{budget_mb}M", args.reuse_builds)
    print(f"autofaiss: index {af['index_key']}, tuned {af['index_param']}; build "
          f"{af['seconds']:.1f}s, peak RSS {gib(af['peak_rss_kib'] << 10)}, index "
          f"{gib(af['index_bytes'])} ({af['versions']})")
    af_index = faiss.read_index(af["index_path"])
    assert af_index.ntotal == store.n, (af_index.ntotal, store.n)
    af_index_rows = recall_table_autofaiss(af_index, store, xq, I_exact, autofaiss_settings(
        af_index, af["index_param"], (8, 32, 128)), ())
    print_rows(af_index_rows)
    tuned = next((r for r in af_index_rows if r["setting"].startswith("tuned")),
                 af_index_rows[0])
    row = {"budget_mb": budget_mb, "who": "autofaiss", "index": af["index_key"],
           "setting": tuned["setting"].removeprefix("tuned "), "build_s": af["seconds"],
           "peak": af["peak_rss_kib"] << 10, "index_bytes": af["index_bytes"],
           "r10": tuned["r10"], "qps": tuned["qps"]}
    if "rss_after_imports_kib" in af:  # builds from before it was recorded: whole process only
        row["added"] = (af["peak_rss_kib"] - af["rss_after_imports_kib"]) << 10
    row["anon"] = anon_added(af)
    return row


def ground_truth(root: Path, data: Path, args, xq: np.ndarray):  # noqa: ANN001, ANN201
    """(float store, exact top-10 ids) from a build of ours at an ample budget (16x the
    floats, at least 4 GiB), for when ours refused the budgets asked and wrote no store."""
    from pipeline.index_build import VectorStore, exact_search

    ample = max(4 << 30, 16 * args.n * args.d * 4)  # main set n, d from the data's meta.json
    print(f"ground truth: ours refused; building ours at {ample >> 20} MiB for its float store")
    _, out = build_ours(root, data, ample, args)
    store = VectorStore.open(out / "vectors.npy")
    return store, exact_search(store, xq, 10)[1]


def print_summary(summary: list[dict], refused: dict[int, str]) -> None:
    """One table: every budget, ours and autofaiss side by side, ratios ours / autofaiss.

    "In budget" is judged on the anonymous RSS the build (and, for ours, the tuning after it)
    added at its sampled peak, the memory `index.max_memory_mb` budgets; the whole process's
    VmHWM (interpreter, libraries' file pages, for ours after the build) is shown beside it."""
    print("\nbudget  who        index                          build s  peak RSS   build added"
          "  anon added  in budget  index bytes  10-R@10  queries/s  setting")
    for r in summary:
        added = gib(r["added"]) if "added" in r else "-"
        anon = gib(r["anon"]) if r.get("anon") is not None else "-"
        print(f"{r['budget_mb']:>6}  {r['who']:<10} {r['index'][:30]:<30} {r['build_s']:>7.1f}  "
              f"{gib(r['peak']):>9}  {added:>11}  {anon:>10}  {within(r):>9}  "
              f"{gib(r['index_bytes']):>11}  {r['r10']:>7.4f}  {r['qps']:>9.0f}  {r['setting']}")
    print("(peak RSS: the whole process's VmHWM; build added: VmHWM minus the RSS after imports;"
          " anon added: sampled anonymous RSS, build and tuning, minus that after imports; in "
          "budget: anon added <= the budget, or build added for results without it)")
    for budget in sorted({r["budget_mb"] for r in summary} | set(refused), reverse=True):
        pair = {r["who"]: r for r in summary if r["budget_mb"] == budget}
        if budget in refused:
            print(f"{budget} MiB: autofaiss built no index ({refused[budget][:160]}); "
                  f"ours {'did' if 'ours' in pair else 'did not either'}")
        for who in ("ours", "ours@match"):
            if who not in pair or "autofaiss" not in pair:
                continue
            o, a = pair[who], pair["autofaiss"]
            print(f"{budget} MiB, {who} / autofaiss: build time {o['build_s'] / a['build_s']:.2f},"
                  f" peak RSS {o['peak'] / a['peak']:.2f}, index bytes "
                  f"{o['index_bytes'] / a['index_bytes']:.2f}, 10-recall@10 "
                  f"{o['r10'] / a['r10']:.3f}, queries/s {o['qps'] / a['qps']:.2f}; targets "
                  f"(recall >=, q/s >=, RSS within budget): "
                  f"{'met' if o['r10'] >= a['r10'] else 'NOT met'}, "
                  f"{'met' if o['qps'] >= a['qps'] else 'NOT met'}, "
                  f"{'met' if within(o) == 'yes' else 'NOT met'}")


def within(row: dict) -> str:
    """yes / NO: what the build added (anonymous RSS where sampled) against the budget."""
    added = row["anon"] if row.get("anon") is not None else row.get("added", row["peak"])
    return "yes" if added <= row["budget_mb"] << 20 else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall")
    parser.add_argument("--throughput-queries", type=int, default=0,
                        help="also time the score stage's search on this many (0 = skip)")
    parser.add_argument("--budgets-mb", type=int, nargs="+", default=[4096, 1024, 256],
                        help="index.max_memory_mb values, each built by both")
    parser.add_argument("--budget-mb", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=10_000, help="queries per search call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="data and builds live here; data is reused between runs")
    parser.add_argument("--skip-autofaiss", action="store_true")
    parser.add_argument("--autofaiss-index-memory", default=None,
                        help="its max_index_memory_usage (default: 90%% of the budget, the "
                        "most it accepts with current_memory_available = the budget)")
    parser.add_argument("--reuse-builds", action="store_true",
                        help="measure search on the builds of an earlier run (debugging)")
    parser.add_argument("--wait-load", type=float, default=0.5,
                        help="before building, wait for the 1-min load average below this")
    parser.add_argument("--wait-max-s", type=float, default=600)
    parser.add_argument("--vectors", type=Path, default=None,
                        help="real vectors, (n, d) float32 unit rows in a .npy, instead of the "
                        "synthetic ones (--n, --d ignored)")
    parser.add_argument("--query-vectors", type=Path, default=None,
                        help="queries for --vectors (.npy); default: --queries rows of "
                        "--vectors drawn with --seed, left out of the gallery")
    parser.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                        help="ours: index.target_recall the tuner picks the fastest setting for")
    parser.add_argument("--ef-search", type=int, nargs="+", default=None,
                        help="ours: the efSearch values swept for HNSW (default: the shipped "
                        "index.ef_search)")
    parser.add_argument("--match-autofaiss", action="store_true",
                        help="also re-tune ours' build to autofaiss's measured 10-recall@10 at "
                             "each budget (no rebuild) and measure it: a row 'ours@match'")
    parser.add_argument("--child-build", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-tune", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ef_search is None:
        from pipeline.config import IndexConfig

        args.ef_search = list(IndexConfig().ef_search)
    if args.child_build:
        child_build(*args.child_build, args.budget_mb << 20, args.target_recall, args.ef_search)
        return
    if args.child_tune:
        child_tune(Path(args.child_tune[0]), int(args.child_tune[1]), args.target_recall,
                   args.ef_search)
        return

    import faiss

    from pipeline.index_build import VectorStore, exact_search

    started_all = time.perf_counter()
    print(f"machine: {os.cpu_count()} cores, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads), numpy {np.__version__}; "
          f"load average at start {os.getloadavg()}")
    root = args.work_dir.resolve()
    n_queries = max(args.queries, args.throughput_queries)
    if args.vectors:
        data = ensure_data_from(root, args.vectors, args.query_vectors, args.shards, n_queries,
                                args.seed)
    else:
        data = ensure_data(root, args.n, args.d, args.shards, n_queries, args.seed)
    meta = json.loads((data / "meta.json").read_text())
    args.n, args.d = meta["n"], meta["d"]
    xq = np.ascontiguousarray(np.load(data / "queries.npy", mmap_mode="r")[:args.queries])
    summary, I_exact, store = [], None, None
    refused: dict[int, str] = {}  # budget -> why autofaiss built no index
    for budget_mb in args.budgets_mb:
        if not args.reuse_builds:
            wait_for_quiet(args.wait_load, args.wait_max_s)
        try:
            if I_exact is None:  # ground truth once, from the first build's float store
                _, ours_dir = build_ours(root, data, budget_mb << 20, args)
                store = VectorStore.open(ours_dir / "vectors.npy")
                started = time.perf_counter()
                D_exact, I_exact = exact_search(store, xq, 10)
                print(f"exact brute force: {len(xq)} queries x {store.n} vectors in "
                      f"{time.perf_counter() - started:.1f}s; queries with an exact "
                      f"duplicate in the gallery (top-1 score >= 1 - 1e-6): "
                      f"{int(np.sum(D_exact[:, 0] >= 1 - 1e-6))}")
                args.reuse_builds, reuse = True, args.reuse_builds  # measured just below
                summary.append(ours_at_budget(root, data, args, budget_mb, xq, I_exact))
                args.reuse_builds = reuse
            else:
                summary.append(ours_at_budget(root, data, args, budget_mb, xq, I_exact))
        except RuntimeError as error:  # e.g. refused up front: nothing fits the budget
            print(f"ours at {budget_mb} MiB: {error}")
        # autofaiss after ours at each budget: a run cut short still has ours.
        if not args.skip_autofaiss:
            if store is None:  # ours refused every budget so far: no float store to judge by
                store, I_exact = ground_truth(root, data, args, xq)
            try:
                summary.append(autofaiss_at_budget(root, data, args, budget_mb, store, xq,
                                                   I_exact))
                if args.match_autofaiss:
                    summary.extend(ours_matched(root, data, args, budget_mb, xq, I_exact,
                                                summary))
            except RuntimeError as error:  # e.g. it refuses: its index needs more memory
                print(f"autofaiss at {budget_mb} MiB: {error}")
                lines = str(error).splitlines()
                refused[budget_mb] = next((line.split("[ERROR]:")[-1].strip()
                                           for line in lines if "[ERROR]" in line), lines[0])
    print_summary(summary, refused)
    search_peak = rss_kib("VmHWM") << 10
    print(f"\nsearch process peak RSS {gib(search_peak)}; total "
          f"{time.perf_counter() - started_all:.0f}s; load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
