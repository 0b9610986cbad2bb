"""ONNX export of the RetinaFace detector: dynamic batch, fixed 640x640, raw head outputs.

Softmax, decoding and NMS stay outside the graph (`runtime/faces/detection.py`, NumPy) so that every
runtime shares one post-processing and the graph holds only convolutions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..models.retinaface import RetinaFace
from ..runtime.artifacts.spec import AxisRange, NetworkSpec, TensorSpec
from ..runtime.faces.detection import DETECTOR, prior_boxes
from .artifacts import arrays_digest, cached_artifact
from .onnx_io import check_graph, export_graph, simplify

log = logging.getLogger(__name__)

OPSET = 18


def detector_spec(size: int = DETECTOR.input_size, max_batch: int = 16) -> NetworkSpec:
    """Inputs/outputs of the exported detector for `size` x `size` images."""
    n = len(prior_boxes(size, size))
    return NetworkSpec(
        name="detector",
        inputs=(TensorSpec("images", "float32", ("photos", 3, size, size)),),
        outputs=(
            TensorSpec("logits", "float32", ("photos", n, 2)),
            TensorSpec("boxes", "float32", ("photos", n, 4)),
            TensorSpec("landmarks", "float32", ("photos", n, 10)),
        ),
        axes={"photos": AxisRange(1, 1, max_batch)},
    )


def export_detector(model: RetinaFace, path: str | Path, spec: NetworkSpec | None = None) -> None:
    """Export `model` (float32, eval) to `path` and check the graph."""
    spec = spec or detector_spec()
    model = model.float().eval()
    sample = torch.zeros(spec.sample_shapes()["images"])
    export_graph(model, (sample,), spec, Path(path), OPSET)
    simplify(Path(path))
    check_graph(Path(path), spec)


def cached_detector(model: RetinaFace, out_dir: str | Path, spec: NetworkSpec | None = None) -> Path:
    """The detector graph in `out_dir`, named by a hash of its weights and spec; reused when current."""
    spec = spec or detector_spec()
    digest = arrays_digest({k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()})
    settings = {
        "exporter": "torchscript",
        "opset": OPSET,
        "inputs": [t.shape for t in spec.inputs],
        "dtype": "float32",
    }
    return cached_artifact(
        out_dir, "detector", ".onnx", digest, settings, lambda p: export_detector(model, p, spec)
    )
