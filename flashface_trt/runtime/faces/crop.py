"""Face crops in NumPy and Pillow: plausible boxes, crop and level by the eyes, one face per photo."""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from ..errors import InputError

log = logging.getLogger(__name__)

MAX_BOX_SIDE = 2.0  # a face box side may be at most this many times the photo's longer side


def box_problem(box: ArrayLike, landmarks: ArrayLike, photo_size: tuple[int, int]) -> str | None:
    """Why a detection cannot be a face of a photo of `photo_size` (width, height), or None if it can.

    A face box may overhang the photo (the official crop fills the part outside with black, as ours
    does), but it must be finite, non-empty after rounding, overlap the photo, and have no side
    longer than `MAX_BOX_SIDE` times the photo's longer side; that also bounds the crop's size.
    """
    b = np.asarray(box, dtype=np.float32).reshape(-1)  # the official boxes are float32 tensors
    if b.shape[0] not in (4, 5):
        return f"{b.shape[0]} numbers, not [x1, y1, x2, y2(, score)]"
    if not np.isfinite(b[:4]).all() or not np.isfinite(np.asarray(landmarks, dtype=np.float32)).all():
        return "not finite"
    x1, y1, x2, y2 = (int(v) for v in np.round(b[:4]))
    width, height = photo_size
    if x2 <= x1 or y2 <= y1:
        return "empty"
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return "outside the photo"
    if max(x2 - x1, y2 - y1) > MAX_BOX_SIDE * max(width, height):
        return f"over {MAX_BOX_SIDE:g} times the photo's longer side"
    return None


def _norm(v: np.ndarray) -> float:
    """float32 Euclidean length, as the official `v.square().sum().sqrt().item()`."""
    return float(np.sqrt(np.sum(np.square(v, dtype=np.float32), dtype=np.float32), dtype=np.float32))


def eye_angle(landmarks: ArrayLike) -> float | None:
    """Rotation (degrees, counter-clockwise) that levels the eyes; None where the official skips it.

    Reproduces the law-of-cosines arithmetic of the official `crop_face` (ldm/models/retinaface.py),
    including its `direction` flip and the `b == 0 or c == 0` (coincident eyes) skip.
    """
    lm = np.asarray(landmarks, dtype=np.float32)  # [5, 2]: left eye, right eye, nose, mouth corners
    if lm.shape != (5, 2):
        raise InputError(f"face landmarks must have shape [5, 2], got {list(lm.shape)}")
    leye, reye = lm[0], lm[1]
    if leye[1] > reye[1]:
        point_3rd = np.array([reye[0], leye[1]], dtype=np.float32)
        direction = -1
    else:
        point_3rd = np.array([leye[0], reye[1]], dtype=np.float32)
        direction = 1
    a = _norm(leye - point_3rd)
    b = _norm(reye - point_3rd)
    c = _norm(reye - leye)
    if b == 0 or c == 0:
        return None
    cos_a = min(1.0, max(-1.0, (b * b + c * c - a * a) / (2 * b * c)))
    angle = (math.acos(cos_a) * 180) / math.pi
    if direction == -1:
        angle = 90 - angle
    return direction * angle


def crop_face(img: Image.Image, box: ArrayLike, landmarks: ArrayLike) -> Image.Image:
    """Crop the rounded box and rotate it level by the eyes (official `crop_face`, ldm/models/retinaface.py).

    As the official: PIL `crop` (outside the photo is black), then PIL `rotate` with its defaults
    (nearest neighbour, same size, black corners). A box that cannot be a face of `img`
    (`box_problem`) raises InputError.
    """
    b = np.asarray(box, dtype=np.float32).reshape(-1)
    problem = box_problem(b, landmarks, img.size)
    if problem is not None:
        raise InputError(
            f"face box {b[:4].tolist()} cannot be cropped from a {img.width}x{img.height} photo: {problem}"
        )
    x1, y1, x2, y2 = (int(v) for v in np.round(b[:4]))  # half to even, as the official `bbox.round()`
    try:
        crop = img.crop((x1, y1, x2, y2))
    except Image.DecompressionBombError as exc:
        raise InputError(f"the crop of face box {[x1, y1, x2, y2]} is too large: {exc}") from exc
    angle = eye_angle(landmarks)
    if angle is not None:
        crop = crop.rotate(angle)
    return crop


def detections(boxes: ArrayLike, landmarks: ArrayLike, photo_name: str) -> tuple[np.ndarray, np.ndarray]:
    """A photo's detections as arrays [K, 5] and [K, 5, 2] (K may be 0); InputError naming the photo."""
    b, lm = np.asarray(boxes), np.asarray(landmarks)
    if b.size == 0:
        b = b.reshape(0, 5)
    if lm.size == 0:
        lm = lm.reshape(0, 5, 2)
    if b.ndim != 2 or b.shape[1] != 5 or lm.shape[1:] != (5, 2) or len(lm) != len(b):
        raise InputError(
            f"{photo_name!r}: boxes must be [K, 5] and landmarks [K, 5, 2], "
            f"got {list(b.shape)} and {list(lm.shape)}"
        )
    return b, lm


def select_face(boxes: ArrayLike, landmarks: ArrayLike, photo_name: str, largest: bool = False) -> int:
    """Index of the one face of a photo; no face, or several without `largest`, raise InputError.

    boxes [K, 5] (x1, y1, x2, y2, score), landmarks [K, 5, 2]. With `largest`, the box of largest
    area wins; ties go to the higher score, then to the earlier box.
    """
    b, lm = detections(boxes, landmarks, photo_name)
    b = b.astype(np.float64)
    k = len(b)
    if k == 0:
        raise InputError(f"no face found in {photo_name!r}")
    if k == 1:
        return 0
    if not largest:
        fix = "largest_face"  # the API's field; the CLI shows its flag
        raise InputError(f"{k} faces found in {photo_name!r}; crop it or use {fix}", None, fix)
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # [K]
    best = max(range(k), key=lambda i: (areas[i], b[i, 4], -i))
    log.info("%s: %d faces found, keeping the largest (#%d, area %.0f)", photo_name, k, best, areas[best])
    return best
