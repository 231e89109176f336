"""Configuration: `pipeline.toml` -> frozen dataclasses, validated before any work starts.

One section per stage plus `[run]` and `[data]` (the `ingest` stage's section). Unknown keys,
wrong types and impossible values raise `ConfigError` naming the key and what is allowed.
Any value can be overridden with `--set section.key=value` (the value is parsed as TOML,
falling back to a bare string).

Fields marked `fingerprint=False` (batch sizes, worker counts, devices) change how a stage
runs, not what it computes, so they stay out of unit fingerprints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import tomllib

from pipeline.frozen import frozen


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or impossible."""


def _run_only(default: Any) -> Any:
    """A field that changes how a stage runs, not its results (kept out of fingerprints)."""
    return field(default=default, metadata={"fingerprint": False})


@frozen
class RunConfig:
    work_dir: str = "runs/demo"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = _run_only("auto")
    # How long a process waits for the catalog's single-writer lock before giving up.
    catalog_timeout_s: float = _run_only(300.0)
    # Where units run (docs/distributed.md): inline (this process), local (a process pool),
    # slurm (sbatch array jobs), ray (Ray actors).
    executor: Literal["inline", "local", "slurm", "ray"] = _run_only("inline")
    # local/ray: worker processes; 0 = one per GPU when CUDA is visible, else one per 2 cores.
    workers: int = _run_only(0)
    # Units whose worker died without a record (killed, node lost, preempted) are rerun up to
    # this many times; a unit that raised stops the run at once.
    max_retries: int = _run_only(2)
    # A running unit touches its lease file every heartbeat_s; a lease older than lease_s
    # belongs to a lost unit (on another host: its liveness can only be seen through this).
    heartbeat_s: float = _run_only(10.0)
    lease_s: float = _run_only(120.0)
    # ray: the cluster address (`ray://host:10001` or `auto`); empty = a local Ray cluster.
    ray_address: str = _run_only("")

    def validate(self) -> None:
        _check(bool(self.work_dir.strip()), "run.work_dir", "must name a folder (e.g. runs/demo)")
        _check(self.seed >= 0, "run.seed", "must be >= 0")
        _check(self.catalog_timeout_s > 0, "run.catalog_timeout_s", "must be > 0")
        _check(self.workers >= 0, "run.workers", "must be >= 0 (0 = automatic)")
        _check(self.max_retries >= 0, "run.max_retries", "must be >= 0")
        _check(self.heartbeat_s > 0, "run.heartbeat_s", "must be > 0")
        _check(self.lease_s > 2 * self.heartbeat_s, "run.lease_s",
               "must be more than twice run.heartbeat_s (a live unit must not look lost)")


@frozen
class SlurmConfig:
    """The sbatch array script the slurm executor writes (docs/distributed.md)."""

    partition: str = _run_only("")
    gpus: int = _run_only(0)             # per task (extract, embed, train, score when CUDA)
    cpus_per_task: int = _run_only(4)
    mem: str = _run_only("")             # e.g. "32G"; empty = the partition's default
    time: str = _run_only("02:00:00")
    extra: tuple[str, ...] = _run_only(())  # more "#SBATCH ..." lines, e.g. "--account=x"
    # The command a task runs fsr-pipe with (e.g. a venv's path, or "srun fsr-pipe").
    command: str = _run_only("fsr-pipe")
    poll_s: float = _run_only(30.0)      # sacct polling interval with --submit
    submit: bool = _run_only(False)      # submit and wait (--submit), or only write the script

    def validate(self) -> None:
        _check(self.gpus >= 0, "slurm.gpus", "must be >= 0")
        _check(self.cpus_per_task >= 1, "slurm.cpus_per_task", "must be >= 1")
        _check(self.poll_s > 0, "slurm.poll_s", "must be > 0")
        _check(bool(self.command.strip()), "slurm.command", "must name the fsr-pipe command")
        for line in self.extra:
            _check("\n" not in line, "slurm.extra", "one #SBATCH option per list item")


@frozen
class DataConfig:
    source: Literal["demo", "dsr", "folder", "manifest"] = "demo"
    # dsr/folder: dataset root; manifest: a .parquet or .csv file. Unused for demo.
    path: str = field(default="", metadata={"path": "file"})
    # Gallery items per shard; queries follow their target photo's shard.
    shard_size: int = 64
    # folder/demo: fraction of items in the test split (dsr and manifest carry their split).
    test_fraction: float = 0.2
    # demo: number of gallery photos and their size in pixels.
    demo_items: int = 160
    demo_image_size: int = 128
    # folder/demo: query styles generated for each photo (text is always added).
    styles: tuple[str, ...] = ("sketch", "art", "lowres")
    # How photos go to the train and test splits: "photo" (each photo by test_fraction) or
    # "class" (class-disjoint, for the zero-shot protocols: every photo of an unseen class is
    # in test, training sees seen classes only; seen classes' photos split by test_fraction).
    # Unseen classes: `unseen_classes` where given, else a seeded `unseen_fraction` of them.
    split: Literal["photo", "class"] = "photo"
    unseen_fraction: float = 0.2
    unseen_classes: tuple[str, ...] = ()
    # Decoding guard: larger images are recorded as failures (decompression bombs).
    max_image_pixels: int = _run_only(40_000_000)
    # A stage fails once more than this fraction of its items are bad inputs.
    max_failure_ratio: float = _run_only(0.05)

    def validate(self) -> None:
        _check(self.shard_size >= 1, "data.shard_size", "must be >= 1")
        _check(0.0 <= self.test_fraction < 1.0, "data.test_fraction", "must be in [0, 1)")
        _check(self.demo_items >= 2, "data.demo_items", "must be >= 2")
        _check(self.demo_image_size >= 32, "data.demo_image_size", "must be >= 32")
        allowed = {"sketch", "art", "lowres"}
        bad = sorted(set(self.styles) - allowed)
        _check(not bad, "data.styles", f"unknown style(s) {bad}; allowed: {sorted(allowed)}")
        _check(0.0 < self.unseen_fraction < 1.0, "data.unseen_fraction", "must be in (0, 1)")
        _check(len(set(self.unseen_classes)) == len(self.unseen_classes), "data.unseen_classes",
               f"lists a class twice: {list(self.unseen_classes)}")
        _check(self.split == "class" or not self.unseen_classes, "data.unseen_classes",
               "is used only with data.split = 'class'; set it, or remove unseen_classes")
        _check(self.split == "photo" or self.source != "dsr", "data.split",
               "'class' needs class labels, which a dsr dataset has not; use 'photo', or a "
               "folder or manifest source with class labels")
        _check(self.max_image_pixels >= 1, "data.max_image_pixels", "must be >= 1")
        _check(0.0 <= self.max_failure_ratio <= 1.0, "data.max_failure_ratio", "must be in [0, 1]")
        needs_path = self.source in ("dsr", "folder", "manifest")
        _check(not needs_path or bool(self.path), "data.path",
               f"is required for source = {self.source!r} (a dataset root or manifest file)")


@frozen
class ExtractConfig:
    # Real VGG-19 weights in the AdaIN layout (a .pth state dict); empty = seeded random init.
    vgg_weights: str = field(default="", metadata={"path": "file"})
    image_size: int = 224
    # Spatial average-pool factor applied to relu2_1 before the Gram matrix (docs/method.md 1).
    pool: int = 2
    # Seeded random projection of the Gram triangle to this many dims; 0 keeps all 8256.
    gram_dim: int = 256
    # Gram of mean-centred features (channel covariance, default) or the literal F F^T / hw;
    # measured choice in pipeline/gram.py.
    centred: bool = True
    # Gallery photos to extract besides the image queries: `cluster` needs the train split.
    gallery: Literal["all", "train", "none"] = "train"
    batch_size: int = _run_only(16)
    num_workers: int = _run_only(1)

    def validate(self) -> None:
        _check(self.image_size >= 32, "extract.image_size", "must be >= 32")
        _check(self.pool >= 1, "extract.pool", "must be >= 1")
        _check(self.gram_dim >= 0, "extract.gram_dim", "must be >= 0 (0 = no projection)")
        _check(self.batch_size >= 1, "extract.batch_size", "must be >= 1")
        _check(self.num_workers >= 0, "extract.num_workers", "must be >= 0")


@frozen
class ClusterConfig:
    k: int = 4
    niter: int = 25
    # w = softmax(cos(g, mu) / temperature); the paper uses temperature 1.
    temperature: float = 1.0
    # K-Means trains on a seeded sample of at most this many training vectors.
    max_train_points: int = 200_000

    def validate(self) -> None:
        _check(self.k >= 2, "cluster.k", "must be >= 2")
        _check(self.niter >= 1, "cluster.niter", "must be >= 1")
        _check(self.temperature > 0, "cluster.temperature", "must be > 0")
        _check(self.max_train_points >= self.k, "cluster.max_train_points", "must be >= cluster.k")


@frozen
class ModelConfig:
    # An open_clip architecture (ViT-B-32, ViT-L-14, ...) or a project one (fsr-tiny-vit).
    arch: str = "ViT-B-32"
    # An open_clip pretrained tag (needs the network), a local checkpoint file, or empty for
    # a seeded random init (logged loudly).
    pretrained: str = field(default="", metadata={"path": "file-or-tag"})
    # docs/method.md 3: prompt tokens inserted after CLS; shallow layers from the style feature,
    # deep layers (VPT-deep, replaced per layer) from the Gram vector.
    n_tokens: int = 4
    shallow_init: Literal["style", "gram", "random"] = "style"
    deep_init: Literal["gram", "style", "random"] = "gram"
    # Vision layers that count as shallow; -1 = half of them (docs/method.md).
    shallow_layers: int = -1
    # What trains (docs/method.md 3 and 8): "paper" = prompt generators + vision LayerNorms;
    # "authors" = what the authors' code trains (+ text LayerNorms, attention in-projections,
    # embeddings and projections); "layernorm" = vision LayerNorms alone, no prompts (control).
    trainable: Literal["paper", "authors", "layernorm"] = "paper"

    def validate(self) -> None:
        _check(bool(self.arch), "model.arch", "must name an open_clip or project architecture")
        _check(self.n_tokens in (1, 2, 4, 8), "model.n_tokens", "must be one of 1, 2, 4, 8")
        _check(self.shallow_layers >= -1, "model.shallow_layers", "must be >= -1 (-1 = half)")


@frozen
class TrainConfig:
    # Paper recipe (docs/method.md 3): Adam, lr 1e-5, batch 24, up to 20 epochs, early stop after 5.
    lr: float = 1e-5
    batch_size: int = 24
    epochs: int = 20
    patience: int = 5
    margin: float = 1.0
    # Training photos (with their queries) held out for the per-epoch validation Recall@1.
    val_fraction: float = 0.1
    # Up to this many of the other training photos join the held-out photos in the validation
    # gallery as distractors, so validation ranks as the score stage's gallery protocol does
    # (against many photos, not a handful). 0 = the held-out photos only.
    val_distractors: int = 1000
    # Mixed precision on CUDA (auto = bf16 where supported, else fp16); CPU always runs fp32.
    amp: Literal["auto", "bf16", "fp16", "off"] = _run_only("auto")
    num_workers: int = _run_only(1)

    def validate(self) -> None:
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.batch_size >= 2, "train.batch_size", "must be >= 2 (negatives come from it)")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.patience >= 1, "train.patience", "must be >= 1")
        _check(self.margin > 0, "train.margin", "must be > 0")
        _check(0.0 < self.val_fraction < 1.0, "train.val_fraction", "must be in (0, 1)")
        _check(self.val_distractors >= 0, "train.val_distractors", "must be >= 0")
        _check(self.num_workers >= 0, "train.num_workers", "must be >= 0")


@frozen
class SplipConfig:
    """Method `splip` (docs/method.md 9): its prompts, losses and the ablation switches of the
    paper's Tables 5 and 6 (docs/method.md 9 lists each row's --set flags). Read only where
    score.methods lists splip."""

    text_tokens: int = 4            # m: vision -> text tokens (B_t) in every text layer
    layer_tokens: int = 2           # n: layer-wise visual tokens (B_vt) per vision layer
    gallery_words: str = "photo of a"   # domain words: B_v's input and the class template
    query_words: str = "sketch of a"    # for image queries of every style
    vision_to_text: bool = True     # B_t on
    text_to_vision: bool = True     # B_v on
    layer_prompts: bool = True      # B_vt on
    layernorm: bool = True          # train CLIP's LayerNorms (Table 6 "w/o LayerNorm": false)
    triplet: bool = True            # triplet loss on (Table 5 "L_class" row: false)
    margin: Literal["adaptive", "fixed"] = "adaptive"  # mu = cos(F_t(c+), F_t(c-)) or fixed
    fixed_margin: float = 0.2       # the paper's fixed-margin comparison value
    alpha: float = 1.0              # classification loss weight; 0 = off
    beta: float = 1.0               # jigsaw loss weight; 0 = off (no solver)
    jigsaw_grid: int = 3            # tiles per side of the shuffled sketch
    jigsaw_permutations: int = 24   # permutation classes the solver chooses among
    jigsaw_conditional: bool = True  # + hinge: the positive photo solves it better
    jigsaw_margin: float = 0.0       # the hinge's margin (the paper's hinge has none)

    def validate(self) -> None:
        _check(1 <= self.text_tokens <= 16, "splip.text_tokens", "must be in 1..16")
        _check(1 <= self.layer_tokens <= 16, "splip.layer_tokens", "must be in 1..16")
        for key in ("gallery_words", "query_words"):
            _check(bool(getattr(self, key).strip()), f"splip.{key}",
                   'must be words such as "photo of a"')
        _check(self.fixed_margin >= 0, "splip.fixed_margin", "must be >= 0")
        _check(self.alpha >= 0, "splip.alpha", "must be >= 0 (0 = no classification loss)")
        _check(self.beta >= 0, "splip.beta", "must be >= 0 (0 = no jigsaw)")
        _check(self.triplet or self.alpha > 0 or self.beta > 0, "splip.triplet",
               "no loss left: keep the triplet, or set alpha or beta > 0")
        _check(self.layernorm or self.vision_to_text or self.text_to_vision
               or self.layer_prompts or self.beta > 0, "splip.layernorm",
               "nothing left to train: keep the LayerNorms, a mapping block or the jigsaw")
        _check(2 <= self.jigsaw_grid <= 4, "splip.jigsaw_grid", "must be in 2..4")
        most = math.factorial(self.jigsaw_grid ** 2) - 1
        _check(2 <= self.jigsaw_permutations <= min(most, 1000), "splip.jigsaw_permutations",
               f"must be in 2..{min(most, 1000)} for a {self.jigsaw_grid}x{self.jigsaw_grid} grid")
        _check(self.jigsaw_margin >= 0, "splip.jigsaw_margin", "must be >= 0")


@frozen
class EmbedConfig:
    # Stored embedding precision.
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = _run_only(64)
    num_workers: int = _run_only(1)
    amp: Literal["auto", "bf16", "fp16", "off"] = _run_only("auto")

    def validate(self) -> None:
        _check(self.batch_size >= 1, "embed.batch_size", "must be >= 1")
        _check(self.num_workers >= 0, "embed.num_workers", "must be >= 0")


@frozen
class IndexConfig:
    # A FAISS factory string (e.g. "IVF4096,PQ64") or "auto": chosen from the gallery size,
    # dimension and max_memory_mb, with the reason logged (pipeline/index.py, docs/method.md 5).
    factory: str = "auto"
    # Memory budget of the index build for "auto" (index, training sample, add buffers, check):
    # the most accurate family whose estimated build peak fits (pipeline/index_plan.py).
    max_memory_mb: int = 4096
    # Search parameters are tuned on this many gallery vectors used as queries (their own id
    # left out): the fastest setting of the sweep below reaching target_recall 10-recall@10
    # is stored with the index (search_params.json) and used by score and query.
    check_queries: int = 1000
    target_recall: float = 0.95
    check_nprobe: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)  # IVF lists visited
    ef_search: tuple[int, ...] = (16, 32, 64, 128, 256, 512)  # HNSW search depths
    # The longest short list re-ranked (SQ8 / PQ codes): 1M x 512 in IVF512,PQ32 (the 256 MiB
    # plan) needs ~1,200 to reach 0.95 (docs/benchmarks.md); the sweep tries 0, cap/8 .. cap.
    check_rerank_k: int = 1600
    # Build on the GPU when run.device resolves to CUDA and faiss-gpu is installed.
    use_gpu: bool = _run_only(True)
    # A killed build resumes from its last checkpoint, written at most this often.
    checkpoint_s: float = _run_only(60.0)

    def validate(self) -> None:
        _check(bool(self.factory), "index.factory", 'must be "auto" or a FAISS factory string')
        _check(self.max_memory_mb >= 1, "index.max_memory_mb", "must be >= 1")
        _check(self.check_queries >= 0, "index.check_queries", "must be >= 0 (0 = no check)")
        _check(0 < self.target_recall <= 1, "index.target_recall",
               "must be in (0, 1] (10-recall@10 against exact search, e.g. 0.95)")
        _check(bool(self.ef_search) and all(1 <= e <= 4096 for e in self.ef_search),
               "index.ef_search", "must be a non-empty list of values in [1, 4096]")
        _check(bool(self.check_nprobe) and all(1 <= n <= 2048 for n in self.check_nprobe),
               "index.check_nprobe", "must be a non-empty list of values in [1, 2048]")
        _check(10 <= self.check_rerank_k <= 2048, "index.check_rerank_k",
               "must be in [10, 2048] (10-recall@10 is measured; 2048 is FAISS's GPU limit)")
        _check(self.checkpoint_s >= 0, "index.checkpoint_s", "must be >= 0")


FUSED_PAIRS = ("sketch+text", "art+text", "lowres+text")
FUSIONS = ("softmax-max", "cosine-max", "mean")


@frozen
class ScoreConfig:
    # Retrieval methods embedded, indexed and scored side by side, the first one compared
    # query by query with each other (pipeline/methods: freestyle, untrained, baseline, vpt).
    methods: tuple[str, ...] = ("freestyle", "baseline")
    # Recall@K cut-offs: the query's own photo in the top K.
    ks: tuple[int, ...] = (1, 5, 10)
    # Class-level mAP@map_k and P@map_k, where the dataset has class labels.
    map_k: int = 200
    # The zero-shot protocols (zs, gzs: only where the test split holds classes with no
    # training photo, data.split = "class"): class-level mAP@k and P@k, scored exactly over
    # their whole gallery; 0 = @all (every relevant photo of the gallery).
    zs_map_ks: tuple[int, ...] = (200, 0)
    zs_precision_ks: tuple[int, ...] = (100, 200)
    # Gallery protocol: search through the index with the parameters the index stage tuned to
    # index.target_recall (search_params.json). Set to override: nprobe (IVF lists visited,
    # >= 1), ef_search (HNSW depth, >= 1), rerank_k (top rerank_k re-ranked by exact cosine
    # from the stored vectors, >= 0, 0 = none; the max fusions always score the union of
    # their two short lists exactly). 0 / 0 / -1 = the tuned values.
    nprobe: int = 0
    ef_search: int = 0
    rerank_k: int = -1
    # Two-query searches "<style>+<style>", scored under each fusion rule (docs/method.md 6):
    # softmax-max (the authors': per gallery item, the larger of the two queries'
    # softmax(100 cos) probabilities), cosine-max (the larger raw cosine), mean (of the two
    # normalised embeddings).
    fused: tuple[str, ...] = FUSED_PAIRS
    fusions: tuple[str, ...] = FUSIONS
    # softmax-max in the gallery protocol: the softmax runs over the whole gallery (exact,
    # one pass over the stored vectors per query) or over the union of the two short lists.
    softmax_over: Literal["gallery", "shortlist"] = "gallery"
    # The authors' protocol: rank within consecutive batches of this many (query, photo) pairs;
    # batch_drop_last leaves out the last, shorter batch, as their DataLoader does.
    batch_pairs: int = 24
    batch_drop_last: bool = False
    # Top-k results kept per query in the results Parquet.
    keep_k: int = 10
    batch_size: int = _run_only(64)
    num_workers: int = _run_only(1)
    amp: Literal["auto", "bf16", "fp16", "off"] = _run_only("auto")

    def validate(self) -> None:
        from pipeline.methods import registered  # light: method modules import torch lazily

        known = registered()
        _check(bool(self.methods), "score.methods", f"must name at least one of {sorted(known)}")
        bad = sorted(set(self.methods) - set(known))
        _check(not bad, "score.methods", f"unknown method(s) {bad}; methods: {sorted(known)}")
        _check(len(set(self.methods)) == len(self.methods), "score.methods",
               f"lists a method twice: {list(self.methods)}")
        _check(bool(self.ks) and all(k >= 1 for k in self.ks), "score.ks",
               "must be a non-empty list of values >= 1")
        _check(self.map_k >= 1, "score.map_k", "must be >= 1")
        for key in ("zs_map_ks", "zs_precision_ks"):
            _check(all(k >= 0 for k in getattr(self, key)), f"score.{key}",
                   "must be values >= 1, or 0 = all")
        _check(self.nprobe >= 0, "score.nprobe", "must be >= 1, or 0 = the index's tuned value")
        _check(self.ef_search >= 0, "score.ef_search",
               "must be >= 1, or 0 = the index's tuned value")
        _check(self.rerank_k >= -1, "score.rerank_k",
               "must be >= 0 (0 = no re-ranking), or -1 = the index's tuned value")
        for pair in self.fused:
            parts = pair.split("+")
            _check(len(parts) == 2 and all(parts) and parts[0] != parts[1], "score.fused",
                   f"{pair!r} is not '<style>+<style>' with two different styles, e.g. "
                   "'sketch+text'")
        bad = [f for f in self.fusions if f not in FUSIONS]
        _check(not bad, "score.fusions", f"unknown fusion(s) {bad}; allowed: {list(FUSIONS)}"
               + ("; 'max' is now 'cosine-max' (raw cosines; the authors' rule is "
                  "'softmax-max')" if "max" in bad else ""))
        _check(len(set(self.fusions)) == len(self.fusions), "score.fusions",
               f"lists a fusion twice: {list(self.fusions)}")
        _check(self.batch_pairs >= 2, "score.batch_pairs", "must be >= 2")
        _check(self.keep_k >= 1, "score.keep_k", "must be >= 1")
        _check(self.batch_size >= 1, "score.batch_size", "must be >= 1")
        _check(self.num_workers >= 0, "score.num_workers", "must be >= 0")


@frozen
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    splip: SplipConfig = field(default_factory=SplipConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # Directory relative paths in the file are resolved against (the config file's folder).
    base_dir: str = field(default=".", metadata={"fingerprint": False})

    def resolve(self, path: str) -> Path:
        """An absolute path for a config path value (relative ones are against base_dir)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    @property
    def work_dir(self) -> Path:
        return self.resolve(self.run.work_dir)

    def section(self, name: str) -> Any:
        return getattr(self, name)


SECTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(Config) if f.name != "base_dir"
)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; returns the value in its dataclass form."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: got {value!r}, allowed: {_type_name(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        item_type = typing.get_args(tp)[0]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {tp}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got boolean {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


# Keys an earlier fsr-pipe had: what replaced them.
MOVED = {
    "embed.baseline": "baseline is gone: list the methods in score.methods instead, e.g. "
                      'methods = ["freestyle", "untrained", "baseline"] under [score]',
    "embed.untrained": "untrained is gone: list the methods in score.methods instead, e.g. "
                       'methods = ["freestyle", "untrained", "baseline"] under [score]',
}


def _build_section(cls: type, name: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if moved := [MOVED[f"{name}.{k}"] for k in unknown if f"{name}.{k}" in MOVED]:
        raise ConfigError(f"[{name}] {moved[0]}")
    if unknown:
        raise ConfigError(
            f"[{name}] unknown key(s) {unknown}; allowed: {sorted(known)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    section = cls(**kwargs)
    section.validate()
    return section


def config_from_dict(raw: dict[str, Any], base_dir: str | Path = ".") -> Config:
    """Build and validate a Config from a parsed TOML document."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    hints = typing.get_type_hints(Config)
    sections = {name: _build_section(hints[name], name, raw.get(name, {})) for name in SECTIONS}
    return Config(**sections, base_dir=str(Path(base_dir).resolve()))


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split 'section.key=value' into (section, key, value); value parsed as TOML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. extract.batch_size=64")
    dotted, raw_value = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value  # a bare word such as --set data.source=dsr
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read `path` (None = defaults), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass --config PATH to a "
                              f"pipeline.toml (e.g. {path / 'pipeline.toml'})")
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found; pass --config PATH to a pipeline.toml"
            )
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        base_dir = path.resolve().parent
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--set {text!r}: [{section}] is not a table")
        raw[section][key] = value
    return config_from_dict(raw, base_dir)


def fingerprint_fields(section: Any, resolve: Callable[[str], Path]) -> dict[str, Any]:
    """The fields of a section that define results (excludes `fingerprint=False` fields).

    Path fields go in as normalised absolute paths (`resolve` is `Config.resolve`), so
    `photos`, `./photos/` and `/data/photos` are one plan; `model.pretrained` only when it
    names an existing file (otherwise it is an open_clip tag).
    """
    values = {}
    for f in dataclasses.fields(section):
        if not f.metadata.get("fingerprint", True):
            continue
        value = getattr(section, f.name)
        kind = f.metadata.get("path")
        if kind and value and (kind == "file" or resolve(value).is_file()):
            value = os.path.normpath(resolve(value))
        values[f.name] = value
    return values


def to_dict(config: Config) -> dict[str, Any]:
    """Plain dict of every section (for JSON sidecars and the catalog)."""
    return {name: dataclasses.asdict(config.section(name)) for name in SECTIONS}
