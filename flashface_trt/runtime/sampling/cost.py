"""Admission by cost: a request's cost units and estimated peak memory against the operator's limits.

One place for the CLI (before any model loads), the service (before a job exists) and Ray's ingress.
Peak memory = max(one batched UNet step, the VAE decode of the request's samples) in activations:
UNet level-0 activations per row and latent token, attention scores where the backend materialises
them, and the decoder's full-resolution activations plus its single-head latent attention scores
(the 256 GiB a tiny-preset 4096x4096 decode asked for: (512*512)^2 float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .params import MAX_SIDE

MIB, GIB = 1 << 20, 1 << 30
# measured by `python -m benchmarks.memory_calibration 128 256 512 1024 256x4` on the CPU (PyTorch
# float32, one thread, the tiny preset, Xeon dev box): (side, samples) -> MiB that the first step and
# then the decode added to the process's peak RSS over the loaded models; tests/test_admission.py
# holds the estimate within [1, 2] of every row
CALIBRATION = {
    (128, 1): (3.6, 31.4),
    (256, 1): (8.1, 81.6),
    (512, 1): (28.9, 265.7),
    (1024, 1): (146.1, 2418.1),
    (256, 4): (39.3, 281.1),
}
STEP_TENSORS = 28  # UNet level-0 activations alive at once per row and token (fit to CALIBRATION)
DECODE_TENSORS = 8  # decoder full-resolution activations alive at once per pixel (fit to CALIBRATION)
FIXED = 32 * MIB  # allocator slack and per-request buffers (a size measured again varies by ~12 MiB)
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class OverBudget(InputError):
    """A request over the service's cost limit or the device's free memory (the message names both)."""


@dataclass(frozen=True)
class Footprint:
    """What a backend's peak activation memory scales with.

    unet_dim / heads: the UNet's level-0 width and attention heads; vae_dim: the decoder's
    full-resolution width; factor: pixels per latent cell; itemsize: bytes per activation;
    unet_scores: the backend materialises UNet attention scores (ONNX Runtime's MatMul-Softmax);
    weights: bytes of the networks themselves (counted by the CLI, which has not loaded them yet).
    """

    unet_dim: int
    heads: int
    vae_dim: int
    factor: int = 8
    itemsize: int = 4
    unet_scores: bool = False
    weights: int = 0

    @classmethod
    def of(cls, config: dict[str, Any], precision: str, family: str, weights: int = 0) -> Footprint:
        """From a model config dict (`ModelConfig.to_dict()`, an export's `model_config`)."""
        unet, vae = config["unet"], config["vae"]
        width = unet["dim"] * unet["dim_mult"][0]
        heads = width // unet["head_dim"] if unet.get("head_dim") else unet["num_heads"]
        return cls(
            width,
            heads,
            vae["dim"] * vae["dim_mult"][0],
            2 ** (len(vae["dim_mult"]) - 1),
            BYTES.get(precision, 4),
            family == "onnxruntime",
            weights,
        )

    def peak_bytes(self, height: int, width: int, samples: int, refs: int = 1, rows: int = 0) -> int:
        """Estimated peak bytes of a request; `rows`: UNet rows of the batch it may share (>= its own)."""
        tokens = (height // self.factor) * (width // self.factor)
        rows = max(rows, 3 * samples)
        scores = self.heads * tokens * tokens * (1 + refs) * self.itemsize if self.unet_scores else 0
        step = rows * tokens * (STEP_TENSORS * self.unet_dim * self.itemsize) + rows * scores
        decode = samples * (
            DECODE_TENSORS * self.vae_dim * self.itemsize * height * width + 2 * 4 * tokens**2
        )
        return self.weights + FIXED + max(step, decode)


def footprint_of(backend: Any, weights: int = 0) -> Footprint | None:
    """The footprint of a loaded backend (its model config, precision, family); None if unknown."""
    manifest = getattr(backend, "manifest", None) or {}
    config = getattr(backend, "model_config", None) or manifest.get("model_config")
    config = config or manifest.get("export", {}).get("model_config")
    return None if config is None else Footprint.of(config, backend.precision, backend.name, weights)


def cost_units(height: int, width: int, samples: int, steps: int) -> float:
    """Megapixel-steps: height x width x samples x steps / 1e6."""
    return height * width * samples * steps / 1e6


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_memory(backend: Any = None) -> int | None:
    """Free memory of a backend's device: its `free_memory()` (CUDA backends), else available RAM."""
    fn = getattr(backend, "free_memory", None)
    return fn() if fn is not None else available_ram()


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


@dataclass(frozen=True)
class Admission:
    """The limits a request must meet (`check`).

    max_cost: megapixel-steps per request (0: none); footprint: the backend's sizes (None: no memory
    check); budget: bytes an estimate may take (free memory less the margin); rows: batch rows.
    """

    max_cost: float = 0.0
    footprint: Footprint | None = None
    budget: int | None = None
    rows: int = 0

    def check(self, request: Any, refs: int = 1) -> None:
        """OverBudget naming the limit and what would fit; nothing where the request fits."""
        h, w, n, steps = request.height, request.width, request.num_samples, request.steps
        cost = cost_units(h, w, n, steps)
        if self.max_cost and cost > self.max_cost:
            raise OverBudget(
                f"{h}x{w} x {n} sample(s) x {steps} steps = {cost:g} megapixel-steps is over the limit"
                f" max_cost={self.max_cost:g}",
                "steps",
            )
        fp, budget = self.footprint, self.budget
        if fp is None or budget is None:
            return
        need = fp.peak_bytes(h, w, n, refs, self.rows)
        if need <= budget:  # [B, C, H, W] activations of one step or decode
            return
        side = self.largest_side(n)
        hint = f"at most {side}x{side} fits" if side else "even 8x8 does not fit: ask fewer num_samples"
        raise OverBudget(
            f"{h}x{w} x {n} sample(s) needs ~{_gib(need)} of memory, over the {_gib(budget)} this device"
            f" has free for it: {hint}",
            "height",
        )

    def limits(self) -> dict[str, Any]:
        """The limits as /readyz reports them."""
        return {
            "max_cost": self.max_cost,
            "memory_budget_bytes": self.budget,
            "max_side_1_sample": self.largest_side(1),
        }

    def largest_side(self, samples: int) -> int | None:
        """The largest square side (a multiple of 8) of `samples` samples within the budget."""
        if self.footprint is None or self.budget is None:
            return None
        fp, budget = self.footprint, self.budget
        lo, hi = 0, MAX_SIDE // 8
        while lo < hi:  # peak_bytes grows with the side
            mid = (lo + hi + 1) // 2
            lo, hi = (
                (mid, hi)
                if fp.peak_bytes(8 * mid, 8 * mid, samples, 1, self.rows) <= budget
                else (lo, mid - 1)
            )
        return 8 * lo


def budget_of(free: int | None, margin: float) -> int | None:
    """Bytes an estimate may take: free memory less the margin (None: unknown, no memory check)."""
    return None if free is None or margin >= 1 else math.floor(free * (1 - margin))
