"""Retrieval methods as plug-ins (docs/method.md 7).

    from pipeline import methods
    for method in methods.configured(config):   # score.methods, in order
        encoders = method.load(config, ctx, device)
        x = encoders.image(pixels, gram)          # (N, D) float32, L2 rows
        t = encoders.text(encoders.tokenizer(["a red car"]).to(device))

A method is one module of this package that defines `METHOD = Method(...)`: its name, how
the tables label it, whether the train stage fits it (and with which loss), its gallery
embeddings' artifact kind, file and view, and how it is built and loaded. Stages, views, the
CLI's tables and the summary SQL iterate over the configured methods; no other module names
one. Modules whose name starts with "_" are shared helpers, not methods. Method modules import
torch and the models inside their functions, so listing methods (config checks, `status`,
the CLI) stays light.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.frozen import frozen

if TYPE_CHECKING:
    import torch

    from pipeline.config import Config


class Artifacts(Protocol):
    """Where a method finds what upstream stages wrote (a StageContext is one)."""

    def input_path(self, stage: str, kind: str, unit_key: str | None = None) -> str: ...


@frozen
class Encoders:
    """A loaded method. `image(pixels, gram)`: RGB [0, 1] pixels at extract.image_size (and
    their Gram vectors, or None) -> L2 rows; `text(tokens)` -> L2 rows. `gram_encoder`: the
    Gram path `image` reads, shared by the methods that have one (embed runs it once per
    batch for all of them), or None. `query_image`: how image queries are encoded, where a
    method encodes them unlike gallery photos (SpLIP's sketch domain); None = `image`."""

    image: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    text: Callable[[torch.Tensor], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    gram_encoder: torch.nn.Module | None = None
    query_image: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    @property
    def query(self) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """The image-query encoder: `query_image`, else `image`."""
        return self.image if self.query_image is None else self.query_image


@frozen
class Method:
    name: str          # score.methods value, unit key of index and score (and train)
    short: str         # column suffix in the printed tables ("R@1 FSR")
    title: str         # the tables' legend
    kind: str          # the embed stage's artifact kind of its gallery embeddings
    file: str          # that file in an embed shard's folder
    view: str          # the catalog view over them
    # (config, upstream artifacts, device) -> Encoders, in eval mode.
    load: Callable[[Config, Artifacts, torch.device], Encoders]
    # Trained methods: (config, cluster centres, device) -> (fresh model, tokenizer), and the
    # loss the train stage minimises, loss(query, positive, negative, margin).
    build: Callable[[Config, Any, torch.device], tuple[Any, Any]] | None = None
    loss: Callable[..., torch.Tensor] | None = None
    # Class-aware training (splip): the negatives are photos of another class, the batches
    # carry pos_class / neg_class indices into the sorted training class names, and build
    # gets those names as `classes=`. `batch_loss` replaces pipeline.training.batch_loss
    # (same signature) for a method whose loss needs more than three embeddings.
    class_aware: bool = False
    batch_loss: Callable[..., torch.Tensor | None] | None = None
    # The config section the method reads besides [model] and [train] (its switches): part
    # of the train stage's fingerprint while the method trains.
    section: str | None = None

    @property
    def trains(self) -> bool:
        return self.build is not None


@cache
def registered() -> dict[str, Method]:
    """Every method module of this package, by name."""
    found: dict[str, Method] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module.startswith("_"):
            continue
        method = importlib.import_module(f"{__name__}.{module}").METHOD
        if method.name in found:
            raise RuntimeError(f"two method modules are named {method.name!r}")
        found[method.name] = method
    return found


def get(name: str) -> Method:
    try:
        return registered()[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; methods: {sorted(registered())}") from None


def configured(config: Config) -> list[Method]:
    """The methods a run embeds, indexes and scores (score.methods, in its order)."""
    return [get(name) for name in config.score.methods]


def trained(config: Config) -> list[Method]:
    """The configured methods the train stage fits, one unit each."""
    return [m for m in configured(config) if m.trains]
