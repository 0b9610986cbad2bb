"""Image input/output in NumPy and Pillow: reading photos, reference crops, output conversion."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: any phone photo; refuses decompression bombs

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


class ImageTooLarge(InputError):
    """An image over the pixel guard (or too large to decode): a service answers 413."""


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as 8-bit RGB; anything unreadable raises InputError naming the file.

    The size in the header is checked against `max_pixels` (None: no limit of ours) before any
    pixel is decoded, and Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) also
    applies; both raise InputError. The EXIF orientation is applied (phone photos). Transparent
    images (RGBA, LA, PA, P with transparency) are composited onto white. 16-bit grayscale
    (I;16*, I) is scaled by 255/65535; F is taken as [0, 1] or [0, 255] if it fits, else its range.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise InputError(f"image file {name!r} does not exist")
    if not path.is_file():
        raise InputError(f"{name!r} is not a file")
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_size(name, img.size, max_pixels, caught)
                if ImageFile.LOAD_TRUNCATED_IMAGES:
                    log.warning("ImageFile.LOAD_TRUNCATED_IMAGES is set: a truncated %r may load", name)
                img.load()  # the full decode: truncated or corrupt data fails here
                return _to_rgb(name, _oriented(name, img))
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name!r} is too large to decode: {exc}") from exc
    except MemoryError as exc:
        raise ImageTooLarge(f"{name!r} is too large to decode: out of memory") from exc
    except _DECODE_ERRORS as exc:
        raise InputError(f"{name!r} is not a readable image: {exc}") from exc
    finally:
        for w in caught:
            if not issubclass(w.category, Image.DecompressionBombWarning):
                log.warning("%s: %s", name, w.message)


def check_pixels(
    photos: Sequence[tuple[str, str | Path | bytes]], max_pixels: int | None, max_total: int | None = None
) -> int:
    """Pixels of `photos` (name, file or bytes) from headers, no decode: ImageTooLarge over a limit."""
    total = 0
    for name, src in photos:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
                    w, h = img.size
            except Image.DecompressionBombError as exc:
                raise ImageTooLarge(f"{name!r} is too large to decode: {exc}") from exc
            except _DECODE_ERRORS as exc:
                raise InputError(f"{name!r} is not a readable image: {exc}") from exc
        _check_size(name, (w, h), max_pixels, caught)
        total += w * h
        if max_total is not None and total > max_total:
            raise ImageTooLarge(f"{name!r} ({w}x{h} = {w * h} pixels) brings the photos to {total} decoded"
                                f" pixels, over the limit of {max_total} for all photos together")
    return total


def _check_size(
    name: str, size: tuple[int, int], max_pixels: int | None, caught: list[warnings.WarningMessage]
) -> None:
    """Refuse a header size over our limit or Pillow's (its DecompressionBombWarning), before decoding."""
    width, height = size
    pixels = width * height
    if pixels == 0:
        raise InputError(f"{name!r} has no pixels ({width}x{height})")
    limits = [] if max_pixels is None else [max_pixels]
    bomb = any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    if bomb and Image.MAX_IMAGE_PIXELS is not None:
        limits.append(Image.MAX_IMAGE_PIXELS)
    if limits and (bomb or pixels > min(limits)):
        raise ImageTooLarge(
            f"{name!r} is {width}x{height} = {pixels} pixels, over the limit of {min(limits)} pixels"
        )


def _oriented(name: str, img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block is logged and ignored."""
    try:
        return ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as exc:
        log.warning("%s: EXIF orientation ignored (%s)", name, exc)
        return img


def _composite_white(rgba: Image.Image) -> Image.Image:
    """RGBA -> RGB over a white background."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """[H, W] float gray in [0, 255] -> RGB, rounded."""
    g = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(g).convert("RGB")


def _to_rgb(name: str, img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see `load_image` for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite_white(img.convert("RGBA"))
    if mode.startswith("I;16") or mode == "I":
        x = np.asarray(img).astype(np.float64)  # [H, W]
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 65535:
            return _gray_to_rgb((x - lo) * (255.0 / max(hi - lo, 1.0)))
        return _gray_to_rgb(x * (255.0 / 65535.0))
    if mode == "F":
        x = np.nan_to_num(np.asarray(img, dtype=np.float64))  # [H, W]
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0 and hi <= 1:
            return _gray_to_rgb(x * 255.0)
        if lo >= 0 and hi <= 255:
            return _gray_to_rgb(x)
        return _gray_to_rgb((x - lo) * (255.0 / max(hi - lo, 1e-30)))
    try:
        return img.convert("RGB")  # P, CMYK, L, 1, YCbCr, ...
    except ValueError as exc:
        raise InputError(f"{name!r} has the unsupported image mode {mode!r}") from exc


def _padding(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) padding that centres a w x h image in a size x size square."""
    if w > h:
        pad = size - h
        return 0, pad // 2, 0, pad - pad // 2
    if h > w:
        pad = size - w
        return pad // 2, 0, pad - pad // 2, 0
    return 0, 0, 0, 0


def pad_to_square(img: Image.Image, size: int) -> Image.Image:
    """Longer side to `size` (Pillow's default bicubic), pad with black (official `PadToSquare`)."""
    scale = size / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)))
    left, top, right, bottom = _padding(img.width, img.height, size)
    out = Image.new(img.mode, (img.width + left + right, img.height + top + bottom))
    out.paste(img, (left, top))
    return out


def reference_array(img: Image.Image, size: int) -> np.ndarray:
    """A face crop as the model sees it: padded square, [3, size, size] float32 in [-1, 1]."""
    square = pad_to_square(img.convert("RGB"), size)
    x = np.asarray(square, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [3, S, S] in [0, 1]
    return ((x - 0.5) / 0.5).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Decoded [N, 3, H, W] in about [-1, 1] -> uint8 [N, H, W, 3] (official: scale, clip, truncate)."""
    x = images.transpose(0, 2, 3, 1) * 127.5 + 127.5
    return x.clip(0, 255).astype(np.uint8)


def synthetic_face(size: int = 224, seed: int = 0) -> Image.Image:
    """A drawn stand-in face for the tiny preset's demo (not a photo; the tiny model's output is noise)."""
    from PIL import ImageDraw

    rng = np.random.Generator(np.random.PCG64(seed))
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(40, 90, 3)))
    d = ImageDraw.Draw(img)
    s = size / 224
    d.ellipse([52 * s, 30 * s, 172 * s, 190 * s], fill=(224, 180, 150))
    for cx in (88, 136):
        d.ellipse([(cx - 10) * s, 88 * s, (cx + 10) * s, 102 * s], fill=(40, 30, 30))
    d.line(
        [112 * s, 105 * s, 106 * s, 135 * s, 116 * s, 138 * s], fill=(150, 100, 90), width=max(1, int(3 * s))
    )
    d.arc([86 * s, 140 * s, 138 * s, 168 * s], 20, 160, fill=(160, 60, 60), width=max(1, int(4 * s)))
    return img
