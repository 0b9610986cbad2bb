"""The PyTorch backend: text, reference and decode calls plus a `denoise` for the shared sampler."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from ..runtime.graphs import StepGraphs
from ..runtime.guidance import guided_x0, step_update
from ..runtime.identities import Identity, ReferenceKVCache, kv_key
from ..runtime.images import to_uint8
from ..runtime.sampler import GuidanceParams, StepPlan
from ..runtime.tokenizer import ClipTokenizer
from .config import LATENT_SCALE, ModelConfig
from .settings import TorchSettings
from .static_step import StaticDenoiser, StaticStep, TorchCapture
from .text_encoder import TextEncoder
from .unet import FlashFaceUNet
from .unet_blocks import RefInputs
from .vae import AutoencoderKL

VAE_BATCH = 3  # references encoded per VAE call (official cfg.ae_batch_size)
COMPILED_SHAPES = 64  # compiled UNet specialisations kept before dynamo falls back to eager


@dataclass
class TorchModels:
    """Every network of FlashFace, on one device and dtype."""

    config: ModelConfig
    unet: FlashFaceUNet
    text: TextEncoder
    vae: AutoencoderKL
    tokenizer: ClipTokenizer

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


@dataclass
class TorchDenoiser:
    """`denoise(x, step) -> x_next` for one request: the 2-/3-way batch, guidance, DDIM (float32).

    cond / uncond: [1, 77, C] text embeddings; identity: reference latents [R, 4, hr, wr] and
    their key; mask: [1, 1, h, w]. Reference K/V are computed once per timestep, shared by every
    row, and kept in `cache` (keyed by identity, timestep, negative prompt and reference size) so
    that later requests for the same identity skip the ReferenceNet.
    """

    unet: FlashFaceUNet
    cond: torch.Tensor
    uncond: torch.Tensor
    identity: Identity
    mask: torch.Tensor
    guidance: GuidanceParams
    cache: ReferenceKVCache = field(default_factory=ReferenceKVCache)
    uncond_key: str = ""

    def reference_kv(self, t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = kv_key(self.identity, t, self.uncond_key)
        kv = self.cache.get(key)
        if kv is None:
            lat = self.identity.latents
            with torch.inference_mode():
                tt = torch.full((1,), t, device=lat.device, dtype=torch.long)
                kv = self.unet.reference_kv(self.unet.reference_features(lat, tt, self.uncond))
            self.cache.put(key, kv)
        return kv

    def eps(self, x: torch.Tensor, step: StepPlan) -> torch.Tensor:
        """Raw model output for the whole batch [k*N, 4, h, w] (k = 3 or 2), as the official model call."""
        n = x.shape[0]
        layout = step.layout(n)
        dtype = self.cond.dtype
        text = (self.cond, self.uncond)
        context = torch.cat([text[b].expand(n, -1, -1) for b in layout.text_blocks])  # [k*N, 77, C]
        xb = x.to(dtype).repeat(layout.k, 1, 1, 1)  # [k*N, 4, h, w]: layout.sample_rows
        t = torch.full((layout.rows,), step.t, device=x.device, dtype=torch.long)
        scale = torch.full((layout.ref_rows,), step.ref_strength, device=x.device, dtype=dtype)
        return self.unet(xb, self.mask, t, context, RefInputs(self.reference_kv(step.t), scale))

    @torch.inference_mode()
    def x0(self, x: torch.Tensor, step: StepPlan) -> torch.Tensor:
        """Guided x0 prediction of one step."""
        return guided_x0(x, self.eps(x, step).float(), step.three_way, step.coefficients(self.guidance))

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, step: StepPlan) -> torch.Tensor:
        coef = step.coefficients(self.guidance)
        return step_update(x, self.eps(x, step).float(), step.three_way, coef)


class TorchBackend:
    """Runs FlashFace with PyTorch modules (float32 on CPU, float16 weights on CUDA)."""

    name = "torch"

    def __init__(self, models: TorchModels, settings: TorchSettings | None = None):
        self.settings = settings = (settings or TorchSettings()).validated()
        self.models = models
        self.device = models.device
        self.dtype = models.dtype
        self.kv_cache = ReferenceKVCache(settings.kv_cache_bytes)
        self.static = self.device.type == "cuda" if settings.static_loop is None else settings.static_loop
        self.states: OrderedDict[tuple, StaticStep] = OrderedDict()  # static buffers per request shape
        capture = TorchCapture() if self.device.type == "cuda" else None
        self.graphs = StepGraphs(capture, 2 * settings.max_shapes)  # a 2-way and a 3-way graph per shape
        if settings.channels_last:
            models.unet.to_channels_last()
        self.unet = models.unet  # what the denoisers call: the module, or its compiled forward
        if settings.compile:  # one specialisation per batch shape: raise dynamo's limit of 8 per function
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
            compiled = torch.compile(models.unet, dynamic=False, mode=settings.compile_mode)
            self.unet = cast(FlashFaceUNet, compiled)

    @property
    def tokenizer(self) -> ClipTokenizer:
        return self.models.tokenizer

    @property
    def precision(self) -> str:
        return "fp16" if self.dtype == torch.float16 else "fp32"

    def from_numpy(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def to_host(self, x: torch.Tensor) -> np.ndarray:
        """A backend array (latents, images) as a float32 NumPy array."""
        return x.detach().float().cpu().numpy()

    def latents_from_host(self, latents: np.ndarray) -> torch.Tensor:
        """Stored reference latents [R, 4, hr, wr] onto the device, in the model dtype."""
        return self.from_numpy(latents.astype(np.float32)).to(self.dtype)

    @torch.inference_mode()
    def encode_text(self, ids: np.ndarray) -> torch.Tensor:
        """Token ids [P, 77] -> last hidden states [P, 77, C]."""
        return self.models.text(self.from_numpy(ids.astype(np.int64)))

    @torch.inference_mode()
    def encode_references(self, images: np.ndarray) -> torch.Tensor:
        """Reference crops [R, 3, S, S] in [-1, 1] -> scaled latents [R, 4, S/8, S/8] (posterior mean)."""
        x = self.from_numpy(images.astype(np.float32)).to(self.dtype)
        return torch.cat([LATENT_SCALE * self.models.vae.encode(chunk) for chunk in x.split(VAE_BATCH)])

    def denoiser(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        identity: Identity,
        mask: np.ndarray,
        guidance: GuidanceParams,
        steps: Sequence[StepPlan] = (),
        uncond_key: str = "",
    ) -> TorchDenoiser | StaticDenoiser:
        """The plain denoiser, or (static settings) the static step over this request's shape."""
        m = self.from_numpy(mask.astype(np.float32))[None, None].to(self.dtype)  # [1, 1, h, w]
        den = TorchDenoiser(self.unet, cond, uncond, identity, m, guidance, self.kv_cache, uncond_key)
        if not self.static or not steps:
            return den
        return StaticDenoiser(den, steps, self.state, self.graphs)

    def state(self, den: TorchDenoiser, x_shape: tuple[int, ...]) -> StaticStep:
        """The static buffers of this request shape (least recently used shapes are dropped)."""
        key = (tuple(x_shape), tuple(den.identity.latents.shape))
        state = self.states.pop(key, None) or StaticStep(self.unet, den, x_shape)
        self.states[key] = state
        while len(self.states) > self.settings.max_shapes:
            _, old = self.states.popitem(last=False)
            self.graphs.discard(old.key)  # they read its buffers
        return state

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Scaled latents [N, 4, h, w] -> uint8 images [N, 8h, 8w, 3]."""
        x = self.models.vae.decode((z / LATENT_SCALE).to(self.dtype))
        return to_uint8(x.float().cpu().numpy())
