"""Export plumbing: network specs and hash-named cached artifacts with manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flashface_trt.export.artifacts import arrays_digest, cached_artifact
from flashface_trt.export.detector import detector_spec
from flashface_trt.runtime.artifacts.spec import AxisRange
from flashface_trt.runtime.errors import FlashFaceError, InputError


def test_detector_spec_profiles_and_input_checks():
    spec = detector_spec(640, max_batch=4)
    assert spec.profile("min") == {"images": (1, 3, 640, 640)}
    assert spec.profile("max") == {"images": (4, 3, 640, 640)}
    assert spec.sample_shapes() == {"images": (2, 3, 640, 640)}
    assert spec.outputs[0].shape == ("photos", 16800, 2)  # (80*80 + 40*40 + 20*20) * 2 anchors
    assert spec.dynamic_axes() == {n: {0: "photos"} for n in ("images", "logits", "boxes", "landmarks")}
    spec.check_inputs({"images": np.zeros((3, 3, 640, 640), np.float32)})
    with pytest.raises(InputError, match=r"'images' has shape \[1, 3, 320, 640\]"):
        spec.check_inputs({"images": np.zeros((1, 3, 320, 640), np.float32)})
    with pytest.raises(InputError, match=r"'photos' = 5 is outside \[1, 4\]"):
        spec.check_inputs({"images": np.zeros((5, 3, 640, 640), np.float32)})
    with pytest.raises(InputError, match="do not match"):
        spec.check_inputs({"image": np.zeros((1, 3, 640, 640), np.float32)})
    with pytest.raises(InputError, match="min <= opt <= max"):
        AxisRange(2, 1, 4)


def test_cached_artifact_reuse_staleness_and_failure(tmp_path):
    calls = []

    def build(path):
        calls.append(path.name)
        path.write_bytes(b"graph bytes " * 10)

    digest = arrays_digest({"w": np.arange(4, dtype=np.float32)})
    a = cached_artifact(tmp_path, "net", ".onnx", digest, {"opset": 18}, build)
    manifest = json.loads(a.with_suffix(".onnx.json").read_text())
    assert manifest["weights_sha256"] == digest and manifest["bytes"] == a.stat().st_size
    assert cached_artifact(tmp_path, "net", ".onnx", digest, {"opset": 18}, build) == a
    assert len(calls) == 1  # reused
    a.write_bytes(b"graph bytez " * 10)  # same size, different bytes: stale
    assert cached_artifact(tmp_path, "net", ".onnx", digest, {"opset": 18}, build) == a
    assert len(calls) == 2 and a.read_bytes() == b"graph bytes " * 10
    other = arrays_digest({"w": np.arange(4, dtype=np.float32) + 1})
    b = cached_artifact(tmp_path, "net", ".onnx", other, {"opset": 18}, build)
    c = cached_artifact(tmp_path, "net", ".onnx", digest, {"opset": 17}, build)
    assert len({a, b, c}) == 3 and len(calls) == 4

    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(FlashFaceError, match="exporter crashed"):
        cached_artifact(tmp_path, "bad", ".onnx", digest, {}, broken)
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob(".bad*"))
