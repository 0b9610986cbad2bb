"""Guidance + CFG rescale + DDIM update of one step as a module whose step scalars are tensors.

Used as the exported `step_2way`/`step_3way` graphs (engines replay it inside a CUDA graph) and by
the PyTorch static loop, so that one captured graph serves any guidance values: the scalars are
read from a coefficient row (`runtime.buffers.STEP_COEFFICIENTS`) instead of being baked in.
"""

from __future__ import annotations

import torch
from torch import nn


def _row_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation per row [N, ...] -> [N, 1, 1, 1] (as `sampler._row_std`)."""
    flat = x.reshape(x.shape[0], -1)
    mean = flat.sum(1, keepdim=True) / flat.shape[1]
    var = ((flat - mean) ** 2).sum(1) / (flat.shape[1] - 1)
    return (var**0.5).reshape(-1, 1, 1, 1)


class GuidanceStepGraph(nn.Module):
    """Disentangled guidance + CFG rescale + x0 + DDIM update of one step, as a graph.

    Same operations and order as `runtime.sampler.guide` and `schedule.DDIMStep`, with the step's
    scalars read from a coefficient row so that one graph (or engine) serves every step, and a
    CUDA graph can replay the loop with the scalars in a device table. Rescale is always applied:
    with guide_rescale = 0 the factor is exactly 1.
    """

    def __init__(self, three_way: bool):
        super().__init__()
        self.three_way = three_way

    def forward(self, x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """x [N, 4, h, w], eps [k*N, 4, h, w] (k = 3 or 2), coef [9] -> x of the next step."""
        n = x.shape[0]
        tg, fg, rs, sigma, alpha, a_cur, s_cur, a_next, s_next = (coef[i] for i in range(9))
        if self.three_way:
            y_ref, y, u = eps[:n], eps[n : 2 * n], eps[2 * n : 3 * n]
            out = u + tg * (y - u) + fg * (y_ref - y)
        else:
            y, u = eps[:n], eps[n : 2 * n]
            out = u + tg * (y - u)
        ratio = _row_std(y) / (_row_std(out) + 1e-12)
        out = out * (rs * ratio + (1.0 - rs))
        x0 = (x - sigma * out) / alpha
        d = (x - a_cur * x0) / s_cur
        return a_next * x0 + s_next * d
