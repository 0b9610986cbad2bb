"""The backend of the model flags (`--engines`, `--onnx`, else `--preset`/`--weights`) for `generate`,
`serve`, `serve run` and the benchmarks; each loader imports its stack (torch or not) when called.
"""

from __future__ import annotations

import argparse
import logging
import time

from .runtime.errors import FlashFaceError

log = logging.getLogger("flashface_trt")

TORCH_FREE_ROUTE = {
    "generate": "`generate --onnx DIR` (a directory written by `flashface-trt export`) needs no torch",
    "detect": "`detect --onnx DIR` (a directory written by `export` or `export-detector`) needs no torch",
}


def require_torch(command: str, what: str = "the PyTorch backend (--preset, --weights)") -> None:
    """Import torch, or say that `what` needs it and which route needs none (FlashFaceError)."""
    try:
        import torch  # noqa: F401
    except (ImportError, OSError) as exc:
        other = TORCH_FREE_ROUTE.get(command)
        raise FlashFaceError(
            f"{what} needs PyTorch, which cannot be imported here ({exc}): pip install torch"
            + (f"; {other}" if other else "")
        ) from exc


def require_onnxruntime(what: str) -> None:
    """Import onnxruntime, or say that `what` needs it (FlashFaceError)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise FlashFaceError(
            f"{what} needs ONNX Runtime, which is not installed: pip install onnxruntime"
        ) from exc


def load_backend(args: argparse.Namespace):
    """(backend, detector factory) of --engines, --onnx or the PyTorch flags."""
    if args.onnx:
        require_onnxruntime("generate --onnx")
    elif not args.engines:
        require_torch("generate")
    if args.engines:
        return trt_backend(args)
    return ort_backend(args) if args.onnx else torch_backend(args)


def torch_device(args: argparse.Namespace):
    """(device, dtype) from --device/--precision; fp16 by default on CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not cuda:
        raise FlashFaceError("--device cuda was asked for but torch sees no CUDA device")
    precision = args.precision if args.precision != "auto" else ("fp16" if device == "cuda" else "fp32")
    return device, torch.float16 if precision == "fp16" else torch.float32


def torch_detector(args: argparse.Namespace, device: str = "cpu"):
    """RunDetector over the PyTorch RetinaFace of --weights or the tiny preset (always float32)."""
    from .models.loading import load_detector, tiny_detector
    from .models.retinaface import detector_runner

    if args.preset:
        log.warning("the tiny preset's detector has random weights: its 'faces' are random boxes")
        return detector_runner(tiny_detector(device))
    return detector_runner(load_detector(args.weights, device))


def torch_backend(args: argparse.Namespace):
    """PyTorch networks of --weights or the tiny preset, on --device in --precision."""
    from .models.backend import TorchBackend
    from .models.loading import load_models, tiny_models
    from .models.settings import TORCH_PRESETS

    device, dtype = torch_device(args)
    t0 = time.perf_counter()
    models = tiny_models(device, dtype) if args.preset else load_models(args.weights, device, dtype)
    log.info("models ready in %.1f s (%s, %s)", time.perf_counter() - t0, device, dtype)
    return TorchBackend(models, TORCH_PRESETS[args.torch_preset]), lambda: torch_detector(args, device)


def ort_backend(args: argparse.Namespace):
    """ONNX Runtime backend over an export directory (imports no torch)."""
    from .runtime.backends.ort import OrtBackend, OrtSettings

    backend = OrtBackend(args.onnx, OrtSettings(provider=args.provider))
    return backend, backend.detector


def trt_backend(args: argparse.Namespace):
    """TensorRT engines (stale engines are refused with what differs); detection on ONNX Runtime."""
    from .runtime.artifacts.manifest import check_artifact
    from .runtime.backends.trt import TrtBackend
    from .runtime.faces.ort_detector import OrtDetector

    backend = TrtBackend(args.engines)
    entry = backend.manifest["export"]["networks"].get("detector")

    def detector():
        if entry is None:
            raise FlashFaceError("the engines' export has no detector graph; pass --cropped faces")
        graph = args.engines / entry["file"]
        check_artifact(graph, "flashface-trt build")
        return OrtDetector(graph)

    return backend, detector
