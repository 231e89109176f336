"""Pick the torch device from `run.device` (auto = CUDA when present)."""

from __future__ import annotations

import torch

from pipeline.config import ConfigError


def resolve_device(setting: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' but torch sees no CUDA device (no GPU, or a "
                          "CPU-only torch build); use 'auto' or 'cpu'")
    return torch.device(setting)
