"""SpLIP (Singha et al., ECCV 2024, arXiv 2407.04207): bidirectional vision<->text prompts on a
frozen CLIP ViT, for sketch -> photo retrieval (docs/method.md 9).

    model = Splip(clip, tokenizer, classes=["cat", "dog"], spec=SplipSpec(), seed=0)
    x = model.encode_image(photos)            # gallery photos, "photo of a" domain, L2
    q = model.encode_query(sketches)          # image queries, "sketch of a" domain, L2
    out = model.forward_images(pixels, "query")   # embedding, class logits, patch tokens
    t = model.encode_text(tokens)             # text queries: CLIP's text tower, L2

The three mapping blocks (each LayerNorm + Linear; docs/method.md 9 says why):

    B_t   vision -> text: the mean patch embedding of the image (conv1 output) -> m text
          tokens, placed after SOT in every text layer (the same m tokens, replaced per layer).
    B_v   text -> vision: the token embeddings of the domain words ("photo of a" /
          "sketch of a", no class name) -> J - 1 visual tokens, one per word token, the
          same in every vision layer.
    B_vt  text -> vision, layer-wise: text layer t's EOT output over *all training class
          names* (with the B_t tokens in), averaged over the classes -> n visual tokens for
          the vision layer that reads text layer t (t = l * L_text // L_vision).

The text pass over the C training class names ("X X X X <domain words> <class>.", X = the
m B_t positions) gives both the B_vt tokens and the class text features of the
classification loss. With B_t on it depends on the image (C sequences per image); with B_t
off it does not, and in eval mode it is computed once per domain and cached. Sequences are
cut after the longest EOT: the text tower is causal, so the EOT outputs are exactly those
of the full 77-token context.

Vision sequence: [CLS, J - 1 B_v tokens, n B_vt tokens, P patches]; prompts are inserted
after ln_pre at layer 0 and replaced at the input of every later layer, then dropped before
pooling (as FreestyleRet's). Trainable: every LayerNorm of both towers (unless
splip.layernorm = false), B_t, B_v, B_vt and the jigsaw solver; the rest of CLIP is frozen
and stays in eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.clip import clip_image_size, clip_pixels, encode_text, pool_visual
from pipeline.models.freestyle import PROMPT_INIT_STD, _check_visual
from pipeline.splip_losses import SplipLossSpec

DOMAINS = ("photo", "query")
# Placeholder word whose token positions the B_t tokens take (CoOp's "X X X X").
PLACEHOLDER = "X"
# Width of the jigsaw solver (at most the vision width): a small head, docs/method.md 9.
SOLVER_WIDTH = 256
CLASSES_KEY = "splip.classes"  # the class names, stored with the trainable tensors


@dataclass(frozen=True)
class SplipSpec:
    """SpLIP's structure ([splip] in pipeline.toml; the paper's defaults, docs/method.md 9)."""

    text_tokens: int = 4          # m: B_t tokens in the text tower
    layer_tokens: int = 2         # n: B_vt tokens per vision layer
    gallery_words: str = "photo of a"
    query_words: str = "sketch of a"
    vision_to_text: bool = True   # B_t
    text_to_vision: bool = True   # B_v
    layer_prompts: bool = True    # B_vt
    layernorm: bool = True        # train CLIP's LayerNorms (off: Table 6 "w/o LayerNorm")
    jigsaw_grid: int = 3
    jigsaw_permutations: int = 24
    jigsaw: bool = True           # build the solver (loss weight beta > 0)

    def words(self, domain: str) -> str:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}; got {domain!r}")
        return self.gallery_words if domain == "photo" else self.query_words


@dataclass
class SplipOutput:
    """One batch through the image tower: L2 embedding (N, D), classification logits over
    the training classes (N, C) or None, final-layer patch tokens (N, P, width)."""

    embedding: torch.Tensor
    logits: torch.Tensor | None
    tokens: torch.Tensor


def jigsaw_permutations(grid: int, count: int, seed: int) -> torch.Tensor:
    """(count, grid * grid) distinct non-identity tile permutations, a pure function of seed."""
    tiles = grid * grid
    if count < 1 or count > math.factorial(tiles) - 1:
        raise ValueError(f"jigsaw permutations must be in 1..{math.factorial(tiles) - 1} for a "
                         f"{grid}x{grid} grid; got {count}")
    rng = np.random.default_rng([seed, 7121])  # 7121: this use of the seed, not another's
    found: dict[tuple[int, ...], None] = {}
    identity = tuple(range(tiles))
    while len(found) < count:
        perm = tuple(int(i) for i in rng.permutation(tiles))
        if perm != identity:
            found.setdefault(perm, None)
    return torch.tensor(list(found), dtype=torch.long)


def shuffle_tiles(images: torch.Tensor, perms: torch.Tensor, grid: int) -> torch.Tensor:
    """Tile i of each output image is tile perms[n, i] of its input; (N, C, H, W) in and out.
    Tiles are (H // grid, W // grid); pixels past grid * tile stay where they are.
    `shuffle_tiles(shuffle_tiles(x, p), p.argsort(1))` is x."""
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"images of {h}x{w} are too small for a {grid}x{grid} jigsaw")
    core = images[:, :, :grid * th, :grid * tw]
    tiles = core.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, grid * grid, c, th, tw)
    index = perms.to(images.device).view(n, grid * grid, 1, 1, 1).expand_as(tiles)
    moved = tiles.gather(1, index).reshape(n, grid, grid, c, th, tw)
    moved = moved.permute(0, 3, 1, 4, 2, 5).reshape(n, c, grid * th, grid * tw)
    out = images.clone()
    out[:, :, :grid * th, :grid * tw] = moved
    return out


def _mapping(in_dim: int, tokens: int, width: int) -> nn.Sequential:
    """LayerNorm + Linear(in_dim, tokens * width): inputs of any scale to `tokens` tokens."""
    linear = nn.Linear(in_dim, tokens * width)
    nn.init.normal_(linear.weight, std=PROMPT_INIT_STD)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.LayerNorm(in_dim), linear)


class JigsawSolver(nn.Module):
    """Permutation class of a shuffled sketch given a photo: both images' patch tokens, one
    sequence [sketch tokens; photo tokens] (+ segment and position embeddings), a 2-layer
    transformer, the sketch half mean-pooled, a linear head -> (N, K) logits."""

    def __init__(self, width: int, patches: int, classes: int) -> None:
        super().__init__()
        dim = min(width, SOLVER_WIDTH)
        self.proj = nn.Linear(width, dim)
        self.position = nn.Parameter(torch.randn(2 * patches, dim) * PROMPT_INIT_STD)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)
        self.patches = patches

    def forward(self, sketch: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
        x = self.proj(torch.cat([sketch, photo], dim=1).float()) + self.position
        return self.head(self.encoder(x)[:, :self.patches].mean(dim=1))


class Splip(nn.Module):
    """Frozen CLIP ViT + B_t, B_v, B_vt, the jigsaw solver and every LayerNorm trainable."""

    def __init__(self, clip: nn.Module, tokenizer, classes: list[str],  # noqa: ANN001
                 spec: SplipSpec, seed: int = 0, loss_spec: SplipLossSpec | None = None) -> None:
        super().__init__()
        self.loss_spec = SplipLossSpec() if loss_spec is None else loss_spec
        visual = _check_visual(getattr(clip, "visual", None))
        if not hasattr(clip, "token_embedding") or getattr(clip, "text_pool_type", "") != "argmax":
            raise NotImplementedError("SpLIP needs open_clip's built-in CLIP text tower "
                                      "(token embedding, argmax/EOT pooling); this CLIP has a "
                                      "custom text tower")
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"SpLIP needs >= 2 distinct training class names; got {classes!r}")
        self.clip, self.spec, self.classes = clip, spec, list(classes)
        self.vision_layers = len(visual.transformer.resblocks)
        self.text_layers = len(clip.transformer.resblocks)
        self.width = visual.conv1.out_channels
        self.text_width = clip.token_embedding.embedding_dim
        m, tw = spec.text_tokens, self.text_width
        clip.requires_grad_(False)
        with torch.no_grad():  # the frozen CLIP's class-name embeddings: adaptive margins
            prompts = tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in classes])
            class_text = encode_text(clip, prompts.to(_device(clip)))
        self.register_buffer("class_text", class_text)
        for norm in self._layernorms() if spec.layernorm else []:
            norm.requires_grad_(True)
        placeholders = " ".join([PLACEHOLDER] * m) + " " if spec.vision_to_text else ""
        for domain in DOMAINS:
            words = spec.words(domain)
            tokens = tokenizer([f"{placeholders}{words} {c.replace('_', ' ')}." for c in classes])
            length = int(tokens.argmax(dim=-1).max()) + 1  # causal: nothing after EOT matters
            self.register_buffer(f"class_tokens_{domain}", tokens[:, :length].clone())
            word_ids = tokenizer([words])[0]
            self.register_buffer(f"word_tokens_{domain}", word_ids[1:int(word_ids.argmax())])
        self.b_t = _mapping(self.width, m, tw) if spec.vision_to_text else None
        self.b_v = _mapping(tw, 1, self.width) if spec.text_to_vision else None
        self.b_vt = _mapping(tw, spec.layer_tokens, self.width) if spec.layer_prompts else None
        grid = visual.grid_size
        self.solver = JigsawSolver(self.width, grid[0] * grid[1], spec.jigsaw_permutations) \
            if spec.jigsaw else None
        self.register_buffer("permutations", jigsaw_permutations(
            spec.jigsaw_grid, spec.jigsaw_permutations, seed))
        self._static: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.train(False)

    # -- structure ---------------------------------------------------------------------

    def _layernorms(self) -> list[nn.LayerNorm]:
        return [m for m in self.clip.modules() if isinstance(m, nn.LayerNorm)]

    def train(self, mode: bool = True) -> Splip:
        super().train(mode)
        self.clip.eval()  # frozen parts: no dropout or patch dropout whatever the loop says
        self._static.clear()
        return self

    @property
    def clip_image_size(self) -> int:
        return clip_image_size(self.clip)

    def _text_layer_for(self, vision_layer: int) -> int:
        return vision_layer * self.text_layers // self.vision_layers

    # -- text tower over the training class names -------------------------------------

    def class_pass(self, text_prompts: torch.Tensor | None,
                   domain: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The text tower over every training class name of `domain`'s template.
        text_prompts: (B, m, text_width) B_t tokens or None. Returns class features
        (B, C, D) L2 (B = 1 without prompts) and per text layer the class-mean EOT output
        (B, text_width)."""
        tokens = getattr(self, f"class_tokens_{domain}")
        n_classes, length = tokens.shape
        batch = 1 if text_prompts is None else text_prompts.shape[0]
        x = self.clip.token_embedding(tokens) + self.clip.positional_embedding[:length]
        x = x.unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * n_classes, length, -1)
        eot = tokens.argmax(dim=-1).repeat(batch)
        rows = torch.arange(batch * n_classes, device=x.device)
        mask = self.clip.attn_mask[:length, :length].to(x.dtype) \
            if self.clip.attn_mask is not None else None
        prompts = None if text_prompts is None else text_prompts.repeat_interleave(n_classes, 0)
        means = []
        for block in self.clip.transformer.resblocks:
            if prompts is not None:
                m = prompts.shape[1]
                x = torch.cat([x[:, :1], prompts.to(x.dtype), x[:, 1 + m:]], dim=1)
            x = block(x, attn_mask=mask)
            means.append(x[rows, eot].view(batch, n_classes, -1).mean(dim=1))
        final = self.clip.ln_final(x[rows, eot])
        proj = self.clip.text_projection
        final = proj(final) if isinstance(proj, nn.Linear) else final @ proj if proj is not None \
            else final
        return F.normalize(final.float(), dim=-1).view(batch, n_classes, -1), means

    def _class_pass_cached(self, text_prompts: torch.Tensor | None, domain: str):  # noqa: ANN202
        """class_pass; without B_t and outside training it depends on nothing per image, so
        it runs once per domain (until train() or a load)."""
        if text_prompts is not None or self.training or torch.is_grad_enabled():
            return self.class_pass(text_prompts, domain)
        if domain not in self._static:
            self._static[domain] = self.class_pass(None, domain)
        return self._static[domain]

    # -- image tower -------------------------------------------------------------------

    def _visual_prompts(self, patches: torch.Tensor, domain: str, logits: bool):  # noqa: ANN202
        """(fixed (N, J-1, w) or None, {vision layer: (N, n, w)} or {}, class features
        (N or 1, C, D), or None when neither B_vt nor `logits` needs the class pass)."""
        n = patches.shape[0]
        class_feats, means = None, []
        if self.b_vt is not None or logits:
            text_prompts = None
            if self.b_t is not None:
                text_prompts = self.b_t(patches.mean(dim=1).float()).view(
                    n, self.spec.text_tokens, self.text_width)
            class_feats, means = self._class_pass_cached(text_prompts, domain)
        fixed = None
        if self.b_v is not None:
            words = self.clip.token_embedding(getattr(self, f"word_tokens_{domain}"))
            fixed = self.b_v(words.float()).unsqueeze(0).expand(n, -1, -1)
        layered: dict[int, torch.Tensor] = {}
        if self.b_vt is not None:
            k = self.spec.layer_tokens
            for layer in range(self.vision_layers):
                mean = means[self._text_layer_for(layer)]
                layered[layer] = self.b_vt(mean.float()).view(-1, k, self.width).expand(n, -1, -1)
        return fixed, layered, class_feats

    def forward_images(self, images: torch.Tensor, domain: str,
                       logits: bool = True) -> SplipOutput:
        """RGB [0, 1] (N, 3, H, W) in `domain` ("photo" or "query") through the prompted
        image tower; logits=False skips the classification logits (None)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) RGB; got {tuple(images.shape)}")
        self.spec.words(domain)  # checks the domain
        visual = self.clip.visual
        x = visual.conv1(clip_pixels(self.clip, images))
        patches = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        fixed, layered, class_feats = self._visual_prompts(patches, domain, logits)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        n_fixed = 0 if fixed is None else fixed.shape[1]
        n_extra = n_fixed + (self.spec.layer_tokens if layered else 0)
        for layer, block in enumerate(visual.transformer.resblocks):
            if n_extra:
                parts = [x[:, :1]] + ([fixed.to(x.dtype)] if fixed is not None else []) \
                    + ([layered[layer].to(x.dtype)] if layered else [])
                rest = x[:, 1:] if layer == 0 else x[:, 1 + n_extra:]
                x = torch.cat([*parts, rest], dim=1)
            x = block(x)
        tokens = x[:, 1 + n_extra:]
        x = torch.cat([x[:, :1], tokens], dim=1)
        embedding = F.normalize(pool_visual(self.clip.visual, x).float(), dim=-1)
        scores = None
        if logits:
            scale = self.clip.logit_scale.exp().float()
            scores = scale * torch.einsum("nd,ncd->nc", embedding,
                                          class_feats.expand(x.shape[0], -1, -1))
        return SplipOutput(embedding, scores, tokens)

    def encode_image(self, images: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
        """Gallery photos ("photo of a" domain) -> (N, D) float32, L2. `gram` is ignored."""
        del gram
        return self.forward_images(images, "photo", logits=False).embedding

    def encode_query(self, images: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
        """Image queries of any style ("sketch of a" domain) -> (N, D) float32, L2."""
        del gram
        return self.forward_images(images, "query", logits=False).embedding

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text queries: CLIP's text tower with its trained LayerNorms, no B_t tokens (there is
        no image to map), float32, L2."""
        return encode_text(self.clip, tokens)

    def solve_jigsaw(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor) -> torch.Tensor:
        if self.solver is None:
            raise RuntimeError("this SpLIP model has no jigsaw solver (splip.beta = 0)")
        return self.solver(sketch_tokens, photo_tokens)

    # -- checkpoints ---------------------------------------------------------------------

    def trainable_state_dict(self) -> dict:
        """Copies of the trainable tensors, and the class names they were trained on."""
        state: dict = {name: p.detach().clone() for name, p in self.named_parameters()
                       if p.requires_grad}
        state[CLASSES_KEY] = list(self.classes)
        return state

    def load_trainable_state_dict(self, state: dict) -> None:
        state = dict(state)
        classes = state.pop(CLASSES_KEY, None)
        if classes != self.classes:
            raise ValueError(f"SpLIP state was trained on classes {classes!r}, this model has "
                             f"{self.classes!r}; build it with the state's classes")
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if set(params) != set(state):
            raise ValueError(f"trainable state does not fit this SpLIP model (other [splip] "
                             f"switches?): missing {sorted(set(params) - set(state))}, "
                             f"unexpected {sorted(set(state) - set(params))}")
        with torch.no_grad():
            for name, p in params.items():
                if state[name].shape != p.shape:
                    raise ValueError(f"{name}: state {tuple(state[name].shape)} vs model "
                                     f"{tuple(p.shape)}")
                p.copy_(state[name].to(device=p.device, dtype=p.dtype))
        self._static.clear()

    def parameter_counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters()) - trainable


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
