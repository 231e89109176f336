"""Style space: k-means, soft style weights/features, purity and ARI; real sketch-vs-photo check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.style_space import (
    adjusted_rand_index,
    assign,
    cluster_purity,
    fit_kmeans,
    style_feature,
    style_feature_torch,
    style_weights,
)


def _blobs(per_cluster: int = 40, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three tight clusters around orthogonal directions (well separated by cosine)."""
    rng = np.random.default_rng(seed)
    points = [np.eye(dim)[i] * 5 + rng.normal(scale=0.3, size=(per_cluster, dim)) for i in range(3)]
    labels = np.repeat(np.array(["photo", "sketch", "art"]), per_cluster)
    return np.concatenate(points).astype(np.float32), labels


# ---------------------------------------------------------------- k-means


def test_kmeans_recovers_separated_clusters() -> None:
    x, labels = _blobs()
    centres = fit_kmeans(x, k=3, niter=20, seed=0)
    assert centres.shape == (3, 16) and centres.dtype == np.float32
    assert np.allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-5)
    clusters = assign(x, centres)
    assert cluster_purity(labels, clusters) == 1.0
    assert adjusted_rand_index(labels, clusters) == pytest.approx(1.0)


def test_kmeans_is_deterministic_given_seed() -> None:
    x, _ = _blobs(seed=1)
    assert np.array_equal(fit_kmeans(x, 3, 10, seed=7), fit_kmeans(x, 3, 10, seed=7))


def test_kmeans_needs_k_points() -> None:
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_kmeans(np.ones((3, 8), dtype=np.float32), k=4, niter=5, seed=0)


# ---------------------------------------------------------------- style weights / features


def test_style_weights_sum_to_one_and_favour_nearest() -> None:
    centres = np.eye(4, dtype=np.float32)
    g = np.array([[0.9, 0.1, 0.0, 0.0], [0.0, 0.2, 0.0, 1.0]], dtype=np.float32)
    weights = style_weights(g, centres)
    assert weights.shape == (2, 4)
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert list(weights.argmax(axis=1)) == [0, 3] == list(assign(g, centres))
    sharp = style_weights(g, centres, temperature=0.01)
    assert sharp[0, 0] > 0.99 and weights[0, 0] < sharp[0, 0]
    with pytest.raises(ValueError):
        style_weights(g, centres, temperature=0.0)


def test_style_weights_by_hand() -> None:
    centres = np.eye(2, dtype=np.float32)
    weights = style_weights(np.array([[1.0, 0.0]], dtype=np.float32), centres)
    expected = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()  # softmax of cosines (1, 0)
    assert np.allclose(weights[0], expected, atol=1e-6)


def test_style_feature_mixes_centres() -> None:
    centres = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    one_hot = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)
    assert np.allclose(style_feature(one_hot, centres), centres[2:])
    halves = np.array([[0.5, 0.5, 0.0]], dtype=np.float32)
    assert np.allclose(style_feature(halves, centres), [[0.5, 0.5]])


def test_style_feature_torch_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 12)).astype(np.float32)
    centres = rng.normal(size=(4, 12)).astype(np.float32)
    expected = style_feature(style_weights(g, centres, 0.5), centres)
    got = style_feature_torch(torch.from_numpy(g), torch.from_numpy(centres), 0.5)
    assert got.dtype == torch.float32
    assert np.allclose(got.numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------- purity / ARI


def test_purity_by_hand() -> None:
    # clusters: {a, a} -> 2, {a, b, b} -> 2, {c} -> 1; 5 of 6.
    true = np.array(["a", "a", "a", "b", "b", "c"])
    clusters = np.array([0, 0, 1, 1, 1, 2])
    assert cluster_purity(true, clusters) == pytest.approx(5 / 6)


def test_ari_known_values() -> None:
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)
    # Identical partitions up to relabelling, string labels on one side.
    true = np.array(["sketch", "sketch", "photo", "art", "art", "photo"])
    assert adjusted_rand_index(true, [2, 2, 0, 1, 1, 0]) == pytest.approx(1.0)
    assert cluster_purity(true, [2, 2, 0, 1, 1, 0]) == 1.0


def test_ari_is_near_zero_for_random_partitions() -> None:
    rng = np.random.default_rng(0)
    true, clusters = rng.integers(0, 4, size=4000), rng.integers(0, 4, size=4000)
    assert abs(adjusted_rand_index(true, clusters)) < 0.01


def test_label_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        cluster_purity([0, 1], [0])


# ---------------------------------------------------------------- real data


def _shared_data() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("FSR_SHARED_DATA", default))


def _load_224(path: Path) -> torch.Tensor:
    """RGB, shorter side -> 224 (bicubic), centre crop 224, (3, 224, 224) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    scale = 224 / min(width, height)
    size = (max(224, round(width * scale)), max(224, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - 224) // 2, (size[1] - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.mark.slow
def test_real_vgg_gram_separates_sketch_from_photo() -> None:
    data = _shared_data()
    weights = data / "vgg19" / "vgg19_conv1_1-conv3_4_adain_layout.pth"
    sketchy = data / "sketchy-mini"
    if not (weights.is_file() and (sketchy / "photo").is_dir()):
        pytest.skip(f"shared test data not found at {data} (set FSR_SHARED_DATA)")
    from pipeline.gram import GramEncoder
    from pipeline.models.vgg import build_vgg_encoder

    classes = sorted(path.name for path in (sketchy / "photo").iterdir())[::6]  # 21 classes
    paths, styles, class_ids = [], [], []
    for index, name in enumerate(classes):
        for style, pattern in (("photo", "*.jpg"), ("sketch", "*.png")):
            for path in sorted((sketchy / style / name).glob(pattern))[:2]:
                paths.append(path)
                styles.append(style)
                class_ids.append(index)
    styles_array, class_array = np.array(styles), np.array(class_ids)

    vgg = build_vgg_encoder(weights)
    # The real layer 0 is the Caffe conversion RGB [0, 1] -> BGR * 255 - mean.
    pixel = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1)
    caffe = torch.tensor([0.8 * 255 - 103.939, 0.5 * 255 - 116.779, 0.2 * 255 - 123.68])
    assert torch.allclose(vgg[0](pixel).flatten(), caffe, atol=1e-3)
    encoder = GramEncoder(vgg, pool=2, dim=0)
    images = torch.stack([_load_224(path) for path in paths])
    with torch.inference_mode():
        g = torch.cat([encoder(images[i : i + 16]) for i in range(0, len(images), 16)]).numpy()
    assert g.shape == (len(paths), 8256)

    # Unsupervised: two clusters are the two styles (measured, k-means seeds 0-4:
    # purity >= 0.988, ARI >= 0.952).
    clusters = assign(g, fit_kmeans(g, k=2, niter=20, seed=0))
    assert cluster_purity(styles_array, clusters) >= 0.95
    assert adjusted_rand_index(styles_array, clusters) >= 0.8

    # Nearest style centroid, fitted on even classes, tested on odd ones (measured: 1.000).
    train = class_array % 2 == 0
    names = np.array(["photo", "sketch"])
    centroids = np.stack([g[train & (styles_array == name)].mean(axis=0) for name in names])
    predicted = names[assign(g[~train], centroids)]
    assert (predicted == styles_array[~train]).mean() >= 0.95
