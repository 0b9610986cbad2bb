"""DDIM step tables on the scaled-linear schedule with trailing timesteps, in NumPy.

Reproduces the float32 arithmetic of the official sampler (`ldm/ops/diffusion.py`
`GaussianDiffusion.sample` with `discretization='trailing'` and `ldm/ops/solvers.py`
`sample_ddim`, eta = 0): fractional trailing timesteps are mapped to sigmas by log-VE
interpolation, each sigma is mapped back to an integer timestep for the model, and the DDIM
update uses the interpolated sigmas while x0 uses the integer timestep's sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import InputError

NUM_TIMESTEPS = 1000
BETA_MIN = 0.00085
BETA_MAX = 0.012

f32 = np.float32


def _exp32(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 exp (evaluated in float64), independent of NumPy's SIMD kernels."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(f32)


def _log32(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 log (evaluated in float64)."""
    return np.log(np.asarray(x, dtype=np.float64)).astype(f32)


@lru_cache(maxsize=4)
def scaled_linear_sigmas(
    n: int = NUM_TIMESTEPS, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX
) -> np.ndarray:
    """Noise std sigma_t of the SD scaled-linear schedule, float64 [n] (official `scaled_linear_schedule`)."""
    betas = np.linspace(beta_min**0.5, beta_max**0.5, n, dtype=np.float64) ** 2
    return np.sqrt(1.0 - np.cumprod(1.0 - betas))


@lru_cache(maxsize=4)
def _log_ve_sigmas(n: int) -> np.ndarray:
    s = scaled_linear_sigmas(n)
    with np.errstate(divide="ignore"):
        ve = np.where(s < 1.0, np.sqrt(s**2 / (1.0 - s**2)), np.inf)
    return np.log(ve).astype(f32)  # computed in float64, used in float32 as the official code does


def trailing_timesteps(steps: int, n: int = NUM_TIMESTEPS) -> np.ndarray:
    """Fractional trailing timesteps t_max, t_max - n/steps, ... (official `torch.arange` in float32)."""
    if not isinstance(steps, (int, np.integer)) or steps < 1 or steps > n:
        raise InputError(f"steps={steps!r} must be an integer in [1, {n}]")
    t_max, t_min = n - 1, 0
    delta = -((t_max - t_min + 1) / steps)
    count = math.ceil((t_min - 1 - t_max) / delta)
    ts = t_max + delta * np.arange(count, dtype=np.float64)
    return np.clip(ts.astype(f32), t_min, t_max)


def t_to_sigma(t: np.ndarray, n: int = NUM_TIMESTEPS) -> np.ndarray:
    """Sigma at fractional timesteps by interpolation in log-VE-sigma space (float32)."""
    t = np.asarray(t, dtype=f32)
    i, j = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    w = (t - np.trunc(t)).astype(f32)
    ls = _log_ve_sigmas(n)
    log_sigma = (f32(1) - w) * ls[i] + w * ls[j]
    log_sigma = np.where(np.isfinite(log_sigma), log_sigma, f32(np.inf)).astype(f32)
    ve = _exp32(log_sigma)
    with np.errstate(invalid="ignore"):
        vp = np.where(ve < np.inf, np.sqrt(ve**2 / (f32(1) + ve**2)), f32(1))
    return vp.astype(f32)


def sigma_to_t(sigma: np.float32, n: int = NUM_TIMESTEPS) -> int:
    """Integer model timestep for a sigma: inverse interpolation, then round half to even."""
    sigma = f32(sigma)
    if sigma == f32(1):
        return n - 1
    ls = _log_ve_sigmas(n)
    log_sigma = _log32(np.sqrt(sigma**2 / (f32(1) - sigma**2)))
    below = np.nonzero((log_sigma - ls) >= 0)[0]
    i = min(int(below[-1]) if below.size else 0, n - 2)
    w = np.clip((ls[i] - log_sigma) / (ls[i] - ls[i + 1]), f32(0), f32(1))
    t = (f32(1) - w) * f32(i) + w * f32(i + 1)
    return int(np.round(t))


def model_coefficients(t: int, n: int = NUM_TIMESTEPS) -> tuple[float, float]:
    """(alpha_t, sigma_t) of an integer timestep, float64 tables cast to float32 as the official `_i`."""
    if not 0 <= int(t) < n:
        raise InputError(f"timestep t={t} must be in [0, {n - 1}]")
    s = scaled_linear_sigmas(n)[int(t)]
    return float(f32(np.sqrt(1.0 - s**2))), float(f32(s))


@dataclass(frozen=True)
class DDIMStep:
    """One DDIM step. Float32 scalars stored as Python floats (exactly representable).

    t: integer timestep the model sees; alpha/sigma: its signal/noise coefficients (x0 from eps);
    a_cur/s_cur and a_next/s_next: coefficients of the interpolated sigmas of this and the next
    step (the DDIM update); s_next = 0 on the last step.
    """

    t: int
    alpha: float
    sigma: float
    a_cur: float
    s_cur: float
    a_next: float
    s_next: float

    def coefficients(self) -> list[float]:
        """(sigma, alpha, a_cur, s_cur, a_next, s_next): the step's part of a coefficient row."""
        return [self.sigma, self.alpha, self.a_cur, self.s_cur, self.a_next, self.s_next]


def ddim_steps(steps: int, n: int = NUM_TIMESTEPS) -> list[DDIMStep]:
    """The DDIM steps of the official trailing sampler for `steps` steps."""
    sig = t_to_sigma(trailing_timesteps(steps, n), n)
    sig = np.concatenate([sig, np.zeros(1, f32)])
    out = []
    for k in range(len(sig) - 1):
        t = sigma_to_t(sig[k], n)
        alpha, sigma = model_coefficients(t, n)
        s_cur, s_next = sig[k], sig[k + 1]
        a_cur = np.sqrt(f32(1) - s_cur**2)
        a_next = np.sqrt(f32(1) - s_next**2)
        s_next_eff = np.sqrt(s_next**2 - f32(0))
        out.append(DDIMStep(t, alpha, sigma, float(a_cur), float(s_cur), float(a_next), float(s_next_eff)))
    return out
