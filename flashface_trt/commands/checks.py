"""Checks every command runs before it loads anything: flags that fit together, inputs, outputs, packages."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..runtime.errors import InputError, WeightsError
from ..runtime.faces.images import DEFAULT_MAX_PIXELS
from ..runtime.faces.outputs import check_output_dir
from ..runtime.sampling.params import BATCH_ROWS

log = logging.getLogger("flashface_trt")


def cli_message(exc: BaseException) -> str:
    """An error as the CLI says it: the remedy an InputError names by its API field, as the flag."""
    option = getattr(exc, "option", None)
    return str(exc).replace(option, "--" + option.replace("_", "-")) if option else str(exc)


def check_weights_dir(path: Path, flag: str = "--weights") -> None:
    """`path` (given as `flag`) is an existing directory."""
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise WeightsError(f"{flag} {str(path)!r} {what}; it takes the directory of the weight files")


def check_count(flag: str, value: int, lo: int) -> None:
    """An integer option is at least `lo`."""
    if value < lo:
        raise InputError(f"{flag} {value} must be at least {lo}")


def refuse(args: argparse.Namespace, rules: list[tuple[str, object, bool, str]]) -> None:
    """Refuse each (flag, default, applies, why not) given a non-default value where it does not apply."""
    for flag, default, applies, why in rules:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value != default and not applies:
            given = flag if isinstance(value, bool) else f"{flag} {value}"
            raise InputError(f"{given} has no effect here: {why}")


def check_generate_flags(args: argparse.Namespace) -> None:
    """Every `generate` option either works with the others given or is refused, saying why."""
    check_count("--max-pixels", args.max_pixels, 1)
    check_count("--max-batch-rows", args.max_batch_rows, int(BATCH_ROWS.lo or 1))
    torch = bool(args.weights or args.preset)
    backend = "--onnx" if args.onnx else "--engines"
    torch_only = f"it sets up the PyTorch backend (--weights, --preset), not {backend}"
    faces = bool(args.face or args.batch_file)  # a batch file's lines may name photos
    no_face = "no --face is given"
    skip = "--cropped skips detection" if args.cropped else no_face
    refuse(
        args,
        [
            ("--device", "auto", torch, f"{torch_only}; with --onnx choose --provider cpu|cuda|tensorrt"),
            (
                "--precision",
                "auto",
                torch,
                f"{torch_only}; the graphs' precision is the export's (`export --precision`)",
            ),
            ("--torch-preset", "auto", torch, torch_only),
            ("--provider", "cpu", bool(args.onnx), "it picks ONNX Runtime's execution provider for --onnx"),
            ("--cropped", False, faces, f"it says the --face photos are crops; {no_face}"),
            (
                "--largest-face",
                False,
                faces and not args.cropped,
                f"it picks a detected face; {skip}",
            ),
            ("--max-pixels", DEFAULT_MAX_PIXELS, faces, f"it limits the --face photos; {no_face}"),
            (
                "--max-batch-rows",
                BATCH_ROWS.default,
                bool(args.batch_file),
                "it sizes the steps --batch-file requests share",
            ),
        ],
    )


def output_dirs(args: argparse.Namespace) -> list[Path]:
    """The directories a command writes into (what a failed command must not leave behind empty)."""
    if args.command == "generate":
        return [args.out.parent]
    if args.command in ("detect", "export-detector"):
        return [args.out_dir]
    return [args.out] if args.command in ("export", "build", "convert-weights") else []


def check_output_dirs(args: argparse.Namespace) -> None:
    """Every output directory of a command exists and is writable, or can be created."""
    if args.command != "generate":
        for path in output_dirs(args):
            check_output_dir(path, "output directory")
