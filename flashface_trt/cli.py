"""`flashface-trt` command line: argparse lives here and nowhere else."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import FlashFaceError
from .runtime.images import DEFAULT_MAX_PIXELS
from .runtime.request import RECIPES, GenerationRequest

log = logging.getLogger("flashface_trt")

# sizes used when --height/--width are not given: the tiny preset is a seconds-long CPU demo
DEFAULT_SIZE = {"weights": 768, "tiny": 128}


def _bbox(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.strip("[]() ").split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--face-bbox {text!r} must be four comma-separated numbers"
        ) from exc
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--face-bbox {text!r} must be four comma-separated numbers")
    return values


def _add_model_args(p: argparse.ArgumentParser, onnx: bool = False) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="directory with the official or converted weights")
    src.add_argument(
        "--preset", choices=["tiny"], help="embedded deterministic random model (no weights needed)"
    )
    if onnx:
        src.add_argument("--onnx", type=Path, help="a directory written by `flashface-trt export`")
        p.add_argument(
            "--backend",
            choices=["torch", "onnxruntime"],
            help="default: onnxruntime with --onnx, else torch",
        )
        p.add_argument(
            "--provider",
            choices=["cpu", "cuda", "tensorrt"],
            default="cpu",
            help="ONNX Runtime execution provider (cuda/tensorrt where installed)",
        )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16"],
        default="auto",
        help="default: fp16 weights on CUDA, fp32 on CPU",
    )


def _add_face_args(p: argparse.ArgumentParser, cropped: bool = True) -> None:
    if cropped:
        p.add_argument(
            "--cropped",
            "--no-detect",
            dest="cropped",
            action="store_true",
            help="the --face files are already-cropped faces: skip face detection",
        )
    p.add_argument(
        "--largest-face",
        action="store_true",
        help="where a photo holds several faces, use the largest instead of refusing the photo",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse photos with more pixels than this (decompression-bomb guard)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashface-trt", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="personalised images from reference faces and a prompt")
    _add_model_args(gen, onnx=True)
    gen.add_argument(
        "--face",
        type=Path,
        action="append",
        default=[],
        help="a reference photo with one face (repeat for more); the tiny preset draws one if omitted",
    )
    _add_face_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="identity",
        help="; ".join(f"{k}: {r.description}" for k, r in RECIPES.items()),
    )
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--height", type=int, help="pixels, multiple of 8 (default 768; 128 with --preset tiny)")
    gen.add_argument("--width", type=int, help="pixels, multiple of 8 (default 768; 128 with --preset tiny)")
    gen.add_argument("--face-bbox", type=_bbox, help="normalised x1,y1,x2,y2 of the face; 0,0,0,0 = anywhere")
    gen.add_argument("--text-guidance", type=float, help="text CFG scale (recipe default)")
    gen.add_argument("--face-guidance", type=float, help="reference guidance scale (recipe default)")
    gen.add_argument("--ref-strength", type=float, help="λ after the launch (recipe default)")
    gen.add_argument("--ref-strength-before", type=float, help="λ before the launch (recipe default)")
    gen.add_argument(
        "--step-to-launch", type=int, help="3-way guidance for timesteps t <= this (recipe default)"
    )
    gen.add_argument("--guide-rescale", type=float, help="CFG rescale in [0, 1] (recipe default)")
    gen.add_argument(
        "--out", type=Path, default=Path("out.png"), help="output PNG; several samples get _0, _1, ..."
    )

    det = sub.add_parser("detect", help="find the face in each photo and write the crops generate would use")
    det.add_argument("photos", type=Path, nargs="+", metavar="PHOTO")
    src = det.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="directory with retinaface_resnet50.pth (or converted)")
    src.add_argument("--preset", choices=["tiny"], help="random detector (finds random 'faces'; for testing)")
    src.add_argument("--onnx", type=Path, help="an exported detector graph, run by ONNX Runtime")
    det.add_argument("--out-dir", type=Path, default=Path("faces"), help="where crops are written")
    det.add_argument("--show", type=int, default=5, help="detections listed per photo (best first)")
    _add_face_args(det, cropped=False)

    exp = sub.add_parser("export-detector", help="export the face detector to ONNX (hash-named, reused)")
    src = exp.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="directory with retinaface_resnet50.pth (or converted)")
    src.add_argument("--preset", choices=["tiny"], help="the tiny preset's random detector")
    exp.add_argument("--out-dir", type=Path, default=Path("onnx"), help="where the graph is written")

    ex = sub.add_parser(
        "export", help="export every network to ONNX (hash-named graphs, reused when current)"
    )
    _add_model_args(ex)
    ex.add_argument("--out", type=Path, required=True, help="output directory (self-contained)")
    ex.add_argument("--fp16", action="store_true", help="float16 graphs (normalisations in float32)")
    ex.add_argument("--max-samples", type=int, help="images per request (default 4; 2 for tiny)")
    ex.add_argument("--max-refs", type=int, default=4, help="reference faces per request")
    ex.add_argument("--min-size", type=int, help="smallest output side in pixels (default 256; 64 tiny)")
    ex.add_argument("--max-size", type=int, help="largest output side in pixels (default 1024; 256 tiny)")
    ex.add_argument("--height", type=int, help="typical output height (default 768; 128 tiny)")
    ex.add_argument("--width", type=int, help="typical output width (default 768; 128 tiny)")
    ex.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")

    conv = sub.add_parser("convert-weights", help="official files -> deduplicated float16 safetensors")
    conv.add_argument("src", type=Path)
    conv.add_argument("out", type=Path)
    return parser


def _request(args: argparse.Namespace, size: tuple[int, int]) -> GenerationRequest:
    req = RECIPES[args.recipe].apply(GenerationRequest(prompt=args.prompt))
    overrides = {
        "text_guidance": args.text_guidance,
        "face_guidance": args.face_guidance,
        "ref_strength": args.ref_strength,
        "ref_strength_before": args.ref_strength_before,
        "step_to_launch": args.step_to_launch,
        "guide_rescale": args.guide_rescale,
    }
    guidance = replace(req.guidance, **{k: v for k, v in overrides.items() if v is not None})
    return replace(
        req,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        seed=args.seed,
        num_samples=args.num_samples,
        height=args.height or size[0],
        width=args.width or size[1],
        face_bbox=args.face_bbox if args.face_bbox is not None else req.face_bbox,
        guidance=guidance,
    ).validated()


def _device(args: argparse.Namespace):
    """(device, dtype) from --device/--precision; fp16 by default on CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not cuda:
        raise FlashFaceError("--device cuda was asked for but torch sees no CUDA device")
    precision = args.precision if args.precision != "auto" else ("fp16" if device == "cuda" else "fp32")
    return device, torch.float16 if precision == "fp16" else torch.float32


def _torch_detector(args: argparse.Namespace, device: str = "cpu"):
    """RunDetector over the PyTorch RetinaFace of --weights or the tiny preset (always float32)."""
    from .models.loading import load_detector, tiny_detector
    from .models.retinaface import detector_runner

    if args.preset:
        log.warning("the tiny preset's detector has random weights: its 'faces' are random boxes")
        return detector_runner(tiny_detector(device))
    return detector_runner(load_detector(args.weights, device))


def _detect(args: argparse.Namespace) -> int:
    from .runtime.detection import detect_faces
    from .runtime.images import load_image
    from .runtime.references import pick_reference

    if args.onnx:
        from .runtime.ort_detector import OrtDetector

        detector = OrtDetector(args.onnx)
    else:
        detector = _torch_detector(args)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    refused = 0
    for path in args.photos:
        try:
            image = load_image(path, max_pixels=args.max_pixels)
            ((boxes, landmarks),) = detect_faces([image], detector)
            print(f"{path}: {len(boxes)} face(s)")
            for box in boxes[: args.show]:
                x1, y1, x2, y2 = (int(v) for v in np.round(box[:4]))
                print(f"  box ({x1}, {y1}, {x2}, {y2})  score {box[4]:.6f}")
            if len(boxes) > args.show:
                print(f"  ... {len(boxes) - args.show} more")
            ref = pick_reference(image, path.name, boxes, landmarks, args.largest_face)
        except FlashFaceError as exc:
            print(f"  refused: {exc}")
            refused += 1
            continue
        out = args.out_dir / f"{path.stem}_face.png"
        ref.crop.save(out)
        print(f"  crop -> {out}")
    return 2 if refused else 0


def _export_detector(args: argparse.Namespace) -> int:
    from .export.detector import cached_detector
    from .models.loading import load_detector, tiny_detector

    model = tiny_detector() if args.preset else load_detector(args.weights)
    print(cached_detector(model, args.out_dir))
    return 0


def _generate(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .runtime.pipeline import generate

    backend_name = args.backend or ("onnxruntime" if args.onnx else "torch")
    if (backend_name == "onnxruntime") != (args.onnx is not None):
        raise FlashFaceError(
            "--backend onnxruntime runs an export: give it --onnx DIR (and torch, --weights)"
        )
    backend, detector = _ort_backend(args) if args.onnx else _torch_backend(args)
    faces = _faces(args, detector)
    request = _request(args, _default_size(args, backend))
    t0 = time.perf_counter()
    images = generate(
        backend,
        request,
        faces,
        wrap=lambda steps: tqdm(steps, desc="denoising", unit="step", file=sys.stderr),
    )
    log.info("generated %d image(s) in %.1f s on %s", len(images), time.perf_counter() - t0, backend.name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = args.out if len(images) == 1 else args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix}")
        img.save(path)
        print(path)


def _default_size(args: argparse.Namespace, backend) -> tuple[int, int]:
    if args.onnx:
        shapes = backend.manifest["shapes"]
        return shapes["opt_height"], shapes["opt_width"]
    size = DEFAULT_SIZE["tiny" if args.preset else "weights"]
    return size, size


def _faces(args: argparse.Namespace, detector):
    """Reference crops from --face photos (detected unless --cropped), or the tiny preset's drawn face."""
    from .runtime.images import synthetic_face
    from .runtime.references import load_references

    if args.face:
        refs = load_references(
            args.face, None if args.cropped else detector(), args.largest_face, args.max_pixels
        )
        return [r.crop for r in refs]
    if args.preset or args.onnx:
        log.info("no --face given: using a drawn stand-in face")
        return [synthetic_face()]
    raise FlashFaceError("give at least one reference photo with --face")


def _torch_backend(args: argparse.Namespace):
    from .models.backend import TorchBackend
    from .models.loading import load_models, tiny_models

    device, dtype = _device(args)
    t0 = time.perf_counter()
    models = tiny_models(device, dtype) if args.preset else load_models(args.weights, device, dtype)
    log.info("models ready in %.1f s (%s, %s)", time.perf_counter() - t0, device, dtype)
    return TorchBackend(models), lambda: _torch_detector(args, device)


def _ort_backend(args: argparse.Namespace):
    """ONNX Runtime backend over an export directory (imports no torch)."""
    from .runtime.ort_backend import OrtBackend, OrtSettings

    backend = OrtBackend(args.onnx, OrtSettings(provider=args.provider))
    return backend, backend.detector


def _export(args: argparse.Namespace) -> None:
    from .export.exporter import ExportSettings, export_models
    from .export.networks import TINY_SHAPES, ExportShapes
    from .models.loading import load_detector, load_models, tiny_detector, tiny_models

    base = TINY_SHAPES if args.preset else ExportShapes()
    given = {
        "max_samples": args.max_samples,
        "max_refs": args.max_refs,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "opt_height": args.height,
        "opt_width": args.width,
    }
    shapes = replace(base, **{k: v for k, v in given.items() if v is not None})
    shapes = replace(shapes, opt_refs=min(shapes.opt_refs, shapes.max_refs))
    settings = ExportSettings("fp16" if args.fp16 else "fp32", shapes=shapes, dynamo=args.dynamo)
    device, _ = _device(args)
    models = (
        tiny_models(device, settings.dtype)
        if args.preset
        else load_models(args.weights, device, settings.dtype)
    )
    detector = None
    if args.preset:
        detector = tiny_detector()
    elif any((args.weights / f).is_file() for f in ("retinaface_resnet50.pth", "retinaface.safetensors")):
        detector = load_detector(args.weights)
    else:
        log.warning("no face detector in %s: the export will need --cropped faces", args.weights)
    vocab = None if args.preset else args.weights / "bpe_simple_vocab_16e6.txt.gz"
    manifest = export_models(
        models, args.out, settings, detector, vocab if vocab and vocab.is_file() else None
    )
    for name, entry in manifest["networks"].items():
        print(f"{name:14s} {args.out / entry['file']}")


def _convert(args: argparse.Namespace) -> None:
    from .models.loading import convert_weights

    manifest = convert_weights(args.src, args.out)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files, {total / 2**30:.2f} GiB, to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        commands = {
            "generate": _generate,
            "detect": _detect,
            "export-detector": _export_detector,
            "export": _export,
            "convert-weights": _convert,
        }
        rc = commands[args.command](args)
    except FlashFaceError as exc:
        print(f"flashface-trt: error: {exc}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
