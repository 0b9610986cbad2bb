"""Graph-shaped wrappers of the FlashFace networks and their specs (names, dtypes, dynamic axes).

Each wrapper's `forward` is exactly the graph a runtime calls: plain tensors in and out, float32
at the edges except the reference keys/values, which stay in the model dtype because they pass
from the ReferenceNet graph to the UNet graph (and into the identity cache) unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.backend import TorchModels
from ..models.batched import batch_eps
from ..models.config import EXPORT_CUTS, LATENT_SCALE
from ..models.unet import FlashFaceUNet
from ..runtime.artifacts.axes import REF_TOKENS, axis_range, check_axes
from ..runtime.artifacts.spec import ExportShapes, NetworkSpec, TensorSpec
from ..runtime.sampling.batch import SHARED_ROWS, STEP_INPUTS
from ..runtime.sampling.guidance import STEP_COEFFICIENTS, batched_update
from ..runtime.sampling.request import REFERENCE_SIZE

NETWORKS = ("text_encoder", "vae_encoder", "vae_decoder", "reference_net", "unet", "step")
INDEX = "int32"  # the batch plan's index arrays (TensorRT gathers with int32 indices)


def kv_names(layer: str) -> tuple[str, str]:
    """Graph tensor names of one reference layer's keys and values (they say which layer they feed)."""
    return f"ref_k.{layer}", f"ref_v.{layer}"


class TextEncoderGraph(nn.Module):
    def __init__(self, models: TorchModels):
        super().__init__()
        self.text = models.text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """int32 ids [B, 77] -> last hidden states [B, 77, C] float32."""
        return self.text(input_ids).float()


class VAEEncoderGraph(nn.Module):
    def __init__(self, models: TorchModels):
        super().__init__()
        self.vae = models.vae
        self.dtype = models.dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reference crops [R, 3, S, S] in [-1, 1] -> scaled latents [R, 4, S/8, S/8] (posterior mean)."""
        return (LATENT_SCALE * self.vae.encode(images.to(self.dtype))).float()


class VAEDecoderGraph(nn.Module):
    def __init__(self, models: TorchModels):
        super().__init__()
        self.vae = models.vae
        self.dtype = models.dtype

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, 4, h, w] -> uint8 images [N, 8h, 8w, 3] (official scale, clamp, truncate)."""
        x = self.vae.decode((latents / LATENT_SCALE).to(self.dtype)).float()
        x = (x.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0.0, 255.0)
        return torch.floor(x).to(torch.uint8)


class ReferenceNetGraph(nn.Module):
    def __init__(self, models: TorchModels):
        super().__init__()
        self.unet: FlashFaceUNet = models.unet
        self.dtype = models.dtype

    def forward(self, ref_latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor):
        """G groups: reference latents [G*R, 4, hr, wr], timesteps [G], negative contexts [G, 77, C]
        -> per layer K, V [G, R*L_i, C_i] (the K/V of every group that is not cached)."""
        feats = self.unet.reference_features(ref_latents.to(self.dtype), timestep, context.to(self.dtype))
        return tuple(t for kv in self.unet.reference_kv(feats, timestep.shape[0]) for t in kv)


class UNetGraph(nn.Module):
    """The UNet over a batched step's rows, gathered from the requests' tensors (`runtime.sampling.batch`)."""

    def __init__(self, models: TorchModels):
        super().__init__()
        self.unet: FlashFaceUNet = models.unet
        self.dtype = models.dtype

    def forward(
        self, x, masks, texts, sample_rows, member_rows, text_rows, timestep, ref_scale, ref_group, *kv
    ):
        """eps [B, 4, h, w] float32 of every row; rows [:B_ref] attend to their group's references.

        `kv` ends with the shared-row arrays of the UNet's cuts (`SHARED_ROWS`, in that order)."""
        shared = [n for n, cut in SHARED_ROWS.items() if cut in self.unet.cuts]
        kv, ix = kv[: len(kv) - len(shared)], dict(zip(shared, kv[len(kv) - len(shared) :]))
        pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        ix |= dict(zip(STEP_INPUTS, (sample_rows, member_rows, text_rows, timestep, ref_scale, ref_group)))
        return batch_eps(self.unet, x, texts.to(self.dtype), masks.to(self.dtype), ix, pairs).float()


class StepGraph(nn.Module):
    """Guidance + CFG rescale + x0 + DDIM update of every sample of a batched step
    (`runtime.sampling.guidance.batched_update`, what the plain step runs too)."""

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, guide: torch.Tensor
    ) -> torch.Tensor:
        """x [S, 4, h, w], eps [B, 4, h, w], coef [S, 11], guide [3, S] -> x of the next step [S, 4, h, w]."""
        return batched_update(x, eps, guide.long(), coef)


GRAPHS = {
    "text_encoder": TextEncoderGraph,
    "vae_encoder": VAEEncoderGraph,
    "vae_decoder": VAEDecoderGraph,
    "reference_net": ReferenceNetGraph,
    "unet": UNetGraph,
    "step": lambda models: StepGraph(),
}


def reference_layer_shapes(models: TorchModels, ref_size: int = REFERENCE_SIZE) -> list[tuple[str, int, int]]:
    """(layer, tokens per reference, channels) of every reference layer, from one ReferenceNet run."""
    unet = models.unet
    lat = ref_size // models.config.vae_factor
    p = next(unet.parameters())
    with torch.inference_mode():
        ref = torch.zeros(1, models.config.unet.ref_in_dim, lat, lat, device=p.device, dtype=p.dtype)
        ctx = torch.zeros(1, 77, models.config.unet.context_dim, device=p.device, dtype=p.dtype)
        feats = unet.reference_features(ref, torch.zeros(1, device=p.device), ctx)
    return [(name, f.shape[1], f.shape[2]) for name, f in zip(unet.reference_layers, feats)]


def network_specs(
    models: TorchModels, shapes: ExportShapes, cuts: tuple[str, ...] = EXPORT_CUTS
) -> dict[str, NetworkSpec]:
    """The spec of every exported network for these models, shape ranges (axes from
    `runtime.artifacts.axes`) and UNet cuts (the shared-row arrays they take)."""
    cfg = models.config
    kv_dtype = "float16" if models.dtype == torch.float16 else "float32"
    ctx, z, lat_ref = cfg.unet.context_dim, cfg.vae.z_dim, shapes.ref_size // cfg.vae_factor
    layers = reference_layer_shapes(models, shapes.ref_size)
    tokens = {f"{REF_TOKENS}{i}": n for i, (_, n, _) in enumerate(layers)}

    def axes(*names: str) -> dict:
        return {n: axis_range(n, shapes, tokens.get(n, 0)) for n in names}

    kv = [
        TensorSpec(name, kv_dtype, ("groups", f"{REF_TOKENS}{i}", c))
        for i, (layer, _, c) in enumerate(layers)
        for name in kv_names(layer)
    ]
    f32 = "float32"
    shared = {"enc_rows": "encoders", "enc_index": "batch", "stem_rows": "samples"}  # each one's axis
    lat = ("latent_h", "latent_w")
    specs = {
        "text_encoder": NetworkSpec(
            "text_encoder",
            (TensorSpec("input_ids", "int32", ("prompts", cfg.text.text_len)),),
            (TensorSpec("hidden", f32, ("prompts", cfg.text.text_len, ctx)),),
            axes("prompts"),
        ),
        "vae_encoder": NetworkSpec(
            "vae_encoder",
            (TensorSpec("images", f32, ("num_refs", 3, shapes.ref_size, shapes.ref_size)),),
            (TensorSpec("latents", f32, ("num_refs", z, lat_ref, lat_ref)),),
            axes("num_refs"),
        ),
        "vae_decoder": NetworkSpec(
            "vae_decoder",
            (TensorSpec("latents", f32, ("images", z, *lat)),),
            (TensorSpec("images", "uint8", ("images", "height", "width", 3)),),
            axes("images", *lat, "height", "width"),
        ),
        "reference_net": NetworkSpec(
            "reference_net",
            (
                TensorSpec("ref_latents", f32, ("ref_images", cfg.unet.ref_in_dim, lat_ref, lat_ref)),
                TensorSpec("timestep", f32, ("groups",)),
                TensorSpec("context", f32, ("groups", cfg.text.text_len, ctx)),
            ),
            tuple(kv),
            axes("ref_images", "groups", *tokens),
            samples={"ref_images": 2, "groups": 2},
        ),
        "step": NetworkSpec(
            "step",
            (
                TensorSpec("x", f32, ("samples", cfg.unet.out_dim, *lat)),
                TensorSpec("eps", f32, ("batch", cfg.unet.out_dim, *lat)),
                TensorSpec("coef", f32, ("samples", len(STEP_COEFFICIENTS))),
                TensorSpec("guide", INDEX, (3, "samples")),
            ),
            (TensorSpec("x_next", f32, ("samples", cfg.unet.out_dim, *lat)),),
            axes("samples", "batch", *lat),
            samples={"samples": 2, "batch": 5},
        ),
        "unet": NetworkSpec(
            "unet",
            (
                TensorSpec("x", f32, ("samples", cfg.unet.out_dim, *lat)),
                TensorSpec("masks", f32, ("members", 1, *lat)),
                TensorSpec("texts", f32, ("texts", cfg.text.text_len, ctx)),
                TensorSpec("sample_rows", INDEX, ("batch",)),
                TensorSpec("member_rows", INDEX, ("batch",)),
                TensorSpec("text_rows", INDEX, ("batch",)),
                TensorSpec("timestep", f32, ("batch",)),
                TensorSpec("ref_scale", f32, ("b_ref",)),
                TensorSpec("ref_group", INDEX, ("b_ref",)),
                *kv,
                *(TensorSpec(n, INDEX, (shared[n],)) for n, cut in SHARED_ROWS.items() if cut in cuts),
            ),
            (TensorSpec("eps", f32, ("batch", cfg.unet.out_dim, *lat)),),
            axes("samples", "members", "texts", "batch", "b_ref", "encoders", "groups", *tokens, *lat),
            samples={"samples": 2, "members": 2, "texts": 4, "batch": 5, "b_ref": 3, "groups": 2},
        ),
    }
    for spec in specs.values():
        check_axes(spec)
    return specs
