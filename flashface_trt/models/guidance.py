"""Guidance + CFG rescale + DDIM update of one step as a module whose step scalars are tensors.

Used as the exported `step_2way`/`step_3way` graphs (engines replay it inside a CUDA graph) and by
the PyTorch static step, so that one captured graph serves any guidance values: the scalars are
read from a coefficient row (`runtime.guidance.STEP_COEFFICIENTS`) instead of being baked in. The
arithmetic is `runtime.guidance.step_update`, the same function the plain sampler runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.guidance import STEP_COEFFICIENTS, step_update


class GuidanceStepGraph(nn.Module):
    """Disentangled guidance + CFG rescale + x0 + DDIM update of one step, as a graph."""

    def __init__(self, three_way: bool):
        super().__init__()
        self.three_way = three_way

    def forward(self, x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """x [N, 4, h, w], eps [k*N, 4, h, w] (k = 3 or 2), coef [10] -> x of the next step."""
        return step_update(x, eps, self.three_way, [coef[i] for i in range(len(STEP_COEFFICIENTS))])
