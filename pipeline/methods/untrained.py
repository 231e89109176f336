"""FreestyleRet's untrained prompts: the model the train stage starts from (same seed), not
trained. Trained vs untrained on the test split is what training added."""

from __future__ import annotations

from pipeline.methods import Method
from pipeline.methods import _prompted as prompted


def _load(config, inputs, device):  # noqa: ANN001, ANN202
    return prompted.encoders(*prompted.fresh(config, inputs, device,
                                             prompted.spec_from_config(config)))


METHOD = Method(name="untrained", short="untr", title="its untrained prompts (untr)",
                kind="untrained_embeddings", file="untrained.parquet",
                view="untrained_embeddings", load=_load)
