"""SpLIP (docs/method.md 9) on the tiny demo CLIP: shapes, which parameters learn, the adaptive
margin and the jigsaw by hand, the ablation switches, class-aware triplets, and one run of
every stage with freestyle, splip and baseline side by side. Random weights: mechanics only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_config

from pipeline.models.clip import DEMO_ARCHS, load_clip
from pipeline.models.splip import (
    CLASSES_KEY,
    Splip,
    SplipSpec,
    jigsaw_permutations,
    shuffle_tiles,
)
from pipeline.splip_losses import (
    SplipLossSpec,
    adaptive_margins,
    batch_loss,
    jigsaw,
    triplet,
)

ARCH = "fsr-tiny-vit"
CLASSES = ["apple", "traffic_light", "cat"]
VISION = DEMO_ARCHS[ARCH]["vision_cfg"]
TEXT = DEMO_ARCHS[ARCH]["text_cfg"]
PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2


def build(spec: SplipSpec | None = None, loss: SplipLossSpec | None = None,
          seed: int = 0) -> tuple[Splip, object]:
    clip, tokenizer = load_clip(ARCH, seed=0)
    torch.manual_seed(seed)
    spec = spec or SplipSpec()
    return Splip(clip, tokenizer, CLASSES, spec, seed=seed, loss_spec=loss), tokenizer


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def batch(n: int = 4) -> dict:
    """A training batch as TripletData + collate_triplets give it (one text row)."""
    is_text = torch.zeros(n, dtype=torch.bool)
    is_text[-1] = True
    return {"is_text": is_text, "text": ["a photo"] * n, "ok": torch.ones(n, dtype=torch.bool),
            "query_pixels": images(n, 1), "pos_pixels": images(n, 2), "neg_pixels": images(n, 3),
            "pos_class": torch.tensor([0, 1, 2, 0][:n]),
            "neg_class": torch.tensor([1, 2, 0, 2][:n]),
            "bad": []}


def test_shapes_of_every_block_and_output() -> None:
    model, _ = build()
    m, n, width, text_width = 4, 2, VISION["width"], TEXT["width"]
    x = images(5, 0)
    patches = model.clip.visual.conv1(torch.zeros(5, 3, 64, 64)).flatten(2).transpose(1, 2)
    assert model.b_t(patches.mean(1)).shape == (5, m * text_width)
    words = model.clip.token_embedding(model.word_tokens_query)
    assert words.shape == (3, text_width)  # "sketch of a": J - 1 = 3 word tokens
    assert model.b_v(words).shape == (3, width)
    assert model.b_vt(torch.zeros(5, text_width)).shape == (5, n * width)
    feats, means = model.class_pass(torch.zeros(5, m, text_width), "photo")
    assert feats.shape == (5, len(CLASSES), 64) and len(means) == TEXT["layers"]
    assert all(mean.shape == (5, text_width) for mean in means)
    for domain in ("photo", "query"):
        out = model.forward_images(x, domain)
        assert out.embedding.shape == (5, 64) and out.logits.shape == (5, len(CLASSES))
        assert out.tokens.shape == (5, PATCHES, width)
        torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(5))
    assert model.solve_jigsaw(out.tokens, out.tokens).shape == (5, 24)
    # The domains differ only through their words: gallery and query encoders disagree.
    assert not torch.allclose(model.encode_image(x), model.encode_query(x))
    with pytest.raises(ValueError, match="domain"):
        model.forward_images(x, "art")


def test_truncated_class_pass_is_the_full_context_text_tower() -> None:
    """Cutting the class sequences after the longest EOT changes nothing (causal mask)."""
    model, tokenizer = build(SplipSpec(vision_to_text=False))
    with torch.no_grad():
        feats, _ = model.class_pass(None, "photo")
        full = model.clip.encode_text(tokenizer(
            [f"photo of a {c.replace('_', ' ')}." for c in CLASSES]))
    assert model.class_tokens_photo.shape[1] < 77
    torch.testing.assert_close(feats[0], F.normalize(full, dim=-1), atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_layernorms_mapping_blocks_and_solver() -> None:
    model, tokenizer = build()
    model.train()
    intended = {name for name, module in model.named_modules()
                if isinstance(module, torch.nn.LayerNorm)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert name.startswith(("b_t.", "b_v.", "b_vt.", "solver.")) or \
            name.rsplit(".", 1)[0] in intended, name
    loss = batch_loss(model, batch(), tokenizer, None, 1.0, torch.device("cpu"))
    loss.backward()
    got = {name for name, p in model.named_parameters()
           if p.grad is not None and p.grad.abs().sum() > 0}
    assert got <= trainable
    for prefix in ("b_t.", "b_v.", "b_vt.", "solver.", "clip.visual.ln_post",
                   "clip.visual.transformer.resblocks.0.ln_1", "clip.transformer.resblocks.1.ln_2",
                   "clip.ln_final"):
        assert any(name.startswith(prefix) for name in got), prefix
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert "clip.visual.conv1.weight" in frozen and "clip.token_embedding.weight" in frozen
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_adaptive_margin_by_hand() -> None:
    model, tokenizer = build()
    with torch.no_grad():  # the frozen CLIP's "a photo of a <class>." embeddings
        text = F.normalize(model.clip.encode_text(tokenizer(
            ["a photo of a apple.", "a photo of a traffic light.", "a photo of a cat."])), dim=-1)
    torch.testing.assert_close(model.class_text, text)
    pos, neg = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    expected = [float(text[p] @ text[q]) for p, q in zip(pos, neg)]
    np.testing.assert_allclose(adaptive_margins(model.class_text, pos, neg).numpy(), expected,
                               rtol=1e-5)
    # triplet: d = 1 - cos; by hand for two rows
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    n = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    mu = torch.tensor([0.5, 0.2])
    d_ap = [1 - 1 / math.sqrt(2), 0.0]
    d_an = [0.0, 1.0]
    want = (max(d_ap[0] - d_an[0] + 0.5, 0) + max(d_ap[1] - d_an[1] + 0.2, 0)) / 2
    assert float(triplet(a, p, n, mu)) == pytest.approx(want, rel=1e-6)


def test_jigsaw_permutations_are_seeded_distinct_and_invertible() -> None:
    perms = jigsaw_permutations(3, 24, seed=0)
    assert perms.shape == (24, 9)
    assert torch.equal(perms, jigsaw_permutations(3, 24, seed=0))
    assert not torch.equal(perms, jigsaw_permutations(3, 24, seed=1))
    assert len({tuple(p.tolist()) for p in perms}) == 24
    assert all(sorted(p.tolist()) == list(range(9)) and p.tolist() != list(range(9))
               for p in perms)
    with pytest.raises(ValueError):
        jigsaw_permutations(2, 24, seed=0)  # 4! - 1 = 23 non-identity permutations
    # Tile i of the output is tile perm[i] of the input (tiles labelled by their index).
    x = torch.arange(9.0).view(3, 3).repeat_interleave(4, 0).repeat_interleave(4, 1)
    x = torch.cat([x, torch.full((2, 12), -1.0)])  # 14 rows: 2 rows past the grid
    x = torch.cat([x, torch.full((14, 1), -1.0)], dim=1).expand(2, 3, 14, 13).clone()
    picked = perms[:2]
    out = shuffle_tiles(x, picked, 3)
    for k in range(2):
        labels = out[k, 0, :12, :12][::4, ::4].flatten().tolist()
        assert labels == [float(v) for v in picked[k].tolist()]
    assert torch.equal(out[:, :, 12:], x[:, :, 12:])  # pixels past the grid stay
    assert torch.equal(out[:, :, :, 12:], x[:, :, :, 12:])
    assert torch.equal(shuffle_tiles(out, picked.argsort(dim=1), 3), x)


def test_jigsaw_loss_and_hinge_by_hand() -> None:
    """CE of the shuffled sketch solved beside its unshuffled self, + the hinge
    relu(CE(positive photo) - CE(negative photo) + margin) (docs/method.md 9)."""
    target = torch.tensor([0, 1])
    own = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    ce_own = math.log(1 + math.exp(-1))
    ce_pos = [math.log(1 + math.exp(-2)), math.log(2)]
    ce_neg = [math.log(2), math.log(1 + math.exp(-3))]
    assert float(jigsaw(own, None, None, target, False, 0.0)) == pytest.approx(ce_own, rel=1e-6)
    for margin in (0.0, 0.1):
        hinge = sum(max(p - q + margin, 0) for p, q in zip(ce_pos, ce_neg)) / 2
        assert float(jigsaw(own, pos, neg, target, True, margin)) == \
            pytest.approx(ce_own + hinge, rel=1e-6)
    assert SplipLossSpec().jigsaw_margin == 0.0  # the paper's hinge has no margin


def test_ablation_switches_change_what_runs(monkeypatch) -> None:
    full, tokenizer = build()
    names = {name.split(".")[0] for name, p in full.named_parameters() if p.requires_grad}
    assert {"b_t", "b_v", "b_vt", "solver"} <= names
    x = images(3, 4)
    with torch.no_grad():
        reference = full.encode_query(x)
    for switch, block in (("vision_to_text", "b_t"), ("text_to_vision", "b_v"),
                          ("layer_prompts", "b_vt")):
        model, _ = build(SplipSpec(**{switch: False}))
        assert getattr(model, block) is None
        with torch.no_grad():
            assert not torch.allclose(model.encode_query(x), reference, atol=1e-4), switch
    assert build(SplipSpec(jigsaw=False))[0].solver is None

    # Without B_t the class pass does not depend on the image: once per domain in eval.
    model, _ = build(SplipSpec(vision_to_text=False))
    calls = []
    original = model.class_pass
    monkeypatch.setattr(model, "class_pass", lambda *a: calls.append(a[1]) or original(*a))
    with torch.inference_mode():
        first = model.encode_image(x)
        again = model.encode_image(x)
        model.encode_query(x)
    assert calls == ["photo", "query"] and torch.equal(first, again)
    model.train()
    model.eval()
    with torch.inference_mode():
        model.encode_image(x)
    assert calls == ["photo", "query", "photo"]  # train() dropped the cache

    # Losses: fixed margin, no classification, no jigsaw, unconditional jigsaw.
    def loss_with(spec: SplipSpec, loss: SplipLossSpec) -> tuple[float, list]:
        model, _ = build(spec, loss)
        seen = []
        forward = model.forward_images
        monkeypatch.setattr(model, "forward_images",
                            lambda im, dom, logits=True: seen.append((dom, logits))
                            or forward(im, dom, logits))
        torch.manual_seed(0)
        return float(batch_loss(model, batch(), tokenizer, None, 1.0,
                                torch.device("cpu")).detach()), seen

    paper, seen = loss_with(SplipSpec(), SplipLossSpec())
    assert seen == [("query", True), ("photo", True), ("photo", True), ("query", False)]
    _, seen = loss_with(SplipSpec(jigsaw=False), SplipLossSpec(alpha=0.0, beta=0.0))
    assert seen == [("query", False), ("photo", False), ("photo", False)]
    fixed, _ = loss_with(SplipSpec(), SplipLossSpec(margin="fixed", fixed_margin=0.7))
    assert fixed != pytest.approx(paper)
    plain, _ = loss_with(SplipSpec(), SplipLossSpec(jigsaw_conditional=False))
    assert plain != pytest.approx(paper)
    # Table 5's "L_class" row: no triplet term; the loss is alpha x the classification loss.
    model, _ = build(SplipSpec(jigsaw=False), SplipLossSpec(triplet=False, beta=0.0))
    only_class = batch_loss(model, batch(), tokenizer, None, 1.0, torch.device("cpu"))
    with_triplet, _ = loss_with(SplipSpec(jigsaw=False), SplipLossSpec(beta=0.0))
    assert float(only_class.detach()) != pytest.approx(with_triplet)
    b = batch()
    keep = b["ok"] & ~b["is_text"]
    outs = [model.forward_images(b[k][keep], dom) for k, dom in
            (("query_pixels", "query"), ("pos_pixels", "photo"), ("neg_pixels", "photo"))]
    labels = torch.cat([b["pos_class"][keep], b["pos_class"][keep], b["neg_class"][keep]])
    want = F.cross_entropy(torch.cat([o.logits for o in outs]).float(), labels)
    assert float(only_class.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    only_class.backward()  # the classification loss alone still trains the model
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)

    # Table 6's "w/o LayerNorm": CLIP's LayerNorms stay frozen, the blocks still train.
    frozen_norms, _ = build(SplipSpec(layernorm=False))
    trainable = {name.split(".")[0] for name, p in frozen_norms.named_parameters()
                 if p.requires_grad}
    assert trainable == {"b_t", "b_v", "b_vt", "solver"}
    assert not any(p.requires_grad for m in frozen_norms.clip.modules()
                   if isinstance(m, torch.nn.LayerNorm) for p in m.parameters())
    assert frozen_norms.parameter_counts()[0] < full.parameter_counts()[0]


def test_state_round_trip_and_class_check() -> None:
    model, tokenizer = build(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    state = model.trainable_state_dict()
    assert state[CLASSES_KEY] == CLASSES
    fresh, _ = build(seed=5)
    x = images(2, 9)
    fresh.load_trainable_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_query(x), model.encode_query(x))
    clip, _ = load_clip(ARCH, seed=0)
    other = Splip(clip, tokenizer, ["dog", "cat"], SplipSpec())
    with pytest.raises(ValueError, match="trained on classes"):
        other.load_trainable_state_dict(state)


def test_class_aware_negatives() -> None:
    from pipeline.training import Query, TripletData

    photos = {i: f"p{i}.png" for i in range(12)}
    classes = {i: i % 3 for i in photos}
    queries = [Query(100 + i, i, "sketch", f"q{i}.png", None) for i in photos]
    grams = {k: np.zeros(2, np.float32) for k in [*photos, *(q.query_id for q in queries)]}
    aware = TripletData(queries, photos, grams, 8, 10**6, seed=0, epoch=1, classes=classes)
    assert all(classes[n] != classes[q.image_id] for q, n in zip(queries, aware.negatives))
    again = TripletData(queries, photos, grams, 8, 10**6, seed=0, epoch=1, classes=classes)
    assert aware.negatives == again.negatives and aware.order == again.order
    blind = TripletData(queries, photos, grams, 8, 10**6, seed=0, epoch=1)
    assert any(classes[n] == classes[q.image_id] for q, n in zip(queries, blind.negatives)) \
        or blind.negatives != aware.negatives
    with pytest.raises(ValueError, match="at least 2 classes"):
        TripletData(queries, photos, grams, 8, 10**6, seed=0, epoch=1,
                    classes=dict.fromkeys(photos, 0))


def test_splip_runs_through_every_stage_beside_freestyle_and_clip(tmp_path) -> None:
    """score.methods = freestyle, splip, baseline on the tiny demo: splip trains (class-aware),
    embeds its gallery through the photo domain, is indexed and scored in every table."""
    from pipeline import commands, methods
    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.data.images import load_rgb, to_tensor
    from pipeline.plans import fingerprints
    from pipeline.runner import upstream_inputs
    from stages import all_stages

    path = write_tiny_config(tmp_path, tmp_path / "run", items=16, extra=(
        '\n[index]\ncheck_queries = 10\n\n[score]\nmethods = ["freestyle", "splip", "baseline"]\n'
        "\n[splip]\njigsaw_grid = 2\njigsaw_permutations = 6\n"))
    config = load_config(path)
    reports = {r.stage: r.ran for r in commands.run(all_stages, config, ["all"], progress=False)}
    assert reports["train"] == 2 and reports["index"] == 3 and reports["score"] == 3
    catalog = Catalog.in_dir(config.work_dir)
    history = catalog.rows("SELECT epoch, loss FROM train_history WHERE method = 'splip' "
                           "ORDER BY epoch")
    assert [e for e, _ in history] == [0, 1, 2] and all(np.isfinite(v) for _, v in history[1:])
    styles = {s for (s,) in catalog.rows(
        "SELECT DISTINCT style FROM retrieval_metrics WHERE method = 'splip'")}
    assert {"sketch", "art", "lowres", "text"} <= styles
    table = commands.sql(all_stages, config, commands.recall_sql(config))
    assert table["splip"].null_count == 0
    assert {r["versus"] for r in commands.paired_table(all_stages, config)} == {"splip",
                                                                             "baseline"}

    stages = all_stages()
    inputs = upstream_inputs(catalog, next(s for s in stages if s.name == "embed"),
                             fingerprints(stages, config), config.work_dir)

    class Artifacts:
        def input_path(self, stage, kind, unit_key=None):  # noqa: ANN001, ANN202
            [found] = inputs.paths(config.work_dir, stage, kind, unit_key)
            return found

    encoders = methods.get("splip").load(config, Artifacts(), torch.device("cpu"))
    photos = catalog.rows("SELECT image_id, path FROM gallery ORDER BY image_id LIMIT 4")
    pixels = torch.stack([to_tensor(load_rgb(p, 10**8), config.extract.image_size)
                          for _, p in photos])
    with torch.inference_mode():
        expected = encoders.image(pixels, None).numpy()
        as_queries = encoders.query(pixels, None).numpy()
    stored = dict(catalog.rows("SELECT image_id, embedding FROM splip_embeddings"))
    assert len(stored) == 16
    np.testing.assert_allclose(np.stack([stored[i] for i, _ in photos]), expected, atol=1e-5)
    assert not np.allclose(expected, as_queries, atol=1e-4)  # queries: the sketch domain
