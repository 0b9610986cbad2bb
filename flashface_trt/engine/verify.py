"""`flashface-trt verify`: every engine against ONNX Runtime float32 on the same inputs, with bounds.

Each network has a stated bound on max |engine - ONNX Runtime| / max |ONNX Runtime| for fp16
engines; `verify` reports every output and fails (naming the network) when one is exceeded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..runtime.artifacts.axes import LoopDims, io_shapes
from ..runtime.artifacts.exports import read_export
from ..runtime.artifacts.spec import NetworkSpec
from ..runtime.backends.cuda import copy_to_device
from ..runtime.backends.ort import OrtSettings, Session
from ..runtime.errors import FlashFaceError
from ..runtime.sampling.guidance import SAMPLE_STEP_ROW

log = logging.getLogger(__name__)

# fp16 engines vs float32 graphs: float16 keeps 11 significant bits (unit roundoff 4.9e-4); through
# dozens of layers with float32 normalisations that stays well under 1e-2 of the output's scale
# (measured 1.8e-3 for the UNet eps on ONNX Runtime's fp16 CPU kernels). The decoder's uint8
# images may move by a few levels; the update step is float32 elementwise arithmetic.
THRESHOLDS = {
    "text_encoder": 1e-2,
    "vae_encoder": 1e-2,
    "vae_decoder": 8 / 255,
    "reference_net": 2e-2,
    "unet": 2e-2,
    "step": 1e-5,
}
# index inputs of the batched engines and the axis (LoopDims field) that bounds their values
INDEX_BOUNDS = {
    "sample_rows": "samples",
    "member_rows": "members",
    "text_rows": "texts",
    "ref_group": "groups",
    "enc_rows": "rows",
    "enc_index": "encoders",
    "stem_rows": "rows",
    "guide": "rows",
}


class VerificationError(FlashFaceError):
    """An engine's output is further from the float32 graph than its network's bound."""


def random_inputs(
    spec: NetworkSpec, shapes: dict[str, tuple[int, ...]], seed: int = 0, dims: LoopDims | None = None
) -> dict[str, np.ndarray]:
    """Plausible inputs: token ids, valid batch indices, timesteps near the middle, λ = 1, a real DDIM
    row per sample, N(0, 1/4) else."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = shapes[t.name]
        if t.name in INDEX_BOUNDS and dims is not None:
            field = INDEX_BOUNDS[t.name]
            high = 2 * dims.members if field == "texts" else getattr(dims, field)
            feeds[t.name] = rng.integers(0, high, shape).astype(np.int32)
        elif t.dtype == "int32":
            feeds[t.name] = rng.integers(0, 49407, shape).astype(np.int32)
        elif t.name == "timestep":
            feeds[t.name] = np.full(shape, 500.0, np.float32)
        elif t.name == "ref_scale":
            feeds[t.name] = np.ones(shape, np.float32)
        elif t.name == "coef":
            feeds[t.name] = np.tile(np.array(SAMPLE_STEP_ROW, np.float32), (shape[0], 1))
        else:
            feeds[t.name] = (0.5 * rng.standard_normal(shape)).astype(t.dtype)
    return feeds


def verify(engines_dir: str | Path, onnx_dir: str | Path, dims: LoopDims | None = None) -> list[dict]:
    """Per network output: max |engine - ONNX Runtime| / max |ONNX Runtime|, its bound, whether it holds."""
    from ..runtime.backends.trt import EAGER, DeviceTensor, TrtBackend

    backend = TrtBackend(engines_dir)
    export = read_export(onnx_dir)
    if export["precision"] != "fp32":
        log.warning("%s is a %s export; compare against a float32 export", onnx_dir, export["precision"])
    shapes_cfg = backend.manifest["export"]["shapes"]
    # a batched step of two one-sample requests (one 2-way, one 3-way): 5 rows, 3 with references
    h, w = shapes_cfg["opt_height"] // 8, shapes_cfg["opt_width"] // 8
    dims = dims or LoopDims(2, h, w, shapes_cfg["opt_refs"], rows=5, ref_rows=3, members=2, groups=2)
    rows = []
    for name, spec in backend.specs.items():
        shapes = io_shapes(spec, dims)
        feeds = random_inputs(spec, shapes, dims=dims)
        entry = export["networks"][name]
        ref = Session(
            Path(onnx_dir) / entry["file"], NetworkSpec.from_dict(entry["spec"]), OrtSettings()
        ).run(**{k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()})
        ins = {}
        for t in spec.inputs:
            ins[t.name] = DeviceTensor.empty(shapes[t.name], t.dtype)
            copy_to_device(ins[t.name].ptr, feeds[t.name], backend.stream)
        outs = {t.name: DeviceTensor.empty(shapes[t.name], t.dtype) for t in spec.outputs}
        backend.run(name, EAGER, shapes, {k: v.ptr for k, v in {**ins, **outs}.items()})
        bound = THRESHOLDS.get(name, 1e-2)
        for out_name, tensor in outs.items():
            got = backend.to_host(tensor).astype(np.float64)
            want = np.asarray(ref[out_name], np.float64)
            err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
            rows.append(
                {
                    "network": name,
                    "output": out_name,
                    "shape": list(got.shape),
                    "rel_err": err,
                    "bound": bound,
                    "ok": err <= bound,
                }
            )
    return rows


def check(rows: list[dict]) -> None:
    """Raise VerificationError naming every network whose error exceeds its bound."""
    bad = [r for r in rows if not r["ok"]]
    if bad:
        raise VerificationError(
            "engines differ from the float32 graphs beyond their bounds: "
            + "; ".join(f"{r['network']}.{r['output']} {r['rel_err']:.2e} > {r['bound']:.1e}" for r in bad)
        )


def format_table(rows: list[dict]) -> str:
    lines = [f"{'network':14s} {'output':36s} {'shape':24s} {'rel. error':>10s} {'bound':>8s}", "-" * 100]
    for r in rows:
        flag = "" if r["ok"] else "  EXCEEDED"
        lines.append(
            f"{r['network']:14s} {r['output']:36s} {str(r['shape']):24s} "
            f"{r['rel_err']:10.2e} {r['bound']:8.1e}{flag}"
        )
    return "\n".join(lines)
