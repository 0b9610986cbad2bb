"""Disentangled guidance and the DDIM loop, written once for every backend.

The loop is a plain function over one `denoise(x, step) -> x0` call (k-diffusion style);
backends (PyTorch, ONNX Runtime, TensorRT, graph replay) provide `denoise` and the loop
never asks which one it has. Arithmetic here uses only operators shared by NumPy arrays
and torch tensors. Guidance follows the official `ContextGaussianDiffusion.denoise`
(flashface/all_finetune/ops/context_diffusion.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .schedule import DDIMStep, ddim_steps, model_coefficients

Array = TypeVar("Array")


@dataclass(frozen=True)
class GuidanceParams:
    """Guidance settings of one generation (defaults: the official demo's identity-fidelity values).

    text_guidance: CFG scale between cond and uncond text.
    face_guidance: reference-guidance scale (cond+ref vs cond) once launched; 0 disables the 3-way batch.
    ref_strength: λ, reference-attention strength after the launch.
    ref_strength_before: λ before the launch.
    step_to_launch: reference guidance runs for timesteps t <= this value.
    guide_rescale: CFG-rescale factor in [0, 1] (arXiv:2305.08891; unbiased std as the official code).
    """

    text_guidance: float = 7.5
    face_guidance: float = 3.2
    ref_strength: float = 1.2
    ref_strength_before: float = 0.85
    step_to_launch: int = 750
    guide_rescale: float = 0.5


@dataclass(frozen=True)
class StepPlan:
    """Everything one denoising step needs, fixed before the loop starts (no host decisions inside).

    ddim: the step's schedule coefficients.
    three_way: batch [cond+ref, cond, uncond] (else [cond, uncond], both with references).
    ref_strength: λ of the rows that use references.
    """

    ddim: DDIMStep
    three_way: bool
    ref_strength: float

    @property
    def t(self) -> int:
        return self.ddim.t

    @property
    def batch_factor(self) -> int:
        """Rows of the model batch per sample (3 or 2)."""
        return 3 if self.three_way else 2

    def ref_rows(self, num_samples: int) -> int:
        """B_ref: the first rows that attend to references (cond+ref only, or all of the 2-way batch)."""
        return num_samples if self.three_way else 2 * num_samples


def plan_step(ddim: DDIMStep, g: GuidanceParams) -> StepPlan:
    """Official rule: any t > step_to_launch -> 2-way at λ_before; else 3-way at λ if face_guidance > 0."""
    launched = ddim.t <= g.step_to_launch
    three_way = launched and g.face_guidance > 0
    return StepPlan(ddim, three_way, g.ref_strength if launched else g.ref_strength_before)


def plan(steps: int, g: GuidanceParams) -> list[StepPlan]:
    """The plan of a whole trailing-DDIM run."""
    return [plan_step(d, g) for d in ddim_steps(steps)]


def single_step(t: int, g: GuidanceParams) -> StepPlan:
    """A plan for one model call at an arbitrary integer timestep (DDIM update coefficients unset)."""
    alpha, sigma = model_coefficients(t)
    return plan_step(DDIMStep(int(t), alpha, sigma, 0.0, 1.0, 0.0, 0.0), g)


def _row_std(x: Any, n: int) -> Any:
    """Unbiased standard deviation of each of the n rows: [n, ...] -> [n, 1, 1, 1]."""
    flat = x.reshape(n, -1)
    m = flat.shape[1]
    mean = flat.sum(1).reshape(n, 1) / m
    var = ((flat - mean) ** 2).sum(1) / (m - 1)
    return (var**0.5).reshape(n, 1, 1, 1)


def guide(eps: Any, n: int, step: StepPlan, g: GuidanceParams) -> Any:
    """Combine the batch's eps [k*n, C, h, w] into one guided eps [n, C, h, w], then CFG-rescale."""
    if step.three_way:
        y_ref, y, u = eps[:n], eps[n : 2 * n], eps[2 * n : 3 * n]
        out = u + g.text_guidance * (y - u) + g.face_guidance * (y_ref - y)
    else:
        y, u = eps[:n], eps[n : 2 * n]
        out = u + g.text_guidance * (y - u)
    if g.guide_rescale > 0:
        ratio = _row_std(y, n) / (_row_std(out, n) + 1e-12)
        out = out * (g.guide_rescale * ratio + (1.0 - g.guide_rescale))
    return out


Denoise = Callable[[Array, StepPlan], Array]


def sample(
    denoise: Callable[[Array, StepPlan], Array],
    x: Array,
    steps: Sequence[StepPlan],
    wrap: Callable[[Iterable[StepPlan]], Iterable[StepPlan]] | None = None,
) -> Array:
    """Deterministic DDIM (eta = 0): x <- update(x, denoise(x, step)) for every step; returns z0."""
    for step in wrap(steps) if wrap is not None else steps:
        x0 = denoise(x, step)
        x = step.ddim.update(x, x0)
    return x
