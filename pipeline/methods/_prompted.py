"""The FreestyleRet family (freestyle, untrained, vpt): one model, different prompt specs,
trained or not. Imported by those methods' functions only (torch is heavy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods import Artifacts, Encoders

if TYPE_CHECKING:
    import torch

    from pipeline.config import Config
    from pipeline.models.freestyle import PromptSpec


def spec_from_config(config: Config) -> PromptSpec:
    """The paper's layout as `[model]` sets it (pipeline.models.factory.prompt_spec)."""
    from pipeline.models.factory import prompt_spec

    return prompt_spec(config)


def centres(inputs: Artifacts):  # noqa: ANN201 - numpy array
    import pyarrow.parquet as pq

    from pipeline.arrays import arrow_to_vectors

    return arrow_to_vectors(pq.read_table(inputs.input_path("cluster", "centres"))["centre"])


def fresh(config: Config, inputs: Artifacts, device: torch.device, spec: PromptSpec):  # noqa: ANN201
    """(the model with freshly initialised prompts, tokenizer), as the train stage starts."""
    from pipeline.models.factory import build_model

    return build_model(config, centres(inputs), device, spec)


def load_trained(config: Config, inputs: Artifacts, device: torch.device, spec: PromptSpec,
                 unit_key: str):  # noqa: ANN201
    """(the model with the train stage's best prompts and LayerNorms for `unit_key`,
    tokenizer)."""
    import torch

    model, tokenizer = fresh(config, inputs, device, spec)
    state = torch.load(inputs.input_path("train", "model", unit_key), map_location=device,
                       weights_only=False)
    model.load_trainable_state_dict(state["model"])
    return model, tokenizer


def encoders(model, tokenizer) -> Encoders:  # noqa: ANN001
    model.eval()
    return Encoders(image=model.encode_image, text=model.encode_text, tokenizer=tokenizer,
                    gram_encoder=model.gram_encoder if model.uses_gram else None)


def triplet_loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """The paper's symmetric triplet loss (pipeline.models.freestyle), imported when used."""
    from pipeline.models.freestyle import triplet_loss as loss

    return loss(*args, **kwargs)
