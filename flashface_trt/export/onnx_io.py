"""Exporting a module to ONNX under a `NetworkSpec`, and checking the written graph against it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import FlashFaceError
from .spec import NetworkSpec

log = logging.getLogger(__name__)


def export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], spec: NetworkSpec, path: Path, opset: int
) -> None:
    """`torch.onnx.export` (the torch.export-based exporter) with the spec's names and dynamic axes."""
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {}
    for t in spec.inputs:
        axes = {}
        for i, name in t.dynamic_axes().items():
            r = spec.axes[name]
            # torch.export specialises sizes 0 and 1; a range from 1 still exports a symbolic axis
            dims.setdefault(name, torch.export.Dim(name, min=r.min, max=max(r.max, 2)))
            axes[i] = dims[name]
        dynamic_shapes[t.name] = axes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def check_graph(path: Path, spec: NetworkSpec) -> None:
    """`onnx.checker` plus the spec's input/output names, ranks, fixed sizes and dynamic axes."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise FlashFaceError(f"{path.name} fails onnx.checker: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    for declared, values in ((spec.inputs, graph.input), (spec.outputs, graph.output)):
        found = {v.name: v for v in values}
        for t in declared:
            if t.name not in found:
                raise FlashFaceError(f"{path.name} has no tensor {t.name!r} (has {sorted(found)})")
            dims = found[t.name].type.tensor_type.shape.dim
            shape = [d.dim_value if d.HasField("dim_value") else "?" for d in dims]
            want = [d if isinstance(d, int) else "?" for d in t.shape]
            if shape != want:
                raise FlashFaceError(
                    f"{path.name}: {t.name!r} has shape {shape}, the spec says {list(t.shape)}"
                )
