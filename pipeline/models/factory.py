"""One entry point that builds the FreestyleRet model from config (train and embed share it)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import Config, ConfigError
from pipeline.models.clip import check_pretrained, load_clip, vision_layers
from pipeline.models.freestyle import FreestyleRet, PromptSpec
from pipeline.models.style import build_gram_encoder, check_vgg_weights


def pretrained_source(config: Config) -> str:
    """`model.pretrained` as a resolved file path when it names a file, else as given (a tag)."""
    value = config.model.pretrained
    if value and config.resolve(value).is_file():
        return str(config.resolve(value))
    return value


def check_model_config(config: Config) -> None:
    """Everything about `[model]` that can be checked without building it: the architecture
    is known and has a ViT, the weights (CLIP's and the Gram path's VGG) exist, the shallow
    layers fit. Runs before any stage does work, so a typo does not surface after an hour of
    feature extraction."""
    check_vgg_weights(config)  # the model runs the Gram path too
    layers = vision_layers(config.model.arch)
    if config.model.shallow_layers > layers:
        raise ConfigError(
            f"model.shallow_layers: {config.model.shallow_layers} exceeds the {layers} vision "
            f"layers of {config.model.arch}; use 0..{layers}, or -1 for half of them"
        )
    check_pretrained(config.model.arch, pretrained_source(config))


def prompt_spec(config: Config) -> PromptSpec:
    """The paper's prompt layout as `[model]` sets it (docs/method.md 3)."""
    m = config.model
    return PromptSpec(n_tokens=m.n_tokens, shallow_init=m.shallow_init, deep_init=m.deep_init,
                      shallow_layers=m.shallow_layers)


def build_model(config: Config, centres: np.ndarray, device: torch.device,
                spec: PromptSpec | None = None) -> tuple[FreestyleRet, object]:
    """(FreestyleRet with freshly initialised prompts, tokenizer); deterministic from run.seed.
    `spec`: the prompt layout, `[model]`'s by default (the vpt method passes its own)."""
    clip, tokenizer = load_clip(config.model.arch, pretrained_source(config),
                                seed=config.run.seed, device=device)
    spec = prompt_spec(config) if spec is None else spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        model = FreestyleRet(clip, build_gram_encoder(config, device),
                             torch.tensor(np.array(centres), dtype=torch.float32),
                             config.cluster.temperature, spec, config.model.trainable)
    return model.to(device), tokenizer
