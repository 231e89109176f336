"""The same CLIP without prompts and with its own LayerNorms: the side-by-side baseline."""

from __future__ import annotations

from pipeline.methods import Encoders, Method


def _load(config, inputs, device):  # noqa: ANN001, ANN202, ARG001 - reads no upstream files
    from pipeline.models.clip import encode_image_baseline, encode_text, load_clip
    from pipeline.models.factory import pretrained_source

    clip, tokenizer = load_clip(config.model.arch, pretrained_source(config),
                                seed=config.run.seed, device=device)
    clip.eval()
    return Encoders(image=lambda pixels, _gram: encode_image_baseline(clip, pixels),
                    text=lambda tokens: encode_text(clip, tokens), tokenizer=tokenizer)


METHOD = Method(name="baseline", short="base", title="CLIP without prompts (base)",
                kind="baseline_embeddings", file="baseline.parquet", view="baseline_embeddings",
                load=_load)
