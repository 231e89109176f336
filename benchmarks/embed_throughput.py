"""Embed stage throughput vs a bare loop over the same model, as ratios measured in one process.

    python benchmarks/embed_throughput.py                          # the shipped demo sizes
    python benchmarks/embed_throughput.py --num-workers 0 1 2 --repeats 3
    python benchmarks/embed_throughput.py --items 400 --batch-size 32 --work-dir /tmp/bench

Sets up a demo run (the shipped pipeline.toml with the CLI's values and `train.epochs = 1`;
the weights do not matter for speed) and runs every stage up to `train`. Then, in this one
process and after a warm-up of each side:

- stage: `commands.run(..., ["embed"])` (its inputs done) over all shards, images/s from
  its wall time (model build, decoding, catalog writes and Parquet writes included), plus
  the per-shard `images_per_s` metrics it records in the catalog;
- bare: the same model objects the stage builds, on gallery tensors decoded beforehand (not
  timed), in the same batches (batch size within each shard, as the stage's loader cuts
  them), each encoder the stage runs (prompted; plain CLIP, the `baseline` method), under
  `torch.inference_mode`. Other methods only with `--set 'score.methods=[...]'`.

Each stage run is followed by a bare run and their ratio is reported; with `--repeats` the
pairs are repeated and the median ratio per worker count is printed. `cores busy` is the CPU
time of this process and its DataLoader workers over wall time: on a machine shared with
others it shows how much of the 2 cores the measurement actually got.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it

from pipeline import commands  # noqa: E402
from pipeline.catalog import Catalog  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.loader import ImageItem, ImageItems, collate  # noqa: E402
from pipeline.device import autocast, resolve_device  # noqa: E402
from pipeline.progress import ProgressBoard  # noqa: E402
from pipeline.runner import Runner, upstream_inputs  # noqa: E402
from stages import all_stages  # noqa: E402
from stages.embed import encode_batch  # noqa: E402


def demo_config(work_dir: Path, items: int, batch_size: int, num_workers: int,
                image_size: int, arch: str, extra: Sequence[str] = ()) -> Config:
    """The shipped pipeline.toml with the benchmark's sizes; `extra` = more overrides."""
    overrides = [
        f"run.work_dir='{work_dir}'",
        f"data.demo_items={items}",
        f"extract.image_size={image_size}",
        f"model.arch='{arch}'",
        "train.epochs=1",
        # The encoders docs/benchmarks.md measured: prompted + baseline (--set adds others).
        'score.methods=["freestyle", "baseline"]',
        f"embed.batch_size={batch_size}",
        f"embed.num_workers={num_workers}",
        *extra,
    ]
    return load_config(REPO_ROOT / "pipeline.toml", overrides)


def with_workers(config: Config, num_workers: int) -> Config:
    """Same run, another `embed.num_workers` (run-only: the fingerprints stay the same)."""
    return dataclasses.replace(config,
                               embed=dataclasses.replace(config.embed, num_workers=num_workers))


def embed_context(config: Config):
    """(embed stage, its context) as the runner builds them for this config."""
    runner = Runner(config, all_stages, ProgressBoard(False))
    stage = next(s for s in runner.stages if s.name == "embed")
    inputs = upstream_inputs(runner.catalog, stage, runner.fingerprints, config.work_dir)
    return stage, runner.context(stage, inputs)


def predecode(config: Config) -> list[list[torch.Tensor]]:
    """Gallery pixels per shard, cut into batches as the stage's loader cuts them."""
    stage, ctx = embed_context(config)
    shards = []
    for unit in ctx.input_units("prepare"):
        table = pq.read_table(ctx.input_path("prepare", "gallery", unit.key),
                              columns=["image_id", "path"])
        items = [ImageItem("gallery", i, p) for i, p in zip(table["image_id"].to_pylist(),
                                                            table["path"].to_pylist())]
        dataset = ImageItems(items, config.extract.image_size, config.data.max_image_pixels)
        size = config.embed.batch_size
        batches = [collate([dataset[j] for j in range(i, min(i + size, len(dataset)))])
                   for i in range(0, len(dataset), size)]
        shards.append([b.pixels for b in batches if b.pixels is not None])
    return shards


@dataclass
class Timing:
    images: int
    seconds: float
    cpu_seconds: float      # this process and its DataLoader workers
    others_seconds: float   # CPU time every other process on the machine used meanwhile

    @property
    def per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cores(self) -> float:
        return self.cpu_seconds / self.seconds

    @property
    def others(self) -> float:
        return self.others_seconds / self.seconds


class Clock:
    """Wall time, our CPU time and the machine's busy CPU time, from start to `stop()`."""

    def __init__(self) -> None:
        self.wall, self.cpu, self.busy = time.perf_counter(), cpu_seconds(), machine_busy()

    def stop(self, images: int) -> Timing:
        cpu = cpu_seconds() - self.cpu
        busy = machine_busy() - self.busy
        return Timing(images, time.perf_counter() - self.wall, cpu, max(busy - cpu, 0.0))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_busy() -> float:
    """Non-idle CPU seconds of all processes since boot (/proc/stat); 0 where unavailable."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(v) for v in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def time_stage(config: Config) -> tuple[Timing, list[float]]:
    """Embed every shard through the runner (after forgetting earlier embed results)."""
    commands.reset(all_stages, config, "embed")
    clock = Clock()
    commands.run(all_stages, config, ["embed"], progress=False)
    timing = clock.stop(0)
    stage, ctx = embed_context(config)
    rows = Catalog.in_dir(config.work_dir).rows(
        "SELECT u.rows, m.value FROM units u JOIN metrics m USING (stage, unit_key, fingerprint) "
        "WHERE u.stage = ? AND u.fingerprint = ? AND m.name = 'images_per_s' "
        "ORDER BY u.unit_key", ["embed", ctx.fingerprint])
    timing.images = sum(r[0] for r in rows)
    return timing, [r[1] for r in rows]


def bare_loop(config: Config, shards: list[list[torch.Tensor]], models,
              limit: int | None = None) -> Timing:
    """The stage's per-batch model work on pre-decoded pixels, nothing else."""
    device = resolve_device(config.run.device)
    batches = [b for shard in shards for b in shard][:limit]
    out = []
    clock = Clock()
    with torch.inference_mode():
        for pixels in batches:
            pixels = pixels.to(device, non_blocking=True)
            with autocast(device, config.embed.amp):
                out.append({k: v.float().cpu().numpy()  # as the stage's loop does
                            for k, v in encode_batch(*models, pixels).items()})
    return clock.stop(sum(len(b) for b in batches))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=160, help="demo photos (data.demo_items)")
    parser.add_argument("--batch-size", type=int, default=64, help="embed.batch_size")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 1, 2],
                        help="embed.num_workers values to measure")
    parser.add_argument("--image-size", type=int, default=224, help="extract.image_size")
    parser.add_argument("--arch", default="fsr-tiny-vit", help="model.arch")
    parser.add_argument("--repeats", type=int, default=3, help="stage/bare pairs per value")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the demo run here (default: a temporary folder)")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="any other config override")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="fsr-bench-") as tmp:
        work_dir = (args.work_dir or Path(tmp) / "run").resolve()
        config = demo_config(work_dir, args.items, args.batch_size, args.num_workers[0],
                             args.image_size, args.arch, args.extra)
        started = time.perf_counter()
        commands.run(all_stages, config, ["train"], progress=False)
        print(f"setup (ingest .. train, epochs=1): {time.perf_counter() - started:.1f}s "
              f"in {work_dir}")
        run_benchmark(config, args)


def run_benchmark(config: Config, args: argparse.Namespace) -> None:
    shards = predecode(config)
    stage, ctx = embed_context(config)
    models = stage.models(ctx)  # the very objects the stage builds for this fingerprint
    n_batches = sum(len(s) for s in shards)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}: intra-op threads {torch.get_num_threads()}, inter-op "
          f"{torch.get_num_interop_threads()}, cpu_count {os.cpu_count()}, device "
          f"{resolve_device(config.run.device)}")
    print(f"items {args.items} in {len(shards)} shards (shard_size {config.data.shard_size}), "
          f"batch {config.embed.batch_size} ({n_batches} batches), image {args.image_size} px, "
          f"arch {config.model.arch}, encoders {'+'.join(models[1])}, "
          f"num_workers {args.num_workers}, load average {os.getloadavg()[0]:.2f}")

    # Warm-up: one shard through the stage, one batch through the bare loop.
    commands.reset(all_stages, config, "embed")
    commands.run(all_stages, config, ["embed"], plan_only=True, progress=False)
    commands.work(all_stages, config, "embed", shard=0, progress=False)
    bare_loop(config, shards, models, limit=1)

    print(f"{'workers':>7} {'rep':>3} {'stage img/s':>11} {'bare img/s':>10} {'ratio':>6} "
          f"{'cpu ratio':>9} {'stage s':>7} {'bare s':>6} {'ours s/b':>9} {'others s/b':>10}  "
          "shard img/s (catalog)")
    pairs: dict[int, list[tuple[Timing, Timing]]] = {w: [] for w in args.num_workers}
    for repeat in range(args.repeats):
        for workers in args.num_workers:
            run_config = with_workers(config, workers)
            # Alternate which side goes first so a drift in the machine's load cancels out.
            if repeat % 2:
                bare = bare_loop(run_config, shards, models)
                staged, per_shard = time_stage(run_config)
            else:
                staged, per_shard = time_stage(run_config)
                bare = bare_loop(run_config, shards, models)
            assert staged.images == bare.images, (staged.images, bare.images)
            pairs[workers].append((staged, bare))
            shard_text = " ".join(f"{v:.1f}" for v in per_shard[:6])
            print(f"{workers:>7} {repeat:>3} {staged.per_s:>11.2f} {bare.per_s:>10.2f} "
                  f"{ratio(staged, bare):>6.3f} {cpu_ratio(staged, bare):>9.3f} "
                  f"{staged.seconds:>7.1f} {bare.seconds:>6.1f} "
                  f"{staged.cores:>4.2f}/{bare.cores:<4.2f} "
                  f"{staged.others:>5.2f}/{bare.others:<4.2f}"
                  f"  {shard_text}{' ...' if len(per_shard) > 6 else ''}", flush=True)
    summarise(pairs)


# A pair counts as quiet when other processes used at most this many cores during both runs.
QUIET_OTHERS = 0.2


def ratio(staged: Timing, bare: Timing) -> float:
    """Stage images/s over bare-loop images/s, by wall time: the target (>= 0.85)."""
    return staged.per_s / bare.per_s


def cpu_ratio(staged: Timing, bare: Timing) -> float:
    """Bare CPU seconds per image over the stage's: how much of the stage's work is the model's."""
    return (bare.cpu_seconds / bare.images) / (staged.cpu_seconds / staged.images)


def summarise(pairs: dict[int, list[tuple[Timing, Timing]]]) -> None:
    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.3f}" if values else "-"

    print(f"median per num_workers (quiet = others <= {QUIET_OTHERS} cores on both sides):")
    best, best_value = None, 0.0
    for workers, measured in pairs.items():
        quiet = [(s, b) for s, b in measured
                 if s.others <= QUIET_OTHERS and b.others <= QUIET_OTHERS]
        print(f"  {workers}: ratio {median([ratio(s, b) for s, b in measured])} over "
              f"{len(measured)} pairs, {median([ratio(s, b) for s, b in quiet])} over "
              f"{len(quiet)} quiet pairs; cpu ratio "
              f"{median([cpu_ratio(s, b) for s, b in measured])}")
        value = statistics.median([ratio(s, b) for s, b in (quiet or measured)])
        if value > best_value:
            best, best_value = workers, value
    shipped = load_config(REPO_ROOT / "pipeline.toml").embed.num_workers
    print(f"best num_workers here: {best} (pipeline.toml ships {shipped}); "
          f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
