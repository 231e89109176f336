"""FreestyleRet (the paper): style-initialised prompts on a frozen CLIP, trained with the
symmetric triplet loss (docs/method.md 3)."""

from __future__ import annotations

from pipeline.methods import Method
from pipeline.methods import _prompted as prompted


def _build(config, centres, device):  # noqa: ANN001, ANN202
    from pipeline.models.factory import build_model

    return build_model(config, centres, device)  # [model]'s prompt layout


def _load(config, inputs, device):  # noqa: ANN001, ANN202
    spec = prompted.spec_from_config(config)
    return prompted.encoders(*prompted.load_trained(config, inputs, device, spec, "freestyle"))


METHOD = Method(name="freestyle", short="FSR", title="FreestyleRet (FSR)", kind="embeddings",
                file="embeddings.parquet", view="gallery_embeddings", load=_load, build=_build,
                loss=prompted.triplet_loss)
