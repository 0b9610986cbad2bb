"""`flashface-trt verify`: every engine against ONNX Runtime float32 on the same inputs, as a table.

Written for the day TensorRT is available: one command tells whether the engines compute what the
float32 graphs compute (TensorRT fp16 should land near 1e-3 relative error, not 1e-1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..export.spec import NetworkSpec
from ..runtime.buffers import SAMPLE_STEP_ROW, LoopDims, io_shapes
from ..runtime.cuda import copy_to_device
from ..runtime.ort_backend import OrtSettings, Session, read_export

log = logging.getLogger(__name__)


def random_inputs(
    spec: NetworkSpec, shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Plausible inputs: token ids, timesteps near the middle, λ = 1, a real DDIM row, N(0, 1/4) else."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = shapes[t.name]
        if t.dtype == "int32":
            feeds[t.name] = rng.integers(0, 49407, shape).astype(np.int32)
        elif t.name == "timestep":
            feeds[t.name] = np.full(shape, 500.0, np.float32)
        elif t.name == "ref_scale":
            feeds[t.name] = np.ones(shape, np.float32)
        elif t.name == "coef":
            feeds[t.name] = np.array(SAMPLE_STEP_ROW, np.float32)
        else:
            feeds[t.name] = (0.5 * rng.standard_normal(shape)).astype(t.dtype)
    return feeds


def verify(engines_dir: str | Path, onnx_dir: str | Path, dims: LoopDims | None = None) -> list[dict]:
    """Per network: max |engine - ONNX Runtime| / max |ONNX Runtime| for every output."""
    from ..runtime.trt_backend import DeviceTensor, TrtBackend

    backend = TrtBackend(engines_dir)
    export = read_export(onnx_dir)
    if export["precision"] != "fp32":
        log.warning("%s is a %s export; compare against a float32 export", onnx_dir, export["precision"])
    shapes_cfg = backend.manifest["export"]["shapes"]
    dims = dims or LoopDims(
        1, shapes_cfg["opt_height"] // 8, shapes_cfg["opt_width"] // 8, shapes_cfg["opt_refs"], 1
    )
    rows = []
    for name, spec in backend.specs.items():
        if name == "detector":
            continue
        shapes = io_shapes(spec, dims)
        feeds = random_inputs(spec, shapes)
        entry = export["networks"][name]
        ref = Session(
            Path(onnx_dir) / entry["file"], NetworkSpec.from_dict(entry["spec"]), OrtSettings()
        ).run(**{k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()})
        ins = {}
        for t in spec.inputs:
            ins[t.name] = DeviceTensor.empty(shapes[t.name], t.dtype)
            copy_to_device(ins[t.name].ptr, feeds[t.name], backend.stream)
        outs = {t.name: DeviceTensor.empty(shapes[t.name], t.dtype) for t in spec.outputs}
        backend.run(name, "verify", shapes, {k: v.ptr for k, v in {**ins, **outs}.items()})
        for out_name, tensor in outs.items():
            got = backend.to_host(tensor).astype(np.float64)
            want = np.asarray(ref[out_name], np.float64)
            err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
            rows.append({"network": name, "output": out_name, "shape": list(got.shape), "rel_err": err})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'network':14s} {'output':36s} {'shape':24s} rel. error", "-" * 88]
    for r in rows:
        lines.append(f"{r['network']:14s} {r['output']:36s} {str(r['shape']):24s} {r['rel_err']:.2e}")
    return "\n".join(lines)
