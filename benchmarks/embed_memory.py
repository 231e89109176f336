"""Peak RSS of the embed stage on a small and a 10x larger demo gallery: it must not grow.

    python benchmarks/embed_memory.py                       # 2,000 and 20,000 photos
    python benchmarks/embed_memory.py --sizes 500 5000      # quicker
    python benchmarks/embed_memory.py --work-dir /tmp/mem   # keep (and reuse) the runs

For every size, one subprocess sets the demo run up (ingest .. train, not measured) and a
fresh one then runs only the real embed stage over all shards
(`commands.run(config, ["embed"])`, its inputs done), so the peak RSS it reports is the
stage's own: `ru_maxrss` of the stage process (= VmHWM) and, separately, the largest of its
DataLoader worker processes (RUSAGE_CHILDREN). The stage streams shard by shard, so both
should be the same for both sizes: the number of shards grows 10x, batch and shard stay.

What keeps 20,000 photos tractable on 2 CPU cores (defaults, all shown in the output): the
photos are rendered at 32 px and read at `extract.image_size = 32` (the VGG Gram path and the
64 px tiny ViT then cost milliseconds per image, instead of ~0.1 s at 224 px); `data.styles =
[]` (text queries only: nothing else to render, the embed stage reads photos only);
`data.test_fraction = 0.95` and `train.epochs = 1` (extract, cluster and train see ~5% of the
photos; the embed stage embeds all of them, train and test alike). Shard size, batch size,
workers and the baseline embedding are the shipped pipeline.toml's (the untrained embedding
is off). Small images make the per-batch part of the peak small, so any per-item growth
stands out more, not less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it

# The scaled-down demo described in the module docstring.
TRACTABLE = ("data.demo_image_size=32", "extract.image_size=32", "data.styles=[]",
             "data.test_fraction=0.95", "train.epochs=1", "extract.num_workers=0",
             "train.num_workers=0")


def status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def load(work_dir: Path, items: int, extra: Sequence[str]):
    from pipeline.config import load_config
    # The prompted + baseline encoders that docs/benchmarks.md measured.
    overrides = [f"run.work_dir='{work_dir}'", f"data.demo_items={items}", *TRACTABLE,
                 'score.methods=["freestyle", "baseline"]', *extra]
    return load_config(REPO_ROOT / "pipeline.toml", overrides)


def child(args: argparse.Namespace) -> None:
    """Run in a subprocess: `setup` runs ingest .. train, `embed` the measured stage."""
    import logging

    from pipeline import commands
    from stages import all_stages
    logging.basicConfig(level=logging.ERROR)
    config = load(args.work_dir, args.items, args.extra)
    if args.child == "setup":
        commands.run(all_stages, config, ["train"], progress=False)
        return
    commands.reset(all_stages, config, "embed")
    before = status_kib("VmRSS")
    started = time.perf_counter()
    reports = commands.run(all_stages, config, ["embed"], progress=False)[-1:]  # upstream: done
    seconds = time.perf_counter() - started
    rows = commands.sql(all_stages, config, "SELECT count(*) FROM gallery_embeddings")[0][0].as_py()
    print(json.dumps({
        "items": args.items, "embedded": rows, "shards": reports[0].units,
        "seconds": seconds, "rss_before_kib": before,
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "vmhwm_kib": status_kib("VmHWM"),
        "worker_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "config": {"shard_size": config.data.shard_size, "batch_size": config.embed.batch_size,
                   "num_workers": config.embed.num_workers, "methods": list(config.score.methods),
                   "image_size": config.extract.image_size, "arch": config.model.arch},
    }))


def spawn(kind: str, work_dir: Path, items: int, extra: Sequence[str]) -> str:
    command = [sys.executable, __file__, "--child", kind, "--work-dir", str(work_dir),
               "--items", str(items), *[f"--set={e}" for e in extra]]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="parent folder of the runs (default: a temporary folder)")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="any other config override")
    parser.add_argument("--child", choices=["setup", "embed"], help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return

    print("overrides of pipeline.toml: " + " ".join(TRACTABLE + tuple(args.extra)))
    with tempfile.TemporaryDirectory(prefix="fsr-mem-") as tmp:
        root = (args.work_dir or Path(tmp)).resolve()
        results = []
        for items in args.sizes:
            work_dir = root / f"items-{items}"
            started = time.perf_counter()
            spawn("setup", work_dir, items, args.extra)
            setup_s = time.perf_counter() - started
            result = json.loads(spawn("embed", work_dir, items, args.extra).splitlines()[-1])
            results.append(result)
            print(f"items {items:>6}: {result['embedded']} embedded in {result['shards']} "
                  f"shards, embed {result['seconds']:.1f}s "
                  f"({result['embedded'] / result['seconds']:.0f} img/s; setup {setup_s:.0f}s); "
                  f"RSS before run {result['rss_before_kib'] / 1024:.0f} MiB, "
                  f"peak {result['peak_kib'] / 1024:.0f} MiB, "
                  f"largest worker peak {result['worker_peak_kib'] / 1024:.0f} MiB")
        print(f"stage config: {results[0]['config']}; load average {os.getloadavg()[0]:.2f}")
        first, last = results[0], results[-1]
        print(f"peak RSS ratio {last['items']} / {first['items']} items: "
              f"stage process {last['peak_kib'] / first['peak_kib']:.3f}, "
              f"worker {last['worker_peak_kib'] / max(first['worker_peak_kib'], 1):.3f}; "
              f"growth {(last['peak_kib'] - first['peak_kib']) / 1024:+.1f} MiB")


if __name__ == "__main__":
    main()
