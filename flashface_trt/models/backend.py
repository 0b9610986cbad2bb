"""The PyTorch backend: text, reference and decode calls plus the batched step (`batched.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from ..runtime.backends.graphs import StepGraphs
from ..runtime.faces.images import to_uint8
from ..runtime.sampling.batch import BatchPlan, Member, plan_batch
from ..runtime.sampling.cost import available_ram
from ..runtime.sampling.identities import ReferenceKVCache
from ..runtime.sampling.request import REFERENCE_SIZE
from ..runtime.sampling.tokenizer import ClipTokenizer
from .batched import KV, reference_kv, step_members
from .config import LATENT_SCALE, ModelConfig
from .settings import TorchSettings
from .static_step import StaticSteps, TorchCapture
from .text_encoder import TextEncoder
from .unet import FlashFaceUNet
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
    ref_size: int = REFERENCE_SIZE  # side of the square reference crops the pipeline prepares

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


class TorchBackend:
    """Runs FlashFace with PyTorch modules (float32 on CPU, float16 weights on CUDA)."""

    name = "torch"

    def __init__(self, models: TorchModels, settings: TorchSettings | None = None):
        self.settings = settings = (settings or TorchSettings()).validated()
        self.models = models
        self.device = models.device
        self.dtype = models.dtype
        self.ref_size, self.tokenizer = models.ref_size, models.tokenizer
        self.precision = "fp16" if self.dtype == torch.float16 else "fp32"
        self.model_config = models.config.to_dict()  # sizes for `cost.footprint_of`
        self.kv_cache = ReferenceKVCache(settings.kv_cache_bytes)
        self.static = self.device.type == "cuda" if settings.static_loop is None else settings.static_loop
        capture = TorchCapture() if self.device.type == "cuda" else None
        self.graphs = StepGraphs(capture, settings.max_shapes)  # one graph per bucket and image size
        models.unet.set_cuts(settings.cuts)
        if settings.channels_last:
            models.unet.to_channels_last()
        self.unet = models.unet  # what the steps call: the module, or its compiled forward
        if settings.compile:  # one specialisation per batch shape: raise dynamo's limit of 8 per function
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
            compiled = torch.compile(models.unet, dynamic=False, mode=settings.compile_mode)
            self.unet = cast(FlashFaceUNet, compiled)
        self.static_steps = StaticSteps(self.unet, self.kv_cache, self.graphs, settings.max_shapes)

    def mask_from_host(self, mask: np.ndarray) -> torch.Tensor:
        """A face mask [h, w] as the steps read it: [1, 1, h, w] in the model dtype."""
        return self.from_numpy(mask.astype(np.float32))[None, None].to(self.dtype)

    @torch.inference_mode()
    def step(self, members: Sequence[Member]) -> list[torch.Tensor]:
        """One batched step: every member's next x (the static, graph-replayed step if configured)."""
        if self.static:
            return self.static_steps(members)
        return step_members(self.unet, members, plan_batch(members), self.kv_cache)[0]

    @torch.inference_mode()
    def reference_kv(self, members: list[Member]) -> list[KV]:
        """One ReferenceNet call for the groups of `members` (`batched.reference_kv`)."""
        return reference_kv(self.models.unet, members)

    def reference_groups(self, num_refs: int) -> int:
        """Timesteps per prefetch ReferenceNet call: `prefetch_images` references in all (0: off)."""
        return self.settings.prefetch_images // num_refs

    @torch.inference_mode()
    def batch_eps(self, members: Sequence[Member], plan: BatchPlan) -> torch.Tensor:
        """Raw model output of every row of a batched step [B, 4, h, w], in float32 (the plain step's)."""
        return step_members(self.unet, members, plan, self.kv_cache)[1].float()

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

    def free_memory(self) -> int | None:
        """Free bytes of the device (`Service.admission`): CUDA's, else the host's available RAM."""
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else available_ram()

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Scaled latents [N, 4, h, w] -> uint8 images [N, 8h, 8w, 3]."""
        x = self.models.vae.decode((z / LATENT_SCALE).to(self.dtype))
        return to_uint8(x.float().cpu().numpy())
