"""Frozen open_clip CLIP: build (seeded random, local file or pretrained tag), save, encode.

    clip, tokenizer = load_clip("fsr-tiny-vit")                 # seeded random init, warned
    clip, tokenizer = load_clip("ViT-B-32", "/data/vit-b-32.pt")  # a local checkpoint file
    clip, tokenizer = load_clip("ViT-B-32", "laion2b_s34b_b79k")  # an open_clip tag (online)
    save_clip(clip, "clip.pt")          # load_clip(arch, pretrained="clip.pt") gives it back
    x = encode_image_baseline(clip, images)   # RGB [0, 1], any size -> (N, embed_dim), L2
    t = encode_text(clip, tokenizer(["a sketch of a cat"]))

Architectures are open_clip's named configs plus the project's tiny `DEMO_ARCHS` (same JSON
shape), which are built through open_clip's `local-dir:` schema from a temporary folder, so
nothing is registered in open_clip's global model list. Every returned model is in eval
mode with all parameters frozen; FreestyleRet (`pipeline/models/freestyle.py`) unfreezes
what it trains.

Needs open_clip_torch with the `local-dir:` schema and `create_model(load_weights=...)`
(3.x; tested with 3.3).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from pipeline.models import WeightsError

log = logging.getLogger(__name__)

# Project architectures, in open_clip's model_configs JSON layout. "fsr-tiny-vit" is for demos
# and tests: a few epochs on ~500 queries take a minute or two on 2 CPU cores. vocab_size and
# context_length are CLIP's, so open_clip's default SimpleTokenizer works offline.
DEMO_ARCHS: dict[str, dict[str, Any]] = {
    "fsr-tiny-vit": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 8,
            "width": 64,
            "layers": 4,
            "head_width": 16,  # 4 heads
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    },
}

_WARNED_RANDOM: set[tuple[str, int]] = set()  # (arch, seed) random inits already warned of

# Suffixes that mark a `pretrained` value as a file path rather than an open_clip tag.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.lower().endswith(CHECKPOINT_SUFFIXES)


class _DropMentions(logging.Filter):
    """Drops log records that mention `marker` (open_clip's own notes on what load_clip
    already says more plainly)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in record.getMessage()


@contextlib.contextmanager
def _drop_root_logs(marker: str) -> Iterator[None]:
    """open_clip logs on the root logger: hide its records that mention `marker`."""
    quiet = _DropMentions(marker)
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _create(arch: str, model_cfg: dict[str, Any] | None, pretrained: str | None,
            seed: int) -> tuple[nn.Module, Callable]:
    """open_clip.create_model (+ tokenizer) with the CPU RNG seeded and then restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_cfg is None:
            # pretrained_text=False: a random init must not pull HF text-tower weights. A
            # random init's "No pretrained weights loaded" is load_clip's warning too.
            with _drop_root_logs("No pretrained weights loaded"):
                model = open_clip.create_model(arch, pretrained=pretrained or None,
                                               device="cpu", pretrained_text=bool(pretrained))
            return model, open_clip.get_tokenizer(arch)
        with tempfile.TemporaryDirectory(prefix="fsr-arch-") as folder:
            config = {"model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": {}}
            (Path(folder) / "open_clip_config.json").write_text(json.dumps(config))
            name = f"local-dir:{folder}"
            # open_clip notes that the temporary folder holds no weights: drop those lines.
            with _drop_root_logs(folder):
                model = open_clip.create_model(name, load_weights=False, device="cpu")
                return model, open_clip.get_tokenizer(name)


def _known_arch(arch: str) -> dict[str, Any] | None:
    """The demo config of `arch`, None for an open_clip built-in; ValueError if neither."""
    if arch in DEMO_ARCHS:
        return DEMO_ARCHS[arch]
    if arch in open_clip.list_models():
        return None
    raise WeightsError(
        f"unknown CLIP architecture {arch!r} (model.arch): use one of the project's "
        f"{sorted(DEMO_ARCHS)} or an open_clip name such as ViT-B-32 or ViT-L-14"
    )


def _arch_config(arch: str) -> dict[str, Any]:
    """`arch`'s model config (demo or open_clip), without building it; WeightsError if unknown."""
    return _known_arch(arch) or open_clip.get_model_config(arch) or {}


def _read_preprocess_cfg(path: Path) -> dict[str, Any] | None:
    """The preprocess cfg that save_clip stores beside the weights, if the file has one."""
    if path.suffix in (".safetensors", ".npz", ".npy"):
        return None
    try:
        # mmap: only the small pickled header is read, not the weights.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy/foreign formats: the weights loader reports real problems
        return None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("preprocess_cfg"), Mapping):
        return dict(loaded["preprocess_cfg"])
    return None


def _load_file(model: nn.Module, arch: str, path: Path) -> None:
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as error:  # torch/open_clip raise many types for foreign files
        raise WeightsError(
            f"CLIP checkpoint {path} (model.pretrained) could not be loaded into architecture "
            f"{arch!r} ({type(error).__name__}: {error}); pass a torch or safetensors "
            "checkpoint of that architecture (open_clip's, or a model.pt fsr-pipe saved)"
        ) from error
    stored = _read_preprocess_cfg(path)
    if stored is not None:
        cfg = open_clip.get_model_preprocess_cfg(model)
        cfg.update({k: v for k, v in stored.items() if k in ("mean", "std")})
        open_clip.set_model_preprocess_cfg(model, cfg)


def vision_layers(arch: str) -> int:
    """Transformer blocks in `arch`'s vision tower, read from its config (nothing is built)."""
    layers = _arch_config(arch).get("vision_cfg", {}).get("layers")
    if not isinstance(layers, int):
        raise WeightsError(
            f"CLIP architecture {arch!r} (model.arch) has no vision transformer tower "
            "(a ResNet or timm backbone); FreestyleRet prompts a ViT: use e.g. ViT-B-32"
        )
    return layers


def embed_dim(arch: str) -> int | None:
    """Dimension of `arch`'s image/text embeddings, read from its config (nothing is built);
    None if the config has none. An unknown architecture raises WeightsError."""
    dim = _arch_config(arch).get("embed_dim")
    return dim if isinstance(dim, int) else None


def check_pretrained(arch: str, pretrained: str) -> None:
    """Raise now (before any work) if `load_clip(arch, pretrained)` cannot find its weights;
    the file's contents and downloads are only checked when loading."""
    model_cfg = _known_arch(arch)
    path = Path(pretrained)
    if not pretrained or path.is_file():
        return
    if path.is_dir():
        raise WeightsError(
            f"CLIP checkpoint {pretrained} (model.pretrained) is a directory; pass the "
            "checkpoint file inside it (e.g. open_clip_pytorch_model.bin or model.pt)"
        )
    if _looks_like_path(pretrained):
        raise FileNotFoundError(
            f"CLIP checkpoint {pretrained} (model.pretrained) does not exist; pass an existing "
            f"file, an open_clip pretrained tag for {arch!r}, or '' for a seeded random init"
        )
    if model_cfg is not None:
        raise WeightsError(
            f"CLIP architecture {arch!r} is a project demo architecture with no pretrained "
            f"tags, so {pretrained!r} cannot be loaded; pass a local checkpoint file path "
            "or '' for a seeded random init"
        )
    if pretrained not in (tags := open_clip.list_pretrained_tags_by_model(arch)):
        raise WeightsError(
            f"{pretrained!r} (model.pretrained) is neither a file nor an open_clip pretrained "
            f"tag for {arch!r}; its tags: {', '.join(tags) or 'none'}. Or pass a local "
            "checkpoint file path, or '' for a seeded random init"
        )


def load_clip(arch: str, pretrained: str = "", seed: int = 0,
              device: str | torch.device = "cpu") -> tuple[nn.Module, Callable]:
    """(frozen eval-mode CLIP, tokenizer) for `arch`.

    `pretrained`: "" = seeded random init (same seed, same weights; global RNG untouched);
    an existing file = that checkpoint (open_clip or save_clip format); anything else = an
    open_clip pretrained tag (downloads; needs the network).
    """
    check_pretrained(arch, pretrained)
    model_cfg = _known_arch(arch)
    if not pretrained:
        model, tokenizer = _create(arch, model_cfg, None, seed)
        # Once per process: a stage builds several models (trained, untrained, baseline).
        level = logging.DEBUG if (arch, seed) in _WARNED_RANDOM else logging.WARNING
        _WARNED_RANDOM.add((arch, seed))
        log.log(level, "CLIP %s: weights are RANDOM (seeded init, seed %d); set "
                "model.pretrained to a checkpoint file or an open_clip tag for real weights",
                arch, seed)
    elif Path(pretrained).is_file():
        model, tokenizer = _create(arch, model_cfg, None, seed)
        _load_file(model, arch, Path(pretrained))
        log.info("CLIP %s: weights from %s", arch, pretrained)
    else:
        try:
            model, tokenizer = _create(arch, None, pretrained, seed)
        except Exception as error:  # offline downloads fail with many error types
            raise WeightsError(
                f"could not load open_clip pretrained tag {pretrained!r} for {arch!r} "
                f"({type(error).__name__}: {error}). Offline? Download the weights on a "
                "machine with network access and set model.pretrained to the local checkpoint "
                "file path"
            ) from error
        log.info("CLIP %s: pretrained tag %s", arch, pretrained)
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def save_clip(model: nn.Module, path: str | Path) -> Path:
    """Write the CLIP's weights (and its mean/std) so load_clip(arch, path) restores them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    state = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "preprocess_cfg": {"mean": list(preprocess.get("mean", OPENAI_DATASET_MEAN)),
                           "std": list(preprocess.get("std", OPENAI_DATASET_STD))},
    }
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def clip_image_hw(model: nn.Module) -> tuple[int, int]:
    """(height, width) the CLIP's visual tower expects."""
    size = getattr(model.visual, "image_size", None)
    if size is None:
        size = open_clip.get_model_preprocess_cfg(model)["size"]
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def clip_image_size(model: nn.Module) -> int:
    """Side of the square input of the CLIP's visual tower (e.g. 224)."""
    height, width = clip_image_hw(model)
    if height != width:
        raise ValueError(f"CLIP expects non-square {height}x{width} inputs; only square is used")
    return height


def clip_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the CLIP's input normalisation (OpenAI's by default)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = tuple(float(v) for v in cfg.get("mean") or OPENAI_DATASET_MEAN)
    std = tuple(float(v) for v in cfg.get("std") or OPENAI_DATASET_STD)
    return mean, std


def clip_pixels(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """RGB [0, 1] (N, 3, H, W) -> resized (bilinear, antialias) and CLIP-normalised, fp32."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) RGB; got {tuple(images.shape)}")
    size = clip_image_hw(model)
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = images.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        mean, std = clip_mean_std(model)
        mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        return (x - mean_t) / std_t


def encode_image_baseline(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Plain CLIP, no prompts: RGB [0, 1] at any size -> (N, embed_dim) float32, L2."""
    features = model.encode_image(clip_pixels(model, images))
    return F.normalize(features.float(), dim=-1)


def pool_visual(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's tok/avg pooling with ln_post, then the projection, of a ViT's final tokens
    x (N, 1 + patches, width) without prompts (the prompted models' shared last step)."""
    if visual.pool_type == "tok":  # ln_post is per token: pooling first is the same
        pooled = visual.ln_post(x[:, 0])
    elif visual.final_ln_after_pool:
        pooled = visual.ln_post(x[:, 1:].mean(dim=1))
    else:
        pooled = visual.ln_post(x[:, 1:]).mean(dim=1)
    return pooled @ visual.proj if visual.proj is not None else pooled


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (N, context_length) -> (N, embed_dim) float32, L2."""
    return F.normalize(model.encode_text(tokens).float(), dim=-1)
