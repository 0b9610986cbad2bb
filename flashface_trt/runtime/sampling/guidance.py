"""Disentangled guidance, CFG rescale, x0 and the DDIM update: the step arithmetic, written once.

Every path runs these functions: one request's step with Python-float coefficients on NumPy
arrays or torch tensors, and the batched step (`batched_update`: the exported `step` graph, the
PyTorch plain and static steps, the ONNX Runtime backend) with per-sample coefficient rows read
from a table, so that one captured graph serves every step, guidance value and mix of requests.
Only operators shared by NumPy arrays and torch tensors are used, in the official float32 order:
guidance as `ContextGaussianDiffusion.denoise` (flashface/all_finetune/ops/context_diffusion.py),
the update as `sample_ddim` (ldm/ops/solvers.py, eta = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# one row of the coefficient table a step reads, in this order
STEP_COEFFICIENTS = (
    "text_guidance",
    "face_guidance",
    "guide_rescale",
    "rescale_keep",  # 1 - guide_rescale, rounded from float64 as the official Python scalar is
    "sigma",
    "alpha",
    "a_cur",
    "s_cur",
    "a_next",
    "s_next",
    "three_way",  # 1: a 3-way step [cond+ref, cond, uncond]; 0: a 2-way step [cond, uncond]
)

# a plausible row (guidance 7.5 / 3.2 / 0.5 and DDIM coefficients) for tracing and verification
SAMPLE_STEP_ROW = (7.5, 3.2, 0.5, 0.5, 0.6, 0.8, 0.8, 0.6, 0.9, 0.4, 1.0)


def row_std(x: Any, n: int) -> Any:
    """Unbiased standard deviation of each of the n rows: [n, ...] -> [n, 1, 1, 1]."""
    flat = x.reshape(n, -1)
    m = flat.shape[1]
    mean = flat.sum(1).reshape(n, 1) / m
    var = ((flat - mean) ** 2).sum(1) / (m - 1)
    return (var**0.5).reshape(n, 1, 1, 1)


def guide(y_ref: Any, y: Any, u: Any, c: Sequence[Any]) -> Any:
    """One guided, CFG-rescaled eps per sample from its y_ref (cond+ref), y (cond) and u (uncond)
    rows, each [S, C, h, w] (arXiv:2305.08891).

    `c` holds Python floats (one step of one request) or per-sample columns [S, 1, 1, 1] (a
    batched step); `c[10]` (three_way) selects the 3-way formula, exactly as the official one.
    """
    text_guidance, face_guidance, rescale, keep, three = c[0], c[1], c[2], c[3], c[10]
    out = u + text_guidance * (y - u)
    if isinstance(three, (int, float)):
        if three:
            out = out + face_guidance * (y_ref - y)
    else:  # per sample: 0 * (finite) adds nothing to a 2-way sample
        out = out + three * (face_guidance * (y_ref - y))
    n = y.shape[0]
    ratio = row_std(y, n) / (row_std(out, n) + 1e-12)
    return out * (rescale * ratio + keep)  # guide_rescale = 0 multiplies by exactly 1


def guided_eps(eps: Any, n: int, three_way: bool, c: Sequence[Any]) -> Any:
    """The batch's eps [k*n, C, h, w] of one request -> guided, CFG-rescaled eps [n, C, h, w]."""
    if three_way:  # rows [cond+ref, cond, uncond]
        return guide(eps[:n], eps[n : 2 * n], eps[2 * n : 3 * n], c)
    y = eps[:n]  # rows [cond, uncond]
    return guide(y, y, eps[n : 2 * n], c)


def x0_from_eps(x: Any, eps: Any, c: Sequence[Any]) -> Any:
    """x0 = (x - sigma_t eps) / alpha_t (eps prediction at the step's integer timestep)."""
    return (x - c[4] * eps) / c[5]


def ddim_update(x: Any, x0: Any, c: Sequence[Any]) -> Any:
    """Deterministic DDIM update x_t -> x_s (eta = 0), in the official operation order."""
    d = (x - c[6] * x0) / c[7]
    return c[8] * x0 + c[9] * d


def guided_x0(x: Any, eps: Any, three_way: bool, c: Sequence[Any]) -> Any:
    """x0 of one step from the model's raw batch output (guidance, rescale, eps -> x0)."""
    return x0_from_eps(x, guided_eps(eps, x.shape[0], three_way, c), c)


def step_update(x: Any, eps: Any, three_way: bool, c: Sequence[Any]) -> Any:
    """One whole step after the model call: x_t and the batch's eps -> x of the next step."""
    return ddim_update(x, guided_x0(x, eps, three_way, c), c)


def columns(coef: Any) -> list[Any]:
    """Per-sample coefficient columns [S, 1, 1, 1] of a coefficient table [S, len(STEP_COEFFICIENTS)]."""
    return [coef[:, i].reshape(-1, 1, 1, 1) for i in range(len(STEP_COEFFICIENTS))]


def batched_update(x: Any, eps: Any, rows: Any, coef: Any) -> Any:
    """A batched step after the model call: every sample's x [S, ...] -> its next x.

    eps [B, C, h, w] holds every request's rows; rows [3, S] names each sample's y_ref, y and u
    rows; coef [S, 11] each sample's coefficients (guidance, DDIM, three_way).
    """
    c = columns(coef)
    return ddim_update(x, x0_from_eps(x, guide(eps[rows[0]], eps[rows[1]], eps[rows[2]], c), c), c)
