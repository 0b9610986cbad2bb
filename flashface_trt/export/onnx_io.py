"""Exporting a module to ONNX under a `NetworkSpec`, and checking the written graph against it."""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..runtime.artifacts.spec import NetworkSpec
from ..runtime.errors import FlashFaceError

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1 << 30  # parameters above this go to external data (protobuf caps a file at 2 GB)


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    spec: NetworkSpec,
    path: Path,
    opset: int,
    external_data: bool = False,
    dynamo: bool = False,
) -> None:
    """`torch.onnx.export` with the spec's names and dynamic axes.

    The TorchScript-based exporter is the default: on these graphs it is 15-25x faster than the
    torch.export-based one (2 s against 30-55 s for the tiny UNet) and gives the same ONNX Runtime
    results; `dynamo=True` selects the torch.export-based exporter.
    """
    kwargs: dict = {}
    if dynamo:
        kwargs = {"dynamic_shapes": _dynamic_shapes(module, spec), "optimize": False, "dynamo": True}
    else:
        kwargs = {"dynamic_axes": spec.dynamic_axes(), "dynamo": False, "do_constant_folding": True}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters warn about tracing, deprecation and naming
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            external_data=external_data,
            verbose=False,
            **kwargs,
        )


def _dynamic_shapes(module: nn.Module, spec: NetworkSpec) -> tuple:
    """torch.export `dynamic_shapes`: positional, one entry per input, *args grouped into one entry."""
    dims: dict[str, torch.export.Dim] = {}
    shapes: list = []
    for t in spec.inputs:
        axes = {}
        for i, name in t.dynamic_axes().items():
            r = spec.axes[name]
            # torch.export specialises sizes 0 and 1; a range from 1 still exports a symbolic axis
            dims.setdefault(name, torch.export.Dim(name.replace(".", "_"), min=r.min, max=max(r.max, 2)))
            axes[i] = dims[name]
        shapes.append(axes)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        fixed = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        shapes = [*shapes[:fixed], tuple(shapes[fixed:])]
    return tuple(shapes)


def simplify(path: Path) -> None:
    """Constant folding, shape inference and dead-code removal with onnxslim (names and axes kept)."""
    import onnx
    import onnxslim

    model = onnxslim.slim(str(path))
    external = sum(i.ByteSize() for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data")


def check_graph(path: Path, spec: NetworkSpec) -> None:
    """`onnx.checker` plus the spec's input/output names, ranks, fixed sizes and dynamic axes."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise FlashFaceError(f"{path.name} fails onnx.checker: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    for declared, values, strict in ((spec.inputs, graph.input, True), (spec.outputs, graph.output, False)):
        found = {v.name: v for v in values}
        for t in declared:
            if t.name not in found:
                raise FlashFaceError(f"{path.name} has no tensor {t.name!r} (has {sorted(found)})")
            value_type = found[t.name].type.tensor_type
            if onnx.helper.tensor_dtype_to_np_dtype(value_type.elem_type).name != t.dtype:
                raise FlashFaceError(f"{path.name}: {t.name!r} is not {t.dtype}")
            shape = [d.dim_value if d.HasField("dim_value") else "?" for d in value_type.shape.dim]
            want = [d if isinstance(d, int) else "?" for d in t.shape]
            if not strict:  # shape inference may not carry a fixed size through a reshape
                shape = [w if s == "?" else s for s, w in zip(shape, want)]
            if shape != want or len(shape) != len(t.shape):
                raise FlashFaceError(
                    f"{path.name}: {t.name!r} has shape {shape}, the spec says {list(t.shape)}"
                )
