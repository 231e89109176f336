"""What FreestyleRet costs per query: plain CLIP image encoding vs FreestyleRet's, per image.

    python benchmarks/overhead.py                       # ViT-B-32 + ViT-L-14, batch 1 + 64
    python benchmarks/overhead.py --archs ViT-B-32 --batches 1 --repeats 20
    python benchmarks/overhead.py --device cuda --cell-budget-s 0   # GPU only, full repeats

Both sides encode the same random RGB batches in [0, 1] at `extract.image_size`, as the embed
stage's loader hands them over (the models resize for CLIP themselves), and every timed call
is the embed stage's per-batch work: copy to the device, `autocast(device, embed.amp)`,
encode, embeddings back to the host.

- CLIP: `encode_image_baseline` on the plain CLIP (`load_clip` with `[model]`'s arch, weights
  and seed: what the baseline method builds);
- FSR: the FreestyleRet of `build_model`, as the embed stage runs it per batch (its
  `encode_batch`: the Gram path once, then `encode_image(pixels, gram)`): the Gram path (VGG
  relu2_1 -> Gram -> projection), the style feature, the prompt generators, the prompted ViT;
- FSR's extra cost in two parts: the Gram path alone (`model.gram_encoder`) and the prompted
  ViT given precomputed Gram vectors (`model.encode_image(images, gram=g)`).

Weights are seeded random (`model.pretrained = ""`, `extract.vgg_weights = ""`: nothing is
downloaded) and the cluster centres are `cluster.k` random unit vectors of the Gram dimension;
the work done, hence the timing, does not depend on the values. Under `torch.inference_mode`,
after `--warmup` rounds, the four calls take turns for `--repeats` rounds (so a drift in the
machine's load hits them alike) and the median of each is reported per image. On CUDA every
call is bracketed by `torch.cuda.synchronize()`.

A round is the four calls once. Each (arch, batch) cell gets about `--cell-budget-s` seconds:
fewer repeats where a round is slow (at least one after the warm-up). A round is estimated
before a cell starts, from the largest smaller batch (or the batch-1 FLOP-counting round),
per image, which overestimates (batching helps): a cell whose estimate exceeds the budget
gets no warm-up and one timed round (the smaller batches warmed the model up; start-up costs
are small beside a round of minutes), and one whose estimate exceeds `--max-round-s` is
skipped, saying so. On 2 CPU cores the defaults take ~8-10 min, ViT-L-14 at batch 64 being
one round of ~2-5 min (skipped on a machine busy enough to push its estimate past 10 min);
`--cell-budget-s 0 --max-round-s 0` runs every cell with full warm-up and repeats.

FLOPs: one batch-1 forward of each call under `torch.utils.flop_counter.FlopCounterMode`, i.e.
matmul / conv / attention FLOPs as torch counts them (2 per multiply-add; norms, softmax and
elementwise ops not counted). While counting, nn.MultiheadAttention's fused inference fast
path is switched off (torch cannot see inside that kernel) and the CPU flash-attention kernel
gets torch's SDPA formula; the arithmetic is the same. FLOPs scale linearly with the batch.

`rounds` = a cell's warm-up + timed rounds; `others` = CPU cores that other processes kept
busy during its timed rounds (from /proc/stat): on a shared machine CPU timings rise with it.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it

from embed_throughput import machine_busy  # noqa: E402 - a sibling script, same folder

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.device import amp_dtype, autocast, resolve_device  # noqa: E402
from pipeline.models.clip import encode_image_baseline, load_clip  # noqa: E402
from pipeline.models.factory import build_model, pretrained_source  # noqa: E402
from pipeline.models.freestyle import FreestyleRet  # noqa: E402
from pipeline.models.style import build_gram_encoder  # noqa: E402

# The paper's reported cost of FreestyleRet over CLIP: ViT-L, batch 1, GPU, per query.
PAPER_EXTRA_MS, PAPER_EXTRA_PCT = 28.0, 41.0

Call = Callable[[], object]


def bench_config(arch: str, extra: Sequence[str] = ()) -> Config:
    """The project defaults with `arch`, seeded random CLIP and VGG weights, and `extra`."""
    return load_config(None, [f"model.arch='{arch}'", "model.pretrained=''",
                              "extract.vgg_weights=''", *extra])


def random_centres(k: int, dim: int, seed: int) -> np.ndarray:
    """(k, dim) float32 random unit vectors: stand-ins for the cluster stage's centres."""
    x = np.random.default_rng(seed).standard_normal((k, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_models(config: Config, device: torch.device) -> tuple[FreestyleRet, torch.nn.Module]:
    """(FreestyleRet with `[model]`'s prompts, plain CLIP), as the embed stage builds them."""
    gram_dim = build_gram_encoder(config, torch.device("cpu")).out_dim  # 256, or 8256 for 0
    centres = random_centres(config.cluster.k, gram_dim, config.run.seed)
    model, _ = build_model(config, centres, device)
    clip, _ = load_clip(config.model.arch, pretrained_source(config), seed=config.run.seed,
                        device=device)
    return model.eval(), clip.eval()


def random_pixels(batch: int, config: Config, device: torch.device) -> torch.Tensor:
    """A host batch as the embed loader yields it: (batch, 3, size, size) float32 RGB in [0, 1]."""
    size = config.extract.image_size
    generator = torch.Generator().manual_seed(config.run.seed)
    pixels = torch.rand(batch, 3, size, size, generator=generator)
    return pixels.pin_memory() if device.type == "cuda" else pixels  # the loader pins for CUDA


def make_calls(model: FreestyleRet, clip: torch.nn.Module, pixels: torch.Tensor,
               device: torch.device, amp: str) -> dict[str, Call]:
    """{clip, fsr, gram, prompted: call}, in the order they take turns; each call is one batch
    of the embed stage's per-batch work (fsr = gram + prompted, in one call)."""
    with torch.inference_mode(), autocast(device, amp):
        gram = model.gram_encoder(pixels.to(device))  # the cached vectors "prompted" gets

    def per_batch(encode: Callable[[torch.Tensor], object]) -> Call:
        def call() -> object:
            on_device = pixels.to(device, non_blocking=True)
            with autocast(device, amp):
                return encode(on_device)
        return call

    def host(x: torch.Tensor) -> np.ndarray:
        return x.float().cpu().numpy()

    return {
        "clip": per_batch(lambda x: host(encode_image_baseline(clip, x))),
        "fsr": per_batch(lambda x: host(model.encode_image(x, gram=model.gram_encoder(x)))),
        "gram": per_batch(lambda x: host(model.gram_encoder(x))),
        "prompted": per_batch(lambda x: host(model.encode_image(x, gram=gram))),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Call, device: torch.device) -> float:
    """Wall seconds of one call, the device's queue drained before and after."""
    sync(device)
    started = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - started


def timed_rounds(calls: dict[str, Call], device: torch.device,
                 rounds: int) -> dict[str, list[float]]:
    """Seconds per call per round; the starting call rotates, so no call always goes first."""
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(time_call(calls[name], device))
    return seconds


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and A V of (B, H, L, E) attention: torch's SDPA count, for the CPU flash kernel."""
    b, h, lq, e = query_shape
    lk, ev = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * (e + ev)


def count_flops(call: Call) -> int:
    """FLOPs of one call as FlopCounterMode counts them, MHA fast path off (see docstring)."""
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flops
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False,
                                                     custom_mapping=mapping) as counter:
            call()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops()


def flops_per_image(calls: dict[str, Call], device: torch.device) -> tuple[dict[str, int], float]:
    """({name: FLOPs} of batch-1 calls, seconds the counting round took: a first estimate)."""
    started = time.perf_counter()
    flops = {name: count_flops(call) for name, call in calls.items()}
    sync(device)
    return flops, time.perf_counter() - started


class OthersClock:
    """CPU cores other processes kept busy between creation and `cores()`."""

    def __init__(self) -> None:
        self.wall, self.own, self.busy = time.perf_counter(), time.process_time(), machine_busy()

    def cores(self) -> float:
        own = time.process_time() - self.own
        others = max(machine_busy() - self.busy - own, 0.0)
        return others / max(time.perf_counter() - self.wall, 1e-9)


@dataclass
class Cell:
    """One (arch, batch) on one device: median seconds per call, batch-1 FLOPs per call."""

    arch: str
    batch: int
    seconds: dict[str, float]
    flops: dict[str, int]
    warmup: int
    repeats: int
    others: float

    def ms(self, name: str) -> float:
        return 1000 * self.seconds[name] / self.batch

    def gflops(self, name: str) -> float:
        return self.flops[name] / 1e9

    @property
    def extra_ms(self) -> float:
        return self.ms("fsr") - self.ms("clip")

    @property
    def extra_pct(self) -> float:
        return 100 * self.extra_ms / self.ms("clip")


def measure_cell(calls: dict[str, Call], device: torch.device, warmup: int, repeats: int,
                 budget_s: float) -> tuple[dict[str, float], int, float]:
    """(median seconds per call, repeats done, others' cores) after `warmup` rounds; with a
    budget, repeats are cut so warm-up + repeats take about `budget_s` (at least one)."""
    started = time.perf_counter()
    warm = timed_rounds(calls, device, warmup)
    if budget_s > 0 and warmup:
        round_s = sum(v[-1] for v in warm.values())
        left = budget_s - (time.perf_counter() - started)
        repeats = max(1, min(repeats, int(left // round_s)))
    clock = OthersClock()
    timed = timed_rounds(calls, device, repeats)
    return {n: statistics.median(v) for n, v in timed.items()}, repeats, clock.cores()


def run_arch(arch: str, device: torch.device, args: argparse.Namespace,
             skipped: list[str]) -> list[Cell]:
    """Every batch of one arch on one device, smallest first (its time sizes the next)."""
    config = bench_config(arch, args.extra)
    model, clip = build_models(config, device)
    amp = config.embed.amp
    flops, round_s = flops_per_image(make_calls(model, clip, random_pixels(1, config, device),
                                                device, amp), device)
    per_image_s = round_s  # one round of the four calls, per image
    cells = []
    for batch in sorted(set(args.batches)):
        estimate = per_image_s * batch
        if args.max_round_s > 0 and batch > 1 and estimate > args.max_round_s:
            why = f"one round ~{estimate:.0f} s > --max-round-s {args.max_round_s:g}"
            skipped.append(f"{arch} batch {batch} on {device}: {why}")
            print(f"  {arch:>9} batch {batch:>3}: skipped, {why}", flush=True)
            continue
        warmup, repeats, budget_s = args.warmup, args.repeats, args.cell_budget_s
        if budget_s > 0 and batch > 1 and estimate > budget_s:
            warmup, repeats, budget_s = 0, 1, 0.0  # a long cell: one round (see the docstring)
        calls = make_calls(model, clip, random_pixels(batch, config, device), device, amp)
        with torch.inference_mode():
            seconds, repeats, others = measure_cell(calls, device, warmup, repeats, budget_s)
        cell = Cell(arch, batch, seconds, flops, warmup, repeats, others)
        cells.append(cell)
        per_image_s = sum(seconds.values()) / batch
        print(f"  {arch:>9} batch {batch:>3}: CLIP {cell.ms('clip'):.1f} / FSR "
              f"{cell.ms('fsr'):.1f} ms/img, {warmup} warm-up + {repeats} timed rounds, "
              f"others {others:.2f} cores", flush=True)
    del model, clip
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cells


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def print_tables(device: torch.device, cells: list[Cell], skipped: list[str]) -> None:
    print(f"\n### {device} ({device_name(device)})\n")
    print(markdown_table(
        ["arch", "batch", "CLIP ms/img", "FSR ms/img", "extra ms/img", "extra %",
         "Gram-path ms/img", "CLIP GFLOPs/img", "FSR GFLOPs/img", "rounds", "others"],
        [[c.arch, str(c.batch), f"{c.ms('clip'):.1f}", f"{c.ms('fsr'):.1f}",
          f"{c.extra_ms:+.1f}", f"{c.extra_pct:+.0f}%", f"{c.ms('gram'):.1f}",
          f"{c.gflops('clip'):.2f}", f"{c.gflops('fsr'):.2f}", f"{c.warmup}+{c.repeats}",
          f"{c.others:.2f}"] for c in cells]))
    print("\nFSR's extra cost split: the Gram path alone vs the prompted ViT given precomputed "
          "Gram vectors\n(prompts = prompted ViT - CLIP: the style feature, the generators and "
          "the 4 extra tokens)\n")
    print(markdown_table(
        ["arch", "batch", "Gram ms/img", "prompted ms/img", "prompts ms/img",
         "Gram + prompted ms/img", "Gram GFLOPs/img", "prompted GFLOPs/img",
         "prompts GFLOPs/img"],
        [[c.arch, str(c.batch), f"{c.ms('gram'):.1f}", f"{c.ms('prompted'):.1f}",
          f"{c.ms('prompted') - c.ms('clip'):+.1f}",
          f"{c.ms('gram') + c.ms('prompted'):.1f}", f"{c.gflops('gram'):.2f}",
          f"{c.gflops('prompted'):.2f}", f"{c.gflops('prompted') - c.gflops('clip'):+.2f}"]
         for c in cells]))
    for line in skipped:
        print(f"skipped: {line} (pass --max-round-s 0 to run it)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs"


def paper_line(results: dict[torch.device, list[Cell]]) -> str:
    """Our ViT-L-14 batch-1 overhead next to the paper's +28 ms (+41%) per query."""
    ours = [f"{device}: {c.extra_ms:+.1f} ms ({c.extra_pct:+.0f}%) on {c.ms('clip'):.1f} ms"
            for device, cells in results.items() for c in cells
            if c.arch == "ViT-L-14" and c.batch == 1]
    paper_clip_ms = PAPER_EXTRA_MS / PAPER_EXTRA_PCT * 100
    return (f"paper (FreestyleRet, ViT-L, batch 1, GPU): +{PAPER_EXTRA_MS:g} ms "
            f"(+{PAPER_EXTRA_PCT:g}%) per query, i.e. on ~{paper_clip_ms:.0f} ms of CLIP; "
            "here, ViT-L-14 batch 1: "
            + ("; ".join(ours) if ours else "not measured (pass --archs ViT-L-14 --batches 1)"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-L-14"],
                        help="open_clip ViT architectures (model.arch)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds per cell, at most (--cell-budget-s may cut them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per cell first")
    parser.add_argument("--cell-budget-s", type=float, default=120.0,
                        help="seconds per (arch, batch) cell, about; 0 = no limit")
    parser.add_argument("--max-round-s", type=float, default=600.0,
                        help="skip cells whose round (the four calls) would take longer; "
                             "0 = no limit")
    default_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=default_devices,
                        help="devices to measure (default: cpu, and cuda when available)")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="any other config override")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batches and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Hides the "weights are RANDOM" warnings: random weights are the point here.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    config = bench_config(args.archs[0], args.extra)
    devices = [resolve_device(d) for d in args.device]
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, cpu_count "
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; seeded random weights; "
          f"images {config.extract.image_size} px; Gram dim {config.extract.gram_dim}, k "
          f"{config.cluster.k}, {config.model.n_tokens} prompt tokens; autocast "
          + ", ".join(f"{d}: {amp_dtype(d, config.embed.amp) or 'off (fp32)'}" for d in devices))
    print("GFLOPs: matmul/conv/attention FLOPs as torch.utils.flop_counter counts them "
          "(2 per multiply-add), one batch-1 forward")
    results: dict[torch.device, list[Cell]] = {}
    for device in devices:
        print(f"\n{device}:", flush=True)
        skipped: list[str] = []
        results[device] = [c for arch in args.archs for c in run_arch(arch, device, args,
                                                                      skipped)]
        print_tables(device, results[device], skipped)
    print(f"\n{paper_line(results)}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
