"""SpLIP (ECCV 2024, arXiv 2407.04207): bidirectional vision<->text prompts on the same frozen
CLIP, trained with the adaptive-margin triplet, classification and conditional jigsaw losses
on class-aware triplets (docs/method.md 9). Gallery photos go through the "photo of a"
domain, image queries of every style through the "sketch of a" domain, text queries through
the text tower with the trained LayerNorms."""

from __future__ import annotations

from pipeline.methods import Encoders, Method


def specs(config):  # noqa: ANN001, ANN201
    """(SplipSpec, SplipLossSpec) from [splip]."""
    from pipeline.models.splip import SplipSpec
    from pipeline.splip_losses import SplipLossSpec

    s = config.splip
    model = SplipSpec(text_tokens=s.text_tokens, layer_tokens=s.layer_tokens,
                      gallery_words=s.gallery_words, query_words=s.query_words,
                      vision_to_text=s.vision_to_text, text_to_vision=s.text_to_vision,
                      layer_prompts=s.layer_prompts, layernorm=s.layernorm,
                      jigsaw_grid=s.jigsaw_grid,
                      jigsaw_permutations=s.jigsaw_permutations, jigsaw=s.beta > 0)
    loss = SplipLossSpec(triplet=s.triplet, margin=s.margin, fixed_margin=s.fixed_margin,
                         alpha=s.alpha,
                         beta=s.beta, jigsaw_conditional=s.jigsaw_conditional,
                         jigsaw_margin=s.jigsaw_margin)
    return model, loss


def build(config, centres, device, classes: list[str]):  # noqa: ANN001, ANN201, ARG001
    """(SpLIP with fresh mapping blocks and solver, tokenizer); deterministic from run.seed.
    `centres` (the style space) is not used: SpLIP has no Gram path."""
    import torch

    from pipeline.models.clip import load_clip
    from pipeline.models.factory import pretrained_source
    from pipeline.models.splip import Splip

    clip, tokenizer = load_clip(config.model.arch, pretrained_source(config),
                                seed=config.run.seed, device=device)
    spec, loss_spec = specs(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        model = Splip(clip, tokenizer, classes, spec, seed=config.run.seed, loss_spec=loss_spec)
    return model.to(device), tokenizer


def _load(config, inputs, device):  # noqa: ANN001, ANN202
    import torch

    from pipeline.models.splip import CLASSES_KEY

    state = torch.load(inputs.input_path("train", "model", "splip"), map_location=device,
                       weights_only=False)["model"]
    model, tokenizer = build(config, None, device, classes=state[CLASSES_KEY])
    model.load_trainable_state_dict(state)
    model.eval()
    return Encoders(image=model.encode_image, text=model.encode_text, tokenizer=tokenizer,
                    query_image=model.encode_query)


def _batch_loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    from pipeline.splip_losses import batch_loss

    return batch_loss(*args, **kwargs)


METHOD = Method(name="splip", short="SpLIP", title="SpLIP, bidirectional prompts (SpLIP)",
                kind="splip_embeddings", file="splip.parquet", view="splip_embeddings",
                load=_load, build=build, class_aware=True, batch_loss=_batch_loss,
                section="splip")
