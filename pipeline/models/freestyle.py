"""FreestyleRet: style-initialised prompt tuning on a frozen CLIP ViT (docs/method.md section 3).

    model = FreestyleRet(clip, gram_encoder, centres, temperature=1.0, spec=PromptSpec())
    x = model.encode_image(images)             # RGB [0, 1] at the Gram encoder's size, L2
    x = model.encode_image(images, gram=g)     # same, with cached Gram vectors (training)
    t = model.encode_text(tokens)              # frozen CLIP text tower, L2
    loss = triplet_loss(query, positive, negative, margin=1.0)

Token layout (L vision layers, S = shallow layers, n = prompt tokens, P = patches); the
sequence is always [CLS, n prompt tokens, P patches], length 1 + n + P::

    layer 0        prompts INSERTED after CLS: shallow generator (S > 0), else deep
    layers 1..S-1  the shallow prompts are carried through (VPT-shallow)
    layers S..L-1  prompt positions REPLACED by that layer's deep generator (VPT-deep)
    after layer L-1 the prompt tokens are dropped, then open_clip's pooling + ln_post + proj

S = -1 means L // 2; S = 0 makes every layer deep; S = L every layer shallow.
Generator inputs: "style" = s_i = style_feature_torch(g_i, centres, T), "gram" = g_i,
"random" = free learned tokens (input-independent, as in VPT).

Choices where the paper is vague (see docs/method.md):
- Generator: one Linear(gram_dim, n * width) per prompted layer (layer 0 and every replaced
  layer); the features are already L2-normalised 256-d vectors, so a linear map is enough to
  place n tokens and keeps the count small (ViT-B-32, 4 tokens: ~5.5M trainable).
- Init: weights N(0, 0.02^2), bias 0, free tokens N(0, 0.02^2) (VPT-like scale). The blocks'
  ln_1 normalise each token, so attention sees only a token's direction; a small scale lets
  Adam's fixed-size steps (lr 1e-5) turn that direction appreciably. It cannot make the
  untrained model equal to CLIP (attention to any extra token changes the CLS), so epoch 0 of
  training measures the untrained prompts.
- Prompts enter after ln_pre (in the residual stream, where replaced deep tokens also live).
- Trainable: the generators and the vision LayerNorms (ln_pre, each block's ln_1 / ln_2,
  ln_post). Frozen: all the rest of CLIP (text tower included) and the VGG / Gram path.
- Prompt tokens are excluded from "avg" pooling (they are not image patches).
- The frozen CLIP and Gram encoder stay in eval mode even in model.train() (no patch dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.gram import GramEncoder
from pipeline.models.clip import clip_image_size, clip_pixels, encode_text, pool_visual
from pipeline.style_space import style_feature_torch

PromptInit = Literal["style", "gram", "random"]
PROMPT_INITS = ("style", "gram", "random")
# What trains besides the frozen rest (docs/method.md 3 and 8): "paper" = the prompt
# generators + vision LayerNorms; "authors" = what the authors' code leaves trainable: the
# generators and every CLIP parameter that is not the weight or bias of a non-LayerNorm module
# (all LayerNorms of both towers, the attention in-projections, class / positional embeddings,
# projections); "layernorm" = the vision LayerNorms alone, no prompts (a control).
TrainableSet = Literal["paper", "authors", "layernorm"]
TRAINABLE_SETS = ("paper", "authors", "layernorm")
# Std of generator weights and of free tokens: per-dimension token scale for a unit input.
PROMPT_INIT_STD = 0.02


@dataclass(frozen=True)
class PromptSpec:
    """Prompt layout (docs/method.md 3); paper best: 4 tokens, shallow=style, deep=gram."""

    n_tokens: int = 4
    shallow_init: PromptInit = "style"
    deep_init: PromptInit = "gram"
    # Vision layers that use the shallow prompts; -1 = half of them (rounded down),
    # 0 = every layer deep, = number of layers: every layer shallow.
    shallow_layers: int = -1

    def __post_init__(self) -> None:
        if isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int) \
                or self.n_tokens < 1:
            raise ValueError(f"PromptSpec.n_tokens must be an int >= 1; got {self.n_tokens!r}")
        for name in ("shallow_init", "deep_init"):
            value = getattr(self, name)
            if value not in PROMPT_INITS:
                raise ValueError(f"PromptSpec.{name} must be one of {PROMPT_INITS}; got {value!r}")
        if isinstance(self.shallow_layers, bool) or not isinstance(self.shallow_layers, int) \
                or self.shallow_layers < -1:
            raise ValueError("PromptSpec.shallow_layers must be an int >= -1 (-1 = half of the "
                             f"vision layers); got {self.shallow_layers!r}")

    def resolve_shallow_layers(self, n_layers: int) -> int:
        """The number of shallow layers for a ViT with `n_layers` blocks."""
        if self.shallow_layers == -1:
            return n_layers // 2
        if self.shallow_layers > n_layers:
            raise ValueError(f"PromptSpec.shallow_layers={self.shallow_layers} exceeds the "
                             f"{n_layers} vision layers of this CLIP")
        return self.shallow_layers


class PromptGenerator(nn.Module):
    """The n prompt tokens of one layer: feature (N, in_dim) -> (N, n, width)."""

    def __init__(self, source: PromptInit, in_dim: int, n_tokens: int, width: int) -> None:
        super().__init__()
        self.source = source
        self.n_tokens = n_tokens
        self.width = width
        if source == "random":
            self.tokens = nn.Parameter(torch.randn(n_tokens, width) * PROMPT_INIT_STD)
        else:
            self.proj = nn.Linear(in_dim, n_tokens * width)
            nn.init.normal_(self.proj.weight, std=PROMPT_INIT_STD)
            nn.init.zeros_(self.proj.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.source == "random":  # input-independent; the feature only gives N
            return self.tokens.unsqueeze(0).expand(feature.shape[0], -1, -1)
        return self.proj(feature).view(feature.shape[0], self.n_tokens, self.width)


def _check_visual(visual: nn.Module | None) -> VisionTransformer:
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            "FreestyleRet needs an open_clip VisionTransformer image tower; got "
            f"{type(visual).__name__} (timm and ResNet towers are not supported)"
        )
    if visual.attn_pool is not None:
        raise NotImplementedError("FreestyleRet does not support attentional pooling "
                                  "(vision_cfg.attentional_pool); use a tok/avg-pooled ViT")
    if visual.pool_type not in ("tok", "avg"):
        raise NotImplementedError(f"FreestyleRet supports pool_type 'tok' and 'avg'; got "
                                  f"{visual.pool_type!r}")
    if not getattr(visual.transformer, "batch_first", True):
        raise NotImplementedError("FreestyleRet needs a batch-first vision transformer")
    return visual


class FreestyleRet(nn.Module):
    """Frozen CLIP + frozen Gram encoder + trainable prompt generators and vision LayerNorms."""

    def __init__(self, clip: nn.Module, gram_encoder: GramEncoder, centres: torch.Tensor,
                 temperature: float, spec: PromptSpec, trainable: TrainableSet = "paper") -> None:
        super().__init__()
        if trainable not in TRAINABLE_SETS:
            raise ValueError(f"trainable must be one of {TRAINABLE_SETS}; got {trainable!r}")
        visual = _check_visual(getattr(clip, "visual", None))
        centres = torch.as_tensor(centres, dtype=torch.float32)
        if centres.ndim != 2 or centres.shape[1] != gram_encoder.out_dim:
            raise ValueError(f"centres must be (k, {gram_encoder.out_dim}) to match the Gram "
                             f"encoder; got {tuple(centres.shape)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.clip = clip
        self.gram_encoder = gram_encoder
        self.register_buffer("centres", centres.clone())
        self.temperature = float(temperature)
        self.spec = spec
        self.n_layers = len(visual.transformer.resblocks)
        self.width = visual.conv1.out_channels
        self.gram_dim = gram_encoder.out_dim
        self.shallow_layers = spec.resolve_shallow_layers(self.n_layers)
        # Layers whose prompt positions are overwritten (VPT-deep); layer 0 always inserts.
        self.replaced_layers = tuple(range(max(self.shallow_layers, 1), self.n_layers))

        self.trainable = trainable
        self.use_prompts = trainable != "layernorm"
        clip.requires_grad_(False)
        gram_encoder.requires_grad_(False)
        if trainable == "authors":  # their freeze_all_but_bn: weight/bias of non-LayerNorms
            clip.requires_grad_(True)
            for module in clip.modules():
                if not isinstance(module, nn.LayerNorm):
                    for name in ("weight", "bias"):
                        if isinstance(getattr(module, name, None), nn.Parameter):
                            getattr(module, name).requires_grad_(False)
        for norm in self._vision_layernorms():
            norm.requires_grad_(True)
        first = spec.shallow_init if self.shallow_layers > 0 else spec.deep_init
        generators = {"0": PromptGenerator(first, self.gram_dim, spec.n_tokens, self.width)}
        for layer in self.replaced_layers:
            generators[str(layer)] = PromptGenerator(spec.deep_init, self.gram_dim,
                                                     spec.n_tokens, self.width)
        self.generators = nn.ModuleDict(generators)
        if not self.use_prompts:  # built all the same: the seeded init stays the same
            self.generators.requires_grad_(False)
        # Text tower parameters that train (the "authors" set): encode_text keeps their graph.
        self.text_trains = any(p.requires_grad for name, p in clip.named_parameters()
                               if not name.startswith("visual."))
        self.train(False)

    def _vision_layernorms(self) -> list[nn.LayerNorm]:
        visual = self.clip.visual
        norms = [visual.ln_pre]
        for block in visual.transformer.resblocks:
            norms += [block.ln_1, block.ln_2]
        norms.append(visual.ln_post)
        return [norm for norm in norms if isinstance(norm, nn.LayerNorm)]

    def train(self, mode: bool = True) -> FreestyleRet:
        super().train(mode)
        # Frozen parts stay in eval mode (no patch dropout) whatever the training loop says.
        self.clip.eval()
        self.gram_encoder.eval()
        return self

    @property
    def clip_image_size(self) -> int:
        return clip_image_size(self.clip)

    @property
    def uses_gram(self) -> bool:
        """Whether any prompt is made from the Gram vector or style feature (not VPT's free
        tokens alone): without, encode_image skips the Gram path."""
        return self.use_prompts and any(g.source != "random" for g in self.generators.values())

    @property
    def prompt_layers(self) -> tuple[int, ...]:
        """Layers at whose input prompt tokens are placed: 0 (inserted), then replaced ones."""
        return (0, *self.replaced_layers)

    def prompt_tokens(self, gram: torch.Tensor) -> dict[int, torch.Tensor]:
        """{layer: (N, n_tokens, width)} tokens placed at the input of each prompted layer."""
        if gram.ndim != 2 or gram.shape[1] != self.gram_dim:
            raise ValueError(f"gram must be (N, {self.gram_dim}); got {tuple(gram.shape)}")
        gram = gram.float()
        features = {"gram": gram}
        if any(g.source == "style" for g in self.generators.values()):
            features["style"] = style_feature_torch(gram, self.centres, self.temperature)
        return {int(layer): generator(features.get(generator.source, gram))
                for layer, generator in self.generators.items()}

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """open_clip's patch + CLS + positional embedding, patch dropout, ln_pre."""
        visual = self.clip.visual
        x = visual.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x)

    def vision_features(self, pixels: torch.Tensor,
                        prompts: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """CLIP-ready pixels -> unnormalised features; prompts=None is the plain CLIP ViT."""
        transformer = self.clip.visual.transformer
        x = self._embed(pixels)
        n = self.spec.n_tokens if prompts else 0
        for layer, block in enumerate(transformer.resblocks):
            if prompts and layer in prompts:
                rest = x[:, 1:] if layer == 0 else x[:, 1 + n:]
                x = torch.cat([x[:, :1], prompts[layer].to(x.dtype), rest], dim=1)
            if transformer.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if n:
            x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
        return pool_visual(self.clip.visual, x)

    def encode_image(self, images: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
        """RGB [0, 1] (N, 3, H, W) -> (N, embed_dim) float32, L2 (docs/method.md 3 and 4).

        The Gram path sees `images` as given (H, W = the Gram encoder's size); `gram` may be
        the cached output of the same encoder instead. The ViT sees them resized to the CLIP
        size and CLIP-normalised.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) RGB; got {tuple(images.shape)}")
        if gram is None and not self.uses_gram:  # free tokens only: read just for the size
            gram = images.new_zeros(images.shape[0], self.gram_dim)
        elif gram is None:
            with torch.no_grad():  # frozen and deterministic: nothing to backpropagate into
                gram = self.gram_encoder(images)
        elif gram.shape != (images.shape[0], self.gram_dim):
            raise ValueError(f"gram must be ({images.shape[0]}, {self.gram_dim}) for these "
                             f"images; got {tuple(gram.shape)}")
        prompts = self.prompt_tokens(gram.to(images.device)) if self.use_prompts else None
        features = self.vision_features(clip_pixels(self.clip, images), prompts)
        return F.normalize(features.float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP text tower (docs/method.md 3: no style adaptation), float32, L2; frozen unless
        the "authors" trainable set trains its LayerNorms and in-projections."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trains):
            return encode_text(self.clip, tokens)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable tensors only (by default generators + vision LayerNorms)."""
        return {name: p.detach().clone() for name, p in self.named_parameters()
                if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what trainable_state_dict returned; keys and shapes must match exactly."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"trainable state does not fit this model (different arch or "
                             f"prompt spec?): missing {missing}, unexpected {unexpected}")
        wrong = [f"{name}: {tuple(state[name].shape)} vs {tuple(p.shape)}"
                 for name, p in params.items() if state[name].shape != p.shape]
        if wrong:
            raise ValueError(f"trainable state shapes do not fit this model: {wrong}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(device=p.device, dtype=p.dtype))

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts; frozen includes CLIP and the VGG."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return trainable, frozen


def triplet_loss(query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float = 1.0) -> torch.Tensor:
    """Symmetric triplet loss, d(x, y) = 1 - cos(x, y) (docs/method.md 3), batch of B rows::

        query->image  L_qi = mean_i relu(d(q_i, p_i) - d(q_i, n_i) + margin)
        image->query  L_iq = mean_i relu(d(p_i, q_i) - d(p_i, q_(i+1 mod B)) + margin)
        loss = (L_qi + L_iq) / 2        (B = 1: L_qi alone, there is no other query)

    q = query embeddings, p = their ground-truth photos, n = random other photos. The
    image->query negative is the next query in the batch (rolled by one).
    """
    if query.shape != positive.shape or query.shape != negative.shape or query.ndim != 2:
        raise ValueError(f"query, positive, negative must be the same (B, D) shape; got "
                         f"{tuple(query.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}")
    q, p, n = query.float(), positive.float(), negative.float()
    d_qp = 1.0 - F.cosine_similarity(q, p, dim=1)
    query_to_image = F.relu(d_qp - (1.0 - F.cosine_similarity(q, n, dim=1)) + margin).mean()
    if q.shape[0] < 2:
        return query_to_image
    other_query = torch.roll(q, shifts=-1, dims=0)
    d_p_other = 1.0 - F.cosine_similarity(p, other_query, dim=1)
    image_to_query = F.relu(d_qp - d_p_other + margin).mean()
    return (query_to_image + image_to_query) / 2
