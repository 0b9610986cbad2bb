"""`flashface-trt` command line: argparse lives here and nowhere else."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import commands as cmd
from .models.settings import TORCH_PRESETS
from .runtime.errors import FlashFaceError
from .runtime.images import DEFAULT_MAX_PIXELS
from .runtime.request import RECIPES

log = logging.getLogger("flashface_trt")


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


def _add_model_args(p: argparse.ArgumentParser, onnx: bool = False, export: bool = False) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="directory with the official or converted weights")
    src.add_argument(
        "--preset", choices=["tiny"], help="embedded deterministic random model (no weights needed)"
    )
    if onnx:
        src.add_argument("--onnx", type=Path, help="a directory written by `flashface-trt export`")
        src.add_argument("--engines", type=Path, help="a directory written by `flashface-trt build`")
        p.add_argument(
            "--provider",
            choices=["cpu", "cuda", "tensorrt"],
            default="cpu",
            help="ONNX Runtime execution provider (cuda/tensorrt where installed)",
        )
        p.add_argument(
            "--torch-preset",
            choices=list(TORCH_PRESETS),
            default="auto",
            help="PyTorch backend: static loop (CUDA graph on a GPU), torch.compile, channels-last",
        )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available"
    )
    if export:
        p.add_argument(
            "--precision",
            choices=["fp32", "fp16"],
            default="fp32",
            help="graph precision: fp16 weights and activations with float32 normalisations",
        )
        return
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
    _add_model_args(ex, export=True)
    ex.add_argument("--out", type=Path, required=True, help="output directory (self-contained)")
    ex.add_argument("--max-samples", type=int, help="images per request (default 4; 2 for tiny)")
    ex.add_argument("--max-refs", type=int, help="reference faces per request (default 4)")
    ex.add_argument("--min-size", type=int, help="smallest output side in pixels (default 256; 64 tiny)")
    ex.add_argument("--max-size", type=int, help="largest output side in pixels (default 1024; 256 tiny)")
    ex.add_argument("--height", type=int, help="typical output height (default 768; 128 tiny)")
    ex.add_argument("--width", type=int, help="typical output width (default 768; 128 tiny)")
    ex.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")

    bld = sub.add_parser("build", help="TensorRT engines from an export (needs TensorRT and a GPU)")
    bld.add_argument("--onnx", type=Path, required=True, help="a directory written by `flashface-trt export`")
    bld.add_argument("--out", type=Path, required=True, help="engine directory")
    for flag, what in (
        ("--max-samples", "images per request (UNet batch 3x this)"),
        ("--max-refs", "reference faces per request"),
        ("--min-size", "smallest output side in pixels"),
        ("--max-size", "largest output side in pixels"),
        ("--height", "typical output height"),
        ("--width", "typical output width"),
    ):
        bld.add_argument(flag, type=int, help=f"{what} (default: the export's)")
    bld.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0-5")
    bld.add_argument("--workspace-gib", type=float, default=8.0, help="builder workspace limit")
    bld.add_argument("--timing-cache", type=Path, help="kernel timing cache file (reused across builds)")

    ver = sub.add_parser("verify", help="every engine vs ONNX Runtime float32 on the same inputs")
    ver.add_argument("--engines", type=Path, required=True)
    ver.add_argument("--onnx", type=Path, required=True, help="a float32 export (the reference)")

    conv = sub.add_parser("convert-weights", help="official files -> deduplicated float16 safetensors")
    conv.add_argument("src", type=Path)
    conv.add_argument("out", type=Path)
    _add_serve_args(sub)
    return parser


def _add_serve_args(sub) -> None:  # type: ignore[no-untyped-def]
    """`flashface-trt serve`: the HTTP service (needs the `serve` extra: fastapi, uvicorn, ...)."""
    srv = sub.add_parser("serve", help="HTTP service: identities, generation jobs, progress, metrics")
    _add_model_args(srv, onnx=True)
    srv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="listen port; 0 picks a free one (default 8000)")
    srv.add_argument(
        "--data-dir", type=Path, default=Path("flashface-data"), help="identities and job results"
    )
    srv.add_argument("--max-queue", type=int, default=64, help="queued jobs before 429 (default 64)")
    srv.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit, MiB (default 20)")
    srv.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="pixels per uploaded photo (decompression guard)",
    )
    srv.add_argument("--timeout-s", type=float, default=600.0, help="default per-job deadline (default 600)")
    srv.add_argument(
        "--api-key", action="append", default=[], help="a bearer key clients must send (repeat for more)"
    )
    srv.add_argument("--api-keys-file", type=Path, help="bearer keys, one per line")
    srv.add_argument(
        "--shutdown", choices=["finish", "cancel"], default="finish", help="on SIGTERM: finish or cancel jobs"
    )
    srv.add_argument(
        "--drain-s", type=float, default=60.0, help="longest wait for jobs on SIGTERM (default 60)"
    )
    srv.add_argument("--max-jobs", type=int, default=1000, help="finished job records kept (default 1000)")
    srv.add_argument(
        "--max-batch-rows",
        type=int,
        default=12,
        help="UNet rows shared by running jobs per step (default 12)",
    )
    srv.add_argument(
        "--warmup-steps", type=int, default=2, help="steps of the warm-up generation before ready (0: none)"
    )
    srv.add_argument("--height", type=int, help="height of requests that give none (default: the model's)")
    srv.add_argument("--width", type=int, help="width of requests that give none (default: the model's)")
    srv.add_argument("--log-json", action="store_true", help="one JSON object per log line (with job ids)")
    ray = srv.add_argument_group("scale-out on Ray Serve (the `ray` extra)")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve: an ingress and model replicas")
    ray.add_argument("--ray-address", help="a running Ray cluster (default: start a local one)")
    ray.add_argument(
        "--replicas", type=int, default=1, help="model replicas (with --max-replicas: the minimum)"
    )
    ray.add_argument("--max-replicas", type=int, help="autoscale up to this many model replicas")
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=2.0,
        help="autoscaling target per replica (default 2)",
    )
    ray.add_argument(
        "--gpus-per-replica", type=float, default=1.0, help="GPUs of one model replica (default 1)"
    )
    ray.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="CPUs of one model replica (default 1)"
    )
    ray.add_argument(
        "--identities-per-replica",
        type=int,
        default=16,
        help="identities a replica keeps loaded (LRU, default 16)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        commands = {
            "generate": cmd.generate,
            "detect": cmd.detect,
            "export-detector": cmd.export_detector,
            "export": cmd.export,
            "build": cmd.build,
            "verify": cmd.verify,
            "convert-weights": cmd.convert,
            "serve": cmd.serve,
        }
        rc = commands[args.command](args)
    except FlashFaceError as exc:
        print(f"flashface-trt: error: {exc}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
