"""RetinaFace: network, NumPy post-processing and the demo's 640 flow against the official outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashface_trt.models.loading import tiny_detector
from flashface_trt.models.retinaface import detector_runner, load_retinaface
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.faces import detection
from flashface_trt.runtime.faces.crop import crop_face, select_face
from flashface_trt.runtime.faces.detection import (
    DETECTOR,
    DetectorConfig,
    decode,
    detect,
    detect_faces,
    expf,
    nms,
    preprocess,
    prior_boxes,
    softmax_face,
    to_unit_tensor,
)
from flashface_trt.runtime.faces.images import pad_to_square, synthetic_face
from flashface_trt.runtime.faces.references import load_references, references_from_images

from .conftest import rel_err, run_without_torch
from .detections import (
    MUTANTS,
    RAW_REL,
    Frame,
    Memo,
    Tolerances,
    as_candidates,
    candidates,
    crop_problems,
    exact,
    from_heads,
    match_anchors,
    nms_problems,
    reference_ordered,
    row_problems,
    tie_problems,
)
from .scripted import scripted_detector

RAW_KEYS = ("raw_scores", "raw_bboxes", "raw_landmarks")

# ---------------------------------------------------------------- oracle parity
#
# The official code gives different low bits on different CPUs (convolution kernels), so nothing
# here depends on the last bit of the network's output: the network is compared within RAW_REL,
# the NumPy post-processing (CPU-independent) exactly on the official raw heads, and the whole
# flows within tolerances derived from RAW_REL (tests/detections.py), ties included.


@pytest.fixture(scope="module")
def detector_weights(face_dir: Path) -> Path:
    path = face_dir / "retinaface_resnet50.pth"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def cases(face_dir: Path):
    return np.load(face_dir / "face_cases.npz")


@pytest.fixture(scope="module")
def cfg(face_dir: Path, cases) -> DetectorConfig:
    """The settings the official outputs were made with (face_config.json, the padded input's size)."""
    c = json.loads((face_dir / "face_config.json").read_text())
    size = cases["padded_input"].shape[-1]
    return replace(
        DETECTOR, min_score=c["min_thr"], nms_iou=c["nms_thr"], post_nms_top_k=c["num_boxes"], input_size=size
    )


@pytest.fixture(scope="module")
def official_run(detector_weights: Path):
    return Memo(detector_runner(load_retinaface(detector_weights)))


@pytest.fixture(scope="module")
def photo(face_dir: Path) -> Image.Image:
    return Image.open(face_dir / "face_input.png").convert("RGB")


@dataclass(frozen=True)
class Flow:
    """One official flow: its input, our raw heads on this CPU, the official output and tolerances."""

    name: str
    unit: np.ndarray  # [1, 3, H, W] in [0, 1]
    frame: Frame
    raw: tuple
    ref: np.ndarray  # official boxes [K, 5] and landmarks [K, 5, 2], in photo pixels
    ref_pts: np.ndarray
    tol: Tolerances  # in input pixels

    def photo_tol(self) -> Tolerances:
        return self.tol.scaled(self.frame.geometry()[0])


@pytest.fixture(scope="module")
def flows(cases, cfg, official_run, photo) -> dict[str, Flow]:
    unpadded = to_unit_tensor(photo)[None]
    padded = to_unit_tensor(pad_to_square(photo, cfg.input_size))[None]
    out = {}
    for name, unit, frame, keys in (
        ("detect", unpadded, Frame(*unpadded.shape[2:]), ("boxes", "landmarks")),
        ("demo flow", padded, Frame(*padded.shape[2:], photo.size), ("demo_boxes", "demo_landmarks")),
    ):
        raw = official_run(preprocess(unit, cfg))
        ref, ref_pts = cases[keys[0]], cases[keys[1]]
        out[name] = Flow(
            name, unit, frame, raw, ref, ref_pts, from_heads(raw, frame.to_input(ref, ref_pts)[0], cfg)
        )
    return out


def _assert_none(problems: list[str]) -> None:
    assert not problems, "\n".join(problems[:10]) + f"\n({len(problems)} problems)"


@pytest.mark.oracle
def test_raw_heads_match_official(cases, flows):
    """Within RAW_REL of max|head|: CPUs differ by ~2e-6 (see tests/detections.py), bugs by 1e-2."""
    for key, out in zip(RAW_KEYS, flows["detect"].raw):
        err, abs_err = rel_err(out, cases[key]), float(np.abs(out - cases[key]).max())
        print(
            f"\n{key}: shape {list(out.shape)}, max |err| {abs_err:.2e}, rel err {err:.2e} (bound {RAW_REL})"
        )
        assert out.shape == cases[key].shape and err <= RAW_REL


def _exact_problems(cases, cfg: DetectorConfig, frame: Frame) -> list[str]:
    """`postprocess` on the official raw heads: scores bit-exact, boxes within a few float32 ulps.

    Our post-processing is elementwise IEEE float32 NumPy (FMA emulated in float64), the same on
    every CPU, so this is strict: a last-bit change of the softmax or one NMS decision fails it.
    Only the order of exactly equal scores is left to the reference (the official sort decides it).
    """
    raw = [cases[k] for k in RAW_KEYS]
    ref, ref_pts = cases["boxes"], cases["landmarks"]
    tol = exact(ref, ref_pts)
    cands = candidates(raw, frame, cfg)
    found, problems = match_anchors(ref.astype(np.float64), cands, tol)
    n = raw[0].shape[1]
    rank = 2 * n - np.arange(n)
    rank[cands.index[found[found >= 0]]] = np.flatnonzero(found >= 0)
    ((boxes, pts),) = detection.postprocess(*raw, frame.height, frame.width, cfg, rank[None])
    return problems + row_problems("post-processing of the official heads", boxes, pts, ref, ref_pts, tol)


@pytest.mark.oracle
def test_postprocess_of_official_heads_is_exact(cases, cfg, flows):
    _assert_none(_exact_problems(cases, cfg, flows["detect"].frame))


def _reference_order_problems(flow: Flow, cfg: DetectorConfig) -> list[str]:
    """Our network and post-processing, near-tied scores processed in the official order."""
    ref_in = flow.frame.to_input(flow.ref, flow.ref_pts)[0]
    boxes, pts, problems = reference_ordered(flow.raw, flow.frame, cfg, ref_in, flow.tol)
    return problems + row_problems(
        f"{flow.name}, official order", boxes, pts, flow.ref, flow.ref_pts, flow.photo_tol()
    )


@pytest.mark.oracle
def test_detect_matches_official(cfg, flows):
    _assert_none(_reference_order_problems(flows["detect"], cfg))


@pytest.mark.oracle
def test_demo_flow_matches_official(cases, cfg, flows):
    np.testing.assert_array_equal(flows["demo flow"].unit[0], cases["padded_input"][0])
    _assert_none(_reference_order_problems(flows["demo flow"], cfg))


def _production_problems(flow: Flow, cfg: DetectorConfig, run, photo: Image.Image) -> list[str]:
    """`detect` / `detect_faces` as shipped (default tie order) and the --largest-face crop vs the official.

    They run with the shipped thresholds (DETECTOR) and the fixture's sizes; the detections must be
    exactly a greedy NMS of our anchors at the official settings (any tie order), match the
    official rows up to near-ties, and for the demo flow give the official largest face and crop.
    """
    shipped = replace(DETECTOR, post_nms_top_k=cfg.post_nms_top_k, input_size=cfg.input_size)
    if flow.frame.photo is None:
        ((boxes, pts),) = detect(flow.unit, run, shipped)
    else:
        ((boxes, pts),) = detect_faces([photo], run, shipped)
    cands = candidates(flow.raw, flow.frame, cfg)
    idx, problems = as_candidates(*flow.frame.to_input(boxes, pts), cands)
    if problems:
        return problems
    kept = np.concatenate([cands.boxes[idx], cands.scores[idx, None]], axis=1)
    ref, ref_pts = flow.frame.to_input(flow.ref, flow.ref_pts)
    problems = nms_problems(idx, cands, cfg)
    problems += tie_problems(flow.name, kept, cands.pts[idx], ref, ref_pts, cands, cfg, flow.tol)
    if flow.frame.photo is not None and not problems:  # what `generate --largest-face` crops
        (face,) = references_from_images([photo], ["face_input.png"], run, largest=True, cfg=shipped)
        tol = flow.photo_tol()
        problems += crop_problems(photo, face.crop, face.box, face.landmarks, flow.ref, flow.ref_pts, tol)
    return problems


@pytest.mark.oracle
def test_detect_default_tie_order_matches_official(cfg, flows, official_run, photo):
    _assert_none(_production_problems(flows["detect"], cfg, official_run, photo))


@pytest.mark.oracle
def test_demo_flow_default_tie_order_and_largest_face_match_official(cfg, flows, official_run, photo):
    _assert_none(_production_problems(flows["demo flow"], cfg, official_run, photo))


@pytest.mark.oracle
def test_largest_face_check_skips_official_boxes_that_cannot_be_faces(cfg, flows, official_run, photo):
    """An official largest box outside the photo, huge or not finite is passed over; a real face is not."""
    flow, (w, h) = flows["demo flow"], photo.size
    shipped = replace(DETECTOR, post_nms_top_k=cfg.post_nms_top_k, input_size=cfg.input_size)
    (face,) = references_from_images([photo], ["face_input.png"], official_run, largest=True, cfg=shipped)
    tol, side = flow.photo_tol(), 2 * max(w, h)  # the longest side a face box may have
    for wild in ([w + 1, 0, w + 1 + side, side], [-side, -side, side, side], [0, 0, np.inf, h]):
        ref = np.concatenate([flow.ref, np.float32([[*wild, 0.99]])])
        pts = np.concatenate([flow.ref_pts, flow.ref_pts[:1]])
        assert select_face(ref, pts, "official", largest=True) == len(ref) - 1  # the official choice
        _assert_none(crop_problems(photo, face.crop, face.box, face.landmarks, ref, pts, tol))
        ref[-1, :4] = (0, 0, side, side)  # now a box that can be a face, the largest: reported
        assert crop_problems(photo, face.crop, face.box, face.landmarks, ref, pts, tol), wild


@pytest.mark.oracle
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutations_are_reported(mutant, monkeypatch, cases, cfg, flows, official_run, photo):
    """Each deliberate bug in the post-processing is reported by the checks that must catch it."""
    attr, replacement, caught_by = MUTANTS[mutant]
    monkeypatch.setattr(detection, attr, replacement)
    checks = {
        "exact": lambda: _exact_problems(cases, cfg, flows["detect"].frame),
        "detect": lambda: _reference_order_problems(flows["detect"], cfg),
        "demo flow": lambda: _reference_order_problems(flows["demo flow"], cfg),
        "production detect": lambda: _production_problems(flows["detect"], cfg, official_run, photo),
        "production demo flow": lambda: _production_problems(flows["demo flow"], cfg, official_run, photo),
    }
    for name in caught_by:
        problems = checks[name]()
        print(f"\n{mutant} -> {name}: {len(problems)} problems, first: {problems[:1]}")
        assert problems, f"{mutant} passed the {name} check"


@pytest.mark.slow
@pytest.mark.oracle
def test_onnx_runtime_detector_matches_torch(detector_weights, cases, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from flashface_trt.export.detector import cached_detector
    from flashface_trt.runtime.faces.ort_detector import OrtDetector

    model = load_retinaface(detector_weights)
    path = cached_detector(model, tmp_path)
    assert path.name.startswith("detector-") and path.with_suffix(".onnx.json").is_file()
    assert cached_detector(model, tmp_path) == path  # reused, not rebuilt
    x = preprocess(np.concatenate([cases["padded_input"], cases["padded_input"][:, :, ::-1]]))  # batch 2
    ours = OrtDetector(path)(x)
    ref = detector_runner(model)(x)
    for name, a, b in zip(("logits", "boxes", "landmarks"), ours, ref):
        err, abs_err = rel_err(a, b), float(np.abs(a - b).max())
        print(f"\nONNX Runtime vs torch {name}: max |err| {abs_err:.2e}, rel err {err:.2e}")
        # two convolution libraries on one CPU round differently (~2e-6, as two CPUs); a wrong graph far more
        assert a.shape == b.shape and err <= 1e-4
    with pytest.raises(InputError, match="640"):
        OrtDetector(path)(x[:, :, :320])


# ---------------------------------------------------------------- post-processing, exact values


def test_softmax_is_bitwise_torch_cpu():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((50000, 2)) * rng.choice([0.5, 4.0, 30.0], (50000, 1))).astype(np.float32)
    ref = torch.softmax(torch.from_numpy(logits), -1)[:, 1].numpy()
    ours = softmax_face(logits)
    print(f"\nsoftmax: {int((ours != ref).sum())} of {len(ref)} differ from torch")
    np.testing.assert_array_equal(ours, ref)


def test_expf_accuracy_and_limits():
    x = np.linspace(-103, 88, 200001, dtype=np.float32)
    ref = np.exp(x.astype(np.float64))
    ulps = np.abs(expf(x) - ref) / np.spacing(ref.astype(np.float32))
    assert ulps.max() <= 1.0, ulps.max()
    np.testing.assert_array_equal(expf(np.float32([0.0, -105.0, 101.0])), np.float32([1.0, 0.0, np.inf]))


def test_priors_count_and_first_anchors():
    h, w = 100, 72  # not multiples of the strides: ceil() per level
    priors = prior_boxes(h, w)
    n = sum(-(-h // s) * -(-w // s) * len(m) for s, m in zip(DETECTOR.strides, DETECTOR.min_sizes))
    assert priors.shape == (n, 4) and priors.dtype == np.float32
    np.testing.assert_array_equal(
        priors[:2], np.float32([[4 / w, 4 / h, 16 / w, 16 / h], [4 / w, 4 / h, 32 / w, 32 / h]])
    )
    np.testing.assert_array_equal(priors[2], np.float32([12 / w, 4 / h, 16 / w, 16 / h]))


def test_decode_zero_offsets_gives_prior_corners():
    priors = np.float32([[0.5, 0.25, 0.2, 0.1]])
    boxes, pts = decode(
        np.zeros((1, 4), np.float32), np.zeros((1, 10), np.float32), priors, 200, 100, DETECTOR
    )
    np.testing.assert_allclose(boxes, [[40.0, 40.0, 60.0, 60.0]], rtol=1e-6)
    np.testing.assert_allclose(pts, [[50.0, 50.0] * 5], rtol=1e-6)


def test_nms_plus_one_convention_and_ties():
    dets = np.float32(
        [
            [0, 0, 9, 9, 0.9],  # 10x10 with the +1 convention
            [10, 0, 19, 9, 0.9],  # touches the first: zero overlap, kept
            [0, 0, 9, 10, 0.95],  # IoU 100/110 with the first: suppresses it
            [0, 0, 9, 9, 0.9],  # equal score to the first two: input order decides
        ]
    )
    assert nms(dets, 0.4).tolist() == [2, 1]
    assert nms(dets[[0, 1, 3]], 0.4).tolist() == [0, 1]
    assert nms(dets[[3, 1, 0]], 0.4).tolist() == [0, 1]
    assert nms(np.zeros((0, 5), np.float32), 0.4).tolist() == []


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (256, 256)])
def test_demo_flow_maps_back_to_the_photo(tmp_path, size):
    """A known detection in the padded 640 square comes back in photo pixels and is cropped there."""
    w, h = size
    scale = 640 / max(w, h)
    left, top = (640 - round(w * scale)) // 2, (640 - round(h * scale)) // 2
    box640 = (left + 60 * scale, top + 50 * scale, left + 160 * scale, top + 170 * scale)
    run, marks640 = scripted_detector(box640)
    photo = tmp_path / "person.jpg"
    synthetic_face(max(size)).resize(size).save(photo, quality=95)
    ((boxes, landmarks),) = detect_faces([Image.open(photo).convert("RGB")], run)
    assert boxes.shape == (1, 5) and boxes[0, 4] > 0.99
    np.testing.assert_allclose(boxes[0, :4], [60, 50, 160, 170], atol=1e-3)
    expected = (marks640 - [left, top]) / scale
    np.testing.assert_allclose(landmarks[0], expected, atol=1e-3)
    (ref,) = load_references([photo], run)
    assert ref.photo == "person.jpg" and ref.faces_found == 1
    want = crop_face(Image.open(photo).convert("RGB"), boxes[0], landmarks[0])
    np.testing.assert_array_equal(np.asarray(ref.crop), np.asarray(want))


# ---------------------------------------------------------------- one face per photo, tiny detector


@pytest.fixture(scope="module")
def tiny_run():
    return detector_runner(tiny_detector())


def test_no_face_is_an_error_naming_the_photo(tmp_path):
    photo = tmp_path / "empty_room.png"
    Image.new("RGB", (200, 150), (90, 90, 90)).save(photo)
    blind = detector_runner(tiny_detector(face_bias=-100.0))
    with pytest.raises(InputError, match="no face found in 'empty_room.png'"):
        load_references([photo], blind)


def test_several_faces_need_largest_face(tmp_path, tiny_run):
    photo = tmp_path / "group.png"
    synthetic_face(240, seed=3).save(photo)
    ((boxes, _),) = detect_faces([Image.open(photo).convert("RGB")], tiny_run)
    assert len(boxes) > 1  # random weights find many 'faces'
    with pytest.raises(InputError, match=rf"{len(boxes)} faces found in 'group.png'.*use largest_face"):
        load_references([photo], tiny_run)
    (ref,) = load_references([photo], tiny_run, largest=True)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert ref.faces_found == len(boxes)
    np.testing.assert_array_equal(ref.box, boxes[int(np.argmax(areas))])


def test_cropped_faces_skip_detection(tmp_path):
    photo = tmp_path / "crop.png"
    synthetic_face(100).save(photo)
    (ref,) = load_references([photo], None)
    assert ref.box is None and ref.crop.size == (100, 100)
    np.testing.assert_array_equal(np.asarray(ref.crop), np.asarray(synthetic_face(100)))
    with pytest.raises(InputError, match="no reference photo"):
        load_references([], None)


def test_detection_runtime_imports_no_torch(tmp_path):
    """The detection, crop and ONNX Runtime modules run with torch made unimportable."""
    script = """
        import sys
        import numpy as np
        from PIL import Image
        import flashface_trt.runtime.faces.ort_detector
        from flashface_trt.runtime.faces.references import load_references
        from tests.scripted import scripted_detector
        run, _ = scripted_detector((100.0, 120.0, 300.0, 360.0))
        Image.new("RGB", (640, 640), (120, 100, 90)).save(sys.argv[1])
        (ref,) = load_references([sys.argv[1]], run)
        assert ref.crop.size == (200, 240), ref.crop.size
        assert "torch" not in sys.modules
        print("ok")
        """
    out = run_without_torch(script, str(tmp_path / "p.png"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
