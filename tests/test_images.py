"""Input decoding: every bad kind -> BadInput with its reason prefix; odd modes -> plain RGB."""

from __future__ import annotations

import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import BadInput, check_caption, load_rgb, read_caption, to_tensor
from pipeline.data.loader import ImageItem, iter_batches

MAX_PIXELS = 40_000_000
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _noise(width: int = 64, height: int = 64) -> Image.Image:
    """Incompressible RGB, so a cut file loses pixel data, not just padding."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR claims width x height RGB pixels (no pixel data behind it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _reason(path: Path, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(BadInput) as caught:
        load_rgb(path, max_pixels)
    assert str(path) in str(caught.value)
    assert "\n" not in caught.value.reason and len(caught.value.reason) <= 200
    return caught.value.reason


def _pixel(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)[xy[1], xy[0]]


# -- bad images ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.jpg").startswith("missing: ")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _reason(path) == "empty file"


def test_directory_is_unreadable(tmp_path: Path) -> None:
    assert _reason(tmp_path).startswith("unreadable: ")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"this is not an image, just some text\n" * 20)
    assert _reason(path) == "corrupt: cannot identify image file"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cut.{fmt.lower()}"
    _noise().save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _reason(path).startswith("truncated: ")


def test_too_large_from_header_before_decoding(tmp_path: Path) -> None:
    # 64 Mpx: under Pillow's own limits, over ours; no pixel data exists, so a decode would fail.
    path = _png_header_only(tmp_path / "big.png", 8000, 8000)
    assert _reason(path) == "too large: 8000x8000 px > max_pixels 40000000"


def test_too_large_small_limit(tmp_path: Path) -> None:
    path = tmp_path / "blank.png"
    Image.new("RGB", (100, 100)).save(path)
    assert _reason(path, max_pixels=5000) == "too large: 100x100 px > max_pixels 5000"
    assert load_rgb(path, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow's warning tier, its error tier
def test_decompression_bomb_no_pillow_warning_or_error(tmp_path: Path, side: int) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = _reason(path)
    assert reason.startswith("too large: ") and "max_pixels 40000000" in reason
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_bad_input_pickles(tmp_path: Path) -> None:
    exc = BadInput("empty file", tmp_path / "a.png")
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.reason, copy.path, str(copy)) == (exc.reason, exc.path, str(exc))


# -- conversions ----------------------------------------------------------------------------


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_rgb(path, MAX_PIXELS)
    assert image.mode == "RGB"
    assert np.abs(_pixel(image, (16, 16)) - RED).max() <= 10


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])  # PNG opens as "I;16", TIFF int32 as "I"
def test_16_bit_grey_is_scaled(tmp_path: Path, fmt: str) -> None:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    path = tmp_path / f"grey16.{fmt.lower()}"
    source = Image.fromarray(ramp) if fmt == "PNG" else Image.fromarray(ramp.astype(np.int32))
    source.save(path, format=fmt)
    assert Image.open(path).mode in ("I;16", "I")
    image = load_rgb(path, MAX_PIXELS)
    assert image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.int32)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    expected = np.round(ramp / 257.0).astype(np.int32)
    assert np.abs(pixels[..., 0] - expected).max() <= 1  # not clipped to white
    assert pixels.min() == 0 and pixels.max() == 255


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(1, (10, 0, 20, 10))  # right half: index 1 (red); left: index 0 (transparent)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    rgb = load_rgb(path, MAX_PIXELS)
    assert rgb.mode == "RGB"
    assert tuple(_pixel(rgb, (2, 5))) == WHITE
    assert tuple(_pixel(rgb, (15, 5))) == RED


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    image.paste((*BLUE, 255), (10, 0, 20, 10))
    image.paste((0, 0, 0, 128), (20, 0, 30, 10))
    path = tmp_path / "alpha.png"
    image.save(path)
    rgb = load_rgb(path, MAX_PIXELS)
    assert rgb.mode == "RGB"
    assert tuple(_pixel(rgb, (5, 5))) == WHITE
    assert tuple(_pixel(rgb, (15, 5))) == BLUE
    assert np.abs(_pixel(rgb, (25, 5)) - 127).max() <= 1  # half-transparent black -> grey


def test_grey_with_alpha(tmp_path: Path) -> None:
    image = Image.new("LA", (10, 10), (40, 0))
    image.paste((40, 255), (5, 0, 10, 10))
    path = tmp_path / "la.png"
    image.save(path)
    rgb = load_rgb(path, MAX_PIXELS)
    assert tuple(_pixel(rgb, (2, 2))) == WHITE
    assert tuple(_pixel(rgb, (7, 2))) == (40, 40, 40)


@pytest.mark.parametrize(("mode", "fill", "expected"), [("L", 100, 100), ("1", 1, 255)])
def test_greyscale(tmp_path: Path, mode: str, fill: int, expected: int) -> None:
    path = tmp_path / f"grey_{mode}.png"
    Image.new(mode, (8, 8), fill).save(path)
    rgb = load_rgb(path, MAX_PIXELS)
    assert rgb.mode == "RGB"
    assert (np.asarray(rgb) == expected).all()


def test_exif_orientation_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    rgb = load_rgb(path, MAX_PIXELS)
    assert rgb.size == (20, 40)
    assert np.abs(_pixel(rgb, (10, 5)) - RED).max() <= 10  # left edge is now the top
    assert np.abs(_pixel(rgb, (10, 35)) - BLUE).max() <= 10


def test_plain_rgb_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    source = _noise(20, 12)
    source.save(path)
    rgb = load_rgb(str(path), MAX_PIXELS)
    assert rgb.mode == "RGB" and rgb.size == (20, 12)
    assert (np.asarray(rgb) == np.asarray(source)).all()


# -- captions -------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"  \n\t \r\n", b"\xef\xbb\xbf \n"])
def test_empty_caption_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "caption.txt"
    path.write_bytes(content)
    with pytest.raises(BadInput) as caught:
        read_caption(path)
    assert caught.value.reason == "empty caption"
    assert str(path) in str(caught.value)


def test_undecodable_caption(tmp_path: Path) -> None:
    path = tmp_path / "caption.txt"
    path.write_bytes(b"a photo of a \xff\xfe cat")
    with pytest.raises(BadInput) as caught:
        read_caption(path)
    assert caught.value.reason.startswith("undecodable caption: ")


def test_missing_caption(tmp_path: Path) -> None:
    with pytest.raises(BadInput) as caught:
        read_caption(tmp_path / "none.txt")
    assert caught.value.reason.startswith("missing: ")


def test_caption_bom_and_whitespace_stripped(tmp_path: Path) -> None:
    path = tmp_path / "caption.txt"
    path.write_bytes("\ufeff  a café at night \n".encode())
    assert read_caption(path) == "a café at night"


@pytest.mark.parametrize("text", [None, "", "   \n", "\ufeff"])
def test_check_caption_empty(text: str | None) -> None:
    with pytest.raises(BadInput) as caught:
        check_caption(text)
    assert caught.value.reason == "empty caption"


def test_check_caption_strips() -> None:
    assert check_caption("\ufeff  a sketch of a dog\t") == "a sketch of a dog"


# -- to_tensor ------------------------------------------------------------------------------


def test_to_tensor_centre_crop_exact() -> None:
    # Shorter side already equals size: no resize, only the centre crop (columns 10..19).
    columns = np.tile(np.arange(30, dtype=np.uint8), (10, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    pixels = to_tensor(image, 10)
    assert pixels.shape == (3, 10, 10) and pixels.dtype == torch.float32
    expected = torch.arange(10, 20, dtype=torch.float32) / 255
    assert torch.equal(pixels[0, 0], expected) and torch.equal(pixels[2, 9], expected)


@pytest.mark.parametrize("size", [(40, 20), (20, 40), (7, 5)])
def test_to_tensor_resize_and_crop(size: tuple[int, int]) -> None:
    # Red outer quarters along the long side, green centre: the crop keeps the green.
    width, height = size
    image = Image.new("RGB", size, RED)
    if width >= height:
        image.paste(GREEN, (width // 4, 0, width - width // 4, height))
    else:
        image.paste(GREEN, (0, height // 4, width, height - height // 4))
    pixels = to_tensor(image, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert pixels[1, 6:10, 6:10].min() > 0.95 and pixels[0, 6:10, 6:10].max() < 0.05
    assert torch.equal(pixels, to_tensor(image, 16))  # deterministic


def test_to_tensor_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("L", (8, 8)), 4)


def _loader_items(tmp_path: Path) -> list[ImageItem]:
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    paths.insert(1, tmp_path / "bad.png")
    return [ImageItem("gallery", i, str(p)) for i, p in enumerate(paths)]


def test_iter_batches_keeps_order_and_reports_bad_inputs(tmp_path):
    batches = list(iter_batches(_loader_items(tmp_path), 16, 10**8, batch_size=2,
                                num_workers=0))
    assert [[i.item_id for i in b.items] for b in batches] == [[0], [2, 3]]
    assert [[(i.item_id, reason != "") for i, reason in b.failures] for b in batches] == [
        [(1, True)], []]
    assert [tuple(b.pixels.shape) for b in batches] == [(1, 3, 16, 16), (2, 3, 16, 16)]
    assert batches[0].pixels[0, 0].mean() > 0.9 > batches[0].pixels[0, 1:].mean()  # red


@pytest.mark.gpu
def test_batches_come_pinned_for_non_blocking_copies(tmp_path):
    # The DataLoader pins only types it knows, or ones with a pin_memory() method (Batch has).
    batches = list(iter_batches(_loader_items(tmp_path), 16, 10**8, batch_size=2,
                                num_workers=0, pin_memory=True))
    assert all(b.pixels.is_pinned() for b in batches)
    assert [i.item_id for b in batches for i, _ in b.failures] == [1]
