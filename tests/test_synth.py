"""Tests for the demo photo generator and the sketch / art / low-res style transforms."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.data.synth import (
    DEMO_CLASSES,
    STYLE_TRANSFORMS,
    render_photo,
    to_art,
    to_lowres,
    to_sketch,
)

SAMPLE = 12


@pytest.fixture(scope="module")
def styled() -> list[dict[str, Image.Image]]:
    """A dozen demo photos, each with its three style versions."""
    items = []
    for index in range(SAMPLE):
        photo = render_photo(5, index)[0]
        versions = {name: transform(photo, index) for name, transform in STYLE_TRANSFORMS.items()}
        items.append({"photo": photo, **versions})
    return items


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def _laplacian_energy(img: Image.Image) -> float:
    """Mean absolute 4-neighbour Laplacian of the luminance: high-frequency content."""
    luma = np.asarray(img.convert("L"), dtype=np.float32)
    centre = luma[1:-1, 1:-1]
    return float(np.abs(4 * centre - luma[:-2, 1:-1] - luma[2:, 1:-1]
                        - luma[1:-1, :-2] - luma[1:-1, 2:]).mean())


def _saturation(img: Image.Image) -> float:
    """Mean max-min channel spread (0 for grey pixels)."""
    rgb = _pixels(img)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


def _distinct_colours(img: Image.Image) -> int:
    """Number of distinct colours at 5 bits per channel."""
    coarse = np.asarray(img) >> 3
    return len(np.unique(coarse.reshape(-1, 3), axis=0))


def _thumbnail(img: Image.Image) -> np.ndarray:
    return _pixels(img.resize((8, 8), Image.BOX))


def test_render_is_deterministic_and_items_differ():
    first, caption, label = render_photo(0, 3)
    again, caption_again, label_again = render_photo(0, 3)
    assert first.tobytes() == again.tobytes()
    assert (caption, label) == (caption_again, label_again)
    assert render_photo(0, 4)[0].tobytes() != first.tobytes()
    assert render_photo(1, 3)[0].tobytes() != first.tobytes()


def test_render_shape_mode_and_sizes():
    for size in (64, 128, 224):
        photo, _, _ = render_photo(2, 9, size=size)
        assert photo.mode == "RGB" and photo.size == (size, size)


def test_photos_are_visibly_distinct():
    thumbs = [_thumbnail(render_photo(0, index)[0]) for index in range(16)]
    for i in range(len(thumbs)):
        for j in range(i + 1, len(thumbs)):
            assert np.abs(thumbs[i] - thumbs[j]).mean() > 3.0, (i, j)


def test_classes_balanced_and_captions_name_them():
    labels = []
    for index in range(64):
        _, caption, label = render_photo(7, index)
        assert label in DEMO_CLASSES
        assert label in caption and "background" in caption
        labels.append(label)
    counts = {name: labels.count(name) for name in DEMO_CLASSES}
    assert min(counts.values()) == max(counts.values()) == 64 // len(DEMO_CLASSES)


def test_some_photos_have_two_objects():
    captions = [render_photo(0, index)[1] for index in range(40)]
    two = [c for c in captions if " and a " in c]
    assert 5 <= len(two) <= 35


@pytest.mark.parametrize("size", [(97, 61), (61, 97), (7, 5), (517, 301)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_transforms_keep_size_and_give_rgb(size, mode):
    img = render_photo(0, 1, size=128)[0].resize(size).convert(mode)
    for name, transform in STYLE_TRANSFORMS.items():
        out = transform(img, 3)
        assert out.mode == "RGB" and out.size == size, name


def test_transforms_are_deterministic():
    photo = render_photo(0, 2)[0]
    for name, transform in STYLE_TRANSFORMS.items():
        assert transform(photo, 11).tobytes() == transform(photo, 11).tobytes(), name
        assert transform(photo, 11).tobytes() != photo.tobytes(), name
    assert STYLE_TRANSFORMS == {"sketch": to_sketch, "art": to_art, "lowres": to_lowres}


def test_negative_seeds_are_accepted():
    photo = render_photo(-1, 0)[0]
    assert photo.tobytes() == render_photo(-1, 0)[0].tobytes()
    for transform in STYLE_TRANSFORMS.values():
        assert transform(photo, -(2**40)).size == photo.size


def test_sketch_is_dark_lines_on_white(styled):
    white = [(np.asarray(item["sketch"].convert("L")) > 200).mean() for item in styled]
    assert np.mean(white) > 0.85 and min(white) > 0.6
    assert np.mean([_saturation(item["sketch"]) for item in styled]) < 5.0
    photo_white = [(np.asarray(item["photo"].convert("L")) > 200).mean() for item in styled]
    assert np.mean(photo_white) < 0.3
    # the lines sit on the photo's edges: its gradient is higher under ink than off it
    ratios = []
    for item in styled:
        smooth = item["photo"].convert("L").filter(ImageFilter.GaussianBlur(1.5))  # no noise
        luma = np.asarray(smooth, dtype=np.float32)
        gradient = np.hypot(*np.gradient(luma))
        grown = item["sketch"].convert("L").filter(ImageFilter.MinFilter(5))
        ink = np.asarray(grown) < 128
        if ink.any():
            ratios.append(gradient[ink].mean() / gradient[~ink].mean())
    assert len(ratios) >= SAMPLE - 1
    assert np.median(ratios) > 2.5 and min(ratios) > 1.1


def test_lowres_loses_high_frequencies(styled):
    photo = np.mean([_laplacian_energy(item["photo"]) for item in styled])
    lowres = np.mean([_laplacian_energy(item["lowres"]) for item in styled])
    assert lowres < 0.4 * photo


def test_art_is_posterised_and_vivid(styled):
    photo_colours = np.mean([_distinct_colours(item["photo"]) for item in styled])
    art_colours = np.mean([_distinct_colours(item["art"]) for item in styled])
    assert art_colours < 0.25 * photo_colours
    photo_saturation = np.mean([_saturation(item["photo"]) for item in styled])
    art_saturation = np.mean([_saturation(item["art"]) for item in styled])
    assert art_saturation > 1.15 * photo_saturation


@pytest.mark.parametrize("style", ["art", "lowres"])
def test_styles_keep_the_composition(styled, style):
    """An 8x8 thumbnail of a styled image is closer to its own photo than to the next one."""
    closer = 0
    for index, item in enumerate(styled):
        other = styled[(index + 1) % len(styled)]["photo"]
        own = np.abs(_thumbnail(item[style]) - _thumbnail(item["photo"])).mean()
        closer += own < np.abs(_thumbnail(item[style]) - _thumbnail(other)).mean()
    assert closer >= len(styled) - 1
