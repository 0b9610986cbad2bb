"""Admission by cost (megapixel-steps) and estimated peak memory: max(one batched UNet step, the VAE
decode), from the model's sizes; used by the CLI before loading, the service before a job exists, Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .params import MAX_SIDE

MIB, GIB = 1 << 20, 1 << 30
# `python -m benchmarks.memory_calibration 128 256 512 1024 256x4` (CPU, PyTorch float32, tiny preset):
# (side, samples) -> MiB the first step and the decode added to the resident set's high-water mark;
# tests/test_admission.py holds the estimate above each row, within a factor 2 (+ FIXED for small ones)
CALIBRATION = {(128, 1): (4.3, 14.0), (256, 1): (9.8, 80.2), (512, 1): (39.1, 271.7),
               (1024, 1): (133.9, 2380.5), (256, 4): (39.6, 333.9)}  # fmt: skip
STEP_TENSORS = 28  # UNet level-0 activations alive at once per row and token (fit to CALIBRATION)
DECODE_TENSORS = 11  # decoder full-resolution activations alive at once per pixel (fit to CALIBRATION)
FIXED = 8 * MIB  # allocator slack and small buffers
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Footprint:
    """What a backend's peak memory scales with: the UNet's level-0 width and heads, the decoder's
    full-resolution width, pixels per latent cell, bytes per activation, whether UNet attention
    scores are materialised (ONNX Runtime's MatMul-Softmax), the networks' own bytes (CLI only)."""

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
        factor, vae_dim = 2 ** (len(vae["dim_mult"]) - 1), vae["dim"] * vae["dim_mult"][0]
        return cls(width, heads, vae_dim, factor, BYTES.get(precision, 4), family == "onnxruntime", weights)

    def peak_bytes(self, height: int, width: int, samples: int, refs: int = 1, rows: int = 0) -> int:
        """Estimated peak bytes of a request; `rows`: UNet rows of a batch it may share (>= its own)."""
        tokens, rows = (height // self.factor) * (width // self.factor), max(rows, 3 * samples)
        scores = self.heads * tokens * tokens * (1 + refs) * self.itemsize if self.unet_scores else 0
        step = rows * (tokens * STEP_TENSORS * self.unet_dim * self.itemsize + scores)  # [rows, T, C]
        decode = samples * self.itemsize * (DECODE_TENSORS * self.vae_dim * height * width + tokens**2)
        return self.weights + FIXED + max(step, decode)


def footprint_of(backend: Any, weights: int = 0) -> Footprint | None:
    """The footprint of a loaded backend (its model config, precision, family); None if unknown."""
    manifest = getattr(backend, "manifest", None) or {}
    config = getattr(backend, "model_config", None) or manifest.get("model_config")
    config = config or manifest.get("export", {}).get("model_config")
    return None if config is None else Footprint.of(config, backend.precision, backend.name, weights)


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unreadable)."""
    try:
        with open("/proc/meminfo") as lines:
            return next(int(ln.split()[1]) << 10 for ln in lines if ln.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


@dataclass(frozen=True)
class Admission:
    """The limits a request must meet: max_cost megapixel-steps (0: none); footprint and free bytes
    of the device (either None, or margin 1: no memory check), of which `margin` is kept back; batch rows."""

    max_cost: float = 0.0
    footprint: Footprint | None = None
    free: int | None = None
    margin: float = 0.2
    rows: int = 0

    @property
    def budget(self) -> int | None:
        """Bytes a request's estimate may take (None: no memory check)."""
        known = self.footprint is not None and self.free is not None and self.margin < 1
        return int(self.free * (1 - self.margin)) if known and self.free is not None else None

    def check(self, request: Any, refs: int = 1) -> None:
        """InputError naming the limit and what would fit; nothing where the request fits."""
        h, w, n, steps = request.height, request.width, request.num_samples, request.steps
        cost = h * w * n * steps / 1e6
        if self.max_cost and cost > self.max_cost:
            over = f"{cost:g} megapixel-steps is over the limit max_cost={self.max_cost:g}"
            raise InputError(f"{h}x{w} x {n} sample(s) x {steps} steps = {over}", "steps")
        budget, need = self.budget, self.footprint and self.footprint.peak_bytes(h, w, n, refs, self.rows)
        if budget is None or not need or need <= budget:
            return
        side = self.largest_side(n)
        fits = f"at most {side}x{side} fits" if side else "even 8x8 does not fit: ask fewer num_samples"
        over = f"over the {_size(budget)} this device has free for it: {fits}"
        raise InputError(f"{h}x{w} x {n} sample(s) needs ~{_size(need)} of memory, {over}", "height")

    def largest_side(self, samples: int) -> int | None:
        """The largest square side (a multiple of 8) of `samples` samples within the budget."""
        fp, budget, sides = self.footprint, self.budget, range(MAX_SIDE, 0, -8)
        if fp is None or budget is None:
            return None
        return next((s for s in sides if fp.peak_bytes(s, s, samples, 1, self.rows) <= budget), 0)

    def limits(self) -> dict[str, Any]:
        """The limits as /readyz reports them."""
        budget, side = self.budget, self.largest_side(1)
        return {"max_cost": self.max_cost, "memory_budget_bytes": budget, "max_side_1_sample": side}
