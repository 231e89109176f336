"""Decode images in DataLoader workers; bad inputs come back as failures, not exceptions.

    done = encode_items(items, lambda pixels, items: model(pixels), image_size=224,
                        max_pixels=40_000_000, batch_size=64, num_workers=1, device=device)
    done.items, done.out, done.failures     # decoded items, their (n, d) outputs, bad inputs

Shared by everything that encodes images (extract, embed, score, train's validation) so that
decoding, the preprocessing, bad-input handling, device copies and mixed precision are the
same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.images import BadInput, load_rgb, to_tensor


@dataclass(frozen=True)
class ImageItem:
    item_kind: str  # gallery | query
    item_id: int
    path: str


@dataclass
class Batch:
    items: list[ImageItem]             # decoded items, in the order of `pixels`
    pixels: torch.Tensor | None        # (n, 3, size, size) float32 in [0, 1]
    failures: list[tuple[ImageItem, str]]

    def pin_memory(self) -> Batch:
        """What the DataLoader calls with `pin_memory=True` (it leaves unknown types unpinned):
        the pixels in page-locked memory, so the copy to the GPU can be non-blocking."""
        pixels = None if self.pixels is None else self.pixels.pin_memory()
        return Batch(self.items, pixels, self.failures)


class ImageItems(Dataset):
    """Items -> (item, tensor) or (item, reason) for bad inputs."""

    def __init__(self, items: Sequence[ImageItem], image_size: int, max_pixels: int) -> None:
        self.items = list(items)
        self.image_size = image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[ImageItem, torch.Tensor | str]:
        item = self.items[index]
        try:
            return item, to_tensor(load_rgb(item.path, self.max_pixels), self.image_size)
        except BadInput as exc:
            return item, exc.reason


def collate(samples: list[tuple[ImageItem, torch.Tensor | str]]) -> Batch:
    good = [(item, x) for item, x in samples if isinstance(x, torch.Tensor)]
    bad = [(item, x) for item, x in samples if isinstance(x, str)]
    pixels = torch.stack([x for _, x in good]) if good else None
    return Batch([item for item, _ in good], pixels, bad)


def iter_batches(items: Sequence[ImageItem], image_size: int, max_pixels: int,
                 batch_size: int, num_workers: int, pin_memory: bool = False) -> Iterator[Batch]:
    """Batches in item order; decoding runs in `num_workers` processes (0 = in this one).

    A single batch is decoded in this process whatever `num_workers` says: the caller waits
    for it either way, so workers could overlap nothing and only add their start-up (fork of
    a process holding the models, ~0.06-0.15 s) and the shared-memory copy; with the demo's
    40-photo shards and embed batches of 64 that tripled the loading time per shard
    (docs/benchmarks.md).
    """
    if len(items) <= batch_size:
        num_workers = 0
    loader = DataLoader(
        ImageItems(items, image_size, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )
    yield from loader


@dataclass
class Encoded:
    items: list[ImageItem]                # the decoded items, in input order
    out: Any                              # their outputs: (n, d) float32, or {name: (n, d)}
    failures: list[tuple[ImageItem, str]]  # (item, reason) of the bad inputs


def encode_items(items: Sequence[ImageItem],
                 encode: Callable[[torch.Tensor, list[ImageItem]], Any], *, image_size: int,
                 max_pixels: int, batch_size: int, num_workers: int, device: torch.device,
                 amp: str = "off", progress: Callable[[int], None] | None = None) -> Encoded:
    """The one image-encoding loop: decode `items` in batches (iter_batches), move each batch
    to `device` (pinned and non-blocking on CUDA), run `encode(pixels, batch_items)` under
    inference mode and `amp` autocast, and collect its outputs (a tensor, or a dict of them)
    as float32 numpy. `progress(n)` ticks per batch with decoded + bad items."""
    from pipeline.device import autocast

    done: list[ImageItem] = []
    chunks: list[Any] = []
    failures: list[tuple[ImageItem, str]] = []
    batches = iter_batches(items, image_size, max_pixels, batch_size, num_workers,
                           pin_memory=device.type == "cuda")
    with torch.inference_mode():
        for batch in batches:
            failures += batch.failures
            if batch.pixels is not None:
                with autocast(device, amp):
                    out = encode(batch.pixels.to(device, non_blocking=True), batch.items)
                chunks.append({k: _numpy(v) for k, v in out.items()} if isinstance(out, dict)
                              else _numpy(out))
                done += batch.items
            if progress is not None:
                progress(len(batch.items) + len(batch.failures))
    return Encoded(done, _concat(chunks), failures)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()


def _concat(chunks: list[Any]) -> Any:
    """Chunks of arrays (or of dicts of arrays) -> one array (dict); None for no chunk."""
    if not chunks:
        return None
    if isinstance(chunks[0], dict):
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return np.concatenate(chunks)
