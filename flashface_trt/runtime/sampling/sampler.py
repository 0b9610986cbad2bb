"""Guidance settings, the per-step plan and the one denoising loop every backend shares.

The loop is a plain function over one `denoise(x, step)` call that returns the next step's x
(k-diffusion style), e.g. `prepare.stepper`: any backend's batched step over one request, and
the loop never asks which backend it has. The step arithmetic is `guidance.py`. The launch rule
follows the official `ContextGaussianDiffusion` (flashface/all_finetune/ops/context_diffusion.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .layout import BatchLayout
from .schedule import DDIMStep, ddim_steps, model_coefficients

Array = TypeVar("Array")
Wrap = Callable[[Iterable["StepPlan"]], Iterable["StepPlan"]]


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

    def layout(self, samples: int) -> BatchLayout:
        """The rows of this step's UNet call for `samples` images."""
        return BatchLayout(samples, self.three_way)

    def coefficients(self, g: GuidanceParams) -> list[float]:
        """This step's row of `guidance.STEP_COEFFICIENTS`: guidance scales and DDIM coefficients."""
        d = self.ddim
        keep = 1.0 - g.guide_rescale  # in float64, as the official Python scalar
        return [
            g.text_guidance,
            g.face_guidance,
            g.guide_rescale,
            keep,
            *d.coefficients(),
            float(self.three_way),
        ]


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


def sample(
    denoise: Callable[[Array, StepPlan], Array],
    x: Array,
    steps: Sequence[StepPlan],
    wrap: Wrap | None = None,
) -> Array:
    """Deterministic DDIM (eta = 0): x <- denoise(x, step) for every step; returns z0.

    `wrap` may wrap the steps (a progress bar); it sees every step, whichever backend runs them.
    """
    for step in wrap(steps) if wrap is not None else steps:
        x = denoise(x, step)
    return x
