"""The `flashface-trt` commands: each takes the parsed arguments and does one job.

Heavy imports (torch, onnxruntime, TensorRT) happen inside the commands, so `generate --onnx`
and `--engines` never import torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace

import numpy as np

from .runtime.errors import FlashFaceError
from .runtime.request import RECIPES, GenerationRequest

log = logging.getLogger("flashface_trt")

# sizes used when --height/--width are not given: the tiny preset is a seconds-long CPU demo
DEFAULT_SIZE = {"weights": 768, "tiny": 128}


def request_from(args: argparse.Namespace, size: tuple[int, int]) -> GenerationRequest:
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


def detect(args: argparse.Namespace) -> int:
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


def export_detector(args: argparse.Namespace) -> int:
    from .export.detector import cached_detector
    from .models.loading import load_detector, tiny_detector

    model = tiny_detector() if args.preset else load_detector(args.weights)
    print(cached_detector(model, args.out_dir))
    return 0


def generate(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .runtime.pipeline import generate as run_pipeline

    if args.engines:
        backend, detector = _trt_backend(args)
    else:
        backend, detector = _ort_backend(args) if args.onnx else _torch_backend(args)
    faces = _faces(args, detector)
    request = request_from(args, _default_size(args, backend))
    t0 = time.perf_counter()
    images = run_pipeline(
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
    if args.onnx or args.engines:
        shapes = backend.manifest["shapes"] if args.onnx else backend.manifest["export"]["shapes"]
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
    if args.preset or args.onnx or args.engines:
        log.info("no --face given: using a drawn stand-in face")
        return [synthetic_face()]
    raise FlashFaceError("give at least one reference photo with --face")


def _torch_backend(args: argparse.Namespace):
    from .models.backend import TorchBackend
    from .models.loading import load_models, tiny_models
    from .models.settings import TORCH_PRESETS

    device, dtype = _device(args)
    t0 = time.perf_counter()
    models = tiny_models(device, dtype) if args.preset else load_models(args.weights, device, dtype)
    log.info("models ready in %.1f s (%s, %s)", time.perf_counter() - t0, device, dtype)
    return TorchBackend(models, TORCH_PRESETS[args.torch_preset]), lambda: _torch_detector(args, device)


def _ort_backend(args: argparse.Namespace):
    """ONNX Runtime backend over an export directory (imports no torch)."""
    from .runtime.ort_backend import OrtBackend, OrtSettings

    backend = OrtBackend(args.onnx, OrtSettings(provider=args.provider))
    return backend, backend.detector


def _trt_backend(args: argparse.Namespace):
    """TensorRT engines (stale engines are refused with what differs); detection on ONNX Runtime."""
    from .runtime.ort_detector import OrtDetector
    from .runtime.trt_backend import TrtBackend

    backend = TrtBackend(args.engines)
    export = backend.manifest["export"]
    entry = export["networks"].get("detector")

    def detector():
        if entry is None:
            raise FlashFaceError("the engines' export has no detector graph; pass --cropped faces")
        return OrtDetector(args.engines / entry["file"])

    return backend, detector


def shapes_from(args: argparse.Namespace, base):
    """`base` ExportShapes with the ranges given on the command line (--max-samples, --height, ...)."""
    given = {
        "max_samples": args.max_samples,
        "max_refs": args.max_refs,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "opt_height": args.height,
        "opt_width": args.width,
    }
    shapes = replace(base, **{k: v for k, v in given.items() if v is not None})
    return replace(shapes, opt_refs=min(shapes.opt_refs, shapes.max_refs))


def build(args: argparse.Namespace) -> None:
    from .engine.build import build_engines, export_shapes
    from .engine.profiles import BuildSettings
    from .runtime.exports import read_export

    shapes = shapes_from(args, export_shapes(read_export(args.onnx)))
    settings = BuildSettings(
        shapes, opt_level=args.opt_level, workspace_gib=args.workspace_gib, timing_cache=args.timing_cache
    )
    manifest = build_engines(args.onnx, args.out, settings)
    for name, entry in manifest["engines"].items():
        print(f"{name:14s} {args.out / entry['file']}")


def verify(args: argparse.Namespace) -> None:
    from .engine.verify import check, format_table, verify

    rows = verify(args.engines, args.onnx)
    print(format_table(rows))
    check(rows)  # a VerificationError naming the network: exit status 2


def export(args: argparse.Namespace) -> None:
    from .export.exporter import ExportSettings, export_models
    from .models.loading import load_detector, load_models, tiny_detector, tiny_models
    from .runtime.spec import TINY_SHAPES, ExportShapes

    shapes = shapes_from(args, TINY_SHAPES if args.preset else ExportShapes())
    settings = ExportSettings(args.precision, shapes=shapes, dynamo=args.dynamo)
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


def convert(args: argparse.Namespace) -> None:
    from .models.loading import convert_weights

    manifest = convert_weights(args.src, args.out)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files, {total / 2**30:.2f} GiB, to {args.out}")


def _serve_setup(args: argparse.Namespace):
    """(settings, backend loader, default size) of `serve` from its arguments."""
    from .serve.config import ServeSettings, read_keys_file
    from .serve.server import JsonFormatter

    keys = tuple(args.api_key) + (read_keys_file(args.api_keys_file) if args.api_keys_file else ())
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        timeout_s=args.timeout_s,
        api_keys=keys,
        shutdown=args.shutdown,
        drain_s=args.drain_s,
        max_jobs=args.max_jobs,
        max_batch_rows=args.max_batch_rows,
        warmup_steps=args.warmup_steps,
    ).validated()
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without API keys: anyone who reaches it can use it", args.host)
    if args.log_json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())

    def load():
        if args.engines:
            return _trt_backend(args)
        return _ort_backend(args) if args.onnx else _torch_backend(args)

    size = None
    if args.height or args.width or args.preset:
        default = DEFAULT_SIZE["tiny"] if args.preset else DEFAULT_SIZE["weights"]
        size = (args.height or default, args.width or default)
    return settings, load, size


def _ray_config(args: argparse.Namespace):
    from .serve.ray_app import RayConfig

    return RayConfig(
        min_replicas=args.replicas,
        max_replicas=args.max_replicas or args.replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        num_gpus=args.gpus_per_replica,
        num_cpus=args.cpus_per_replica,
        identities_per_replica=args.identities_per_replica,
    ).validated()


def serve(args: argparse.Namespace) -> int:
    """`flashface-trt serve`: the networks load on the service's worker thread (see /readyz)."""
    try:
        settings, load, size = _serve_setup(args)
        from .serve.server import serve as run_server
    except ImportError as exc:
        raise FlashFaceError(
            f"the service needs its extra: pip install 'flashface-trt[serve]' ({exc})"
        ) from exc
    if not args.ray:
        return run_server(settings, load, size)
    try:
        from .serve.ray_app import run as run_ray
    except ImportError as exc:
        raise FlashFaceError(f"--ray needs Ray Serve: pip install 'flashface-trt[ray]' ({exc})") from exc
    return run_ray(settings, load, size, _ray_config(args), args.ray_address)


def ray_options(config: dict) -> argparse.Namespace:
    """The `flashface-trt serve --ray` arguments of a `serve run` config's `args` mapping."""
    from .cli import build_parser

    argv = ["serve", "--ray"]
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                argv.append(flag)
            elif v not in (False, None):
                argv += [flag, str(v)]
    return build_parser().parse_args(argv)


def ray_app(config: dict):
    """Application builder for `serve run` (import path `flashface_trt.commands:ray_app`).

    `config` holds the `flashface-trt serve` options by name (`preset: tiny`, `onnx: DIR`,
    `data_dir: /shared/flashface`, `max_replicas: 4`, ...), as `serve run CONFIG.yaml` passes them.
    """
    from .serve.ray_app import build_app

    args = ray_options(config)
    settings, load, size = _serve_setup(args)
    return build_app(settings, load, size, _ray_config(args))
