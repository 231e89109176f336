"""faiss-gpu vs CPU for the index stage: the same plan built and searched on each, in one run.

    python benchmarks/index_gpu.py --work-dir /tmp/index-gpu                    # 1M x 512
    python benchmarks/index_gpu.py --n 200000 --factory IVF1024,PQ64 --work-dir /tmp/ig
    python benchmarks/index_gpu.py --n 20000 --devices cpu --work-dir /tmp/ig   # no GPU: CPU only

Data: benchmarks/index_scale.py's synthetic shards and held-out queries (`ensure_data`; reused
when present under `--work-dir`). Per device, in a fresh subprocess, exactly the stage's code:
`plan_index(n, d, --factory)`, `build_index(..., use_gpu=device == "gpu")` (train on the GPU,
fill on the GPU, save a CPU copy), then the saved index loaded and, for "gpu", copied to the GPU
(`maybe_to_gpu`, as score does) and searched with every `--nprobe` (k = 10, no re-ranking,
`--batch` queries per call, one untimed pass first). Back here: 10-recall@10 against exact
search over the float store, and one table with the GPU / CPU ratios of train, add and search.
Stops before building anything when "gpu" is asked for and faiss sees no GPU (faiss-cpu).
"""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # also when loaded by path (the tests)

from index_scale import ensure_data, run_json, shard_list  # noqa: E402

BUDGET = 1 << 40  # a given factory is costed, never refused: the budget only annotates it


def child(device: str, data: Path, out: Path, factory: str, nprobes: list[int],
          batch: int, n_queries: int) -> None:
    """In a fresh process: build on `device`, search the queries at each nprobe; one JSON line."""
    import faiss

    from pipeline.index import load_index, maybe_to_gpu, plan_index, search
    from pipeline.index_build import build_index, shard_dim

    shards = shard_list(data)
    n, d = sum(s.rows for s in shards), shard_dim(shards[0])
    plan = plan_index(n, d, factory, BUDGET, add_rows=max(s.rows for s in shards))
    build = build_index(shards, plan, out, seed=0, use_gpu=device == "gpu", checkpoint_s=1e9)
    index = load_index(build.index_path, expect_d=d, expect_ntotal=n)
    if device == "gpu":
        index = maybe_to_gpu(index, k=10, nprobe=max(nprobes))
    xq = np.load(data / "queries.npy")[:n_queries]  # a reused data folder may hold more
    searches = []
    for nprobe in nprobes:
        parts = [search(index, xq[s:s + batch], 10, nprobe)[1] for s in range(0, len(xq), batch)]
        started = time.perf_counter()
        parts = [search(index, xq[s:s + batch], 10, nprobe)[1] for s in range(0, len(xq), batch)]
        seconds = time.perf_counter() - started
        np.save(out / f"I-nprobe{nprobe}.npy", np.concatenate(parts))
        searches.append({"nprobe": nprobe, "qps": len(xq) / seconds})
    print(json.dumps({"device": device, "factory": plan.factory, "train_s": build.train_seconds,
                      "add_s": build.add_seconds, "searches": searches,
                      "on_gpu": type(faiss.downcast_index(index)).__name__.startswith("Gpu")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--factory", default="IVF4096,SQ8",
                        help="the index (the auto plan at 1 GB for 1M x 512)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--batch", type=int, default=10_000, help="queries per search call")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "gpu"], default=["cpu", "gpu"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        device, data, out = args.child
        child(device, Path(data), Path(out), args.factory, args.nprobe, args.batch,
              args.queries)
        return

    import faiss

    from pipeline.index import knn_recall
    from pipeline.index_build import VectorStore, exact_search

    if "gpu" in args.devices and faiss.get_num_gpus() == 0:
        sys.exit(f"faiss {faiss.__version__} sees no GPU: install fsr-pipe[gpu] (faiss-gpu) on "
                 "a machine with CUDA, or pass --devices cpu")
    root = args.work_dir.resolve()
    data = ensure_data(root, args.n, args.d, args.shards, args.queries, args.seed)
    results = {}
    for device in args.devices:
        out = root / f"build-{device}-{args.factory.replace(',', '_')}"
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():
            stale.unlink()
        results[device] = (run_json([sys.executable, __file__, "--child", device, str(data),
                                     str(out), "--work-dir", str(root), "--factory",
                                     args.factory, "--queries", str(args.queries), "--batch",
                                     str(args.batch), "--nprobe", *map(str, args.nprobe)],
                                    root / f"build-{device}.log"), out)
    store = VectorStore.open(next(iter(results.values()))[1] / "vectors.npy")
    xq = np.load(data / "queries.npy")[:args.queries]
    I_exact = exact_search(store, xq, 10)[1]
    print(f"\n{args.n} x {args.d}, {args.factory}, {len(xq)} queries in batches of "
          f"{args.batch}, k = 10; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} "
          f"CPU threads")
    print("device  on GPU  train s   add s  nprobe  10-R@10  queries/s")
    for device, (result, out) in results.items():
        for s in result["searches"]:
            I = np.load(out / f"I-nprobe{s['nprobe']}.npy")
            print(f"{device:<6}  {str(result['on_gpu']):<6}  {result['train_s']:>7.1f} "
                  f"{result['add_s']:>7.1f}  {s['nprobe']:>6}  "
                  f"{knn_recall(I, I_exact, 10, 10):>7.4f}  {s['qps']:>9.0f}")
    if len(results) == 2:
        cpu, gpu = results["cpu"][0], results["gpu"][0]
        speed = ", ".join(f"nprobe {c['nprobe']} {g['qps'] / c['qps']:.1f}x"
                          for c, g in zip(cpu["searches"], gpu["searches"]))
        print(f"GPU / CPU speed-up: train {cpu['train_s'] / gpu['train_s']:.1f}x, add "
              f"{cpu['add_s'] / gpu['add_s']:.1f}x, search {speed}")


if __name__ == "__main__":
    main()
