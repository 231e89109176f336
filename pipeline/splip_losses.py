"""SpLIP's losses (docs/method.md 9): adaptive-margin triplet, image-text classification over
the training classes, conditional jigsaw; and `batch_loss`, their weighted sum over one
training batch (the train stage's step for method `splip`).

    mu = adaptive_margins(class_text, pos_class, neg_class)   # cos(F_t(c+), F_t(c-))
    loss = triplet(anchor, positive, negative, mu)            # splip.triplet = false: left out
    loss = loss + alpha * classification(logits, labels)
    loss = loss + beta * jigsaw(solved_self, solved_pos, solved_neg, target,
                                conditional=True, margin=0.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SplipLossSpec:
    """The loss side of [splip] (pipeline.config.SplipConfig)."""

    triplet: bool = True  # the triplet term; off = the paper's Table 5 "L_class" row
    margin: Literal["adaptive", "fixed"] = "adaptive"
    fixed_margin: float = 0.2
    alpha: float = 1.0   # classification weight; 0 = off (not computed)
    beta: float = 1.0    # jigsaw weight; 0 = off (no solver)
    jigsaw_conditional: bool = True
    jigsaw_margin: float = 0.0


def adaptive_margins(class_text: torch.Tensor, pos_class: torch.Tensor,
                     neg_class: torch.Tensor) -> torch.Tensor:
    """mu(c+, c-) = cos(F_t(c+), F_t(c-)) per triplet: class_text (C, D) rows L2."""
    return (class_text[pos_class] * class_text[neg_class]).sum(dim=-1)


def triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
            margins: torch.Tensor | float) -> torch.Tensor:
    """mean relu(d(a, p) - d(a, n) + mu), d = 1 - cos; (B, D) rows, mu (B,) or a number."""
    d_ap = 1.0 - F.cosine_similarity(anchor.float(), positive.float(), dim=1)
    d_an = 1.0 - F.cosine_similarity(anchor.float(), negative.float(), dim=1)
    return F.relu(d_ap - d_an + margins).mean()


def classification(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of image-to-class-text logits (N, C) against class indices (N,)."""
    return F.cross_entropy(logits.float(), labels)


def jigsaw(solved_self: torch.Tensor, solved_pos: torch.Tensor | None,
           solved_neg: torch.Tensor | None, target: torch.Tensor, conditional: bool,
           margin: float) -> torch.Tensor:
    """Conditional cross-modal jigsaw (docs/method.md 9): the cross-entropy of the shuffled
    sketch's permutation solved beside the unshuffled sketch (`solved_self`); conditional adds
    the hinge mean relu(CE(with positive photo) - CE(with negative photo) + margin): the
    positive photo must help solve it more than the negative one."""
    loss = F.cross_entropy(solved_self.float(), target)
    if not conditional:
        return loss
    ce_pos = F.cross_entropy(solved_pos.float(), target, reduction="none")
    ce_neg = F.cross_entropy(solved_neg.float(), target, reduction="none")
    return loss + F.relu(ce_pos - ce_neg + margin).mean()


def batch_loss(model: torch.nn.Module, batch: dict[str, Any], tokenize: Callable,
               loss_fn: Callable | None, margin: float, device: torch.device
               ) -> torch.Tensor | None:
    """SpLIP's loss over a batch of (query, photo, photo of another class) triplets: the
    image queries (any style, through the query domain) whose images all decoded; text
    queries are left out (SpLIP trains sketch -> photo). None when no row is left.
    `tokenize`, `loss_fn` and `margin` are the generic step's and unused: the weights come
    from the model's `loss_spec` ([splip])."""
    del tokenize, loss_fn, margin
    keep = batch["ok"] & ~batch["is_text"]
    if not keep.any():
        return None
    move = {k: v[keep].to(device, non_blocking=True) for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k in ("query_pixels", "pos_pixels",
                                                     "neg_pixels", "pos_class", "neg_class")}
    spec: SplipLossSpec = model.loss_spec
    use_logits = spec.alpha > 0
    anchor = model.forward_images(move["query_pixels"], "query", logits=use_logits)
    positive = model.forward_images(move["pos_pixels"], "photo", logits=use_logits)
    negative = model.forward_images(move["neg_pixels"], "photo", logits=use_logits)
    pos_class, neg_class = move["pos_class"], move["neg_class"]
    margins = adaptive_margins(model.class_text, pos_class, neg_class) \
        if spec.margin == "adaptive" else spec.fixed_margin
    loss = triplet(anchor.embedding, positive.embedding, negative.embedding, margins) \
        if spec.triplet else anchor.embedding.new_zeros(())
    if use_logits:
        logits = torch.cat([anchor.logits, positive.logits, negative.logits])
        labels = torch.cat([pos_class, pos_class, neg_class])
        loss = loss + spec.alpha * classification(logits, labels)
    if spec.beta > 0:
        loss = loss + spec.beta * _jigsaw_term(model, move["query_pixels"], anchor.tokens,
                                               positive.tokens, negative.tokens, spec)
    return loss


def _jigsaw_term(model: torch.nn.Module, sketches: torch.Tensor, self_tokens: torch.Tensor,
                 pos_tokens: torch.Tensor, neg_tokens: torch.Tensor,
                 spec: SplipLossSpec) -> torch.Tensor:
    """Shuffle each anchor by a permutation drawn from torch's global RNG (seeded by the
    train stage, saved in every checkpoint: resumable), encode it, solve it beside the
    unshuffled anchor and (conditional) beside the positive and the negative photo."""
    from pipeline.models.splip import shuffle_tiles

    choice = torch.randint(len(model.permutations), (sketches.shape[0],))  # CPU RNG
    target = choice.to(sketches.device)
    shuffled = shuffle_tiles(sketches, model.permutations[target], model.spec.jigsaw_grid)
    tokens = model.forward_images(shuffled, "query", logits=False).tokens
    solved_self = model.solve_jigsaw(tokens, self_tokens)
    solved_pos = model.solve_jigsaw(tokens, pos_tokens) if spec.jigsaw_conditional else None
    solved_neg = model.solve_jigsaw(tokens, neg_tokens) if spec.jigsaw_conditional else None
    return jigsaw(solved_self, solved_pos, solved_neg, target, spec.jigsaw_conditional,
                  spec.jigsaw_margin)
