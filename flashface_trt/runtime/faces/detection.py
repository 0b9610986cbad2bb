"""RetinaFace pre- and post-processing in NumPy: priors, decoding, softmax, NMS, the demo's 640 flow.

Reproduces `RetinaFace.detect` of the official `ldm/models/retinaface.py` in float32 (the official
runs it in float32 torch), and the padding/mapping of `detect_face` in
`flashface/all_finetune/demo_gradio.py`. The network itself is any `RunDetector` callable (PyTorch,
ONNX Runtime, TensorRT), so this module needs no torch.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from ..errors import InputError
from .images import _padding, pad_to_square

log = logging.getLogger(__name__)

# BGR mean-subtracted 0..255 images [B, 3, H, W] -> logits [B, N, 2], boxes [B, N, 4], landmarks [B, N, 10]
RunDetector = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of RetinaFace-ResNet50 detection (official CONFIGS['resnet50'] and the demo's call).

    input_size: the square the demo pads photos to; mean: BGR means subtracted from 0..255 pixels;
    variance: prior-decoding variances (centre, size); min_sizes/strides: anchors per FPN level;
    min_score: keep detections scoring above this (demo: 0.6); nms_iou: suppress overlaps above
    this IoU (0.4); pre_nms_top_k / post_nms_top_k: candidates before and detections after NMS.
    """

    input_size: int = 640
    mean: tuple[float, float, float] = (104.0, 117.0, 123.0)
    variance: tuple[float, float] = (0.1, 0.2)
    min_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
    strides: tuple[int, ...] = (8, 16, 32)
    min_score: float = 0.6
    nms_iou: float = 0.4
    pre_nms_top_k: int = 5000
    post_nms_top_k: int = 750

    def validated(self) -> DetectorConfig:
        if not 0.0 <= self.min_score < 1.0:
            raise InputError(f"detection min_score {self.min_score} must be in [0, 1)")
        if not 0.0 < self.nms_iou <= 1.0:
            raise InputError(f"detection nms_iou {self.nms_iou} must be in (0, 1]")
        if self.pre_nms_top_k < 1 or self.post_nms_top_k < 1:
            raise InputError(
                f"detection top-k ({self.pre_nms_top_k}, {self.post_nms_top_k}) must be positive integers"
            )
        if self.input_size < max(self.strides):
            raise InputError(f"detection input_size {self.input_size} is below the coarsest stride")
        return self


DETECTOR = DetectorConfig()


def prior_boxes(height: int, width: int, cfg: DetectorConfig = DETECTOR) -> np.ndarray:
    """Anchors [N, 4] (cx, cy, w, h) normalised to the image, in the official order and float32 rounding."""
    anchors: list[list[float]] = []
    for stride, sizes in zip(cfg.strides, cfg.min_sizes):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        for i, j in itertools.product(range(rows), range(cols)):
            cx, cy = (j + 0.5) * stride / width, (i + 0.5) * stride / height
            anchors.extend([cx, cy, s / width, s / height] for s in sizes)
    return np.asarray(anchors, dtype=np.float64).astype(np.float32).reshape(-1, 4)


def preprocess(images: np.ndarray, cfg: DetectorConfig = DETECTOR) -> np.ndarray:
    """RGB [B, 3, H, W] in [0, 1] -> BGR, x255, minus the mean (official `detect`, float32)."""
    x = np.ascontiguousarray(images[:, ::-1], dtype=np.float32)
    return np.float32(255.0) * x - np.asarray(cfg.mean, dtype=np.float32).reshape(1, 3, 1, 1)


def to_unit_tensor(img: Image.Image) -> np.ndarray:
    """A PIL RGB image -> [3, H, W] float32 in [0, 1] (torchvision `ToTensor`: uint8 / 255)."""
    return np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


def _fma(a: np.ndarray, b: ArrayLike, c: ArrayLike) -> np.ndarray:
    """float32 fused multiply-add: the float64 product of two float32 values is exact, one rounding."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(
        np.float32
    )


def expf(x: np.ndarray) -> np.ndarray:
    """float32 exp, bit for bit SLEEF's `xexpf` (u10) with FMA, which PyTorch's CPU kernels vectorise.

    Matching it keeps near-tied detection scores ordered exactly as the official code on the CPU.
    """
    f32 = np.float32
    d = np.asarray(x, dtype=f32)
    q = np.rint(d * f32(1.4426950408889634)).astype(np.int32)  # round(x / ln 2), half to even
    qf = q.astype(f32)
    s = _fma(qf, f32(-0.693145751953125), d)  # x - q ln2, ln2 split in two parts
    s = _fma(qf, f32(-1.428606765330187045e-06), s)
    u = np.full_like(s, f32(0.000198527617612853646278381))
    for c in (0.00139304355252534151077271, 0.00833336077630519866943359, 0.0416664853692054748535156):
        u = _fma(u, s, f32(c))
    u = _fma(_fma(u, s, f32(0.166666671633720397949219)), s, f32(0.5))
    u = f32(1.0) + _fma(s * s, u, s)
    with np.errstate(over="ignore", invalid="ignore"):  # exp(x > 88.7) is inf, as in SLEEF
        u = _scale2(u, q)
    u = np.where(d < f32(-104.0), f32(0.0), u)
    return np.where(d > f32(100.0), f32(np.inf), u).astype(f32)


def _scale2(u: np.ndarray, q: np.ndarray) -> np.ndarray:
    """u * 2^q, applied in two factors so that neither overflows (SLEEF `vldexp2`)."""
    f32 = np.float32
    half = q >> 1
    u = (
        u
        * ((half + 127).astype(np.uint32) << 23).view(f32)
        * ((q - half + 127).astype(np.uint32) << 23).view(f32)
    )
    return u


def softmax_face(logits: np.ndarray) -> np.ndarray:
    """Face probability of 2-class logits [..., 2] -> [...] float32, as PyTorch's CPU softmax computes it.

    max, exp(x - max), sum, then multiply by the reciprocal (ATen `_vec_softmax_lastdim`).
    """
    x = logits.astype(np.float32)
    e = expf(x - x.max(axis=-1, keepdims=True))
    return (e[..., 1] * (np.float32(1.0) / (e[..., 0] + e[..., 1]))).astype(np.float32)


def decode(
    boxes: np.ndarray, landmarks: np.ndarray, priors: np.ndarray, height: int, width: int, cfg: DetectorConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets [N, 4], [N, 10] -> pixel boxes [N, 4] (x1, y1, x2, y2) and landmarks [N, 10] (float32)."""
    f32 = np.float32
    v0, v1 = f32(cfg.variance[0]), f32(cfg.variance[1])
    centre = priors[:, :2] + boxes[:, :2] * v0 * priors[:, 2:]
    size = priors[:, 2:] * expf(boxes[:, 2:] * v1)
    xy1 = centre - size / f32(2.0)
    out = np.concatenate([xy1, size + xy1], axis=1) * np.asarray([width, height] * 2, dtype=f32)
    pts = np.tile(priors[:, :2], 5) + landmarks * v0 * np.tile(priors[:, 2:], 5)
    return out.astype(f32), (pts * np.asarray([width, height] * 5, dtype=f32)).astype(f32)


def nms(dets: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS with the official +1 pixel area convention; dets [K, 5] -> kept indices, best first.

    Equal scores keep their input order (`postprocess` decides it; see its `tie_rank`).
    """
    f32 = np.float32
    x1, y1, x2, y2, scores = (np.ascontiguousarray(c) for c in dets.T.astype(f32))
    one = f32(1.0)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = np.argsort(-scores, kind="stable")  # ties keep the input order
    keep = []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one, f32(0.0))
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one, f32(0.0))
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= f32(iou)]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    logits: np.ndarray,
    boxes: np.ndarray,
    landmarks: np.ndarray,
    height: int,
    width: int,
    cfg: DetectorConfig = DETECTOR,
    tie_rank: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw head outputs of a [B, 3, H, W] batch -> per image (boxes [K, 5], landmarks [K, 5, 2]).

    Boxes are (x1, y1, x2, y2, score) in input pixels, best first. Equal scores are ordered by
    `tie_rank` [B, N] (lower first) if given, else by descending anchor index. The official code
    leaves this order to its sort implementation (libstdc++ `nth_element`, x86-simd-sort or CUDA
    by platform), so no fixed rule reproduces it everywhere; see the README.
    """
    priors = prior_boxes(height, width, cfg)  # [N, 4]
    if logits.shape[1] != len(priors):
        raise InputError(
            f"detector gave {logits.shape[1]} anchors for a {width}x{height} input, expected {len(priors)}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # a broken detector's inf/NaN: dropped below
        return _postprocess(logits, boxes, landmarks, priors, height, width, cfg, tie_rank)


def _postprocess(
    logits: np.ndarray,
    boxes: np.ndarray,
    landmarks: np.ndarray,
    priors: np.ndarray,
    height: int,
    width: int,
    cfg: DetectorConfig,
    tie_rank: np.ndarray | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`postprocess` once the anchors are known to match (see there)."""
    scores = softmax_face(logits)  # [B, N]
    out = []
    for b in range(len(scores)):
        pix, pts = decode(boxes[b], landmarks[b], priors, height, width, cfg)
        ties = -np.arange(scores.shape[1]) if tie_rank is None else tie_rank[b]
        top = np.lexsort((ties, -scores[b]))[: min(cfg.pre_nms_top_k, scores.shape[1])]
        top = top[scores[b, top] > np.float32(cfg.min_score)]
        finite = np.isfinite(pix[top]).all(1) & np.isfinite(pts[top]).all(1)
        if not finite.all():  # a broken detector; the official would carry inf/nan boxes into NMS
            log.warning("dropping %d detections with non-finite boxes", int((~finite).sum()))
            top = top[finite]
        dets = np.concatenate([pix[top], scores[b, top, None]], axis=1)  # [K, 5]
        keep = nms(dets, cfg.nms_iou)[: cfg.post_nms_top_k]
        out.append((dets[keep], pts[top][keep].reshape(-1, 5, 2)))
    return out


def detect(
    images: np.ndarray, run: RunDetector, cfg: DetectorConfig = DETECTOR
) -> list[tuple[np.ndarray, np.ndarray]]:
    """RGB [B, 3, H, W] in [0, 1] -> per image (boxes [K, 5], landmarks [K, 5, 2]) in input pixels."""
    cfg = cfg.validated()
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"detector input must be [B, 3, H, W], got {list(images.shape)}")
    h, w = images.shape[2:]
    logits, boxes, landmarks = run(preprocess(images, cfg))
    return postprocess(np.asarray(logits), np.asarray(boxes), np.asarray(landmarks), h, w, cfg)


def detect_faces(
    images: list[Image.Image], run: RunDetector, cfg: DetectorConfig = DETECTOR
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The demo's flow: pad each photo to a square, detect in one batch, map back to photo pixels."""
    size = cfg.input_size
    if not images:
        return []
    batch = np.stack([to_unit_tensor(pad_to_square(img.convert("RGB"), size)) for img in images])
    found = detect(batch, run, cfg)
    return [to_photo(boxes, pts, img.size, size) for img, (boxes, pts) in zip(images, found)]


def to_photo(
    boxes: np.ndarray, landmarks: np.ndarray, photo_size: tuple[int, int], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [K, 5] and landmarks [K, 5, 2] in the padded square -> photo pixels (the demo's undo)."""
    width, height = photo_size
    scale = size / max(width, height)
    left, top, _, _ = _padding(round(scale * width), round(scale * height), size)
    boxes, pts = boxes.copy(), landmarks.copy()
    boxes[:, [0, 2]] -= np.float32(left)
    boxes[:, [1, 3]] -= np.float32(top)
    pts[:, :, 0] -= np.float32(left)
    pts[:, :, 1] -= np.float32(top)
    with np.errstate(over="ignore"):  # a wild detector's huge boxes may overflow: dropped below
        boxes[:, :4] /= np.float32(scale)
        pts /= np.float32(scale)
    finite = np.isfinite(boxes).all(1) & np.isfinite(pts).all((1, 2))
    if not finite.all():
        log.warning("dropping %d detections whose boxes overflow in photo pixels", int((~finite).sum()))
    return boxes[finite], pts[finite]
