"""Commands that write model files: `export`, `build`, `verify` (reads engines), `convert-weights`."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

from ..backends import require_torch, torch_device
from .checks import check_weights_dir

log = logging.getLogger("flashface_trt")


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
    from ..engine.build import build_engines
    from ..engine.profiles import BuildSettings
    from ..runtime.artifacts.exports import export_manifest, manifest_shapes

    shapes = shapes_from(args, manifest_shapes(export_manifest(args.onnx)))  # graphs checked when building
    settings = BuildSettings(
        shapes, opt_level=args.opt_level, workspace_gib=args.workspace_gib, timing_cache=args.timing_cache
    )
    manifest = build_engines(args.onnx, args.out, settings)
    for name, entry in manifest["engines"].items():
        print(f"{name:14s} {args.out / entry['file']}")


def verify(args: argparse.Namespace) -> None:
    from ..engine.verify import check, format_table, verify

    rows = verify(args.engines, args.onnx)
    print(format_table(rows))
    check(rows)  # a VerificationError naming the network: exit status 2


def export(args: argparse.Namespace) -> None:
    from ..runtime.artifacts.spec import TINY_SHAPES, ExportShapes

    shapes = shapes_from(args, TINY_SHAPES if args.preset else ExportShapes())  # ranges checked first
    if args.weights:
        check_weights_dir(args.weights)
    require_torch("export", "export")
    from ..export.exporter import ExportSettings, export_models
    from ..models.loading import load_detector, load_models, tiny_detector, tiny_models

    settings = ExportSettings(args.precision, shapes=shapes, dynamo=args.dynamo, cuts=args.cuts)
    device, _ = torch_device(args)
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
    check_weights_dir(args.src, "SRC")
    require_torch("convert-weights", "convert-weights")
    from ..models.loading import convert_weights

    manifest = convert_weights(args.src, args.out)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files, {total / 2**30:.2f} GiB, to {args.out}")
