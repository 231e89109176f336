"""FreestyleRet model and CLIP loading (docs/method.md section 3): tiny CPU models, seconds."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline.gram import GramEncoder
from pipeline.models import WeightsError
from pipeline.models import clip as clip_module
from pipeline.models.clip import (
    DEMO_ARCHS,
    clip_image_size,
    clip_mean_std,
    clip_pixels,
    encode_image_baseline,
    encode_text,
    load_clip,
    save_clip,
)
from pipeline.models.freestyle import FreestyleRet, PromptSpec, triplet_loss
from pipeline.models.vgg import build_vgg_encoder
from pipeline.style_space import style_feature_torch

ARCH = "fsr-tiny-vit"
GRAM_DIM = 32
SIZE = 64  # Gram encoder input size in these tests (the CLIP size of fsr-tiny-vit too)
LAYERS = DEMO_ARCHS[ARCH]["vision_cfg"]["layers"]
WIDTH = DEMO_ARCHS[ARCH]["vision_cfg"]["width"]
PATCHES = (SIZE // DEMO_ARCHS[ARCH]["vision_cfg"]["patch_size"]) ** 2


def _images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Varied RGB [0, 1] images: noise, smooth ramps and stripes, so Gram vectors differ."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            image = torch.rand(3, size, size, generator=generator)
        elif kind == 1:
            colour = torch.rand(3, 1, 1, generator=generator)
            image = colour * ramp.view(1, 1, size) * ramp.view(1, size, 1)
        else:
            period = 2 + i % 7
            stripes = ((torch.arange(size) // period) % 2).float()
            image = stripes.view(1, 1, size).expand(3, size, size) * torch.rand(
                3, 1, 1, generator=generator)
        out.append(image)
    return torch.stack(out)


@pytest.fixture(scope="module")
def base_clip():
    clip, tokenizer = load_clip(ARCH, seed=0)
    return clip, tokenizer


@pytest.fixture(scope="module")
def gram_encoder() -> GramEncoder:
    return GramEncoder(build_vgg_encoder(None, seed=0), pool=2, dim=GRAM_DIM, seed=0).eval()


@pytest.fixture(scope="module")
def centres(gram_encoder) -> torch.Tensor:
    with torch.no_grad():
        return gram_encoder(_images(4, seed=99))


def make_model(base_clip, gram_encoder, centres, spec: PromptSpec | None = None,
               seed: int = 0, temperature: float = 0.1) -> FreestyleRet:
    torch.manual_seed(seed)
    return FreestyleRet(copy.deepcopy(base_clip[0]), copy.deepcopy(gram_encoder), centres,
                        temperature, spec or PromptSpec())


@pytest.fixture
def model(base_clip, gram_encoder, centres) -> FreestyleRet:
    return make_model(base_clip, gram_encoder, centres)


# -- PromptSpec ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"n_tokens": 0}, {"n_tokens": 2.0}, {"n_tokens": True}, {"shallow_init": "photo"},
    {"deep_init": "style "}, {"shallow_layers": -2}, {"shallow_layers": 1.5},
])
def test_prompt_spec_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="PromptSpec"):
        PromptSpec(**kwargs)


def test_shallow_layers_beyond_depth_is_an_error(base_clip, gram_encoder, centres):
    with pytest.raises(ValueError, match="exceeds"):
        make_model(base_clip, gram_encoder, centres, PromptSpec(shallow_layers=LAYERS + 1))


# -- prompts and token layout ------------------------------------------------------------------

def test_prompts_depend_on_the_input_image(model):
    images = _images(4, seed=1)
    with torch.no_grad():
        gram = model.gram_encoder(images)
        tokens = model.prompt_tokens(gram)
        embeddings = model.encode_image(images)
    assert sorted(tokens) == [0, *range(LAYERS // 2, LAYERS)]
    for layer, layer_tokens in tokens.items():
        assert layer_tokens.shape == (4, 4, WIDTH)
        for i in range(1, 4):
            assert not torch.allclose(layer_tokens[0], layer_tokens[i]), f"layer {layer}"
    assert (embeddings[0] @ embeddings[1:].T).max() < 0.9999


def test_random_init_gives_the_same_tokens_for_every_image(base_clip, gram_encoder, centres):
    model = make_model(base_clip, gram_encoder, centres,
                       PromptSpec(shallow_init="random", deep_init="random"))
    with torch.no_grad():
        tokens = model.prompt_tokens(model.gram_encoder(_images(3, seed=1)))
    for layer_tokens in tokens.values():
        assert torch.equal(layer_tokens[0], layer_tokens[1])
        assert torch.equal(layer_tokens[0], layer_tokens[2])


@pytest.mark.parametrize("shallow_init", ["style", "gram", "random"])
@pytest.mark.parametrize("deep_init", ["gram", "style", "random"])
def test_generators_use_the_chosen_feature(base_clip, gram_encoder, centres, shallow_init,
                                           deep_init):
    model = make_model(base_clip, gram_encoder, centres,
                       PromptSpec(shallow_init=shallow_init, deep_init=deep_init))
    with torch.no_grad():
        gram = model.gram_encoder(_images(3, seed=2))
        style = style_feature_torch(gram, model.centres, model.temperature)
        tokens = model.prompt_tokens(gram)
        for layer, layer_tokens in tokens.items():
            source = shallow_init if layer == 0 else deep_init
            generator = model.generators[str(layer)]
            assert generator.source == source
            if source == "random":
                expected = generator.tokens.expand(3, -1, -1)
            else:
                feature = style if source == "style" else gram
                expected = generator.proj(feature).view(3, 4, WIDTH)
            torch.testing.assert_close(layer_tokens, expected, rtol=0, atol=0)


def _block_inputs(model: FreestyleRet, images: torch.Tensor,
                  gram: torch.Tensor) -> list[torch.Tensor]:
    """The token sequence entering each vision block, captured with pre-hooks."""
    seen: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
             for block in model.clip.visual.transformer.resblocks]
    try:
        with torch.no_grad():
            model.encode_image(images, gram)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("n_tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("shallow_layers", [0, -1, LAYERS])
def test_token_layout(base_clip, gram_encoder, centres, n_tokens, shallow_layers):
    model = make_model(base_clip, gram_encoder, centres,
                       PromptSpec(n_tokens=n_tokens, shallow_layers=shallow_layers))
    shallow = LAYERS // 2 if shallow_layers == -1 else shallow_layers
    replaced = list(range(max(shallow, 1), LAYERS))
    assert model.shallow_layers == shallow
    assert list(model.replaced_layers) == replaced
    assert list(model.prompt_layers) == [0, *replaced]
    first = model.generators["0"].source
    assert first == ("style" if shallow > 0 else "gram")

    images = _images(2, seed=3)
    with torch.no_grad():
        gram = model.gram_encoder(images)
        tokens = model.prompt_tokens(gram)
    inputs = _block_inputs(model, images, gram)
    assert len(inputs) == LAYERS
    for layer, x in enumerate(inputs):
        assert x.shape == (2, 1 + n_tokens + PATCHES, WIDTH)
        at_prompts = x[:, 1:1 + n_tokens]
        if layer in tokens:  # inserted (layer 0) or replaced (deep layers)
            torch.testing.assert_close(at_prompts, tokens[layer], rtol=0, atol=0)
        else:  # carried through from the layer before: changed by the blocks
            assert not torch.allclose(at_prompts, tokens[0], atol=1e-3)
    # CLS and patches at layer 0 are CLIP's own embedding (prompts only inserted).
    plain = model._embed(clip_pixels(model.clip, images))
    torch.testing.assert_close(inputs[0][:, :1], plain[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(inputs[0][:, 1 + n_tokens:], plain[:, 1:], rtol=0, atol=0)


def test_no_prompt_path_is_open_clips_visual_forward(model):
    pixels = clip_pixels(model.clip, _images(3, seed=4))
    with torch.no_grad():
        torch.testing.assert_close(model.vision_features(pixels, None),
                                   model.clip.visual(pixels), rtol=1e-6, atol=1e-6)


def _custom_clip(**vision) -> open_clip.CLIP:
    torch.manual_seed(0)
    cfg = copy.deepcopy(DEMO_ARCHS[ARCH])
    cfg["vision_cfg"].update(vision)
    return open_clip.CLIP(**cfg).eval()


@pytest.mark.parametrize("vision", [{"pool_type": "avg"},
                                    {"pool_type": "avg", "final_ln_after_pool": True},
                                    {"final_ln_after_pool": True}])
def test_other_pool_types_match_open_clip(gram_encoder, centres, vision):
    model = FreestyleRet(_custom_clip(**vision), gram_encoder, centres, 0.1, PromptSpec())
    pixels = clip_pixels(model.clip, _images(2, seed=4))
    with torch.no_grad():
        torch.testing.assert_close(model.vision_features(pixels, None),
                                   model.clip.visual(pixels), rtol=1e-5, atol=1e-5)
        assert model.encode_image(_images(2, seed=4)).shape == (2, 64)


@pytest.mark.slow
def test_real_open_clip_architecture_vit_b_32(caplog):
    """The prompt model on an open_clip built-in (random init, so offline): the no-prompt path
    is open_clip's own forward, prompted embeddings are unit vectors that differ from the
    plain CLIP's, the loss reaches the generators, and the sizes are docs/method.md's."""
    with caplog.at_level("WARNING"):
        clip, _ = load_clip("ViT-B-32", seed=0)
    # open_clip's own "No pretrained weights loaded" repeats load_clip's warning: dropped.
    assert not any("No pretrained" in r.getMessage() for r in caplog.records)
    gram = GramEncoder(build_vgg_encoder(None, seed=0), pool=2, dim=256, seed=0).eval()
    with torch.no_grad():
        centres = gram(_images(4, seed=99, size=224))
    model = FreestyleRet(clip, gram, centres, 0.1, PromptSpec())
    trainable, frozen = model.parameter_counts()
    assert (round(trainable / 1e6, 2), round(frozen / 1e6)) == (5.57, 151)
    images = _images(3, seed=6, size=224)
    pixels = clip_pixels(model.clip, images)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_features(pixels, None), model.clip.visual(pixels),
                                   rtol=1e-5, atol=1e-5)
        plain = encode_image_baseline(model.clip, images)
    prompted = model.encode_image(images)
    assert prompted.shape == plain.shape == (3, 512)
    torch.testing.assert_close(prompted.norm(dim=1), torch.ones(3))
    assert (prompted - plain).abs().max() > 1e-3
    triplet_loss(prompted[:1], prompted[1:2], prompted[2:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.generators.parameters())


def test_attentional_pool_is_not_supported(gram_encoder, centres):
    clip = _custom_clip(attentional_pool=True, attn_pooler_heads=4)
    with pytest.raises(NotImplementedError, match="attentional"):
        FreestyleRet(clip, gram_encoder, centres, 0.1, PromptSpec())


# -- gradients, parameters, training ----------------------------------------------------------

def _expected_trainable(model: FreestyleRet) -> set[str]:
    names = {"clip.visual.ln_pre.weight", "clip.visual.ln_pre.bias",
             "clip.visual.ln_post.weight", "clip.visual.ln_post.bias"}
    for i in range(LAYERS):
        for norm in ("ln_1", "ln_2"):
            names |= {f"clip.visual.transformer.resblocks.{i}.{norm}.{p}"
                      for p in ("weight", "bias")}
    names |= {f"generators.{name}" for name, _ in model.generators.named_parameters()}
    return names


def test_only_prompt_generators_and_vision_layernorms_get_gradients(model, base_clip):
    tokenizer = base_clip[1]
    model.train()
    images = _images(6, seed=5)
    query = model.encode_image(images[:3])
    text = model.encode_text(tokenizer(["a sketch", "a painting", "a photo"]))
    positive = model.encode_image(images[3:])
    negative = model.encode_image(images[[4, 5, 3]])
    loss = triplet_loss(query, positive, negative) + triplet_loss(text, positive, negative)
    loss.backward()
    expected = _expected_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == expected
    assert with_grad == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad.abs().sum() > 0, name
    frozen_examples = ["clip.visual.conv1.weight", "clip.visual.proj",
                       "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
                       "clip.visual.transformer.resblocks.0.mlp.c_fc.weight",
                       "clip.token_embedding.weight", "clip.ln_final.weight",
                       "gram_encoder.vgg.2.weight"]
    params = dict(model.named_parameters())
    for name in frozen_examples:
        assert not params[name].requires_grad and params[name].grad is None, name


def test_the_authors_trainable_set(base_clip, gram_encoder, centres):
    """model.trainable = "authors": what their freeze_all_but_bn leaves trainable, i.e. every
    parameter that is not the weight or bias of a non-LayerNorm module: LayerNorms of both
    towers, attention in-projections, class and positional embeddings, projections; the
    gradient reaches the text tower too."""
    torch.manual_seed(0)
    model = FreestyleRet(copy.deepcopy(base_clip[0]), copy.deepcopy(gram_encoder), centres,
                         0.1, PromptSpec(), trainable="authors").train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ["clip.ln_final.weight", "clip.transformer.resblocks.0.ln_1.bias",
                 "clip.transformer.resblocks.0.attn.in_proj_weight",
                 "clip.visual.transformer.resblocks.0.attn.in_proj_bias",
                 "clip.visual.class_embedding", "clip.visual.positional_embedding",
                 "clip.visual.proj", "clip.positional_embedding", "clip.text_projection",
                 "clip.visual.ln_pre.weight", "generators.0.proj.weight"]:
        assert name in trainable, name
    for name in ["clip.visual.conv1.weight", "clip.token_embedding.weight",
                 "clip.visual.transformer.resblocks.0.attn.out_proj.weight",
                 "clip.transformer.resblocks.0.mlp.c_fc.weight", "gram_encoder.vgg.2.weight"]:
        assert name not in trainable, name
    text = model.encode_text(base_clip[1](["a sketch", "a photo"]))
    image = model.encode_image(_images(2, seed=5))
    (text * image).sum().backward()
    params = dict(model.named_parameters())
    assert params["clip.ln_final.weight"].grad.abs().sum() > 0
    assert params["clip.transformer.resblocks.0.attn.in_proj_weight"].grad.abs().sum() > 0
    paper = make_model(base_clip, gram_encoder, centres)
    assert model.parameter_counts()[0] > paper.parameter_counts()[0]
    with torch.no_grad():  # the text tower stays frozen by default: no graph
        assert not paper.encode_text(base_clip[1](["x"])).requires_grad


def test_the_layernorm_only_control_has_no_prompts(base_clip, gram_encoder, centres):
    """model.trainable = "layernorm": only the vision LayerNorms train and no prompt enters the
    ViT, so before training it is exactly the plain CLIP."""
    torch.manual_seed(0)
    model = FreestyleRet(copy.deepcopy(base_clip[0]), copy.deepcopy(gram_encoder), centres,
                         0.1, PromptSpec(), trainable="layernorm")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ln_" in n and n.startswith("clip.visual.") for n in trainable)
    assert not model.uses_gram
    images = _images(3, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images),
                                   encode_image_baseline(base_clip[0], images))
    with pytest.raises(ValueError, match="trainable must be one of"):
        FreestyleRet(copy.deepcopy(base_clip[0]), gram_encoder, centres, 0.1, PromptSpec(),
                     trainable="all")


def test_parameter_counts(model):
    trainable, frozen = model.parameter_counts()
    total = sum(p.numel() for p in model.parameters())
    assert trainable + frozen == total
    n = model.spec.n_tokens
    generators = len(model.prompt_layers) * (GRAM_DIM * n * WIDTH + n * WIDTH)
    layernorms = (2 + 2 * LAYERS) * 2 * WIDTH
    assert trainable == generators + layernorms
    clip_and_vgg = sum(p.numel() for p in model.clip.parameters()) + sum(
        p.numel() for p in model.gram_encoder.parameters())
    assert frozen == clip_and_vgg - layernorms


def test_one_adam_step_lowers_the_triplet_loss(model):
    images = _images(8, seed=6)
    gram = model.gram_encoder(images)
    order = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    query_images = (images + 0.15 * torch.rand_like(images)).clamp(0, 1)
    query_gram = model.gram_encoder(query_images)

    def loss() -> torch.Tensor:
        return triplet_loss(model.encode_image(query_images, query_gram),
                            model.encode_image(images, gram),
                            model.encode_image(images[order], gram[order]))

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before.detach() - 1e-4


def test_train_mode_keeps_frozen_parts_in_eval(model):
    model.train()
    assert model.training and model.generators.training
    assert not model.clip.training and not model.clip.visual.training
    assert not model.gram_encoder.training


# -- outputs --------------------------------------------------------------------------------

def test_embeddings_are_unit_norm_float32(model, base_clip):
    with torch.no_grad():
        image = model.encode_image(_images(5, seed=7))
        text = model.encode_text(base_clip[1](["a cat", "a dog"]))
    assert image.shape == (5, 64) and image.dtype == torch.float32
    assert text.shape == (2, 64) and text.dtype == torch.float32
    torch.testing.assert_close(image.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))


def test_precomputed_gram_gives_identical_output(model):
    images = _images(4, seed=8)
    with torch.no_grad():
        internal = model.encode_image(images)
        cached = model.encode_image(images, model.gram_encoder(images))
    assert torch.equal(internal, cached)


def test_gram_path_sees_the_images_as_given_vit_sees_them_resized(model):
    images = _images(2, seed=9, size=96)  # Gram at 96 px, ViT at the CLIP's 64 px
    with torch.no_grad():
        out = model.encode_image(images)
        resized = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
        expected = model.encode_image(resized, model.gram_encoder(images))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="gram must be"):
        model.encode_image(images, torch.zeros(2, GRAM_DIM + 1))


def test_baseline_encoders(base_clip):
    clip, tokenizer = base_clip
    assert clip_image_size(clip) == 64
    assert clip_mean_std(clip) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        small = encode_image_baseline(clip, _images(3, seed=10))
        large = encode_image_baseline(clip, _images(3, seed=10, size=128))
        text = encode_text(clip, tokenizer(["one", "two"]))
    assert small.shape == large.shape == (3, 64)
    torch.testing.assert_close(small.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))
    assert all(not p.requires_grad for p in clip.parameters()) and not clip.training


def test_trainable_state_dict_round_trip(base_clip, gram_encoder, centres, model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    state = model.trainable_state_dict()
    assert set(state) == _expected_trainable(model)
    other = make_model(base_clip, gram_encoder, centres, seed=1)
    images = _images(3, seed=11)
    with torch.no_grad():
        assert not torch.equal(other.encode_image(images), model.encode_image(images))
        other.load_trainable_state_dict(state)
        assert torch.equal(other.encode_image(images), model.encode_image(images))
    fewer = make_model(base_clip, gram_encoder, centres, PromptSpec(shallow_layers=LAYERS))
    with pytest.raises(ValueError, match="does not fit"):
        fewer.load_trainable_state_dict(state)
    wider = make_model(base_clip, gram_encoder, centres, PromptSpec(n_tokens=2))
    with pytest.raises(ValueError, match="shapes"):
        wider.load_trainable_state_dict(state)


# -- load_clip / save_clip ------------------------------------------------------------------

def test_seeded_random_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    first, _ = load_clip(ARCH, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = load_clip(ARCH, seed=5)
    third, _ = load_clip(ARCH, seed=6)
    a, b, c = first.state_dict(), second.state_dict(), third.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_random_init_is_logged_as_a_warning_once(caplog, monkeypatch):
    monkeypatch.setattr(clip_module, "_WARNED_RANDOM", set())
    with caplog.at_level("WARNING"):
        load_clip(ARCH, seed=0)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("RANDOM" in m and ARCH in m for m in messages) == 1
    # open_clip's notes about the temporary config folder are filtered out.
    assert not any("fsr-arch-" in m for m in messages)
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_clip(ARCH, seed=0)  # a stage's second model: already said
        load_clip(ARCH, seed=1)
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "RANDOM" in m] == [m for m in messages if "seed 1" in m]
    assert len(messages) == 1


def test_save_clip_round_trips_through_load_clip(tmp_path):
    clip, _ = load_clip(ARCH, seed=3)
    cfg = open_clip.get_model_preprocess_cfg(clip)
    cfg.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    open_clip.set_model_preprocess_cfg(clip, cfg)
    path = save_clip(clip, tmp_path / "sub" / "clip.pt")
    assert [p.name for p in path.parent.iterdir()] == ["clip.pt"]  # no tmp left behind
    loaded, tokenizer = load_clip(ARCH, pretrained=str(path), seed=0)
    a, b = clip.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert clip_mean_std(loaded) == ((0.5,) * 3, (0.5,) * 3)
    images = _images(2, seed=12)
    with torch.no_grad():
        assert torch.equal(encode_image_baseline(clip, images),
                           encode_image_baseline(loaded, images))
        tokens = tokenizer(["a sketch"])
        assert torch.equal(encode_text(clip, tokens), encode_text(loaded, tokens))
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_load_clip_errors_name_the_problem(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_clip(ARCH, pretrained=str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{garbage}.*{ARCH}"):
        load_clip(ARCH, pretrained=str(garbage))
    wide = copy.deepcopy(DEMO_ARCHS[ARCH])
    wide["vision_cfg"]["width"] = 32
    monkeypatch.setitem(clip_module.DEMO_ARCHS, "fsr-test-narrow", wide)
    path = save_clip(load_clip(ARCH)[0], tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=f"{path}.*fsr-test-narrow"):
        load_clip("fsr-test-narrow", pretrained=str(path))
    # An unknown tag fails at once (no download attempt) and lists the architecture's tags.
    with pytest.raises(WeightsError, match="no_such_tag.*ViT-B-32.*openai.*local checkpoint"):
        load_clip("ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(WeightsError, match="openai.*local checkpoint file"):
        load_clip(ARCH, pretrained="openai")
    with pytest.raises(WeightsError, match="unknown CLIP architecture"):
        load_clip("no-such-arch")


def test_load_clip_download_failure_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(clip_module.open_clip, "create_model", offline)
    with pytest.raises(WeightsError, match="'openai' for 'ViT-B-32'.*OSError: Name or service "
                                           "not known.*Offline.*local checkpoint file path"):
        load_clip("ViT-B-32", pretrained="openai")


# -- losses -----------------------------------------------------------------------------------

def test_triplet_loss_formula():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(5, 8), dim=1) for _ in range(3))
    d = lambda x, y: 1 - F.cosine_similarity(x, y, dim=1)  # noqa: E731
    qi = F.relu(d(q, p) - d(q, n) + 1.0).mean()
    iq = F.relu(d(p, q) - d(p, q.roll(-1, 0)) + 1.0).mean()
    torch.testing.assert_close(triplet_loss(q, p, n), (qi + iq) / 2)
    torch.testing.assert_close(triplet_loss(q[:1], p[:1], n[:1]),
                               F.relu(d(q[:1], p[:1]) - d(q[:1], n[:1]) + 1.0).mean())
    # Perfect retrieval with a margin smaller than the gaps costs nothing.
    eye = torch.eye(4)
    assert triplet_loss(eye, eye, eye.roll(1, 0), margin=0.5) == 0
    with pytest.raises(ValueError, match="same"):
        triplet_loss(q, p[:4], n)


def test_cpu_autocast_bf16_runs_and_stays_close(model, base_clip):
    images = _images(4, seed=13)
    with torch.no_grad():
        gram = model.gram_encoder(images)  # cached: bf16 VGG convs are slow on CPU
        reference = model.encode_image(images, gram)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.encode_image(images, gram)
        text = model.encode_text(base_clip[1](["a", "b", "c", "d"]))
        loss = triplet_loss(mixed, text, mixed.roll(1, 0))
    loss.backward()
    assert mixed.dtype == torch.float32 and text.dtype == torch.float32
    assert F.cosine_similarity(mixed, reference.float()).min() > 0.99
    assert model.generators["0"].proj.weight.grad is not None


# -- GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_fp32_on_cuda(base_clip, gram_encoder, centres, dtype):
    model = make_model(base_clip, gram_encoder, centres).cuda().eval()
    images = _images(6, seed=13).cuda()
    with torch.no_grad():
        reference = model.encode_image(images)
        with torch.autocast("cuda", dtype=dtype):
            mixed = model.encode_image(images)
            gram = model.gram_encoder(images)
            cached = model.encode_image(images, gram)
    assert mixed.dtype == torch.float32 and gram.dtype == torch.float32
    assert F.cosine_similarity(mixed, reference).min() > 0.99
    assert F.cosine_similarity(cached, reference).min() > 0.99
