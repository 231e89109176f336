"""Decode images in DataLoader workers; bad inputs come back as failures, not exceptions.

Shared by the stages that read images (extract now, embed later) so that decoding, the
224 px preprocessing and bad-input handling are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
