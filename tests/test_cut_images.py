"""The UNet's FLOP cuts (issue 23) change no image: one test per backend, cuts against no cuts.

PyTorch (plain and static step), ONNX Runtime (a graph exported with the default cuts against one
exported without), and the TensorRT runtime through the doubles (engines built from each export;
the numbers are ONNX Runtime's, never TensorRT's). Same weights, same request: at most one 8-bit
level apart (float32 sums in another order), on under 1% of the pixels.
"""

from __future__ import annotations

import numpy as np
import pytest

from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.pipeline import generate, register_identity

from .trt_support import pixels, request

FACES = [synthetic_face(200, seed=3), synthetic_face(200, seed=4)]


def assert_same_images(cut, uncut) -> None:
    diff = np.abs(pixels(cut) - pixels(uncut))
    print(f"\ncuts vs none: max {int(diff.max())} levels on {(diff > 0).mean():.2%} of the pixels")
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def images(backend, **kw):
    return generate(backend, request(num_samples=2, **kw), register_identity(backend, FACES))


@pytest.mark.parametrize("static", [False, True])
def test_torch_images_with_and_without_cuts(static):
    from flashface_trt.models.backend import TorchBackend
    from flashface_trt.models.config import CUTS
    from flashface_trt.models.loading import tiny_models
    from flashface_trt.models.settings import TorchSettings

    cut, uncut = (TorchBackend(tiny_models(), TorchSettings(static_loop=static, cuts=c)) for c in (CUTS, ()))
    assert cut.models.unet.cuts == set(CUTS) and not uncut.models.unet.cuts
    assert_same_images(images(cut), images(uncut))


@pytest.fixture(scope="module")
def uncut_export(tiny_export, tmp_path_factory):
    """The tiny preset exported without cuts (the UNet graph takes no shared-row arrays)."""
    pytest.importorskip("onnxslim", reason="exports are simplified with onnxslim (the export extra)")
    from flashface_trt.export.exporter import ExportSettings, export_models
    from flashface_trt.models.loading import tiny_models
    from flashface_trt.runtime.artifacts.spec import TINY_SHAPES

    out = tmp_path_factory.mktemp("onnx_tiny_uncut")
    export_models(tiny_models(), out, ExportSettings(shapes=TINY_SHAPES, cuts=()))
    return out


def test_onnx_runtime_images_with_and_without_cuts(tiny_export, uncut_export):
    from flashface_trt.runtime.backends.ort import OrtBackend

    cut, uncut = OrtBackend(tiny_export), OrtBackend(uncut_export)
    names = [set(b.sessions["unet"].spec.input_names) for b in (cut, uncut)]
    assert {"enc_rows", "stem_rows"} <= names[0] and not names[1] & {"enc_rows", "enc_index", "stem_rows"}
    assert_same_images(images(cut), images(uncut))


def test_engine_images_with_and_without_cuts(fakes, engines, uncut_export, tmp_path):
    from flashface_trt.runtime.backends.trt import TrtBackend

    from .trt_support import build

    cut, uncut = TrtBackend(engines), TrtBackend(build(uncut_export, tmp_path / "engines"))
    assert "enc_rows" in cut.specs["unet"].input_names and "enc_rows" not in uncut.specs["unet"].input_names
    assert_same_images(images(cut), images(uncut))
