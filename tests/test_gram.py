"""VGG encoder (random init, weight loading) and Gram features: shapes, hand values, invariances."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.gram import GramEncoder, GramProjection, gram_matrix, gram_vector, triangle_length
from pipeline.models.vgg import VGG_RELU2_1_CHANNELS, build_vgg_encoder

# ---------------------------------------------------------------- gram_matrix


def _tiny_features() -> torch.Tensor:
    """One image, two channels, 2x2: ch0 = [[1, 2], [3, 4]], ch1 = [[0, 1], [0, 1]]."""
    return torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])


def test_gram_matrix_by_hand() -> None:
    expected = torch.tensor([[[30 / 4, 6 / 4], [6 / 4, 2 / 4]]])
    assert torch.allclose(gram_matrix(_tiny_features(), pool=1), expected)


def test_gram_matrix_pools_before_the_product() -> None:
    # 2x2 average: ch0 -> 2.5, ch1 -> 0.5; a single position.
    expected = torch.tensor([[[6.25, 1.25], [1.25, 0.25]]])
    assert torch.allclose(gram_matrix(_tiny_features(), pool=2), expected)


def test_centred_gram_is_the_covariance() -> None:
    # ch0 - 2.5 = [-1.5, -0.5, 0.5, 1.5]; ch1 - 0.5 = [-0.5, 0.5, -0.5, 0.5].
    expected = torch.tensor([[[1.25, 0.25], [0.25, 0.25]]])
    assert torch.allclose(gram_matrix(_tiny_features(), pool=1, centred=True), expected)


def test_gram_matrix_shapes_and_dtype() -> None:
    features = torch.rand(3, 8, 12, 12, dtype=torch.float64)
    gram = gram_matrix(features, pool=4)
    assert gram.shape == (3, 8, 8)
    assert gram.dtype == torch.float32
    assert torch.allclose(gram, gram.transpose(1, 2))


def test_gram_matrix_stays_fp32_under_autocast() -> None:
    features = torch.rand(2, 4, 8, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        gram = gram_matrix(features, pool=2)
    assert gram.dtype == torch.float32
    assert torch.allclose(gram, gram_matrix(features, pool=2))


@pytest.mark.parametrize("bad", [{"pool": 0}, {"shape": (4, 8, 8)}])
def test_gram_matrix_rejects_bad_input(bad: dict) -> None:
    features = torch.rand(*bad.get("shape", (1, 4, 8, 8)))
    with pytest.raises(ValueError):
        gram_matrix(features, pool=bad.get("pool", 1))


# ---------------------------------------------------------------- gram_vector


def test_gram_vector_by_hand() -> None:
    # corr = [[1, .5], [.5, 1]] -> triangle [1, .5, 1] -> minus mean 5/6 -> [1, -2, 1] / sqrt 6
    gram = torch.tensor([[[4.0, 1.0], [1.0, 1.0]]])
    expected = torch.tensor([[1.0, -2.0, 1.0]]) / math.sqrt(6)
    assert torch.allclose(gram_vector(gram), expected, atol=1e-6)


def test_gram_vector_length_and_norm() -> None:
    gram = gram_matrix(torch.rand(2, VGG_RELU2_1_CHANNELS, 6, 6), pool=1)
    vector = gram_vector(gram)
    assert vector.shape == (2, 8256) == (2, triangle_length(VGG_RELU2_1_CHANNELS))
    assert torch.allclose(vector.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("centred", [False, True])
def test_gram_vector_ignores_positive_per_channel_scale(centred: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(2, 16, 10, 10, generator=generator)
    scale = torch.exp(torch.empty(16).uniform_(-3, 3, generator=generator)).view(1, 16, 1, 1)
    plain = gram_vector(gram_matrix(features, pool=2, centred=centred))
    scaled = gram_vector(gram_matrix(features * scale, pool=2, centred=centred))
    assert torch.allclose(plain, scaled, atol=1e-5)


def test_gram_vector_dead_channel_is_finite() -> None:
    features = torch.rand(1, 4, 6, 6)
    features[:, 2] = 0.0
    vector = gram_vector(gram_matrix(features, pool=1, centred=True))
    assert torch.isfinite(vector).all()
    blank = GramEncoder(build_vgg_encoder(seed=0))(torch.ones(1, 3, 16, 16))
    assert torch.equal(blank, torch.zeros_like(blank))


# ---------------------------------------------------------------- projection


def test_projection_is_deterministic_from_seed() -> None:
    x = torch.nn.functional.normalize(torch.randn(5, 40), dim=1)
    first = GramProjection(40, 8, seed=1)
    again = GramProjection(40, 8, seed=1)
    other = GramProjection(40, 8, seed=2)
    assert torch.equal(first(x), again(x))
    assert not torch.allclose(first(x), other(x))
    assert first(x).shape == (5, 8) and first.out_dim == 8
    assert torch.allclose(first(x).norm(dim=1), torch.ones(5), atol=1e-5)
    assert "matrix" not in first.state_dict()  # regenerated from the seed, never stored


def test_projection_dim_zero_is_identity() -> None:
    x = torch.nn.functional.normalize(torch.randn(3, 10), dim=1)
    projection = GramProjection(10, 0)
    assert projection.out_dim == 10
    assert torch.allclose(projection(x), x)
    with pytest.raises(ValueError):
        projection(torch.randn(3, 11))


# ---------------------------------------------------------------- VGG encoder


def test_random_vgg_is_deterministic_and_frozen() -> None:
    first, again, other = (
        build_vgg_encoder(seed=5),
        build_vgg_encoder(seed=5),
        build_vgg_encoder(seed=6),
    )
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key])
    assert not torch.equal(first[2].weight, other[2].weight)
    assert first.random_init and first.weights_path is None
    assert all(not p.requires_grad for p in first.parameters())
    first.train()
    assert not first.training


def test_vgg_layout_and_output_shape() -> None:
    encoder = build_vgg_encoder(seed=0)
    assert len(encoder) == 11
    assert [type(encoder[i]).__name__ for i in (0, 2, 5, 9)] == ["Conv2d"] * 4
    assert isinstance(encoder[7], torch.nn.MaxPool2d) and encoder[7].ceil_mode
    assert isinstance(encoder[10], torch.nn.ReLU)
    # Random init: layer 0 passes RGB [0, 1] through unchanged.
    pixel = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1)
    assert torch.allclose(encoder[0](pixel), pixel)
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, VGG_RELU2_1_CHANNELS, 16, 16)


def test_vgg_weights_round_trip(tmp_path) -> None:
    source = build_vgg_encoder(seed=3)
    state = dict(source.state_dict())
    state["12.weight"] = torch.zeros(128, 128, 3, 3)  # deeper layers are ignored
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    loaded = build_vgg_encoder(path)
    assert not loaded.random_init and loaded.weights_path == str(path)
    for key, tensor in source.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key])


def test_vgg_missing_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_vgg_encoder(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("missing", "lacks keys"),
        ("shape", "shape mismatch"),
        ("list", "does not hold a state dict"),
        ("garbage", "could not be read"),
    ],
)
def test_vgg_bad_weights_file(tmp_path, content: str, message: str) -> None:
    path = tmp_path / f"{content}.pth"
    state = dict(build_vgg_encoder(seed=0).state_dict())
    if content == "missing":
        del state["9.weight"]
        torch.save(state, path)
    elif content == "shape":
        state["5.weight"] = torch.zeros(64, 64, 1, 1)
        torch.save(state, path)
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=message) as error:
        build_vgg_encoder(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- GramEncoder


@pytest.mark.parametrize(("dim", "out_dim"), [(0, 8256), (32, 32)])
def test_gram_encoder_output(dim: int, out_dim: int) -> None:
    encoder = GramEncoder(build_vgg_encoder(seed=0), pool=2, dim=dim, seed=0)
    assert encoder.out_dim == out_dim
    with torch.inference_mode():
        vectors = encoder(torch.rand(2, 3, 32, 32, dtype=torch.float64))
    assert vectors.shape == (2, out_dim) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError):
        encoder(torch.rand(2, 1, 32, 32))
