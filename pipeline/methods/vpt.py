"""VPT (the paper's VPT* row): deep visual prompts with a random init, input-independent, in
every vision layer, trained like FreestyleRet (same data, loss, optimiser and validation) on
the same frozen CLIP. What the style-initialised prompts add over plain prompt tuning."""

from __future__ import annotations

from dataclasses import replace

from pipeline.methods import Method
from pipeline.methods import _prompted as prompted


def spec(config):  # noqa: ANN001, ANN201
    """model.n_tokens free tokens replaced in every layer (VPT-deep); no Gram or style input."""
    return replace(prompted.spec_from_config(config), shallow_init="random",
                   deep_init="random", shallow_layers=0)


def _build(config, centres, device):  # noqa: ANN001, ANN202
    from pipeline.models.factory import build_model

    return build_model(config, centres, device, spec(config))


def _load(config, inputs, device):  # noqa: ANN001, ANN202
    return prompted.encoders(*prompted.load_trained(config, inputs, device, spec(config), "vpt"))


METHOD = Method(name="vpt", short="vpt", title="VPT, random-init deep prompts (vpt)",
                kind="vpt_embeddings", file="vpt.parquet", view="vpt_embeddings", load=_load,
                build=_build, loss=prompted.triplet_loss)
