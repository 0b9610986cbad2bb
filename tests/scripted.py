"""A torch-free stand-in detector with one known face, for tests of the mapping and the crops."""

from __future__ import annotations

import numpy as np

from flashface_trt.runtime.faces.detection import prior_boxes


def scripted_detector(box640: tuple[float, float, float, float], size: int = 640):
    """A RunDetector whose only face is `box640` (pixels of the padded square), landmarks at its corners."""
    priors = prior_boxes(size, size)
    x1, y1, x2, y2 = box640
    cx, cy, w, h = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
    k = int(np.argmin(np.abs(priors[:, 0] - cx) + np.abs(priors[:, 1] - cy) + np.abs(priors[:, 2] - w)))
    pcx, pcy, pw, ph = priors[k].astype(np.float64)
    offsets = [(cx - pcx) / (0.1 * pw), (cy - pcy) / (0.1 * ph), np.log(w / pw) / 0.2, np.log(h / ph) / 0.2]
    marks = [(x1 + 10, y1 + 10), (x2 - 10, y1 + 20), ((x1 + x2) / 2, (y1 + y2) / 2), (x1, y2), (x2, y2)]
    lm = [((px / size - pcx) / (0.1 * pw), (py / size - pcy) / (0.1 * ph)) for px, py in marks]

    def run(images):
        b, n = len(images), len(priors)
        logits = np.tile(np.float32([5.0, -5.0]), (b, n, 1))
        boxes = np.zeros((b, n, 4), np.float32)
        landmarks = np.zeros((b, n, 10), np.float32)
        logits[:, k] = [-5.0, 5.0]
        boxes[:, k] = offsets
        landmarks[:, k] = np.ravel(lm)
        return logits, boxes, landmarks

    return run, np.float64(marks)


WILD_OFFSETS = (
    (0.0, 0.0, 60.0, 60.0),  # exp(12) times its anchor: a box far larger than any photo
    (1e6, 1e6, 0.0, 0.0),  # centre far outside the photo
    (0.0, 0.0, 400.0, 400.0),  # overflows float32 in the detector's pixels
    (0.0, 0.0, 1e30, -1e30),  # exp overflows to inf / underflows to an empty box
    (float("nan"), 0.0, 0.0, 0.0),
    (float("inf"), float("-inf"), 0.0, 0.0),
    (-1e6, 0.0, 0.0, 0.0),
    (3.0, 3.0, 20.0, -20.0),  # a huge flat box
)


def wild_detector(face640: tuple[float, float, float, float] | None = None, landmarks: float = 0.0):
    """A RunDetector whose confident detections are absurd boxes (huge, far outside, inf, NaN).

    Anchor k of `WILD_OFFSETS` takes row k's offsets; `landmarks` is every landmark offset of them
    (NaN or huge values make the landmarks wild too); two more anchors have NaN or inf logits.
    With `face640`, one sane face (`scripted_detector`'s) scores like the rest.
    """
    size = 640
    priors = prior_boxes(size, size)
    anchors = np.linspace(0, len(priors) - 1, len(WILD_OFFSETS) + 2).astype(int)
    face = scripted_detector(face640)[0] if face640 is not None else None

    def run(images):
        b, n = len(images), len(priors)
        if face is None:
            logits = np.tile(np.float32([5.0, -5.0]), (b, n, 1))
            boxes = np.zeros((b, n, 4), np.float32)
            marks = np.zeros((b, n, 10), np.float32)
        else:
            logits, boxes, marks = face(images)
        for k, offsets in zip(anchors, WILD_OFFSETS):
            logits[:, k] = [-5.0, 5.0]
            boxes[:, k] = offsets
            marks[:, k] = landmarks
        logits[:, anchors[-2]] = [np.nan, 1.0]
        logits[:, anchors[-1]] = [-np.inf, np.inf]
        return logits, boxes, marks

    return run
