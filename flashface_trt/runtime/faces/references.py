"""Reference photos -> face crops: decode, detect, keep exactly one face, crop and level it.

The flow of the official demo's `detect_face` (flashface/all_finetune/demo_gradio.py): detect on
the photo padded to a 640 square, map back, then `crop_face`; here every photo must hold
exactly one face unless the caller asks for the largest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from .crop import box_problem, crop_face, detections, select_face
from .detection import DETECTOR, DetectorConfig, RunDetector, detect_faces
from .images import DEFAULT_MAX_PIXELS, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceFace:
    """One reference: the crop the model sees and where it came from.

    photo: the file name; box: [x1, y1, x2, y2, score] in photo pixels (None if not detected);
    landmarks: [5, 2] (None if not detected); faces_found: detections above the threshold that can
    be faces of the photo (`faces.box_problem`).
    """

    photo: str
    crop: Image.Image
    box: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    faces_found: int = 1


def find_references(
    images: Sequence[Image.Image],
    names: Sequence[str],
    detector: RunDetector,
    largest: bool = False,
    cfg: DetectorConfig = DETECTOR,
) -> list[tuple[np.ndarray, ReferenceFace | InputError]]:
    """Detect in all photos in one batch; per photo its boxes [K, 5] and its reference or refusal."""
    found: list[tuple[np.ndarray, ReferenceFace | InputError]] = []
    for image, name, (boxes, landmarks) in zip(images, names, detect_faces(list(images), detector, cfg)):
        try:
            found.append((boxes, pick_reference(image, name, boxes, landmarks, largest)))
        except InputError as exc:
            found.append((boxes, exc))
    return found


def references_from_images(
    images: Sequence[Image.Image],
    names: Sequence[str],
    detector: RunDetector,
    largest: bool = False,
    cfg: DetectorConfig = DETECTOR,
) -> list[ReferenceFace]:
    """`find_references`, raising the first refusal: each photo's one face (or its largest), cropped."""
    refs = []
    for _, ref in find_references(images, names, detector, largest, cfg):
        if isinstance(ref, InputError):
            raise ref
        refs.append(ref)
    return refs


def pick_reference(
    image: Image.Image, name: str, boxes: np.ndarray, landmarks: np.ndarray, largest: bool = False
) -> ReferenceFace:
    """The one face of a photo (or its largest) from its detections, cropped and levelled by the eyes.

    Detections that cannot be a face of the photo (outside it, absurdly large, not finite: see
    `faces.box_problem`) are ignored, with a warning; a photo left with none is refused, naming it.
    """
    boxes, landmarks = detections(boxes, landmarks, name)  # [K, 5], [K, 5, 2]
    problems = [box_problem(b, lm, image.size) for b, lm in zip(boxes, landmarks)]
    keep = np.flatnonzero([p is None for p in problems])
    if len(keep) < len(boxes):
        why = ", ".join(sorted({p for p in problems if p is not None}))
        size = f"{image.width}x{image.height}"
        if len(keep) == 0:
            raise InputError(
                f"no face found in {name!r}: its {len(boxes)} detection(s) cannot be faces of the "
                f"{size} photo ({why})"
            )
        log.warning(
            "%s: ignoring %d of %d detections that are not faces of the %s photo (%s)",
            name,
            len(boxes) - len(keep),
            len(boxes),
            size,
            why,
        )
    i = keep[select_face(boxes[keep], landmarks[keep], name, largest)]
    crop = crop_face(image, boxes[i], landmarks[i])
    log.info("%s: face at %s (score %.3f)", name, np.round(boxes[i, :4]).astype(int).tolist(), boxes[i, 4])
    return ReferenceFace(name, crop, boxes[i], landmarks[i], len(keep))


def load_references(
    paths: Sequence[str | Path],
    detector: RunDetector | None,
    largest: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    cfg: DetectorConfig = DETECTOR,
) -> list[ReferenceFace]:
    """Reference photos -> crops; `detector=None` takes the photos as already-cropped faces."""
    if not paths:
        raise InputError("no reference photo given")
    images = [load_image(path, max_pixels=max_pixels) for path in paths]
    names = [Path(path).name for path in paths]
    if detector is None:
        return [ReferenceFace(name, image) for name, image in zip(names, images)]
    return references_from_images(images, names, detector, largest, cfg)
