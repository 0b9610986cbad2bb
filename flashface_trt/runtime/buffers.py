"""Shapes of every engine input and output for one request, from the specs (pure, unit-tested).

The engine runtime allocates its buffers from this plan once per request shape: the UNet's at the
3-way batch (the 2-way steps use a prefix), the ReferenceNet's K/V outputs with exactly the UNet's
K/V input shapes, so that the same device buffers serve both engines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..export.spec import NetworkSpec


@dataclass(frozen=True)
class LoopDims:
    """The sizes of one request: samples N, latent height/width, references, steps, text length."""

    samples: int
    latent_h: int
    latent_w: int
    num_refs: int
    steps: int
    prompts: int = 2

    def __post_init__(self) -> None:
        for name in ("samples", "latent_h", "latent_w", "num_refs", "steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be at least 1")


def axis_sizes(spec: NetworkSpec, dims: LoopDims, k: int = 3) -> dict[str, int]:
    """Concrete size of every dynamic axis of `spec` for a request, with a k-way UNet batch (k = 2, 3)."""
    n = dims.samples
    sizes = {
        "batch": k * n,
        "b_ref": n if k == 3 else 2 * n,
        "samples": n,
        "batch2": 2 * n,
        "batch3": 3 * n,
        "latent_h": dims.latent_h,
        "latent_w": dims.latent_w,
        "height": 8 * dims.latent_h,
        "width": 8 * dims.latent_w,
        "num_refs": dims.num_refs,
        "prompts": dims.prompts,
    }
    for name, r in spec.axes.items():
        if name.startswith("ref_tokens_"):
            sizes[name] = r.min * dims.num_refs  # exported from one reference: min = tokens per reference
    return sizes


def io_shapes(spec: NetworkSpec, dims: LoopDims, k: int = 3) -> dict[str, tuple[int, ...]]:
    """Every input and output of `spec` at this request's sizes."""
    sizes = axis_sizes(spec, dims, k)
    return {t.name: t.concrete(sizes) for t in (*spec.inputs, *spec.outputs)}


def nbytes(spec: NetworkSpec, name: str, shape: tuple[int, ...]) -> int:
    dtype = next(t.dtype for t in (*spec.inputs, *spec.outputs) if t.name == name)
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def check_kv_wiring(reference_net: NetworkSpec, unet: NetworkSpec, dims: LoopDims) -> None:
    """The ReferenceNet's outputs must be exactly the UNet's K/V inputs (names, shapes, dtypes)."""
    outs = io_shapes(reference_net, dims)
    ins = io_shapes(unet, dims)
    for t in reference_net.outputs:
        if t.name not in ins:
            raise InputError(f"ReferenceNet output {t.name!r} is not a UNet input")
        if outs[t.name] != ins[t.name]:
            raise InputError(f"{t.name}: ReferenceNet gives {outs[t.name]}, the UNet takes {ins[t.name]}")
        if next(u.dtype for u in unet.inputs if u.name == t.name) != t.dtype:
            raise InputError(f"{t.name}: ReferenceNet and UNet dtypes differ")


def step_tables(
    coefficients: list[list[float]], timesteps: list[int], strengths: list[float], dims: LoopDims
):
    """Per-step device tables of a captured loop: coef [S, 9], UNet timesteps [S, 3N], λ [S, 2N], t [S, 1].

    Rows are read at fixed offsets by the captured graph, so new guidance values only need a copy.
    """
    n, s = dims.samples, dims.steps
    if not len(coefficients) == len(timesteps) == len(strengths) == s:
        raise InputError(
            f"step tables need {s} rows, got {len(coefficients)}, {len(timesteps)}, {len(strengths)}"
        )
    coef = np.asarray(coefficients, dtype=np.float32)  # [S, 9]
    t_unet = np.repeat(np.asarray(timesteps, np.float32)[:, None], 3 * n, axis=1)  # [S, 3N]
    lam = np.repeat(np.asarray(strengths, np.float32)[:, None], 2 * n, axis=1)  # [S, 2N]
    t_ref = np.asarray(timesteps, np.float32)[:, None]  # [S, 1]
    return coef, t_unet, lam, t_ref


STEP_COEFFICIENTS = (
    "text_guidance",
    "face_guidance",
    "guide_rescale",
    "sigma",
    "alpha",
    "a_cur",
    "s_cur",
    "a_next",
    "s_next",
)


# a plausible row (guidance 7.5 / 3.2 / 0.5 and DDIM coefficients) for tracing and verification
SAMPLE_STEP_ROW = [7.5, 3.2, 0.5, 0.6, 0.8, 0.8, 0.6, 0.9, 0.4]


def step_coefficients(step, guidance) -> list[float]:
    """One row of the device table the update graph reads: guidance scales and DDIM coefficients."""
    d = step.ddim
    g = guidance
    return [
        g.text_guidance,
        g.face_guidance,
        g.guide_rescale,
        d.sigma,
        d.alpha,
        d.a_cur,
        d.s_cur,
        d.a_next,
        d.s_next,
    ]
