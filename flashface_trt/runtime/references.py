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

from .detection import DETECTOR, DetectorConfig, RunDetector, detect_faces
from .errors import InputError
from .faces import crop_face, select_face
from .images import DEFAULT_MAX_PIXELS, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceFace:
    """One reference: the crop the model sees and where it came from.

    photo: the file name; box: [x1, y1, x2, y2, score] in photo pixels (None if not detected);
    landmarks: [5, 2] (None if not detected); faces_found: detections above the threshold.
    """

    photo: str
    crop: Image.Image
    box: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    faces_found: int = 1


def references_from_images(
    images: Sequence[Image.Image],
    names: Sequence[str],
    detector: RunDetector,
    largest: bool = False,
    cfg: DetectorConfig = DETECTOR,
) -> list[ReferenceFace]:
    """Detect in all photos at once, keep each photo's one face (or its largest), crop and level it."""
    found = detect_faces(list(images), detector, cfg)
    return [pick_reference(im, name, b, lm, largest) for im, name, (b, lm) in zip(images, names, found)]


def pick_reference(
    image: Image.Image, name: str, boxes: np.ndarray, landmarks: np.ndarray, largest: bool = False
) -> ReferenceFace:
    """The one face of a photo (or its largest) from its detections, cropped and levelled by the eyes."""
    i = select_face(boxes, landmarks, name, largest)  # boxes [K, 5], landmarks [K, 5, 2]
    crop = crop_face(image, boxes[i], landmarks[i])
    log.info("%s: face at %s (score %.3f)", name, np.round(boxes[i, :4]).astype(int).tolist(), boxes[i, 4])
    return ReferenceFace(name, crop, boxes[i], landmarks[i], len(boxes))


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
