"""`fsr-pipe query` speed: the cold first query, and batch queries/s against the score stage's
own encoding rate, measured in one run (issue 16; target: batch >= 0.9 of score's rate).

    python benchmarks/query_speed.py --work-dir /tmp/bench/query        # ~4 min setup, ~2 min
    python benchmarks/query_speed.py --work-dir runs/demo --repeats 5

Uses the finished demo run under --work-dir (the shipped pipeline.toml, that work_dir), and
runs `fsr-pipe run score` first: a no-op on a finished run, the whole demo (~3-4 min on 2
cores) on an empty folder. The queries are the demo's test split, as the score stage encodes
them: every text query and every image query (sketch, art, low-res), one per row.

- cold: `fsr-pipe query --text ...` in a fresh process (Python start, imports, model build,
  index and gallery load, one query), wall time; and, inside one process, open_searcher
  (model + index + gallery) and the first query, timed apart.
- batch: `fsr-pipe query --queries FILE` (fresh process) over the test queries, queries/s of
  its batch loop as it prints it (encode + search + Parquet write, the load not included), and
  the same loop in this process (query.search_file after open_searcher).
- score: the score stage's encoding of the same queries, re-timed in this process
  (stages.score._encode_queries: model load + encoding, what its `encode_queries_per_s` metric
  times), and that metric as the run recorded it.

Ratios: batch / score per repeat (each repeat times score's encoding right before the batch
loop), median at the end. `others' cores`: CPU the rest of the machine used meanwhile.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline import commands  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.query import Query, open_searcher, search_file, stage_context  # noqa: E402
from stages import all_stages  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from embed_throughput import machine_busy  # noqa: E402


def own_cpu() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Clock:
    """Wall time and the CPU the rest of the machine used meanwhile (in cores)."""

    def __init__(self) -> None:
        self.wall, self.busy, self.own = time.monotonic(), machine_busy(), own_cpu()

    def stop(self) -> tuple[float, float]:
        wall = time.monotonic() - self.wall
        others = (machine_busy() - self.busy) - (own_cpu() - self.own)
        return wall, max(others, 0.0) / max(wall, 1e-9)


def cli(config_path: Path, overrides: list[str], *args: str) -> subprocess.CompletedProcess:
    flags = [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "query", *args, "--config",
                           str(config_path), *flags, "-q"], env=env, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"fsr-pipe query failed:\n{done.stdout}\n{done.stderr}")
    return done


def split_queries(config: Config, method: str):  # noqa: ANN201 - (ctx, pyarrow table)
    from pipeline.index_build import VectorStore
    from stages.score import _test_queries

    ctx = stage_context(all_stages, config)
    store = VectorStore.open(ctx.input_path("index", "vectors", method))
    queries, _ = _test_queries(ctx, store)
    return ctx, queries


def write_query_file(queries, path: Path) -> int:  # noqa: ANN001 - pyarrow table
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "image"])
        for r in queries.select(["query_id", "text", "path"]).to_pylist():
            writer.writerow([r["query_id"], "" if r["path"] else r["text"], r["path"] or ""])
    return len(queries)


def bare_encode(searcher, queries, config: Config) -> None:  # noqa: ANN001
    """Only the encoding score runs (evaluation.encode_queries), its model already loaded."""
    from pipeline.data.loader import ImageItem
    from pipeline.evaluation import encode_queries

    rows = queries.select(["query_id", "path", "text"]).to_pylist()
    texts = [(r["query_id"], r["text"] or "") for r in rows if r["path"] is None]
    images = [ImageItem("query", r["query_id"], r["path"]) for r in rows if r["path"]]
    encode_queries(searcher.encoders, texts, images, device=searcher.device,
                   image_size=config.extract.image_size,
                   max_pixels=config.data.max_image_pixels,
                   batch_size=config.score.batch_size, num_workers=config.score.num_workers,
                   amp=config.score.amp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="a finished demo run (or an empty folder to make one)")
    parser.add_argument("--method", default="freestyle")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="another config override S.K=V (repeatable)")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="fsr-query-"))
    config_path = REPO_ROOT / "pipeline.toml"
    overrides = [f"run.work_dir='{work_dir.resolve()}'", *args.extra]
    config = load_config(config_path, overrides)
    print(f"run: {work_dir} (pipeline.toml with {overrides})")
    clock = Clock()
    commands.run(all_stages, config, ["score"], progress=False)
    print(f"setup (fsr-pipe run score): {clock.stop()[0]:.1f}s")

    ctx, queries = split_queries(config, args.method)
    query_file = work_dir / "bench_queries.csv"
    n = write_query_file(queries, query_file)
    kinds = {s: queries["style"].to_pylist().count(s) for s in set(queries["style"].to_pylist())}
    print(f"{n} test queries: {kinds}; method {args.method}; score.batch_size "
          f"{config.score.batch_size}; torch threads {__import__('torch').get_num_threads()}")
    _, [[recorded]] = commands.sql(all_stages, config, (
        "SELECT value FROM current_metrics WHERE stage = 'score' AND "
        f"unit_key = '{args.method}' AND name = 'encode_queries_per_s'"), arrow=False)
    text = next(t for t in queries["text"].to_pylist() if t)

    from stages.score import _encode_queries

    print("\nrep | cold CLI s | load s | first query s | CLI batch q/s | batch q/s | score "
          "encode q/s | encode only q/s | batch / score | batch / encode only | others' cores "
          "(cold / CLI batch / batch / score / encode only)")
    pairs, colds, cli_ratios = [], [], []
    for rep in range(args.repeats):
        clock = Clock()
        cli(config_path, overrides, "--text", text, "--method", args.method, "--json")
        cold, busy_cold = clock.stop()
        clock = Clock()
        searcher = open_searcher(all_stages, config, args.method, k=10)
        load = clock.stop()[0]
        clock = Clock()
        searcher.search([Query(text=text)])
        first = clock.stop()[0]
        clock = Clock()
        done = cli(config_path, overrides, "--queries", str(query_file), "--method",
                   args.method, "--out", str(work_dir / "bench_results.parquet"))
        busy_cli = clock.stop()[1]
        cli_rate = float(re.search(r"\(([\d,.]+)/s\)", done.stderr).group(1).replace(",", ""))
        timed = {}
        # score's encoding, the encoding alone, the batch loop: one after the other, in an
        # order that turns each repeat, so that none always runs first.
        order = ["score", "bare", "batch"]
        for name in order[rep % 3:] + order[:rep % 3]:
            clock = Clock()
            if name == "score":
                _encode_queries(ctx, args.method, queries)
            elif name == "bare":
                bare_encode(searcher, queries, config)
            else:
                report = search_file(searcher, query_file, work_dir / "bench_results.parquet")
            wall, busy = clock.stop()
            timed[name] = (n / wall if name != "batch" else report.per_s, busy)
        (score_rate, busy_score), (bare_rate, busy_bare), (rate, busy_batch) = (
            timed["score"], timed["bare"], timed["batch"])
        pairs.append((rate / score_rate, rate / bare_rate,
                      max(busy_batch, busy_score), max(busy_batch, busy_bare)))
        cli_ratios.append(cli_rate / score_rate)
        colds.append((cold, busy_cold))
        print(f"{rep} | {cold:.2f} | {load:.2f} | {first:.3f} | {cli_rate:.1f} | "
              f"{rate:.1f} | {score_rate:.1f} | {bare_rate:.1f} | {pairs[-1][0]:.3f} | "
              f"{pairs[-1][1]:.3f} | {busy_cold:.2f} / {busy_cli:.2f} / {busy_batch:.2f} / "
              f"{busy_score:.2f} / {busy_bare:.2f}")
    print(f"\nscore stage's recorded encode_queries_per_s (its own run): {recorded:.1f}")
    print(f"median cold first query (fresh CLI process): "
          f"{statistics.median(c for c, _ in colds):.2f}s (quiet ones, others <= {QUIET}: "
          f"{quiet_median([c for c, b in colds if b <= QUIET])})")
    for i, what in ((0, "score's encoding (model load included)"),
                    (1, "the encoding alone (model loaded)")):
        quiet = [p[i] for p in pairs if p[2 + i] <= QUIET]
        print(f"batch / {what}: median {statistics.median(p[i] for p in pairs):.3f} over all "
              f"{len(pairs)} repeats, {quiet_median(quiet)} over the {len(quiet)} quiet ones "
              f"(others <= {QUIET} cores on both sides); target >= 0.9")
    print(f"CLI batch / score's encoding: median {statistics.median(cli_ratios):.3f} (the CLI's "
          "batch loop runs in a fresh process, the other side in this warm one)")


QUIET = 0.2  # cores the rest of the machine may use for a pair to count as quiet


def quiet_median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "none"


if __name__ == "__main__":
    main()
