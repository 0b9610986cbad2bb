"""The `flashface-trt` commands: each takes the parsed arguments and does one job.

Every command checks its flags, inputs and outputs before it loads anything. Heavy imports (torch,
onnxruntime, TensorRT) happen inside the commands, so `generate --onnx` and `--engines` never
import torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..runtime.faces.outputs import missing_dirs, remove_empty
from . import detect, generate, model_files, serve
from .checks import check_output_dirs, output_dirs

__all__ = ["COMMANDS", "run"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "generate": generate.generate,
    "detect": detect.detect,
    "export-detector": detect.export_detector,
    "export": model_files.export,
    "build": model_files.build,
    "verify": model_files.verify,
    "convert-weights": model_files.convert,
    "serve": serve.serve,
}


def run(args: argparse.Namespace) -> int:
    """Run `args.command`; a failed command removes the output directories it created while still empty."""
    check_output_dirs(args)
    created = missing_dirs(output_dirs(args))
    try:
        rc = COMMANDS[args.command](args) or 0
    except BaseException:
        remove_empty(created)
        raise
    if rc:
        remove_empty(created)
    return rc
