"""Pick the torch device from `run.device` (auto = CUDA when present), and mixed precision
on it (`amp` settings of train, embed and score)."""

from __future__ import annotations

import contextlib

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


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device` (auto = bf16 where the GPU has it, else fp16);
    None = fp32, always on CPU."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":  # native bf16 only (Ampere on): emulated bf16 on a T4 / V100 is slow
        amp = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA as configured; fp32 (no autocast) on CPU."""
    dtype = amp_dtype(device, amp)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast, whose small gradients underflow to zero without it (GPUs
    without bf16: T4, V100); a pass-through for bf16 and fp32."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)
