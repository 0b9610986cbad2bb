"""Tolerances and tie-aware comparisons of RetinaFace detections with the official ones.

Every check returns a list of problems (empty when it passes), so that the mutation tests of
test_detection.py can show that a broken post-processing is reported. The code under test is
called through the module (`detection.nms`, `detection.to_photo`, ...), where a mutation test
patches it; the checker's own references (`softmax_face`, `decode`) are bound here at import.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from flashface_trt.runtime.faces import detection
from flashface_trt.runtime.faces.crop import box_problem, crop_face, eye_angle, select_face
from flashface_trt.runtime.faces.detection import (
    DetectorConfig,
    decode,
    nms,
    prior_boxes,
    softmax_face,
    to_photo,
)

# Raw heads of two CPUs differ by float32 rounding in the convolutions (summation order, FMA,
# AVX2 vs AVX-512 kernels): measured 2.2e-6 (logits), 3.2e-6 (boxes), 2.1e-6 (landmarks) of
# max|head| between the fixtures' CPU and an AMD EPYC. 1e-5 leaves 3x that; a wrong layer or weight
# is off by 1e-2 or more.
RAW_REL = 1e-5
ULPS = 4  # float32 ulps of the coordinate scale: a few roundings of values up to that scale
IOU_SLACK = 1e-6  # NMS computes IoU in float32; at most a few float32 roundings from the float64 value
F32_EPS = float(np.finfo(np.float32).eps)


class Memo:
    """A RunDetector that runs the network once per distinct input (all checks share the runs)."""

    def __init__(self, run):
        self.run, self.seen = run, {}

    def __call__(self, x: np.ndarray):
        key = (x.shape, hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest())
        if key not in self.seen:
            self.seen[key] = self.run(x)
        return self.seen[key]


@dataclass(frozen=True)
class Tolerances:
    """How far a detection may be from the official one: score, and box and landmark pixels."""

    score: float
    box: float
    landmark: float

    def scaled(self, factor: float) -> Tolerances:
        return Tolerances(self.score, self.box / factor, self.landmark / factor)


def coord_ulps(*arrays: np.ndarray) -> float:
    """ULPS float32 ulps of the largest coordinate."""
    scale = max([1.0] + [float(np.abs(a).max()) for a in arrays if a.size])
    return ULPS * float(np.spacing(np.float32(scale)))


def exact(ref: np.ndarray, ref_pts: np.ndarray) -> Tolerances:
    """Bit-exact scores; boxes and landmarks within a few float32 ulps of the coordinate scale."""
    return Tolerances(0.0, coord_ulps(ref[:, :4], ref_pts), coord_ulps(ref[:, :4], ref_pts))


def from_heads(raw, ref_in: np.ndarray, cfg: DetectorConfig) -> Tolerances:
    """What raw heads within RAW_REL of max|head| allow, in pixels of the detector input.

    Score: a 2-class softmax is sigmoid(l1 - l0), whose slope is at most 1/4, and l1 - l0 moves by
    at most twice the logit error e, so the score moves by at most e / 2 (plus float32 rounding).
    Box: x1 = W (cx + v0 pw dx) - W pw exp(v1 dw) / 2, where W pw is the anchor size s and
    W pw exp(v1 dw) the box side, so a box offset error e moves x1 (and x2) by (v0 s + v1 side / 2) e.
    Landmark: v0 s e. Plus ULPS float32 ulps of the coordinate scale for the rounding.
    """
    e_logit, e_box, e_lm = (RAW_REL * float(np.abs(r).max()) for r in raw)
    s = max(max(sizes) for sizes in cfg.min_sizes)
    side = float((ref_in[:, 2:4] - ref_in[:, :2]).max()) if len(ref_in) else 0.0
    v0, v1 = cfg.variance
    ulps = coord_ulps(ref_in[:, :4])
    return Tolerances(
        e_logit / 2 + 4 * F32_EPS, (v0 * s + v1 * side / 2) * e_box + ulps, v0 * s * e_lm + ulps
    )


@dataclass(frozen=True)
class Frame:
    """A flow's detector input: height x width pixels; `photo` (w, h) if it is the demo's padded square."""

    height: int
    width: int
    photo: tuple[int, int] | None = None

    def geometry(self) -> tuple[float, int, int]:
        """(scale, left, top): photo pixel p is input pixel p * scale + (left, top)."""
        if self.photo is None:
            return 1.0, 0, 0
        w, h = self.photo
        scale = self.width / max(w, h)
        return scale, (self.width - round(w * scale)) // 2, (self.height - round(h * scale)) // 2

    def to_input(self, boxes: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes [K, 5] and landmarks [K, 5, 2] from photo to input pixels (float64)."""
        scale, left, top = self.geometry()
        shift = np.array([left, top], np.float64)
        b = np.asarray(boxes, np.float64).copy()
        b[:, :4] = b[:, :4] * scale + np.tile(shift, 2)
        return b, np.asarray(pts, np.float64) * scale + shift

    def to_photo(self, boxes: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The code under test's map back (identity for an unpadded input)."""
        if self.photo is None:
            return boxes, pts
        return detection.to_photo(boxes, pts, self.photo, self.width)


@dataclass(frozen=True)
class Candidates:
    """The anchors that enter NMS (input pixels): scores [M], boxes [M, 4], landmarks [M, 5, 2]."""

    scores: np.ndarray
    boxes: np.ndarray
    pts: np.ndarray
    optional: np.ndarray  # [M] bool: tied with the last score of the pre-NMS top-k, may be cut by it
    index: np.ndarray  # [M] their anchor numbers


def candidates(raw, frame: Frame, cfg: DetectorConfig, softmax=softmax_face, dec=decode) -> Candidates:
    """The top `pre_nms_top_k` scores above `min_score`, with their decoded boxes and landmarks."""
    logits, loc, lm = (np.asarray(r)[0] for r in raw)
    h, w = frame.height, frame.width
    scores = softmax(logits)
    boxes, pts = dec(loc, lm, prior_boxes(h, w, cfg), h, w, cfg)
    kth = np.sort(scores)[::-1][min(cfg.pre_nms_top_k, len(scores)) - 1]
    take = (scores > np.float32(cfg.min_score)) & (scores >= kth)
    cut = (scores >= kth).sum() > cfg.pre_nms_top_k  # ties at the top-k boundary: some may be cut
    optional = (scores[take] == kth) & cut
    return Candidates(scores[take], boxes[take], pts[take].reshape(-1, 5, 2), optional, np.flatnonzero(take))


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [A, B] of boxes [A, >=4] and [B, >=4] with the official +1 pixel convention (float64)."""
    a, b = np.asarray(a, np.float64)[:, None, :4], np.asarray(b, np.float64)[None, :, :4]
    w = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0)
    h = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0)
    area = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return w * h / (area + area_b - w * h)


def iou_slack(boxes: np.ndarray, err: float) -> np.ndarray:
    """How far the IoU of a box [K, 4] with any box can move when its corners move by `err` pixels.

    With side lengths w, h (+1), the intersection I and the area A each move by at most
    2 err (w + h) + 4 err^2 and IoU = I / U (U >= A) by at most (2 dI + dA) / A.
    """
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    return 3 * (2 * err * (w + h) + 4 * err * err) / (w * h)


def match_anchors(
    ref_in: np.ndarray, cands: Candidates, tol: Tolerances, rows=None
) -> tuple[np.ndarray, list]:
    """For each official row (input pixels, numbered `rows`) the anchor within `tol` of it, or -1."""
    found = np.full(len(ref_in), -1)
    problems = []
    for pos, row in enumerate(ref_in):
        near = np.flatnonzero(np.abs(cands.scores - row[4]) <= tol.score)
        dist = np.abs(cands.boxes[near] - row[:4]).max(axis=1) if len(near) else np.full(1, np.inf)
        if dist.min() > tol.box or near[dist.argmin()] in found:
            name = pos if rows is None else rows[pos]
            problems.append(f"official row {name} (score {row[4]:.8g}): no anchor within {tol}")
            continue
        found[pos] = near[dist.argmin()]
    return found, problems


def row_problems(name: str, boxes, pts, ref, ref_pts, tol: Tolerances) -> list[str]:
    """Row by row: same count, every score, box and landmark within `tol` (printed: the errors)."""
    if boxes.shape != ref.shape or pts.shape != ref_pts.shape:
        return [f"{name}: {len(boxes)} detections, official {len(ref)}"]
    if not len(ref):
        return []
    errs = {
        "score": (np.abs(boxes[:, 4] - ref[:, 4]), tol.score),
        "box": (np.abs(boxes[:, :4] - ref[:, :4]).max(axis=1), tol.box),
        "landmark": (np.abs(pts - ref_pts).reshape(len(ref), -1).max(axis=1), tol.landmark),
    }
    scale = max(float(np.abs(ref[:, :4]).max()), 1.0)
    text = ", ".join(f"{k} {e.max():.2e} (bound {t:.2e})" for k, (e, t) in errs.items())
    print(
        f"\n{name}: {len(ref)} detections, max |err| {text}; box rel err {errs['box'][0].max() / scale:.2e}"
    )
    problems = []
    for key, (err, bound) in errs.items():
        bad = np.flatnonzero(err > bound)
        if len(bad):
            problems.append(
                f"{name}: {len(bad)} rows with a {key} off by more than {bound:.2e}, first {bad[0]}"
            )
    return problems


def reference_ordered(raw, frame: Frame, cfg: DetectorConfig, ref_in: np.ndarray, tol: Tolerances):
    """Our detections with the near-tied processing order taken from the official output.

    The anchor of each official row is processed in the official order, at the official score;
    every other anchor at 2 * tol.score below its own score, i.e. after the official row that
    suppressed or capped it (its official score is at most ours + tol.score). NMS, the cap and the
    map back are the code under test. Returns (boxes [K, 5], landmarks [K, 5, 2], problems).
    """
    cands = candidates(raw, frame, cfg, detection.softmax_face, detection.decode)
    found, problems = match_anchors(ref_in, cands, tol)
    key = cands.scores.astype(np.float64) - 2 * tol.score
    rank = np.arange(len(key)) + len(ref_in)
    key[found[found >= 0]] = ref_in[found >= 0, 4]
    rank[found[found >= 0]] = np.flatnonzero(found >= 0)
    order = np.lexsort((rank, -key))
    dets = np.concatenate([cands.boxes[order], key[order, None]], axis=1).astype(np.float32)
    keep = order[detection.nms(dets, cfg.nms_iou)[: cfg.post_nms_top_k]]
    boxes = np.concatenate([cands.boxes[keep], cands.scores[keep, None]], axis=1)
    return (*frame.to_photo(boxes, cands.pts[keep]), problems)


def as_candidates(kept: np.ndarray, kept_pts: np.ndarray, cands: Candidates) -> tuple[np.ndarray, list[str]]:
    """The candidate of each detection [K, 5] (input pixels): same score, box and landmarks to ULPS ulps."""
    ulps = coord_ulps(cands.boxes, cands.pts)
    idx, problems = np.full(len(kept), -1), []
    for i, row in enumerate(kept):
        near = np.flatnonzero(cands.scores == np.float32(row[4]))
        dist = np.abs(cands.boxes[near] - row[:4]).max(axis=1) if len(near) else np.full(1, np.inf)
        j = near[dist.argmin()] if len(near) else -1
        if j < 0 or dist.min() > ulps or np.abs(cands.pts[j] - kept_pts[i]).max() > ulps:
            problems.append(
                f"detection {i} (score {row[4]:.8g}, box {row[:4]}) is no anchor above the threshold"
            )
        idx[i] = j
    return idx, problems


def nms_problems(idx: np.ndarray, cands: Candidates, cfg: DetectorConfig) -> list[str]:
    """Are the candidates `idx`, in this order, exactly a greedy NMS of all candidates at cfg's IoU and cap?

    The scores must not increase, no two kept boxes may overlap above the IoU, and every other
    candidate must overlap a kept box of higher or equal score above the IoU, or fall past a full
    list. The IoU is computed in float64 from the float32 boxes that NMS saw (IOU_SLACK).
    """
    kept, s_kept = cands.boxes[idx], cands.scores[idx]
    problems = []
    if len(idx) > cfg.post_nms_top_k or np.any(np.diff(s_kept) > 0):
        problems.append(f"{len(idx)} detections (cap {cfg.post_nms_top_k}), or not in descending score order")
    overlap = np.triu(iou(kept, kept), 1)
    if np.any(overlap > cfg.nms_iou + IOU_SLACK):
        pair = np.unravel_index(overlap.argmax(), overlap.shape)
        problems.append(f"detections {pair} overlap at IoU {overlap.max():.4f} > {cfg.nms_iou}")
    rest = np.setdiff1d(np.flatnonzero(~cands.optional), idx)
    s = cands.scores[rest]
    beaten = (iou(cands.boxes[rest], kept) > cfg.nms_iou - IOU_SLACK) & (s_kept[None, :] >= s[:, None])
    capped = s <= s_kept[-1] if len(idx) == cfg.post_nms_top_k else np.zeros(len(s), bool)
    lost = rest[~(beaten.any(axis=1) | capped)]
    if len(lost):
        problems.append(
            f"{len(lost)} anchors neither kept nor suppressed at IoU > {cfg.nms_iou}, e.g. score "
            f"{cands.scores[lost[0]]:.8g} box {cands.boxes[lost[0]]}"
        )
    return problems


def tie_problems(name, kept, kept_pts, ref, ref_pts, cands: Candidates, cfg: DetectorConfig, tol: Tolerances):
    """Our detections (default tie order) vs the official ones, all in input pixels.

    Rows match when score, box and landmarks are within `tol`, and keep the official order. Any
    other row must lie past the other's full list (score within tol.score of its last) or come
    from a near-tie. An official row we lack must be one of our anchors, suppressed by a kept box of
    at least its score - tol.score that is not official, or at an IoU within `iou_slack` of the
    threshold; a row only we have must overlap an official row of at least its score - tol.score
    that we lack, or at an IoU within `iou_slack` of the threshold.
    """
    pair = np.full(len(ref), -1)
    free = np.ones(len(kept), bool)
    for pos, row in enumerate(ref):
        ok = free & (np.abs(kept[:, 4] - row[4]) <= tol.score)
        ok &= np.abs(kept[:, :4] - row[:4]).max(axis=1) <= tol.box
        ok &= np.abs(kept_pts - ref_pts[pos]).reshape(len(kept), -1).max(axis=1) <= tol.landmark
        if ok.any():
            pair[pos] = np.flatnonzero(ok)[0]
            free[pair[pos]] = False
    # matched rows keep the official order, except near-ties: two rows whose scores are within
    # tol.score of each other may come in either order (their order is the last bit of the scores)
    matched = np.flatnonzero(pair >= 0)
    later = np.triu(np.ones((len(matched), len(matched)), bool), 1)  # [i, j]: j after i officially
    swapped = later & (pair[matched][:, None] > pair[matched][None, :])
    apart = np.abs(ref[matched, 4][:, None] - ref[matched, 4][None, :]) > tol.score
    problems = [f"{name}: matched rows out of official order"] if (swapped & apart).any() else []
    cap, thr = cfg.post_nms_top_k, cfg.nms_iou

    def at_threshold(overlap, box, others):
        return np.abs(overlap - thr) <= iou_slack(box, tol.box) + iou_slack(others, tol.box)

    lacked, extra = np.flatnonzero(pair < 0), np.flatnonzero(free)
    anchor, missing = match_anchors(ref[lacked], cands, tol, lacked)
    problems += [f"{name}: {m}" for m in missing]
    for pos, j in zip(lacked, anchor):
        box = cands.boxes[j : j + 1]
        ov = iou(box, kept)[0]
        by = (ov > thr - IOU_SLACK) & (kept[:, 4] >= ref[pos, 4] - tol.score)
        past = len(kept) == cap and ref[pos, 4] <= kept[-1, 4] + tol.score
        if j >= 0 and not (past or np.any(by & (free | at_threshold(ov, box, kept)))):
            problems.append(
                f"{name}: official row {pos} (score {ref[pos, 4]:.8g}) is missing, not near a tie"
            )
    for i in extra:
        box = kept[i : i + 1]
        ov = iou(box, ref)[0]
        by = (ov > thr - iou_slack(box, tol.box) - iou_slack(ref, tol.box)) & (
            ref[:, 4] >= kept[i, 4] - tol.score
        )
        past = len(ref) == cap and kept[i, 4] <= ref[-1, 4] + tol.score
        if not (past or np.any(by & ((pair < 0) | at_threshold(ov, box, ref)))):
            problems.append(f"{name}: detection {i} (score {kept[i, 4]:.8g}) is not official, not near a tie")
    m, k = np.flatnonzero(pair >= 0), pair[pair >= 0]
    errs = [
        np.abs(a[k] - b[m]).max(initial=0.0) for a, b in ((kept[:, 4], ref[:, 4]), (kept[:, :4], ref[:, :4]))
    ]
    print(
        f"\n{name}, default tie order: {len(kept)} detections, official {len(ref)}; {len(m)} match "
        f"(max |err| score {errs[0]:.2e}, box {errs[1]:.2e} px, landmark "
        f"{np.abs(kept_pts[k] - ref_pts[m]).max(initial=0.0):.2e} px); official rows missing "
        f"{lacked.tolist()[:20]}, extra rows {extra.tolist()[:20]}"
    )
    return problems


def _sampled(size: tuple[int, int], angle: float) -> np.ndarray:
    """The source pixel that Pillow's nearest-neighbour `rotate(angle)` copies to each output pixel."""
    w, h = size
    index = Image.fromarray(np.arange(1, w * h + 1, dtype=np.int32).reshape(h, w))
    return np.asarray(index.rotate(angle), dtype=np.int64) - 1


def crop_problems(
    photo: Image.Image, crop: Image.Image, box, pts, ref, ref_pts, tol: Tolerances
) -> list[str]:
    """The --largest-face crop of our detections vs crop_face of the official largest box.

    The official largest box is taken among those that can be faces of the photo (`box_problem`),
    as ours is: the official code would also crop a box outside the photo or many times its size.
    Same face (box and landmarks within `tol`) and rounded box; the eye vector (length c) turns by
    at most 2 sqrt(2) tol / c radians, as the landmark tolerance allows, and pixels differ only where
    the two eye angles make Pillow's rotate copy different source pixels (found by rotating an
    image of pixel numbers). The angle itself is not compared: `eye_angle` takes an arccos of
    float32 lengths, ill-conditioned near level or upright eyes.
    """
    faces = np.flatnonzero([box_problem(b, p, photo.size) is None for b, p in zip(ref, ref_pts)])
    j = faces[select_face(ref[faces], ref_pts[faces], "official", largest=True)]
    official = crop_face(photo, ref[j], ref_pts[j])
    problems = row_problems("largest face", box[None], pts[None], ref[j : j + 1], ref_pts[j : j + 1], tol)
    if problems:
        return problems
    if not np.array_equal(np.round(box[:4].astype(np.float32)), np.round(ref[j, :4])):
        frac = np.abs(ref[j, :4] % 1 - 0.5)
        ambiguous = np.all(frac[np.round(box[:4]) != np.round(ref[j, :4])] <= tol.box)
        return (
            [] if ambiguous else [f"largest face: rounded box {np.round(box[:4])} != {np.round(ref[j, :4])}"]
        )
    v, v_ref = (complex(*np.subtract(p[1], p[0], dtype=np.float64)) for p in (pts, ref_pts[j]))
    turn = abs(math.degrees(np.angle(v / v_ref)))
    bound = math.degrees(2 * math.sqrt(2) * tol.landmark / abs(v_ref))
    ours_angle, ref_angle = eye_angle(pts) or 0.0, eye_angle(ref_pts[j]) or 0.0
    diff = np.any(np.asarray(crop) != np.asarray(official), axis=-1)
    moved = _sampled(crop.size, ours_angle) != _sampled(crop.size, ref_angle)
    print(
        f"\nlargest face crop {crop.size}: eye angle {ours_angle:.6f} vs official {ref_angle:.6f}, eyes "
        f"turned by {turn:.1e} deg (bound {bound:.1e}); {int(diff.sum())} pixels differ, "
        f"{int(moved.sum())} sampled from another source pixel"
    )
    if turn > bound:
        problems.append(f"largest face: the eyes turned by {turn} degrees, over {bound}")
    if np.any(diff & ~moved):
        n = int((diff & ~moved).sum())
        problems.append(f"largest face: {n} pixels differ, sampled from the same source pixel")
    return problems


# ---------------------------------------------------------------- deliberate bugs the checks must report


def _nms_areas_without_plus_one(dets: np.ndarray, iou: float) -> np.ndarray:
    """`nms` with the +1 pixel dropped from the areas (and kept in the intersection)."""
    x1, y1, x2, y2, scores = dets.T.astype(np.float32)
    areas = (x2 - x1) * (y2 - y1)
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1, 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1, 0)
        order = rest[w * h / (areas[i] + areas[rest] - w * h) <= np.float32(iou)]
    return np.asarray(keep, dtype=np.int64)


def _plain_softmax(logits: np.ndarray) -> np.ndarray:
    """A float32 softmax that is not PyTorch's: NumPy's exp and a division."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e[..., 1] / (e[..., 0] + e[..., 1])).astype(np.float32)


def _shifted_half_pixel(boxes, pts, photo_size, size):
    """`to_photo` with the boxes half a photo pixel off."""
    boxes, pts = to_photo(boxes, pts, photo_size, size)
    boxes[:, :4] += np.float32(0.5)
    return boxes, pts


CHECKS = ("exact", "detect", "demo flow", "production detect", "production demo flow")
# name: (attribute of the detection module, replacement, the checks of test_detection.py that must report it)
MUTANTS = {
    "nms iou +0.05": ("nms", lambda dets, iou: nms(dets, iou + 0.05), CHECKS),
    "nms iou -0.05": ("nms", lambda dets, iou: nms(dets, iou - 0.05), CHECKS),
    "nms areas without +1": ("nms", _nms_areas_without_plus_one, CHECKS),
    "plain float32 softmax": ("softmax_face", _plain_softmax, ("exact", "production detect")),
    "map back shifted by half a pixel": ("to_photo", _shifted_half_pixel, CHECKS[2::2]),
    "map back with the padding transposed": (
        "to_photo",
        lambda b, p, photo_size, n: to_photo(b, p, photo_size[::-1], n),
        CHECKS[2::2],
    ),
}
