"""RetinaFace: network, NumPy post-processing and the demo's 640 flow against the official outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashface_trt.models.loading import tiny_detector
from flashface_trt.models.retinaface import detector_runner, load_retinaface
from flashface_trt.runtime.detection import (
    DETECTOR,
    decode,
    detect,
    detect_faces,
    expf,
    nms,
    postprocess,
    preprocess,
    prior_boxes,
    softmax_face,
    to_photo,
    to_unit_tensor,
)
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.faces import crop_face
from flashface_trt.runtime.images import pad_to_square, synthetic_face
from flashface_trt.runtime.references import load_references

from .conftest import rel_err, run_without_torch
from .scripted import scripted_detector

# ---------------------------------------------------------------- oracle parity


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
def official_run(detector_weights: Path):
    return detector_runner(load_retinaface(detector_weights))


@pytest.fixture(scope="module")
def photo(face_dir: Path) -> Image.Image:
    return Image.open(face_dir / "face_input.png").convert("RGB")


def _compare_detections(name, boxes, landmarks, ref_boxes, ref_landmarks) -> None:
    assert boxes.shape == ref_boxes.shape and landmarks.shape == ref_landmarks.shape, name
    scale = max(float(np.abs(ref_boxes[:, :4]).max()), 1.0)
    box_err = float(np.abs(boxes[:, :4] - ref_boxes[:, :4]).max()) / scale
    lm_err = float(np.abs(landmarks - ref_landmarks).max()) / scale if len(ref_landmarks) else 0.0
    score_err = float(np.abs(boxes[:, 4] - ref_boxes[:, 4]).max()) if len(ref_boxes) else 0.0
    errs = f"box rel err {box_err:.2e}, landmark {lm_err:.2e}, score {score_err:.2e}"
    print(f"\n{name}: {len(boxes)} faces, {errs}")
    assert box_err <= 1e-4 and lm_err <= 1e-4 and score_err <= 1e-6


@pytest.mark.oracle
def test_raw_heads_match_official(cases, official_run, photo):
    raw = official_run(preprocess(to_unit_tensor(photo)[None]))
    for key, out in zip(("raw_scores", "raw_bboxes", "raw_landmarks"), raw):
        err = rel_err(out, cases[key])
        print(f"\n{key}: shape {list(out.shape)}, rel err {err:.2e}")
        assert out.shape == cases[key].shape and err <= 1e-4


def _tie_rank(ref_boxes, boxes, scores) -> np.ndarray:
    """Order equal scores as the reference output does: its anchors first, in its order.

    The official code leaves the order of equal scores to its sort implementation, so the
    reference fixes it; every anchor of the reference must be found among ours (same score to
    1e-6, same box to 1e-3 of the box scale), so this cannot hide a wrong box or score.
    """
    n = len(scores)
    rank = 2 * n - np.arange(n)  # anchors absent from the reference: after, by descending index
    tol = 1e-3 * max(float(np.abs(ref_boxes[:, :4]).max()), 1.0)
    for pos, ref in enumerate(ref_boxes):
        cand = np.flatnonzero(np.abs(scores - ref[4]) <= 1e-6)
        assert len(cand), f"no anchor scores {ref[4]} (reference row {pos})"
        dist = np.abs(boxes[cand] - ref[:4]).max(axis=1)
        assert dist.min() <= tol, f"reference row {pos}: nearest box off by {dist.min()}"
        rank[cand[np.argmin(dist)]] = pos
    return rank


def _check_flow(name, run, unit_input, ref_boxes, ref_landmarks, photo_size=None):
    """Our detections vs the official ones, with equal scores ordered as the reference orders them."""
    _, _, h, w = unit_input.shape
    raw = run(preprocess(unit_input))
    scores = softmax_face(raw[0])[0]
    boxes, pts = decode(raw[1][0], raw[2][0], prior_boxes(h, w), h, w, DETECTOR)
    if photo_size is not None:
        scored = np.concatenate([boxes, scores[:, None]], axis=1)
        boxes = to_photo(scored, pts.reshape(-1, 5, 2), photo_size, h)[0][:, :4]
    rank = _tie_rank(ref_boxes, boxes, scores)
    ((out_boxes, out_pts),) = postprocess(*raw, h, w, DETECTOR, rank[None])
    if photo_size is not None:
        out_boxes, out_pts = to_photo(out_boxes, out_pts, photo_size, h)
    _compare_detections(name, out_boxes, out_pts, ref_boxes, ref_landmarks)


@pytest.mark.oracle
def test_detect_matches_official(cases, official_run, photo):
    _check_flow("detect", official_run, to_unit_tensor(photo)[None], cases["boxes"], cases["landmarks"])
    ((boxes, _),) = detect(to_unit_tensor(photo)[None], official_run)
    same = boxes.shape == cases["boxes"].shape and np.allclose(boxes, cases["boxes"], atol=1e-3)
    print(f"default tie order reproduces the official order too: {same}")


@pytest.mark.oracle
def test_demo_flow_matches_official(cases, official_run, photo):
    padded = to_unit_tensor(pad_to_square(photo, DETECTOR.input_size))
    np.testing.assert_array_equal(padded, cases["padded_input"][0])
    _check_flow(
        "demo flow", official_run, padded[None], cases["demo_boxes"], cases["demo_landmarks"], photo.size
    )
    ((boxes, _),) = detect_faces([photo], official_run)
    same = boxes.shape == cases["demo_boxes"].shape and np.allclose(boxes, cases["demo_boxes"], atol=1e-3)
    print(f"default tie order reproduces the official order too: {same}")


@pytest.mark.oracle
def test_onnx_runtime_detector_matches_torch(detector_weights, cases, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from flashface_trt.export.detector import cached_detector
    from flashface_trt.runtime.ort_detector import OrtDetector

    model = load_retinaface(detector_weights)
    path = cached_detector(model, tmp_path)
    assert path.name.startswith("detector-") and path.with_suffix(".onnx.json").is_file()
    assert cached_detector(model, tmp_path) == path  # reused, not rebuilt
    x = preprocess(np.concatenate([cases["padded_input"], cases["padded_input"][:, :, ::-1]]))  # batch 2
    ours = OrtDetector(path)(x)
    ref = detector_runner(model)(x)
    for name, a, b in zip(("logits", "boxes", "landmarks"), ours, ref):
        err = rel_err(a, b)
        print(f"\nONNX Runtime vs torch {name}: rel err {err:.2e}")
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
    with pytest.raises(InputError, match=rf"{len(boxes)} faces found in 'group.png'.*--largest-face"):
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
        import flashface_trt.runtime.ort_detector
        from flashface_trt.runtime.references import load_references
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
