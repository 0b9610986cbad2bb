"""Image input/output in NumPy and Pillow: reading photos, reference crops, output conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB; anything unreadable raises InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{str(path)!r} is not a readable image: {exc}") from exc


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


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(img) for img in to_uint8(images)]


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
