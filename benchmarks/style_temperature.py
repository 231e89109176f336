"""How much the soft style weights and the style feature vary per input, by temperature.

    python benchmarks/style_temperature.py                          # ~10 min on 2 cores
    python benchmarks/style_temperature.py --per-type 150 --temperatures 1 0.1 0.01
    python benchmarks/style_temperature.py --skip-demo              # part 1 only (~2 min)
    python benchmarks/style_temperature.py --skip-real --work-dir /tmp/temp-demo \
        --set extract.vgg_weights=../shared/data/vgg19/vgg19_conv1_1-conv3_4_adain_layout.pth

The shallow prompts are made from the style feature `s = sum_k w_k mu_k`,
`w = softmax(cos(g, mu) / cluster.temperature)` (docs/method.md section 2). Two parts:

1. Real VGG features. The real VGG-19 weights and a seeded sample of sketchy-mini sketches and
   photos from the shared data (`../shared/data`, or $FSR_SHARED_DATA; skipped with a reason
   when absent). Gram vectors through the extract stage's own encoder and image loader
   (`build_gram_encoder`, `iter_batches`) under the shipped `[extract]` settings, K-Means with
   the cluster stage's `fit_kmeans` on the sample, then per temperature: how peaked w is
   (max weight, entropy), how much s varies across inputs (per-dimension std, pairwise cosine,
   share of the variance a hard assignment gives), and whether s tells a sketch from a photo.
2. What the validation split prefers. The shipped demo (`pipeline.toml`: random `fsr-tiny-vit`,
   160 generated photos, 10 epochs at the validation-chosen lr) run up to `train` once per
   temperature in one work dir: prepare and extract are computed once, cluster and train per
   temperature (the temperature is in the cluster fingerprint). Reads each run's
   `train_history` and per-style validation Recall@1. With a random-init CLIP these numbers
   show the mechanics, not the paper's result.

`--set S.K=V` applies to both parts (part 1 starts from extract.vgg_weights = the shared
file; `--set extract.vgg_weights=...` replaces it there and gives the demo runs real VGG too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing it
# torch and faiss both load an OpenMP runtime; busy-waiting threads of one slow the other
# on 2 cores (tests/conftest.py sets the same before either is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import commands  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.loader import ImageItem, iter_batches  # noqa: E402
from pipeline.device import resolve_device  # noqa: E402
from pipeline.models.style import build_gram_encoder  # noqa: E402
from pipeline.style_space import (  # noqa: E402
    assign,
    cosine_to_centres,
    fit_kmeans,
    style_feature_torch,
    style_weights,
)
from stages import all_stages  # noqa: E402

VGG_FILE = Path("vgg19") / "vgg19_conv1_1-conv3_4_adain_layout.pth"
REAL_TEMPERATURES = (1.0, 0.3, 0.1, 0.03, 0.01)
DEMO_TEMPERATURES = (1.0, 0.1, 0.03)
DEMO_NOTE = ("demo: random-init fsr-tiny-vit on generated data; these numbers show the "
             "mechanics of the temperature, not the paper's result")


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout, or $FSR_SHARED_DATA (as tests/conftest.py)."""
    env = os.environ.get("FSR_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


# ---------------------------------------------------------------- part 1: real VGG features

def sample_paths(root: Path, per_type: int, seed: int) -> tuple[list[Path], np.ndarray]:
    """A seeded sample of `per_type` sketches and `per_type` photos -> (paths, is_sketch)."""
    rng = np.random.default_rng(seed)
    paths, is_sketch = [], []
    for folder, pattern, sketch in (("sketch", "*/*.png", True), ("photo", "*/*.jpg", False)):
        files = sorted((root / folder).glob(pattern))
        if len(files) < per_type:
            raise FileNotFoundError(f"{root / folder}: {len(files)} files match {pattern}; "
                                    f"--per-type asks for {per_type}")
        chosen = rng.choice(len(files), size=per_type, replace=False)
        paths += [files[i] for i in sorted(chosen)]
        is_sketch += [sketch] * per_type
    return paths, np.array(is_sketch)


def gram_vectors(config: Config, paths: Sequence[Path]) -> np.ndarray:
    """Gram vectors of image files, by the extract stage's encoder and loader -> (n, d)."""
    cfg = config.extract
    device = resolve_device(config.run.device)
    encoder = build_gram_encoder(config, device)
    items = [ImageItem("query", i, str(p)) for i, p in enumerate(paths)]
    out = []
    batches = iter_batches(items, cfg.image_size, config.data.max_image_pixels, cfg.batch_size,
                           cfg.num_workers)
    with torch.inference_mode():
        for batch in batches:
            if batch.failures:
                item, reason = batch.failures[0]
                raise RuntimeError(f"{item.path}: could not be read ({reason})")
            out.append(encoder(batch.pixels.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_cosine(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """Mean cosine over pairs of rows: within a (i != j) when b is None, else a x b."""
    ua = unit_rows(a)
    if b is None:
        n = len(ua)
        total = ua.sum(axis=0)
        return float((total @ total - n) / (n * (n - 1)))  # sum_ij minus the n diagonal ones
    return float((ua @ unit_rows(b).T).mean())


def nearest_mean_accuracy(x: np.ndarray, is_sketch: np.ndarray) -> float:
    """Leave-one-out accuracy of sketch/photo by the nearer (cosine) of the two type means."""
    sums = {t: x[is_sketch == t].sum(axis=0) for t in (True, False)}
    counts = {t: int((is_sketch == t).sum()) for t in (True, False)}
    cos = {}
    for t in (True, False):
        own = is_sketch == t
        means = np.where(own[:, None], (sums[t] - x) / (counts[t] - 1), sums[t] / counts[t])
        cos[t] = (unit_rows(x) * unit_rows(means)).sum(axis=1)
    guess = cos[True] > cos[False]
    return float((guess == is_sketch).mean())


def feature_stats(s: np.ndarray, is_sketch: np.ndarray) -> dict[str, float]:
    """How much the rows of s vary, overall and by sketch / photo."""
    sketches, photos = s[is_sketch], s[~is_sketch]
    return {
        "std": float(s.std(axis=0).mean()),
        "var": float(s.var(axis=0).sum()),
        "norm": float(np.linalg.norm(s, axis=1).mean()),
        "cos": mean_cosine(s),
        "cos_ss": mean_cosine(sketches),
        "cos_pp": mean_cosine(photos),
        "cos_sp": mean_cosine(sketches, photos),
        "nm_acc": nearest_mean_accuracy(s, is_sketch),
        "gap": float(np.linalg.norm(sketches.mean(axis=0) - photos.mean(axis=0))),
    }


def weight_stats(w: np.ndarray) -> dict[str, float]:
    """Mean max weight and mean entropy (nats) of soft weights w (n, K)."""
    logs = np.log(np.where(w > 0, w, 1.0))  # 0 log 0 = 0 (weights underflow at small T)
    entropy = -(w * logs).sum(axis=1)
    return {"max_w": float(w.max(axis=1).mean()), "entropy": float(entropy.mean())}


def real_vgg_part(config: Config, root: Path, per_type: int, k: int,
                  temperatures: Sequence[float]) -> None:
    seed = config.run.seed
    paths, is_sketch = sample_paths(root, per_type, seed)
    start = time.perf_counter()
    g = gram_vectors(config, paths)
    cfg = config.extract
    weights = config.resolve(cfg.vgg_weights) if cfg.vgg_weights else "random init"
    print(f"\n=== Part 1: real VGG features (VGG weights: {weights})")
    print(f"{per_type} sketches + {per_type} photos from {root} (seed {seed}); extract settings "
          f"image_size {cfg.image_size}, pool {cfg.pool}, gram_dim {cfg.gram_dim}, centred "
          f"{cfg.centred}: Gram vectors {g.shape} in {time.perf_counter() - start:.0f} s")
    centres = fit_kmeans(g, k, config.cluster.niter, seed)
    clusters = assign(g, centres)
    print(f"\nK-Means (fit_kmeans, k = {k}, niter {config.cluster.niter}) on the sample; "
          "cluster sizes as sketches / photos:")
    for c in range(k):
        print(f"    cluster {c}: {int((is_sketch & (clusters == c)).sum()):4d} / "
              f"{int((~is_sketch & (clusters == c)).sum()):4d}")
    between = centres @ centres.T
    off = between[~np.eye(k, dtype=bool)]
    print(f"cos between centres: min {off.min():.3f}, mean {off.mean():.3f}, max {off.max():.3f}"
          f"; norm of the mean centre {np.linalg.norm(centres.mean(axis=0)):.3f}")

    cos = cosine_to_centres(g, centres)
    top = np.sort(cos, axis=1)
    print("\nRaw cos(g, centres), the softmax logits at T = 1 (mean over inputs):")
    print(f"    {'inputs':<9}{'max':>8}{'min':>8}{'max-min':>9}{'top1-top2':>11}{'std over k':>12}")
    for name, rows in (("all", slice(None)), ("sketches", is_sketch), ("photos", ~is_sketch)):
        c = cos[rows]
        t = top[rows]
        print(f"    {name:<9}{c.max(axis=1).mean():8.3f}{c.min(axis=1).mean():8.3f}"
              f"{(c.max(axis=1) - c.min(axis=1)).mean():9.3f}"
              f"{(t[:, -1] - t[:, -2]).mean():11.3f}{c.std(axis=1).mean():12.3f}")
    print(f"    (weights ~ exp(cos / T): a logit range r gives a max/min weight ratio e^(r/T); "
          f"uniform w has max weight {1 / k:.3f}, entropy log k = {np.log(k):.3f} nats)")

    g_t, centres_t = torch.from_numpy(g), torch.from_numpy(centres)
    hard = centres[clusters]  # the T -> 0 limit: s = the nearest centre
    hard_var = feature_stats(hard, is_sketch)["var"]
    rows: list[tuple[str, dict[str, float], dict[str, float] | None]] = []
    for temperature in temperatures:
        w = style_weights(g, centres, temperature)
        # The model's own soft mix (FreestyleRet.prompt_tokens calls this one).
        s = style_feature_torch(g_t, centres_t, temperature).numpy()
        assert np.allclose(s, w @ centres, atol=1e-5), "style_feature_torch != w @ centres"
        rows.append((f"T = {temperature:g}", feature_stats(s, is_sketch), {
            **weight_stats(w),
            "max_w_sketch": float(w[is_sketch].max(axis=1).mean()),
            "max_w_photo": float(w[~is_sketch].max(axis=1).mean()),
        }))
    onehot = np.eye(k, dtype=np.float32)[clusters]
    rows.append(("hard T->0", feature_stats(hard, is_sketch), weight_stats(onehot)))
    rows.append(("g (deep)", feature_stats(g, is_sketch), None))

    print(f"\nStyle weights and style feature s per temperature ({len(g)} inputs; 'var/hard' = "
          "total variance of s over that of the hard assignment s = nearest centre; 'g (deep)' "
          "= the Gram vectors themselves, what the deep prompts see):")
    print(f"    {'':<11}{'max w':>7}{'H nats':>8}{'H/logk':>8}{'std(s)/dim':>12}{'var/hard':>10}"
          f"{'|s|':>7}{'cos(s,s)':>10}")
    for name, fs, ws in rows:
        weights = (f"{ws['max_w']:7.3f}{ws['entropy']:8.3f}{ws['entropy'] / np.log(k):8.3f}"
                   if ws else f"{'':>23}")
        print(f"    {name:<11}{weights}{fs['std']:12.5f}{fs['var'] / hard_var:10.4f}"
              f"{fs['norm']:7.3f}{fs['cos']:10.4f}")

    print("\nSketch vs photo: mean max weight per type; mean cosine of s within sketches (S-S), "
          "within photos (P-P), across (S-P); leave-one-out nearest-type-mean accuracy of s; "
          "|mS-mP| = distance between the sketch and photo means of s (the signal's size):")
    print(f"    {'':<11}{'max w S':>8}{'max w P':>8}{'S-S':>8}{'P-P':>8}{'S-P':>8}"
          f"{'within-across':>15}{'NM acc':>8}{'|mS-mP|':>9}")
    for name, fs, ws in rows:
        weights = (f"{ws['max_w_sketch']:8.3f}{ws['max_w_photo']:8.3f}"
                   if ws and "max_w_sketch" in ws else f"{'':>16}")
        within = (fs["cos_ss"] + fs["cos_pp"]) / 2
        print(f"    {name:<11}{weights}{fs['cos_ss']:8.4f}{fs['cos_pp']:8.4f}{fs['cos_sp']:8.4f}"
              f"{within - fs['cos_sp']:15.4f}{fs['nm_acc']:8.3f}{fs['gap']:9.4f}")


# ------------------------------------------------------- part 2: the validation split's choice

def demo_config(work_dir: Path, temperature: float, overrides: Sequence[str]) -> Config:
    return load_config(REPO_ROOT / "pipeline.toml", overrides=[
        f"run.work_dir='{work_dir}'", f"cluster.temperature={temperature!r}", *overrides])


def train_results(config: Config) -> dict:
    """The train stage's history and per-style validation R@1 of `config`'s plan."""
    history = commands.sql(all_stages,
                           config, "SELECT epoch, loss, val_recall_at_1 FROM train_history "
                                   "ORDER BY epoch").to_pylist()
    if not history:
        raise RuntimeError(f"train did not finish in {config.work_dir}")
    metrics = commands.sql(all_stages,
                           config, "SELECT name, value, labels_json FROM current_metrics "
                                   "WHERE stage = 'train'").to_pylist()
    scalars = {m["name"]: m["value"] for m in metrics if m["labels_json"] in (None, "{}")}
    best = int(scalars["best_epoch"])
    by_style: dict[int, dict[str, float]] = {}
    for m in metrics:
        labels = json.loads(m["labels_json"] or "{}")
        if m["name"] == "val_recall@1" and "style" in labels:
            by_style.setdefault(int(labels["epoch"]), {})[labels["style"]] = m["value"]
    weights = commands.sql(all_stages,
                           config, "SELECT avg(list_max(weights)) AS w FROM style_assignments "
                                   "WHERE split = 'train'").to_pylist()[0]["w"]
    return {"history": history, "best": best, "by_style": by_style,
            "val_photos": int(scalars["validation_photos"]),
            "val_gallery": int(scalars["validation_gallery"]), "max_w": weights}


def demo_part(work_dir: Path, temperatures: Sequence[float], overrides: Sequence[str]) -> None:
    print(f"\n=== Part 2: validation R@1 per temperature, shipped demo (pipeline.toml) up to "
          f"train, in {work_dir}\n{DEMO_NOTE}")
    if overrides:
        print(f"overrides: {', '.join(overrides)}")
    results = {}
    for temperature in temperatures:
        config = demo_config(work_dir, temperature, overrides)
        start = time.perf_counter()
        commands.run(all_stages, config, ["train"], progress=False)
        results[temperature] = train_results(config)
        reused = " (prepare and extract reused)" if len(results) > 1 else ""
        print(f"T = {temperature:g}: prepare..train {time.perf_counter() - start:.0f} s{reused}",
              flush=True)
    first = next(iter(results.values()))
    n_styles = 1 + len(config.data.styles)  # text + each image style per photo
    n_val = first["val_photos"] * n_styles
    print(f"\nValidation: {first['val_photos']} held-out photos x {n_styles} query styles = "
          f"~{n_val} queries, ranked against {first['val_gallery']} photos; 'demo max w' = mean "
          "max style weight of the demo's training items (random VGG unless overridden)")
    print(f"    {'T':>6}{'demo max w':>11}{'epoch 0':>9}{'best':>7}{'(epoch)':>8}"
          f"{'+- se':>7}{'epochs run':>11}   val R@1 per epoch")
    for temperature, r in results.items():
        curve = [h["val_recall_at_1"] for h in r["history"]]
        best = r["history"][r["best"]]["val_recall_at_1"]
        se = (best * (1 - best) / n_val) ** 0.5
        print(f"    {temperature:6g}{r['max_w']:11.3f}{curve[0]:9.3f}{best:7.3f}{r['best']:>8d}"
              f"{se:7.3f}{len(curve) - 1:11d}   " + " ".join(f"{v:.2f}" for v in curve))
    styles = sorted(first["by_style"].get(first["best"], {}))
    print("\nPer-style validation R@1 at epoch 0 -> best epoch:")
    print("    " + f"{'T':>6}" + "".join(f"{s:>16}" for s in styles))
    for temperature, r in results.items():
        zero, best = r["by_style"].get(0, {}), r["by_style"].get(r["best"], {})
        print("    " + f"{temperature:6g}" + "".join(
            f"{zero.get(s, float('nan')):>8.3f} -> {best.get(s, float('nan')):.3f}"
            for s in styles))
    best = {t: r["history"][r["best"]]["val_recall_at_1"] for t, r in results.items()}
    top = max(best.values())
    chosen = [f"{t:g}" for t, v in best.items() if v > top - 1e-9]  # ties up to rounding
    spread = top - min(best.values())
    print(f"\nBest validation R@1 {top:.3f} at T = {' and '.join(chosen)}; the spread over "
          f"temperatures is {spread:.3f} ({spread * n_val:.0f} of ~{n_val} queries) against a "
          f"standard error of ~{(top * (1 - top) / n_val) ** 0.5:.3f}: differences within ~2 se "
          "are noise at this size, and this is one seed.")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="shared data folder (default: ../shared/data or $FSR_SHARED_DATA)")
    parser.add_argument("--per-type", type=int, default=300,
                        help="sketches and photos each sampled from sketchy-mini (default 300)")
    parser.add_argument("--k", type=int, default=None,
                        help="K-Means centres for part 1 (default: cluster.k, 4)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=REAL_TEMPERATURES,
                        help="temperatures for part 1 (default 1 0.3 0.1 0.03 0.01)")
    parser.add_argument("--demo-temperatures", type=float, nargs="+", default=DEMO_TEMPERATURES,
                        help="temperatures for the demo runs of part 2 (default 1 0.1 0.03)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the demo run lives (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="S.K=V",
                        help="a config override for both parts (repeatable)")
    parser.add_argument("--skip-real", action="store_true", help="skip part 1")
    parser.add_argument("--skip-demo", action="store_true", help="skip part 2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.skip_real:
        data = args.data or shared_data_dir()
        if not (data / VGG_FILE).is_file() or not (data / "sketchy-mini").is_dir():
            print(f"part 1 skipped: shared data not found at {data} (need {VGG_FILE} and "
                  "sketchy-mini/; pass --data or set FSR_SHARED_DATA)")
        else:
            config = load_config(REPO_ROOT / "pipeline.toml", overrides=[
                f"extract.vgg_weights='{data / VGG_FILE}'", *args.set])
            real_vgg_part(config, data / "sketchy-mini", args.per_type,
                          args.k or config.cluster.k, args.temperatures)
    if not args.skip_demo:
        with tempfile.TemporaryDirectory(prefix="fsr-temperature-") as tmp:
            demo_part(args.work_dir or Path(tmp) / "run", args.demo_temperatures, args.set)


if __name__ == "__main__":
    main()
