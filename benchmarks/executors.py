"""Executors and the driver at scale, as ratios and times measured in one run.

    python benchmarks/executors.py                       # extract on 8 shards + 25,000 records
    python benchmarks/executors.py --items 640 --executors inline local --workers 2
    python benchmarks/executors.py --records 25000 --skip-extract

1. extract: a demo run (the shipped pipeline.toml, `data.demo_items` photos, 40 per shard) is
   prepared once; then the extract stage runs on a copy of it per executor (`inline`, `local`
   and `ray` with `--workers`), wall time from the driver's call to its return: pool start-up
   and model loading in the workers included. Speedups are against `inline` in this run.
2. ingest: 25,000 unit records (two artifacts, two metrics each, as extract writes) are
   written under a stage plan of a fresh catalog, then `ingest_records` reads, checks and
   ingests them (the driver's work after an array job).
3. status: `commands.status` on that run of 25,000 units (the function, then the CLI as a
   subprocess: the CLI's import time is the "instant CLI" issue's, not this one's).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it

from pipeline import commands  # noqa: E402
from pipeline.catalog import Catalog  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.plans import fingerprints, ingest_records  # noqa: E402
from pipeline.records import ArtifactRecord, MetricRecord, UnitRecord, write_record  # noqa: E402  # noqa: E402
from stages import all_stages  # noqa: E402


def demo_config(work_dir: Path, items: int, extra: Sequence[str]) -> Config:
    return load_config(REPO_ROOT / "pipeline.toml", [
        f"run.work_dir={json.dumps(str(work_dir))}", f"data.demo_items={items}",
        "data.shard_size=40", *extra])


def time_extract(base: Path, tmp: Path, items: int, executor: str, workers: int,
                 extra: Sequence[str]) -> float:
    """Seconds for the extract stage on a fresh copy of the prepared run."""
    work = tmp / f"extract-{executor}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    config = demo_config(work, items, [f'run.executor="{executor}"', f"run.workers={workers}",
                                       *extra])
    started = time.perf_counter()
    reports = commands.run(all_stages, config, ["extract"], progress=False)
    seconds = time.perf_counter() - started
    ran = {r.stage: r.ran for r in reports}
    assert ran["extract"] == reports[-1].units, ran
    return seconds


def bench_extract(args: argparse.Namespace, tmp: Path) -> None:
    base = tmp / "prepared"
    config = demo_config(base, args.items, args.extra)
    started = time.perf_counter()
    commands.run(all_stages, config, ["prepare"], progress=False)
    shards = len(Catalog.in_dir(base).units("prepare", fingerprints(all_stages(),
                                                                    config)["prepare"]))
    print(f"setup: prepare {args.items} photos in {shards} shards "
          f"({time.perf_counter() - started:.1f}s)")
    times = {}
    for executor in args.executors:
        try:
            times[executor] = time_extract(base, tmp, args.items, executor, args.workers,
                                           args.extra)
        except Exception as exc:  # noqa: BLE001 - e.g. ray not installed: say so, go on
            print(f"  {executor:<7} skipped: {exc}")
            continue
        speedup = times["inline"] / times[executor] if "inline" in times else float("nan")
        print(f"  {executor:<7} workers {args.workers if executor != 'inline' else 1}: "
              f"{times[executor]:6.1f}s  speedup vs inline {speedup:.2f}x")


def fake_records(config: Config, n: int) -> tuple[str, str]:
    """A catalog with an extract plan of `n` units and a record (2 artifacts) per unit."""
    stage = "extract"
    fp = fingerprints(all_stages(), config)[stage]
    catalog = Catalog.in_dir(config.work_dir)
    catalog.init()
    keys = [f"shard-{i:05d}" for i in range(n)]
    meta = {"code_version": "1", "config": {}, "inputs": {}, "notes": None}
    catalog.save_plan(stage, fp, meta, [(k, {"shard": i}) for i, k in enumerate(keys)])
    out_dir = config.work_dir / stage / fp
    now = time.time()
    for i, key in enumerate(keys):
        artifacts = []
        for kind in ("gram_queries", "gram_gallery"):
            path = out_dir / key / f"{kind}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 64)
            artifacts.append(ArtifactRecord(kind, str(path.relative_to(config.work_dir)), 40,
                                            64, "0" * 64))
        write_record(UnitRecord(stage, fp, key, "done", "node-1", 1000 + i, 1, now, now + 1,
                                rows=80, artifacts=artifacts, metrics=[
                                    MetricRecord("good_items", 40.0, {"item_kind": "query"}),
                                    MetricRecord("good_items", 40.0,
                                                 {"item_kind": "gallery"})]), out_dir)
    return stage, fp


def bench_driver(args: argparse.Namespace, tmp: Path) -> None:
    work = tmp / "records"
    config = demo_config(work, 160, args.extra)
    started = time.perf_counter()
    stage, fp = fake_records(config, args.records)
    print(f"setup: {args.records:,} unit records written in {time.perf_counter() - started:.1f}s")
    catalog = Catalog.in_dir(work)
    started = time.perf_counter()
    n = ingest_records(catalog, stage, fp, work)
    seconds = time.perf_counter() - started
    print(f"  ingest: {n:,} records read, checked and ingested in {seconds:.2f}s "
          f"({n / seconds:,.0f} records/s; target < 30 s)")
    started = time.perf_counter()
    again = ingest_records(catalog, stage, fp, work)
    print(f"  ingest again (all done, nothing new): {again} in "
          f"{time.perf_counter() - started:.2f}s")
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        statuses = commands.status(all_stages, config)
        timings.append(time.perf_counter() - started)
    extract = {s.stage: s for s in statuses}[stage]
    assert extract.done == args.records, extract
    print(f"  status (function): {min(timings):.2f}s best of 3 over {extract.done:,} done "
          f"units (target < 2 s)")
    toml = work / "bench.toml"
    toml.write_text((REPO_ROOT / "pipeline.toml").read_text().replace(
        'work_dir = "runs/demo"', f"work_dir = {json.dumps(str(work))}"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--config", str(toml),
                    "--set", "data.shard_size=40"], check=True, stdout=subprocess.DEVNULL,
                   cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    started_import = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pipeline.cli"], check=True, cwd=REPO_ROOT,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    imports = time.perf_counter() - started_import
    print(f"  status (CLI subprocess): {started_import - started:.2f}s, of which importing "
          f"the CLI alone takes {imports:.2f}s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=320, help="demo photos (40 per shard)")
    parser.add_argument("--executors", nargs="+", default=["inline", "local", "ray"])
    parser.add_argument("--workers", type=int, default=2, help="local/ray workers")
    parser.add_argument("--records", type=int, default=25_000, help="unit records to ingest")
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--skip-driver", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="any other config override")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {' '.join(sys.argv)}; cpu_count "
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="fsr-bench-") as scratch:
        tmp = (args.work_dir or Path(scratch)).resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        if not args.skip_extract:
            bench_extract(args, tmp)
        if not args.skip_driver:
            bench_driver(args, tmp)


if __name__ == "__main__":
    main()
