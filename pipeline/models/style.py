"""Build the Gram style encoder from config: the one extract, train and embed all use.

docs/method.md section 1; the normalisation choices are documented in `pipeline/gram.py`.
"""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.gram import GramEncoder
from pipeline.models.vgg import build_vgg_encoder


def check_vgg_weights(config: Config) -> None:
    """Raise now, before any stage works, if `extract.vgg_weights` names no file."""
    if config.extract.vgg_weights:
        path = config.resolve(config.extract.vgg_weights)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"VGG weights {path} (extract.vgg_weights) {what}; pass the .pth file "
                "(docs/config.md), or '' for a seeded random init")


def build_gram_encoder(config: Config, device: torch.device) -> GramEncoder:
    """VGG (real weights from `extract.vgg_weights`, else seeded random) + Gram + projection."""
    cfg = config.extract
    weights = config.resolve(cfg.vgg_weights) if cfg.vgg_weights else None
    vgg = build_vgg_encoder(weights, seed=config.run.seed)
    encoder = GramEncoder(vgg, pool=cfg.pool, dim=cfg.gram_dim, seed=config.run.seed,
                          centred=cfg.centred)
    return encoder.to(device).eval()
