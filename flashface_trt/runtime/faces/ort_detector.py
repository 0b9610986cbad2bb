"""The exported face detector on ONNX Runtime: a `RunDetector` that needs no torch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import FlashFaceError, InputError

log = logging.getLogger(__name__)


class OrtDetector:
    """RetinaFace graph from `export/detector.py` run by ONNX Runtime (CPU provider unless told)."""

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise FlashFaceError("onnxruntime is not installed: pip install onnxruntime") from exc
        path = Path(path)
        if not path.is_file():
            raise FlashFaceError(f"detector graph {str(path)!r} does not exist")
        try:
            self.session = ort.InferenceSession(str(path), providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise FlashFaceError(f"{str(path)!r} is not a loadable ONNX graph: {exc}") from exc
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        self.size = tuple(inp.shape[2:])  # fixed (640, 640) in the exported graph
        self.output_names = [o.name for o in self.session.get_outputs()]
        log.info("detector graph %s on %s", path.name, self.session.get_providers()[0])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BGR mean-subtracted [B, 3, H, W] float32 -> logits, box and landmark offsets."""
        if images.ndim != 4 or tuple(images.shape[2:]) != self.size:
            raise InputError(
                f"the detector graph takes [B, 3, {self.size[0]}, {self.size[1]}], got {list(images.shape)}"
            )
        logits, boxes, landmarks = self.session.run(
            self.output_names, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)}
        )
        return logits, boxes, landmarks
