"""SpLIP's cost per image query against plain CLIP and FreestyleRet, on the CPU (issue 18).

    python benchmarks/splip_cost.py                      # tiny ViT and ViT-B-32, batch 1 and 64
    python benchmarks/splip_cost.py --archs fsr-tiny-vit --batches 1 8 --classes 100

Random-init weights (speed does not depend on them), `torch.inference_mode`, the images at
the CLIP size (FreestyleRet's Gram path reads them at that size too, through its seeded
random VGG-19 up to relu2_1). Per (arch, batch): after one warm-up call, the median of
`--repeats` timed calls of

- `clip`: plain CLIP's image tower (the `baseline` method);
- `freestyle`: FreestyleRet's prompted tower with its Gram path (the VGG runs per image);
- `splip`: SpLIP's query encoder as trained by default (B_t on: the text tower runs over
  every one of the C training class names per image, since B_t maps each image into the
  text prompts);
- `splip_class_pass`: that per-image class pass alone (the text tower over C x batch
  sequences), the part of `splip` that B_t makes per image;
- `splip_no_bt`: SpLIP with `splip.vision_to_text = false`: the class pass depends on no
  image and is cached per domain at the first call (eval mode), so a query costs the prompted
  image tower only.

C = `--classes` training classes named "class <i>" (Sketchy's zero-shot split trains on 104;
sketchy-mini's default class split on 100). Prints one Markdown table (ms per query).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def timed(call: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Median seconds of `repeats` calls after one warm-up call (if `warm_up`)."""
    if warm_up:
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def models(arch: str, classes: list[str]) -> dict[str, object]:
    """(name -> encoder of an image batch) for plain CLIP, FreestyleRet and SpLIP (B_t on and
    off), and SpLIP's per-image class pass."""
    from pipeline.config import load_config
    from pipeline.models.clip import encode_image_baseline, load_clip
    from pipeline.models.factory import build_model
    from pipeline.models.splip import Splip, SplipSpec

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"run.work_dir={tmp}", f"model.arch={arch}"])
    clip, tokenizer = load_clip(arch, seed=0)
    centres = np.random.default_rng(0).standard_normal((config.cluster.k,
                                                        config.extract.gram_dim))
    freestyle, _ = build_model(config, centres, torch.device("cpu"))
    freestyle.eval()
    splip = Splip(clip, tokenizer, classes, SplipSpec(), seed=0)
    clip_b, tokenizer_b = load_clip(arch, seed=0)
    no_bt = Splip(clip_b, tokenizer_b, classes, SplipSpec(vision_to_text=False), seed=0)

    def class_pass(images: torch.Tensor) -> object:
        x = splip.clip.visual.conv1(images)
        prompts = splip.b_t(x.flatten(2).transpose(1, 2).mean(dim=1)).view(
            len(images), splip.spec.text_tokens, splip.text_width)
        return splip.class_pass(prompts, "query")

    return {"clip": lambda x: encode_image_baseline(clip, x),
            "freestyle": lambda x: freestyle.encode_image(x),
            "splip": splip.encode_query, "splip_class_pass": class_pass,
            "splip_no_bt": no_bt.encode_query}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["fsr-tiny-vit", "ViT-B-32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-repeats", type=int, default=1,
                        help="repeats, with no warm-up call (the smaller batch warmed the "
                        "model up), where batch x classes >= 2000 (slow on a CPU)")
    args = parser.parse_args(argv)
    from pipeline.models.clip import clip_image_size, load_clip

    classes = [f"class {i}" for i in range(args.classes)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, C = {args.classes} "
          "training classes; ms per query (median)\n")
    print("| arch | batch | clip | freestyle | splip (B_t on) | of which class pass | "
          "splip, B_t off (cached) | splip / clip |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        encoders = models(arch, classes)
        size = clip_image_size(load_clip(arch, seed=0)[0])
        for batch in args.batches:
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            big = batch * args.classes >= 2000
            repeats = args.big_repeats if big else args.repeats
            ms = {}
            with torch.inference_mode():
                for name, encode in encoders.items():
                    ms[name] = 1000 * timed(lambda e=encode, x=x: e(x), repeats, not big) / batch
            print(f"| {arch} | {batch} | {ms['clip']:.1f} | {ms['freestyle']:.1f} | "
                  f"{ms['splip']:.1f} | {ms['splip_class_pass']:.1f} | "
                  f"{ms['splip_no_bt']:.1f} | {ms['splip'] / ms['clip']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
