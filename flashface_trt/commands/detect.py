"""`detect` (the faces `generate` would use, and their crops) and `export-detector`."""

from __future__ import annotations

import argparse

import numpy as np

from ..backends import require_onnxruntime, require_torch, torch_detector
from ..runtime.errors import FlashFaceError
from .checks import check_count, check_weights_dir, cli_message


def _detector(args: argparse.Namespace):
    """The RunDetector of --onnx DIR (ONNX Runtime), --weights or --preset (PyTorch)."""
    if args.onnx:
        from ..runtime.artifacts.exports import detector_graph
        from ..runtime.faces.ort_detector import OrtDetector

        graph = detector_graph(args.onnx)
        require_onnxruntime("detect --onnx")
        return OrtDetector(graph)
    if args.weights:
        check_weights_dir(args.weights)
    require_torch("detect", "detection with PyTorch (--preset, --weights)")
    return torch_detector(args)


def detect(args: argparse.Namespace) -> int:
    from ..runtime.errors import InputError
    from ..runtime.faces.images import load_image
    from ..runtime.faces.outputs import save_image
    from ..runtime.faces.references import find_references

    check_count("--show", args.show, 0)
    check_count("--max-pixels", args.max_pixels, 1)
    detector = _detector(args)
    loaded, refused = [], 0
    for path in args.photos:
        try:
            loaded.append((path, load_image(path, max_pixels=args.max_pixels)))
        except FlashFaceError as exc:
            print(f"{path}: refused: {exc}")
            refused += 1
    # one batch through the library path of `generate`, so that the crops are the ones it would use
    names = [path.name for path, _ in loaded]
    found = find_references([image for _, image in loaded], names, detector, args.largest_face)
    for (path, _), (boxes, ref) in zip(loaded, found):
        print(f"{path}: {len(boxes)} face(s)")
        for box in boxes[: args.show]:
            x1, y1, x2, y2 = (int(v) for v in np.round(box[:4]))
            print(f"  box ({x1}, {y1}, {x2}, {y2})  score {box[4]:.6f}")
        if len(boxes) > args.show:
            print(f"  ... {len(boxes) - args.show} more")
        if isinstance(ref, InputError):
            print(f"  refused: {cli_message(ref)}")
            refused += 1
            continue
        out = args.out_dir / f"{path.stem}_face.png"
        save_image(ref.crop, out)  # the directory is made only once there is a crop to write
        print(f"  crop -> {out}")
    return 2 if refused else 0


def export_detector(args: argparse.Namespace) -> int:
    if args.weights:
        check_weights_dir(args.weights)
    require_torch("export-detector", "export-detector")
    from ..export.detector import cached_detector
    from ..models.loading import load_detector, tiny_detector

    model = tiny_detector() if args.preset else load_detector(args.weights)
    print(cached_detector(model, args.out_dir))
    return 0
