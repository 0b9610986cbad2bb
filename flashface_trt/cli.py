"""FlashFace-TRT: personalised images of a person from reference photos and a prompt.

Generate with PyTorch (--weights, or --preset tiny without downloads), with ONNX Runtime from an
export (--onnx) or with TensorRT engines (--engines); `flashface-trt COMMAND --help` for each.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from . import commands as cmd
from .commands.checks import cli_message
from .models.config import CUTS, EXPORT_CUTS
from .models.settings import TORCH_PRESETS
from .runtime.errors import FlashFaceError
from .runtime.faces.images import DEFAULT_MAX_PIXELS
from .runtime.faces.outputs import COMMON_FORMATS
from .runtime.sampling.params import BATCH_ROWS, DEFAULT_SIZE, GENERATE_PARAMS, GUIDANCE, RECIPES, REQUIRED
from .serve.config import SETTINGS

log = logging.getLogger("flashface_trt")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, leaving out defaults that say nothing (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


def _recipes(name: str) -> str:
    """Each recipe's value of a guidance parameter or the face position, for the help."""
    values = {
        k: ",".join(f"{v:g}" for v in r.face_bbox) if name == "face_bbox"
        else f"{getattr(r.guidance, name):g}"
        for k, r in sorted(RECIPES.items())
    }
    if len(set(values.values())) == 1:
        return f"{next(iter(values.values()))} with every --recipe"
    return ", ".join(f"{v} with --recipe {k}" for k, v in values.items())


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


FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "path": Path, "bbox": _bbox
}  # fmt: skip


def _add_params(p: argparse.ArgumentParser, params, notes: dict[str, str] | None = None) -> None:
    """One positive flag per schema parameter: its type, default, choices, and range in the help."""
    for param in params:
        rule = "" if param.choices else param.rule()
        text = param.help + (f" ({rule})" if rule.startswith(">") else f" {rule}" if rule else "")
        if param.group == GUIDANCE or param.name == "face_bbox":
            text += f" (default: {_recipes(param.name)})"
        elif param.name == "recipe":
            text += ": " + "; ".join(f"{k}: {r.description}" for k, r in RECIPES.items())
        p.add_argument(
            f"--{param.name.replace('_', '-')}",
            type=FLAG_TYPES[param.kind],
            default=None if param.default is REQUIRED else param.default,
            choices=param.choices or None,
            metavar="X1,Y1,X2,Y2" if param.kind == "bbox" else None,
            help=text + (notes or {}).get(param.name, ""),
        )


def _sub(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


def _add_source(p: argparse.ArgumentParser, onnx: str | None = None, engines: bool = False):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="directory of the official or converted weight files")
    src.add_argument(
        "--preset", choices=["tiny"], help="embedded deterministic random model: no downloads, noise images"
    )
    if onnx:
        src.add_argument("--onnx", type=Path, help=onnx)
    if engines:
        src.add_argument("--engines", type=Path, help="a directory written by `flashface-trt build`")
    return src


def _add_torch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="PyTorch device (--weights, --preset); auto: cuda if torch sees one",
    )


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    """How each backend runs: PyTorch device, precision and preset; ONNX Runtime provider."""
    _add_torch_args(p)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16"],
        default="auto",
        help="PyTorch weights (--weights, --preset); auto: fp16 on CUDA, fp32 on the CPU",
    )
    p.add_argument(
        "--torch-preset",
        choices=list(TORCH_PRESETS),
        default="auto",
        help="how the PyTorch backend runs: static loop (CUDA graph on a GPU), torch.compile, channels-last",
    )
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda", "tensorrt"],
        default="cpu",
        help="ONNX Runtime execution provider for --onnx (cuda/tensorrt where installed)",
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
        help="refuse photos with more pixels than this (>= 1; decompression-bomb guard)",
    )


def _add_generate(sub) -> None:
    gen = _sub(sub, "generate", "personalised images from reference faces and a prompt")
    _add_source(
        gen, onnx="a directory written by `flashface-trt export` (ONNX Runtime, no torch)", engines=True
    )
    _add_backend_args(gen)
    gen.add_argument(
        "--face",
        type=Path,
        action="append",
        default=[],
        metavar="PHOTO",
        help="a reference photo with one face (repeat for more); without it --preset/--onnx use a drawn face",
    )
    _add_face_args(gen)
    size = (
        f" (default: {DEFAULT_SIZE['weights']}; {DEFAULT_SIZE['tiny']} with --preset tiny;"
        " the export's typical size with --onnx/--engines)"
    )
    notes = {"prompt": " (needed without --batch-file)", "height": size, "width": size}
    _add_params(gen, GENERATE_PARAMS, notes)
    gen.add_argument(
        "--out",
        type=Path,
        default=Path("out.png"),
        help=f"output image; its extension picks the format: {COMMON_FORMATS}, ... (any Pillow writes); "
        "several samples get _0, _1, ...",
    )
    gen.add_argument(
        "--batch-file",
        type=Path,
        metavar="JSONL",
        help="many requests in one call, run together step by step: one JSON object of generate options "
        "per line (prompt, face, seed, steps, out, ...; missing keys take these flags' values); relative "
        "paths resolve against the file's directory, as does a line's default output <--out stem>_<line>",
    )
    _add_params(gen, [BATCH_ROWS], {"max_batch_rows": " with --batch-file"})


def _add_detect(sub) -> None:
    det = _sub(sub, "detect", "find the face in each photo and write the crops generate would use")
    det.add_argument("photos", type=Path, nargs="+", metavar="PHOTO", help="photos to detect faces in")
    src = det.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="directory with retinaface_resnet50.pth (or converted)")
    src.add_argument("--preset", choices=["tiny"], help="random detector (finds random 'faces'; for testing)")
    src.add_argument(
        "--onnx",
        type=Path,
        help="a directory written by `export` or `export-detector` (ONNX Runtime, no torch)",
    )
    det.add_argument("--out-dir", type=Path, default=Path("faces"), help="where crops are written")
    det.add_argument("--show", type=int, default=5, help="detections listed per photo, best first (>= 0)")
    _add_face_args(det, cropped=False)


def _add_exports(sub) -> None:
    exp = _sub(sub, "export-detector", "export the face detector to ONNX (hash-named, reused)")
    src = exp.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="directory with retinaface_resnet50.pth (or converted)")
    src.add_argument("--preset", choices=["tiny"], help="the tiny preset's random detector")
    exp.add_argument("--out-dir", type=Path, default=Path("onnx"), help="where the graph is written")

    ex = _sub(sub, "export", "export every network to ONNX (hash-named graphs, reused when current)")
    _add_source(ex)
    _add_torch_args(ex)
    ex.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="graph precision: fp16 weights and activations with float32 normalisations",
    )
    ex.add_argument("--out", type=Path, required=True, help="output directory (self-contained)")
    ex.add_argument(
        "--max-samples", type=int, help="images per request, >= 1 (default: 4; 2 with --preset tiny)"
    )
    ex.add_argument("--max-refs", type=int, help="reference faces per request, >= 1 (default: 4)")
    ex.add_argument(
        "--min-size", type=int, help="smallest image side in pixels, a multiple of 8 (default: 256; 64 tiny)"
    )
    ex.add_argument(
        "--max-size", type=int, help="largest image side in pixels, a multiple of 8 (default: 1024; 256 tiny)"
    )
    for side in ("height", "width"):
        ex.add_argument(
            f"--{side}",
            type=int,
            help=f"typical image {side}, a multiple of 8 in [min-size, max-size] "
            f"(default: {DEFAULT_SIZE['weights']}; {DEFAULT_SIZE['tiny']} tiny)",
        )
    ex.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    ex.add_argument(
        "--cuts",
        type=lambda text: tuple(c for c in text.split(",") if c),
        default=EXPORT_CUTS,
        help=f"UNet FLOP cuts in the graph, of {','.join(CUTS)} (see ExportSettings)",
    )


def _add_engines(sub) -> None:
    bld = _sub(sub, "build", "TensorRT engines from an export (needs TensorRT and a GPU)")
    bld.add_argument("--onnx", type=Path, required=True, help="a directory written by `flashface-trt export`")
    bld.add_argument("--out", type=Path, required=True, help="engine directory")
    for flag, what in (
        ("--max-samples", "images per request, >= 1 (UNet batch 3x this)"),
        ("--max-refs", "reference faces per request, >= 1"),
        ("--min-size", "smallest image side in pixels, a multiple of 8"),
        ("--max-size", "largest image side in pixels, a multiple of 8"),
        ("--height", "typical image height, a multiple of 8"),
        ("--width", "typical image width, a multiple of 8"),
    ):
        bld.add_argument(flag, type=int, help=f"{what} (default: the export's)")
    bld.add_argument("--opt-level", type=int, default=3, help="builder optimisation level in [0, 5]")
    bld.add_argument("--workspace-gib", type=float, default=8.0, help="builder workspace limit in GiB (> 0)")
    bld.add_argument("--timing-cache", type=Path, help="kernel timing cache file (reused across builds)")

    ver = _sub(sub, "verify", "every engine vs ONNX Runtime float32 on the same inputs")
    ver.add_argument(
        "--engines", type=Path, required=True, help="a directory written by `flashface-trt build`"
    )
    ver.add_argument("--onnx", type=Path, required=True, help="a float32 export, the reference")

    conv = _sub(sub, "convert-weights", "official weight files -> deduplicated float16 safetensors")
    conv.add_argument("src", type=Path, metavar="SRC", help="directory of the official weight files")
    conv.add_argument("out", type=Path, metavar="OUT", help="directory to write the converted files to")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashface-trt", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    version = f"%(prog)s {metadata.version('flashface-trt')}"
    parser.add_argument("--version", action="version", version=version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_detect(sub)
    _add_exports(sub)
    _add_engines(sub)
    _add_serve(sub)
    return parser


def _add_serve(sub) -> None:
    """`flashface-trt serve`: the HTTP service (needs the `serve` extra: fastapi, uvicorn, ...)."""
    srv = _sub(sub, "serve", "HTTP service: identities, generation jobs, progress, metrics")
    _add_source(srv, onnx="a directory written by `flashface-trt export` (ONNX Runtime)", engines=True)
    _add_backend_args(srv)
    _add_params(srv, SETTINGS)
    srv.add_argument(
        "--api-key", action="append", default=[], help="a bearer key clients must send (repeat for more)"
    )
    srv.add_argument("--api-keys-file", type=Path, help="bearer keys, one per line")
    srv.add_argument(
        "--height", type=int, help="height of requests that give none, a multiple of 8 (default: the model's)"
    )
    srv.add_argument(
        "--width", type=int, help="width of requests that give none, a multiple of 8 (default: the model's)"
    )
    srv.add_argument("--log-json", action="store_true", help="one JSON object per log line (with job ids)")
    ray = srv.add_argument_group("scale-out on Ray Serve (the `ray` extra)")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve: an ingress and model replicas")
    ray.add_argument("--ray-address", help="a running Ray cluster (default: start a local one)")
    ray.add_argument(
        "--replicas", type=int, default=1, help="model replicas, >= 1 (with --max-replicas: the minimum)"
    )
    ray.add_argument(
        "--max-replicas", type=int, help="autoscale up to this many model replicas (>= --replicas)"
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=2.0,
        help="autoscaling target of ongoing requests per replica (> 0)",
    )
    gpus = "GPUs of one model replica (>= 0); auto: 1 where its backend runs on a GPU, else 0"
    auto = lambda v: v if v == "auto" else float(v)  # noqa: E731
    ray.add_argument("--gpus-per-replica", type=auto, default="auto", help=gpus)
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs of one model replica (>= 0)")
    ray.add_argument(
        "--identities-per-replica",
        type=int,
        default=16,
        help="identities a replica keeps loaded, >= 1 (least recently used leave first)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return cmd.run(args)
    except FlashFaceError as exc:
        print(f"flashface-trt: error: {cli_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashface-trt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
