"""What prompt training adds per query style on the demo, under the prompt ablation switches.

    python benchmarks/prompt_ablation.py                          # ~10 min on 2 cores
    python benchmarks/prompt_ablation.py --work-dir /tmp/ablation \
        --variant deep-style:model.deep_init=style
    python benchmarks/prompt_ablation.py --set model.pretrained=/path/to/clip.pt

One demo run from the shipped pipeline.toml (methods freestyle, untrained, baseline) under
`--work-dir`. For each variant, `run all` with the variant's overrides in that same run:
extract and cluster do not depend on the model or train settings, so they are computed once
and reused; train, embed, index and score run again under the variant's fingerprint. After
each variant the test split's gallery-protocol Recall@1 per query set is read from the
catalog, for FreestyleRet (FSR), its untrained prompts (untr, the train stage's epoch 0)
and CLIP without prompts (base).

First, the instance signal each query style leaves in the Gram vectors the deep prompts are
made from: training-split queries of each style against the training photos, R@1 of each
query's Gram vector, both sides centred (the mean of each side subtracted). A style whose
Gram vectors do not find their own photo gives the Gram prompts nothing instance-specific to
learn from; a style the frozen CLIP already matches by pixels (low-res on a random ViT) can
only lose by being pulled towards its Gram vector. docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it

from pipeline import commands  # noqa: E402
from pipeline.arrays import arrow_to_vectors  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.training import recall_at_1 as argmax_recall  # noqa: E402
from stages import all_stages  # noqa: E402

# (name, overrides): the paper's layout first (the shipped config), then the ablations of
# docs/method.md section 3 that change where the prompts come from, then what trains.
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("paper (shallow style, deep gram)", ()),
    ("deep from style", ("model.deep_init=style",)),
    ("shallow from gram", ("model.shallow_init=gram",)),
    ("all layers deep gram", ("model.shallow_layers=0",)),
    ("random prompts (VPT)", ("model.shallow_init=random", "model.deep_init=random")),
    # What trains (docs/method.md 8): the authors' code's set, and a LayerNorm-only control.
    ("authors' trainable set", ("model.trainable=authors",)),
    ("vision LayerNorms only, no prompts", ("model.trainable=layernorm",)),
)
METHODS = (("freestyle", "FSR"), ("untrained", "untr"), ("baseline", "base"))


def demo_config(work_dir: Path, overrides: Sequence[str]) -> Config:
    return load_config(REPO_ROOT / "pipeline.toml", overrides=[
        f"run.work_dir='{work_dir}'", 'score.methods=["freestyle", "untrained", "baseline"]',
        *overrides])


def centred_unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def gram_signal(config: Config) -> dict[str, tuple[float, int, int]]:
    """style -> (R@1 of centred Gram vectors vs the training photos', queries, photos)."""
    photos = commands.sql(all_stages,
                          config, "SELECT g.image_id, g.gram FROM gallery_gram g JOIN gallery "
                                  "USING (image_id) WHERE split = 'train' ORDER BY image_id")
    queries = commands.sql(all_stages,
                           config, "SELECT q.style, q.image_id, f.gram FROM gram_features f "
                                   "JOIN queries q USING (query_id) WHERE q.split = 'train' "
                                   "ORDER BY q.query_id")
    photo_ids = np.array(photos["image_id"].to_pylist())
    photo_vecs = centred_unit(arrow_to_vectors(photos["gram"]))
    styles = np.array(queries["style"].to_pylist())
    targets = np.array(queries["image_id"].to_pylist())
    vecs = arrow_to_vectors(queries["gram"])
    result = {}
    for style in sorted(set(styles)):
        keep = (styles == style) & np.isin(targets, photo_ids)
        r1 = argmax_recall(centred_unit(vecs[keep]), targets[keep], photo_vecs, photo_ids)
        result[style] = (r1, int(keep.sum()), len(photo_ids))
    return result


def recall_at_1(config: Config) -> dict[str, dict[str, float]]:
    """query set ('art', 'art+text/mean', ...) -> method -> gallery-protocol R@1."""
    table = commands.recall_table(all_stages, config)
    if table is None:
        raise RuntimeError(f"the score stage did not finish in {config.work_dir}")
    out: dict[str, dict[str, float]] = {}
    for row in table:
        if row["protocol"] != "gallery" or row["k"] != 1:
            continue
        name = row["style"] if row["fusion"] == "none" else f"{row['style']}/{row['fusion']}"
        out[name] = {m: row[m] for m, _ in METHODS if row[m] is not None}
    return out


def print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    sets = list(next(iter(results.values())))
    width = max(len(s) for s in sets) + 2
    print("\nTest split, gallery protocol, R@1 as FSR / untr / base (base does not depend on "
          "the variant):")
    for variant, by_set in results.items():
        print(f"\n  {variant}")
        for name in sets:
            cells = " / ".join(f"{by_set[name].get(m, float('nan')):.3f}" for m, _ in METHODS)
            change = by_set[name]["freestyle"] - by_set[name]["untrained"]
            print(f"    {name:<{width}} {cells}   FSR - untr {change:+.3f}")
        single = [n for n in sets if "/" not in n]
        mean = {m: float(np.mean([by_set[n][m] for n in single])) for m, _ in METHODS}
        print(f"    {'mean (single)':<{width}} " + " / ".join(f"{mean[m]:.3f}" for m, _ in METHODS)
              + f"   FSR - untr {mean['freestyle'] - mean['untrained']:+.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the demo run lives (default: a temporary folder)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:S.K=V[,S.K=V]",
                        help="a variant instead of the default list (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="S.K=V",
                        help="a config override applied to every variant (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    variants = VARIANTS
    if args.variant:
        variants = tuple((spec.split(":", 1)[0], tuple(filter(None, spec.split(":", 1)[1]
                          .split(",")))) for spec in args.variant)
    with tempfile.TemporaryDirectory(prefix="fsr-ablation-") as tmp:
        work_dir = args.work_dir or Path(tmp) / "run"
        base = demo_config(work_dir, args.set)
        start = time.perf_counter()
        commands.run(all_stages, base, ["cluster"], progress=False)
        print(f"demo run in {work_dir}: extract + cluster {time.perf_counter() - start:.0f} s")
        print("\nGram instance signal, training split (R@1 of centred Gram vectors against "
              "the training photos'; chance = 1 / photos):")
        for style, (r1, n, photos) in gram_signal(base).items():
            print(f"    {style:<8} {r1:.3f}  ({n} queries, {photos} photos, chance "
                  f"{1 / photos:.3f})")
        results = {}
        for name, overrides in variants:
            start = time.perf_counter()
            config = demo_config(work_dir, [*args.set, *overrides])
            commands.run(all_stages, config, ["all"], progress=False)
            results[name] = recall_at_1(config)
            print(f"variant {name!r} ({', '.join(overrides) or 'shipped config'}): "
                  f"train..score {time.perf_counter() - start:.0f} s", flush=True)
        print_table(results)


if __name__ == "__main__":
    main()
