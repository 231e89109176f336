"""Plain prompt-tuning code: triplet batches, one epoch, validation Recall@1, checkpoints.

The `train` stage is glue around these functions (docs/method.md section 3). Nothing here knows
about the catalog; checkpoints are a weights file plus a JSON sidecar written last, so a
sidecar's existence means the checkpoint is complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.arrays import stable_uniform
from pipeline.artifacts import atomic_path, write_bytes
from pipeline.data.images import BadInput, load_rgb, to_tensor
from pipeline.data.loader import ImageItem, encode_items
from pipeline.device import autocast


@dataclass(frozen=True)
class Query:
    query_id: int
    image_id: int
    style: str
    path: str | None  # image queries
    text: str | None  # text queries


# A bad input met while training: [item kind ("gallery" | "query"), id, path, reason]. Lists,
# not tuples, so a checkpoint's JSON sidecar holds them as they are.
BadItem = list


@dataclass
class History:
    """What a checkpoint remembers besides weights: per-epoch metrics and early stopping."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -1.0
    bad_epochs: int = 0
    # Inputs that failed to decode here though extract read them (changed since): BadItem
    # lists, one per (kind, id), kept across a resume so the unit records every one of them.
    bad_inputs: list[BadItem] = field(default_factory=list)

    def update(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Record an epoch; True if it is the best so far (by mean validation Recall@1)."""
        self.epochs.append({"epoch": epoch, **metrics})
        if metrics["val_recall@1"] > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = metrics["val_recall@1"], epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def add_bad_inputs(self, items: Sequence[BadItem]) -> list[BadItem]:
        """Remember `items` (see `bad_inputs`); returns the ones not seen before."""
        seen = {(kind, item_id) for kind, item_id, *_ in self.bad_inputs}
        new = []
        for item in items:
            if (item[0], item[1]) not in seen:
                seen.add((item[0], item[1]))
                new.append(list(item))
        self.bad_inputs += new
        return new


def decode(path: str, image_size: int, max_pixels: int) -> torch.Tensor:
    """An image as a (3, size, size) tensor, or BadInput (missing, corrupt, too large...)."""
    return to_tensor(load_rgb(path, max_pixels), image_size)


class TripletData(Dataset):
    """(query, its photo, another photo) triplets; images decoded in DataLoader workers.

    Negatives are drawn per epoch from a generator seeded by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would. A triplet with an image that does not
    decode (it changed after extract read it) comes back with `ok` False, blank pixels in its
    place and the image in `bad`: the loss leaves it out and the stage records it.

    `classes` (photo id -> class index; class-aware methods such as splip): each negative is
    a photo of another class, and the items carry `pos_class` and `neg_class`. Without it
    the draws are exactly those of the class-blind triplets.
    """

    def __init__(self, queries: Sequence[Query], photos: dict[int, str], grams: dict[int, Any],
                 image_size: int, max_pixels: int, seed: int, epoch: int,
                 classes: dict[int, int] | None = None) -> None:
        self.queries = list(queries)
        self.photos = photos
        self.grams = grams  # query_id / image_id -> Gram vector (np.ndarray)
        self.image_size = image_size
        self.max_pixels = max_pixels
        photo_ids = np.array(sorted(photos), dtype=np.int64)
        rng = np.random.default_rng([seed, epoch])
        positives = np.array([q.image_id for q in self.queries], dtype=np.int64)
        drawn = rng.integers(0, len(photo_ids), len(self.queries))  # rows of photo_ids
        self.classes = classes
        # A negative must be another photo (of another class): compare ids, or class indices
        # looked up once per photo.
        if classes is None:
            photo_keys, positive_keys = photo_ids, positives
        else:
            photo_keys = np.array([classes[i] for i in photo_ids.tolist()], dtype=np.int64)
            positive_keys = np.array([classes[i] for i in positives.tolist()], dtype=np.int64)
            if len(np.unique(photo_keys)) < 2:
                raise ValueError("class-aware negatives need photos of at least 2 classes")
        clash = photo_keys[drawn] == positive_keys
        while clash.any():
            drawn[clash] = rng.integers(0, len(photo_ids), int(clash.sum()))
            clash = photo_keys[drawn] == positive_keys
        self.negatives = photo_ids[drawn].tolist()
        self.order = rng.permutation(len(self.queries)).tolist()

    def __len__(self) -> int:
        return len(self.queries)

    def _image(self, kind: str, item_id: int, path: str, bad: list[BadItem]) -> torch.Tensor:
        try:
            return decode(path, self.image_size, self.max_pixels)
        except BadInput as exc:
            bad.append([kind, item_id, path, exc.reason])
            return torch.zeros(3, self.image_size, self.image_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        query = self.queries[self.order[index]]
        negative = self.negatives[self.order[index]]
        is_text = query.path is None
        bad: list[BadItem] = []
        pixels = torch.zeros(3, self.image_size, self.image_size) if is_text else self._image(
            "query", query.query_id, query.path, bad)
        dim = len(next(iter(self.grams.values())))
        gram = np.zeros(dim, np.float32) if is_text else self.grams[query.query_id]
        labels = {} if self.classes is None else {
            "pos_class": self.classes[query.image_id], "neg_class": self.classes[negative]}
        return {
            **labels,
            "is_text": is_text,
            "text": query.text or "",
            "query_pixels": pixels,
            "query_gram": torch.as_tensor(gram),
            "pos_pixels": self._image("gallery", query.image_id, self.photos[query.image_id], bad),
            "pos_gram": torch.as_tensor(self.grams[query.image_id]),
            "neg_pixels": self._image("gallery", negative, self.photos[negative], bad),
            "neg_gram": torch.as_tensor(self.grams[negative]),
            "ok": not bad,
            "bad": bad,
        }


def collate_triplets(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """torch's default collation, except `bad`: one flat list of the batch's BadItems."""
    bad = [item for sample in samples for item in sample["bad"]]
    batch = default_collate([{k: v for k, v in s.items() if k != "bad"} for s in samples])
    return {**batch, "bad": bad}


def triplet_batches(data: TripletData, batch_size: int, num_workers: int,
                    pin_memory: bool) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, collate_fn=collate_triplets)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler) -> None:
    """Backward and step through the scaler: it unscales the gradients before the step and
    skips a step whose gradients overflowed (then lowers its scale)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def batch_loss(model: torch.nn.Module, batch: dict[str, Any], tokenize: Callable,
               loss_fn: Callable, margin: float, device: torch.device) -> torch.Tensor | None:
    """Mean symmetric triplet loss of a batch with text and image queries mixed, over the
    triplets whose images all decoded (`ok`); None when none did."""
    ok = batch["ok"]
    if not ok.all():
        if not ok.any():
            return None
        rows = ok.nonzero().flatten().tolist()
        batch = {k: v[ok] if isinstance(v, torch.Tensor) else [v[i] for i in rows]
                 for k, v in batch.items() if k != "bad"}
    move = {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if isinstance(v, torch.Tensor)}
    is_text = move["is_text"]
    positive = model.encode_image(move["pos_pixels"], move["pos_gram"])
    negative = model.encode_image(move["neg_pixels"], move["neg_gram"])
    query = torch.empty_like(positive)
    if is_text.any():
        texts = [t for t, flag in zip(batch["text"], is_text.tolist()) if flag]
        query[is_text] = model.encode_text(tokenize(texts).to(device)).to(query.dtype)
    if (~is_text).any():
        image = ~is_text
        query[image] = model.encode_image(move["query_pixels"][image],
                                          move["query_gram"][image]).to(query.dtype)
    return loss_fn(query, positive, negative, margin)


def train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, tokenize: Callable, loss_fn: Callable,
                margin: float, device: torch.device, amp: str,
                advance: Callable[[int], None], bad: list[BadItem],
                step_loss: Callable | None = None) -> float:
    """One pass over the loader; returns the mean loss (weighted by the triplets it was over).
    Images that did not decode are appended to `bad` (their triplets are left out).
    `step_loss`: a method's own batch loss (Method.batch_loss), else `batch_loss`."""
    step_loss = batch_loss if step_loss is None else step_loss
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        bad += batch["bad"]
        with autocast(device, amp):
            loss = step_loss(model, batch, tokenize, loss_fn, margin, device)
        if loss is not None:
            optimizer_step(loss, optimizer, scaler)
            n = int(batch["ok"].sum())
            total += float(loss.detach()) * n
            count += n
        advance(len(batch["text"]))
    return total / count if count else float("nan")


def recall_at_1(query_emb: np.ndarray, query_targets: np.ndarray, gallery_emb: np.ndarray,
                gallery_ids: np.ndarray) -> float:
    """Fraction of queries whose nearest gallery item (inner product) is their target."""
    if len(query_emb) == 0:
        return float("nan")
    best = np.argmax(query_emb @ gallery_emb.T, axis=1)
    return float(np.mean(gallery_ids[best] == query_targets))


def validation_gallery(held_out: dict[int, str], others: dict[int, str], distractors: int,
                       seed: int) -> dict[int, str]:
    """The photos validation ranks against: every held-out photo plus up to `distractors` of
    the `others`, a seeded choice that does not depend on how many there are."""
    ranked = sorted(others, key=lambda i: stable_uniform(seed, f"distractor:{i}"))
    return {**held_out, **{i: others[i] for i in ranked[:distractors]}}


@torch.no_grad()
def validate(model: torch.nn.Module, queries: Sequence[Query], photos: dict[int, str],
             grams: dict[int, Any], tokenize: Callable, image_size: int, max_pixels: int,
             device: torch.device, amp: str, batch_size: int,
             bad: list[BadItem] | None = None) -> dict[str, float]:
    """Recall@1 per query style against `photos` (the held-out photos, which the queries
    target, and any distractors: `validation_gallery`), and their mean. Images that do not
    decode are left out (with the queries of a photo that does not) and appended to `bad`."""
    model.eval()
    bad = [] if bad is None else bad

    # Image queries through the model's query encoder where it has one (SpLIP's sketch domain).
    encode_query = getattr(model, "encode_query", model.encode_image)

    def encode_images(kind: str, keys: Sequence[int],
                      paths: Sequence[str]) -> tuple[list[int], np.ndarray]:
        def encode(pixels: torch.Tensor, items: list[ImageItem]) -> torch.Tensor:
            gram = torch.stack([torch.as_tensor(grams[i.item_id]) for i in items]).to(device)
            return (encode_query if kind == "query" else model.encode_image)(pixels, gram)

        done = encode_items([ImageItem(kind, key, path) for key, path in zip(keys, paths)],
                            encode, image_size=image_size, max_pixels=max_pixels,
                            batch_size=batch_size, num_workers=0, device=device, amp=amp)
        bad.extend([item.item_kind, item.item_id, item.path, reason]
                   for item, reason in done.failures)
        out = done.out if done.items else np.zeros((0, 1), np.float32)
        return [item.item_id for item in done.items], out

    keys = sorted(photos)
    ids, gallery = encode_images("gallery", keys, [photos[i] for i in keys])
    photo_ids = np.array(ids, dtype=np.int64)
    decoded = set(ids)
    result = {}
    for style in sorted({q.style for q in queries}):
        subset = [q for q in queries if q.style == style and q.image_id in decoded]
        if not subset:
            continue
        if style == "text" or subset[0].path is None:
            embs = []
            for start in range(0, len(subset), batch_size):
                tokens = tokenize([q.text for q in subset[start:start + batch_size]])
                with autocast(device, amp):
                    embs.append(model.encode_text(tokens.to(device)).float().cpu().numpy())
            emb = np.concatenate(embs)
        else:
            done, emb = encode_images("query", [q.query_id for q in subset],
                                      [q.path for q in subset])
            kept = set(done)
            subset = [q for q in subset if q.query_id in kept]
        targets = np.array([q.image_id for q in subset], dtype=np.int64)
        result[f"val_recall@1/{style}"] = recall_at_1(emb, targets, gallery, photo_ids)
    result["val_recall@1"] = float(np.nanmean(list(result.values()))) if result else float("nan")
    return result


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Torch's global RNG seeded from the run's seed inside, restored after: a training run
    does not depend on (or change) what the process drew before, and its checkpoints store the
    same RNG state in identical runs."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# -- checkpoints --------------------------------------------------------------------------

CHECKPOINT_PREFIX = "epoch-"


def checkpoint_paths(directory: Path, epoch: int) -> tuple[Path, Path]:
    stem = directory / f"{CHECKPOINT_PREFIX}{epoch:03d}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def save_checkpoint(directory: Path, epoch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    history: History, config: dict[str, Any]) -> Path:
    """Weights + optimizer + loss scale + RNG state, then the JSON sidecar last (its existence
    = complete)."""
    weights, sidecar = checkpoint_paths(directory, epoch)
    # Through memory: torch.save names the archive inside the file after the file it writes,
    # and the temporary name holds the pid, so identical runs would write different bytes.
    buffer = io.BytesIO()
    torch.save({"model": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()}, buffer)
    write_bytes(buffer.getvalue(), weights)
    meta = {"epoch": epoch, "config": config, "history": asdict(history)}
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return weights


def latest_checkpoint(directory: Path) -> int | None:
    """The last epoch whose checkpoint is complete (sidecar present), or None."""
    epochs = []
    for sidecar in directory.glob(f"{CHECKPOINT_PREFIX}*.json"):
        weights = sidecar.with_suffix(".pt")
        if weights.exists():
            epochs.append(int(sidecar.stem[len(CHECKPOINT_PREFIX):]))
    return max(epochs) if epochs else None


def load_checkpoint(directory: Path, epoch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> History:
    weights, sidecar = checkpoint_paths(directory, epoch)
    state = torch.load(weights, map_location="cpu", weights_only=False)
    model.load_trainable_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    # A checkpoint from a run without fp16 (CPU, bf16) has an empty scaler state: a resumed
    # fp16 run starts from the default scale.
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return History(**json.loads(sidecar.read_text())["history"])


def prune_checkpoints(directory: Path, keep: Sequence[int]) -> None:
    """Delete epoch checkpoints other than `keep` (the latest and the best)."""
    for path in directory.glob(f"{CHECKPOINT_PREFIX}*"):
        try:
            epoch = int(path.stem[len(CHECKPOINT_PREFIX):])
        except ValueError:
            continue
        if epoch not in keep:
            path.unlink(missing_ok=True)


# -- the epoch loop -----------------------------------------------------------------------


@dataclass
class Fit:
    """What `fit` trains and where: the model with its optimizer and loss scaler, the folder
    its checkpoints go to, the config each checkpoint carries, and the bad inputs met since the
    last checkpoint (the epoch and validation passes append to `bad`)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    out: Path
    config: dict[str, Any]
    bad: list[BadItem] = field(default_factory=list)


def fit(state: Fit, epochs: int, patience: int, run_epoch: Callable[[int], float],
        evaluate: Callable[[], dict[str, float]], log: logging.Logger,
        name: str = "train") -> History:
    """Train up to `epochs` and return the history. Epoch 0 is `evaluate()` before any step
    (the untrained model, the reference to beat); then per epoch `run_epoch(epoch)` (its mean
    loss) and `evaluate()` ({"val_recall@1": ..., ...}), a checkpoint after each, the latest
    and the best kept. Resumes after the latest complete checkpoint in `state.out`; stops
    early after `patience` epochs without a better validation score. `name` prefixes the
    log lines."""
    start = latest_checkpoint(state.out)
    if start is None:
        history = History()
        _end_epoch(state, history, 0, {"loss": None, **evaluate()}, log, name)
        start = 0
    else:
        history = load_checkpoint(state.out, start, state.model, state.optimizer, state.scaler)
        log.info("%s: resuming after epoch %d (best so far: epoch %d, R@1 %.3f)", name, start,
                 history.best_epoch, history.best_score)
    for epoch in range(start + 1, epochs + 1):
        if history.bad_epochs >= patience:
            log.info("%s: early stop, no better validation R@1 for %d epochs", name,
                     history.bad_epochs)
            break
        loss = run_epoch(epoch)
        _end_epoch(state, history, epoch, {"loss": loss, **evaluate()}, log, name)
    return history


def _end_epoch(state: Fit, history: History, epoch: int, metrics: dict[str, Any],
               log: logging.Logger, name: str) -> None:
    for kind, item_id, path, reason in history.add_bad_inputs(state.bad):
        log.warning("%s: %s %d (%s) is a bad input now (%s), though extract read it; left "
                    "out of training and recorded", name, kind, item_id, path, reason)
    state.bad.clear()
    best = history.update(epoch, metrics)
    save_checkpoint(state.out, epoch, state.model, state.optimizer, state.scaler, history,
                    state.config)
    prune_checkpoints(state.out, keep={epoch, history.best_epoch})
    loss = "-" if metrics["loss"] is None else f"{metrics['loss']:.4f}"  # None at epoch 0
    log.info("%s epoch %d: loss %s, validation R@1 %.3f%s", name, epoch, loss,
             metrics["val_recall@1"], " (best)" if best else "")
