"""Decode images and captions robustly: a bad input raises `BadInput` with a short reason.

A batch run must never stop or be corrupted by one bad file, so every way an input can be
bad (missing, empty, corrupt, truncated, too large, undecodable caption) ends in `BadInput`,
whose `reason` starts with a stable prefix ("missing:", "empty file", "corrupt:",
"truncated:", "too large:", "unreadable:", "unsupported:", "empty caption",
"undecodable caption:") so failures can be grouped with `split(":")[0]`. Anything else
(MemoryError, a bug) propagates.

Everything that decodes goes through `load_rgb`, which returns an 8-bit RGB image whatever
the file holds (CMYK, 16-bit grey, palette, alpha, EXIF-rotated); `to_tensor` then makes the
fixed-size float tensor the models read.

Usage:
    img = load_rgb("photo.jpg", max_pixels=40_000_000)
    pixels = to_tensor(img, 224)          # (3, 224, 224) float32 in [0, 1]
    text = read_caption("caption.txt")
"""

from __future__ import annotations

import logging
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_CAPTION_BYTES = 1 << 20  # a caption file larger than this is not a caption
_REASON_CHARS = 200  # reasons are grouped and stored per row: keep them short
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_BYTES_LEFT = re.compile(r"\s*\(\d+ bytes not processed\)")
_TRUNCATED_WORDS = ("truncated", "premature end", "unexpected end")
# 16-bit modes Pillow can open; "I" (32-bit signed) is handled beside them.
_MODES_16 = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class BadInput(Exception):
    """An input that cannot be used; `reason` is short and machine-groupable, str() has the path."""

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def __reduce__(self):
        # DataLoader workers pickle exceptions; the default would call __init__(message).
        return type(self), (self.reason, self.path)


def _short(message: object) -> str:
    """One line, at most _REASON_CHARS characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return f"too large: {width}x{height} px > max_pixels {max_pixels}"


def _decode_reason(exc: Exception, max_pixels: int) -> str:
    """Map a Pillow open/decode failure to a reason."""
    if isinstance(exc, Image.DecompressionBombError):
        # Pillow's own outer limit (2 * Image.MAX_IMAGE_PIXELS) fired inside Image.open, before
        # the size could be read; its message carries the pixel count but not width x height.
        found = _BOMB_PIXELS.search(str(exc))
        if found:
            return f"too large: {found.group(1)} px > max_pixels {max_pixels}"
        return f"too large: {_short(exc)}"
    if isinstance(exc, UnidentifiedImageError):
        # Pillow's message names the file object; the path is already on the BadInput.
        return "corrupt: cannot identify image file"
    if isinstance(exc, EOFError):
        return f"truncated: {_short(exc) or 'unexpected end of file'}"
    message = _short(_BYTES_LEFT.sub("", str(exc)))
    if isinstance(exc, OSError) and any(w in message.lower() for w in _TRUNCATED_WORDS):
        return f"truncated: {message}"
    return f"corrupt: {message or type(exc).__name__}"


def _check_file(path: Path) -> None:
    """Raise BadInput for a missing, unreadable or empty file."""
    try:
        size = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise BadInput(f"missing: {exc.strerror}", path) from exc
    except OSError as exc:
        raise BadInput(f"unreadable: {exc.strerror}", path) from exc
    if not path.is_file():
        raise BadInput("unreadable: not a regular file", path)
    if size == 0:
        raise BadInput("empty file", path)


def _decode(path: Path, max_pixels: int) -> Image.Image:
    """Open, check the header size against max_pixels, then fully decode (first frame)."""
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's warning tier; its error tier
            # (2 * MAX_IMAGE_PIXELS) still raises and is mapped to "too large" below.
            # catch_warnings swaps the process-wide filter list: DataLoader workers are
            # processes, so it is safe there; with threads the worst case is that this
            # narrow "ignore" filter outlives the block. Image.MAX_IMAGE_PIXELS is not
            # touched, so other Pillow users in the process keep their limits.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadInput(_too_large(width, height, max_pixels), path)
                if width <= 0 or height <= 0:
                    raise BadInput(f"corrupt: image size {width}x{height}", path)
                # load() raises OSError on truncated data as long as
                # ImageFile.LOAD_TRUNCATED_IMAGES stays False (never set here).
                image.load()
                return _oriented(image, path)
    except FileNotFoundError as exc:  # removed between the stat and the open
        raise BadInput(f"missing: {exc.strerror}", path) from exc
    except PermissionError as exc:
        raise BadInput(f"unreadable: {exc.strerror}", path) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError) as exc:
        # UnidentifiedImageError is an OSError; SyntaxError/struct.error come from plugins'
        # header parsers, ValueError from limits such as oversized PNG text chunks.
        raise BadInput(_decode_reason(exc, max_pixels), path) from exc


def _oriented(image: Image.Image, path: Path) -> Image.Image:
    """The image turned upright per its EXIF orientation; a new image, detached from the file."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error) as exc:
        # Broken EXIF in an otherwise decodable image: keep the pixels, lose the rotation.
        logger.debug("%s: ignoring unreadable EXIF orientation (%s)", path, exc)
        return image.copy()


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit "L", scaled (Pillow's convert would clip)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode in _MODES_16 or (
        image.mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535
    ):
        # Known or plausible 16-bit data (PNG/TIFF 16-bit grey may open as "I"): full scale.
        scaled = values / 65535.0
    elif image.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        scaled = values
    else:  # unknown range: stretch what is there
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8), mode="L")


def _flatten(image: Image.Image) -> Image.Image:
    """Alpha (or transparency key) composited on white, returned as RGB."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    """Alpha channel, tRNS-style transparency key, or an RGBA palette."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """Any decoded mode -> 8-bit RGB."""
    mode = image.mode
    if mode in _MODES_16 or mode in ("I", "F"):
        return _high_depth_to_l(image).convert("RGB")
    if _has_alpha(image):
        try:
            return _flatten(image)
        except ValueError as exc:
            raise BadInput(f"unsupported: mode {mode} with alpha ({_short(exc)})", path) from exc
    try:
        # CMYK (incl. Adobe inverted, undone by the decoder), P, L, 1, YCbCr -> RGB.
        return image.convert("RGB")
    except ValueError as exc:  # e.g. LAB, which needs a colour profile
        raise BadInput(f"unsupported: mode {mode}", path) from exc


def load_rgb(path: str | Path, max_pixels: int) -> Image.Image:
    """Fully decoded 8-bit RGB image, EXIF-upright; BadInput if missing/empty/corrupt/
    truncated/larger than max_pixels (checked from the header, before decoding)."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    path = Path(path)
    _check_file(path)
    return _to_rgb(_decode(path, max_pixels), path)


def check_caption(text: str | None, path: str | Path | None = None) -> str:
    """Caption with BOM and surrounding whitespace stripped; BadInput("empty caption") if none."""
    if text is None:
        raise BadInput("empty caption", path)
    cleaned = text.lstrip("\ufeff").strip()
    if not cleaned:
        raise BadInput("empty caption", path)
    return cleaned


def read_caption(path: str | Path) -> str:
    """Caption file read as UTF-8 (BOM allowed), stripped; BadInput if missing/empty/undecodable."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CAPTION_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise BadInput(f"missing: {exc.strerror}", path) from exc
    except OSError as exc:  # a directory, no permission, I/O error
        raise BadInput(f"unreadable: {exc.strerror}", path) from exc
    if len(data) > MAX_CAPTION_BYTES:
        raise BadInput(f"too large: caption > {MAX_CAPTION_BYTES} bytes", path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"undecodable caption: invalid utf-8 at byte {exc.start}", path) from exc
    return check_caption(text, path)


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> float32 (3, size, size) in [0, 1]: shorter side to size (bilinear,
    antialiased), then centre crop."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor needs an RGB image (use load_rgb), got mode {img.mode}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        # Pillow's BILINEAR widens its filter when shrinking, i.e. it is antialiased.
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (size, size, 3), a copy
    return pixels.permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)
