"""Settings of the PyTorch backend (no torch import: the command line reads the preset names)."""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.errors import InputError
from ..runtime.sampling.identities import DEFAULT_KV_CACHE_BYTES, DEFAULT_PREFETCH_IMAGES
from .config import CUTS

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # the loop is captured by our own CUDA graph


@dataclass(frozen=True)
class TorchSettings:
    """How the PyTorch backend runs; `benchmarks.suite --variants` times each preset side by side.

    static_loop: run each step over static tensors, replayed as a CUDA graph on a GPU (one graph
        per request shape and batch layout; None: on for CUDA, off for the CPU, where the plain
        step is as fast).
    compile: torch.compile the main UNet's forward (one specialisation per batch shape); the
        ReferenceNet, run once per step per new identity, stays eager.
    compile_mode: a torch.compile mode without inductor's own CUDA graphs (ours capture the loop).
    channels_last: NHWC layout for the UNet's convolutions (its weights are converted in place).
    kv_cache_bytes: byte budget of the per-identity reference K/V cache.
    max_shapes: request shapes whose static buffers and step graphs are kept, least recent dropped.
    cuts: the exact FLOP cuts (`config.CUTS`) the UNet takes, set on the (shared) module by the backend.
    prefetch_images: reference images (timesteps x references) per ReferenceNet call when a request's
        K/V are computed on admission (`prepare.prefetch_kv`), a bound on its memory; 0: one call per step.
    """

    static_loop: bool | None = None
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    max_shapes: int = 4
    cuts: tuple[str, ...] = CUTS
    prefetch_images: int = DEFAULT_PREFETCH_IMAGES

    def validated(self) -> TorchSettings:
        """These settings, or an InputError naming the value out of range."""
        if self.compile_mode not in COMPILE_MODES:
            raise InputError(f"compile_mode {self.compile_mode!r} is not one of {COMPILE_MODES}")
        for name in ("kv_cache_bytes", "prefetch_images"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_shapes < 1:
            raise InputError(f"max_shapes must be >= 1, got {self.max_shapes}")
        return self


TORCH_PRESETS = {
    "auto": TorchSettings(),
    "eager": TorchSettings(static_loop=False),
    "eager-uncut": TorchSettings(static_loop=False, cuts=(), prefetch_images=0),
    "eager-no-prefetch": TorchSettings(static_loop=False, prefetch_images=0),
    "static": TorchSettings(static_loop=True),
    "compiled": TorchSettings(static_loop=True, compile=True),
    "channels-last": TorchSettings(static_loop=True, channels_last=True),
    "compiled-channels-last": TorchSettings(static_loop=True, compile=True, channels_last=True),
}
