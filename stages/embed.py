"""Stage `embed`: gallery embeddings from the trained prompted encoder, sharded (docs/method.md 4).

    fsr-pipe stage embed --shard 3

Each shard's photos are decoded in DataLoader workers and go through the same prompted visual
encoder as the queries (VGG Gram path inside the model, then the prompted ViT), L2-normalised,
and are written as (image_id, embedding). Photos `extract` (or `train`) recorded as bad inputs
are skipped, not decoded and recorded again. With `embed.baseline` the same CLIP without prompts
embeds them too, for the side-by-side baseline; with `embed.untrained` the model with the
untrained prompts (the train stage's fresh init) does, for trained vs untrained. On CUDA:
autocast, pinned memory, non-blocking copies; memory stays at one batch plus one shard's
embeddings.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.arrays import arrow_to_vectors, vectors_to_arrow
from pipeline.artifacts import describe, write_parquet
from pipeline.catalog import FailureRecord, MetricRecord, UnitRow, ViewSpec
from pipeline.config import Config
from pipeline.data.loader import ImageItem, iter_batches
from pipeline.device import resolve_device
from pipeline.gram import GramEncoder
from pipeline.models.clip import encode_image_baseline
from pipeline.models.factory import build_baseline, build_model, check_model_config
from pipeline.stage import PlannedUnit, Stage, StageContext, UnitResult
from pipeline.training import autocast

EMPTY = "image_id BIGINT, embedding FLOAT[]"

# Methods with their own gallery embeddings, index and scores: the artifact kind of each and
# its file in a shard's folder.
METHOD_KINDS = {"freestyle": "embeddings", "untrained": "untrained_embeddings",
                "baseline": "baseline_embeddings"}
FILES = {"freestyle": "embeddings.parquet", "untrained": "untrained.parquet",
         "baseline": "baseline.parquet"}


def methods(config: Config) -> list[str]:
    """The methods a run embeds, indexes and scores: freestyle, then the switched-on others."""
    return ["freestyle"] + [m for m in ("untrained", "baseline") if getattr(config.embed, m)]


def load_untrained(config: Config, ctx: StageContext, device: torch.device):
    """(FreestyleRet with the prompts the train stage starts from, tokenizer)."""
    centres = arrow_to_vectors(pq.read_table(ctx.input_path("cluster", "centres"))["centre"])
    model, tokenizer = build_model(config, centres, device)
    return model.eval(), tokenizer


def load_trained(config: Config, ctx: StageContext, device: torch.device):
    """(FreestyleRet with the train stage's best prompts and LayerNorms loaded, tokenizer)."""
    model, tokenizer = load_untrained(config, ctx, device)
    state = torch.load(ctx.input_path("train", "model"), map_location=device, weights_only=False)
    model.load_trainable_state_dict(state["model"])
    return model, tokenizer


# (pixels, their Gram vectors) -> L2 embeddings; the baseline ignores the Gram vectors.
Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def encode_batch(gram_encoder: GramEncoder, encoders: dict[str, Encoder],
                 pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """One batch through every method. The Gram path runs once: it is frozen and the same in
    the trained and untrained models, and on CPU it is most of the time."""
    gram = gram_encoder(pixels)
    return {method: encode(pixels, gram).float().cpu().numpy()
            for method, encode in encoders.items()}


class EmbedStage(Stage):
    name = "embed"
    section = "embed"
    needs = ("prepare", "extract", "cluster", "train")
    views = (ViewSpec("gallery_embeddings", "embed", "embeddings", EMPTY),
             ViewSpec("baseline_embeddings", "embed", "baseline_embeddings", EMPTY),
             ViewSpec("untrained_embeddings", "embed", "untrained_embeddings", EMPTY))

    def __init__(self) -> None:
        self._models: tuple[tuple, tuple[GramEncoder, dict[str, Encoder]]] | None = None

    def check(self, config: Config) -> None:
        check_model_config(config)

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return ctx.input_units("prepare")

    def models(self, ctx: StageContext) -> tuple[GramEncoder, dict[str, Encoder]]:
        """(Gram encoder, {method: encode(pixels, gram)}) for methods(config), built once per
        process and fingerprint."""
        key = (ctx.fingerprint, ctx.config.run.device)
        if self._models is None or self._models[0] != key:
            config, device = ctx.config, resolve_device(ctx.config.run.device)
            trained = load_trained(config, ctx, device)[0]
            encoders: dict[str, Encoder] = {"freestyle": trained.encode_image}
            if config.embed.untrained:
                encoders["untrained"] = load_untrained(config, ctx, device)[0].encode_image
            if config.embed.baseline:
                clip = build_baseline(config, device).eval()
                encoders["baseline"] = lambda pixels, _gram: encode_image_baseline(clip, pixels)
            self._models = (key, (trained.gram_encoder, encoders))
        return self._models[1]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        cfg = ctx.config.embed
        gram_encoder, encoders = self.models(ctx)
        device = resolve_device(ctx.config.run.device)
        gallery = pq.read_table(ctx.input_path("prepare", "gallery", unit.key),
                                columns=["image_id", "path"])
        # recorded there already (train: photos that broke after extract read them)
        known_bad = ctx.input_failures("extract", "gallery") | ctx.input_failures("train",
                                                                                 "gallery")
        items = [ImageItem("gallery", i, p) for i, p in zip(gallery["image_id"].to_pylist(),
                                                           gallery["path"].to_pylist())
                 if i not in known_bad]
        ids: list[int] = []
        chunks: dict[str, list[np.ndarray]] = {method: [] for method in encoders}
        failures = []
        started = time.monotonic()
        batches = iter_batches(items, ctx.config.extract.image_size,
                               ctx.config.data.max_image_pixels, cfg.batch_size,
                               cfg.num_workers, pin_memory=device.type == "cuda")
        with ctx.progress(f"embed {unit.key}", len(items)) as advance, torch.inference_mode():
            for batch in batches:
                failures += [FailureRecord(item.item_kind, item.item_id, item.path, reason)
                             for item, reason in batch.failures]
                if batch.pixels is not None:
                    pixels = batch.pixels.to(device, non_blocking=True)
                    with autocast(device, cfg.amp):
                        encoded = encode_batch(gram_encoder, encoders, pixels)
                    for method, emb in encoded.items():
                        chunks[method].append(emb)
                    ids += [item.item_id for item in batch.items]
                advance(len(batch.items) + len(batch.failures))
        seconds = time.monotonic() - started
        out = ctx.out_dir / unit.key
        artifacts = [describe(METHOD_KINDS[method], write_parquet(
            self._table(ids, chunks[method], cfg.dtype), out / FILES[method]), len(ids))
            for method in encoders]
        return UnitResult(
            rows=len(ids), artifacts=artifacts, failures=failures, good={"gallery": len(ids)},
            metrics=[MetricRecord("images_per_s", len(ids) / max(seconds, 1e-9)),
                     MetricRecord("shard_seconds", seconds)],
        )

    @staticmethod
    def _table(ids: list[int], chunks: list[np.ndarray], dtype: str) -> pa.Table:
        x = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
        return pa.table({"image_id": pa.array(ids, pa.int64()),
                         "embedding": vectors_to_arrow(x, dtype)})
