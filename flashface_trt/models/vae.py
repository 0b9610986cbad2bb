"""SD 1.x KL autoencoder as FlashFace uses it: posterior-mean encoder and decoder.

Re-implements the official `ldm/models/vae.py` `AutoencoderKL` (Encoder / Decoder of `ResidualBlock`s,
one single-head `AttentionBlock` in each middle, `Resample` up/down) with the official parameter names,
so `sd-v1-vae.pth` loads as is. `vae_state` also converts the diffusers `AutoencoderKL` layout.

The official attention block reads its output [B, HW, C] back as [B, C, H, W] without transposing
(a plain `reshape` of the row-major buffer). `official_reshape=True` (the default) reproduces that so the
outputs equal the official FlashFace ones; `official_reshape=False` gives the standard attention of
LDM / diffusers. The two agree only when the attention `proj` weight is zero.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .weights import StateDict, build_strict, meta_shapes, read_state

log = logging.getLogger(__name__)


class GroupNorm(nn.GroupNorm):
    """GroupNorm(32, eps=1e-6) in float32, cast back (official `group_norm`; float16-safe)."""

    def __init__(self, dim: int):
        super().__init__(32, dim, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type_as(x)


class Upsample(nn.Module):
    """2x nearest upsampling computed in float32 and cast back (official `Upsample`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").type_as(x)  # [B, C, 2H, 2W]


class Resample(nn.Module):
    """Official `Resample`: nearest 2x + 3x3 conv, or pad (0, 1, 0, 1) + stride-2 3x3 conv."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode == "upsample":
            self.resample = nn.Sequential(Upsample(), nn.Conv2d(dim, dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class ResidualBlock(nn.Module):
    """Official `ResidualBlock`: norm-SiLU-conv twice (dropout slot kept as identity) + 1x1 shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            GroupNorm(in_dim),
            nn.SiLU(),
            nn.Conv2d(in_dim, out_dim, 3, padding=1),
            GroupNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Official single-head spatial self-attention, scale 1/sqrt(C), with a residual connection."""

    def __init__(self, dim: int, official_reshape: bool = True):
        super().__init__()
        self.official_reshape = official_reshape
        self.norm = GroupNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape  # [B, C, H, W]
        qkv = self.to_qkv(self.norm(x)).view(b, 3 * c, h * w).transpose(1, 2)  # [B, HW, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # 3 x [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C]
        if self.official_reshape:
            out = out.contiguous().reshape(b, c, h, w)  # the [B, HW, C] buffer read as [B, C, H, W]
        else:
            out = out.transpose(1, 2).reshape(b, c, h, w)  # [B, C, H, W]
        return self.proj(out) + x


def _middle(c: int, official_reshape: bool) -> nn.Sequential:
    """Official middle stack: residual, attention, residual at the lowest resolution."""
    return nn.Sequential(ResidualBlock(c, c), AttentionBlock(c, official_reshape), ResidualBlock(c, c))


class Encoder(nn.Module):
    """Official `Encoder`: images [B, 3, H, W] -> moments [B, 2z, H/f, W/f] (f = 2^(levels-1))."""

    def __init__(self, cfg: VAEConfig, official_reshape: bool):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = nn.Conv2d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample"))
        self.downsamples = nn.Sequential(*blocks)
        c = dims[-1]
        self.middle = _middle(c, official_reshape)
        self.head = nn.Sequential(GroupNorm(c), nn.SiLU(), nn.Conv2d(c, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder(nn.Module):
    """Official `Decoder`: latents [B, z, h, w] -> images [B, 3, f*h, f*w]."""

    def __init__(self, cfg: VAEConfig, official_reshape: bool):
        super().__init__()
        dims = [cfg.dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        c = dims[0]
        self.conv1 = nn.Conv2d(cfg.z_dim, c, 3, padding=1)
        self.middle = _middle(c, official_reshape)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(GroupNorm(dims[-1]), nn.SiLU(), nn.Conv2d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(x))))


class AutoencoderKL(nn.Module):
    """Official `AutoencoderKL` (SD 1.x VAE): `encode` gives the posterior mean, `decode` the image."""

    def __init__(self, cfg: VAEConfig, official_reshape: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, official_reshape)
        self.conv1 = nn.Conv2d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg, official_reshape)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> unscaled posterior mean [B, z, H/f, W/f] (official `sample`)."""
        moments = self.conv1(self.encoder(images))  # [B, 2z, h, w] = (mu, log_var)
        return moments[:, : self.cfg.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, z, h, w] -> images [B, 3, f*h, f*w] in about [-1, 1]."""
        return self.decoder(self.conv2(z))


# diffusers ResnetBlock2D parameter -> official ResidualBlock parameter
_RESNET = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
# diffusers Attention parameter (new and pre-0.14 names) -> q/k/v part or official AttentionBlock name
_ATTN = {
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj",
    "proj_attn": "proj",
    "group_norm": "norm",
}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_SIDE = {"conv_in": "conv1", "conv_norm_out": "head.0", "conv_out": "head.2"}
_BLOCK = re.compile(
    r"(encoder\.down|decoder\.up)_blocks\.(\d+)\."
    r"(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)"
)
_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets\.([01])|attentions\.0)\.(.+)")
_SIMPLE = re.compile(
    r"(?:(encoder|decoder)\.(conv_in|conv_norm_out|conv_out)|(quant_conv|post_quant_conv))"
    r"\.(weight|bias)"
)
_DIFFUSERS = re.compile(
    r"(encoder|decoder)\.(conv_in|down_blocks|up_blocks|mid_block|conv_norm_out|conv_out)"
    r"\.|(post_)?quant_conv\."
)


def _resnet_name(rest: str) -> str | None:
    """`norm1.weight` -> `residual.0.weight`; None when not a ResnetBlock2D parameter."""
    layer, _, kind = rest.rpartition(".")
    return f"{_RESNET[layer]}.{kind}" if layer in _RESNET and kind in ("weight", "bias") else None


def _flat_layout(keys: list[str]) -> dict[tuple[str, int], tuple[int, int]]:
    """(side, block) -> (index of its first module in the flat official Sequential, resnets in it)."""
    sizes: dict[tuple[str, int], list[int]] = {}  # (side, block) -> [resnets, resamplers]
    for key in keys:
        if m := _BLOCK.fullmatch(key):
            size = sizes.setdefault((m[1], int(m[2])), [0, 0])
            if m[4] is not None:
                size[0] = max(size[0], int(m[4]) + 1)
            else:
                size[1] = 1
    layout: dict[tuple[str, int], tuple[int, int]] = {}
    for side in ("encoder.down", "decoder.up"):
        total = 0
        for block in range(max((b for s, b in sizes if s == side), default=-1) + 1):
            resnets, resamplers = sizes.get((side, block), (0, 0))
            layout[side, block] = (total, resnets)
            total += resnets + resamplers
    return layout


def _conv1x1(t: torch.Tensor) -> torch.Tensor:
    """Linear weight [O, I] -> 1x1 conv weight [O, I, 1, 1]; conv weights and biases unchanged."""
    return t[:, :, None, None] if t.dim() == 2 else t


def _from_diffusers(state: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers `AutoencoderKL` names -> official names; keys not understood keep their name."""
    layout = _flat_layout(list(state))
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}  # (prefix, kind) -> part -> (key, t)
    for key, value in state.items():
        new: str | None = None
        if m := _SIMPLE.fullmatch(key):
            new = f"{m[1]}.{_SIDE[m[2]]}.{m[4]}" if m[1] else f"{_TOP[m[3]]}.{m[4]}"
        elif m := _BLOCK.fullmatch(key):
            side, block, j, rest = m[1], int(m[2]), m[4], m[5]
            seq = "encoder.downsamples" if side == "encoder.down" else "decoder.upsamples"
            first, resnets = layout[side, block]
            if j is not None and (name := _resnet_name(rest)):
                new = f"{seq}.{first + int(j)}.{name}"
            elif j is None and rest in ("conv.weight", "conv.bias"):
                new = f"{seq}.{first + resnets}.resample.1.{rest[len('conv.') :]}"
        elif m := _MID.fullmatch(key):
            side, j, rest = m[1], m[3], m[4]
            if j is not None:
                name = _resnet_name(rest)
                new = f"{side}.middle.{0 if j == '0' else 2}.{name}" if name else None
            else:
                layer, _, kind = rest.rpartition(".")
                part = _ATTN.get(layer)
                if part in ("q", "k", "v") and kind in ("weight", "bias"):
                    qkv.setdefault((f"{side}.middle.1", kind), {})[part] = (key, _conv1x1(value))
                    continue
                if part is not None and kind in ("weight", "bias"):
                    new, value = f"{side}.middle.1.{part}.{kind}", _conv1x1(value)
        out[new if new is not None else key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"{prefix}.to_qkv.{kind}"] = torch.cat([parts[p][1] for p in "qkv"])  # [3C, C, 1, 1] / [3C]
        else:  # incomplete: keep the originals so the strict check reports them
            out.update(dict(parts.values()))
    return out


def vae_state(state: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """Official (`sd-v1-vae.pth`) or diffusers `AutoencoderKL` layout -> official names."""
    if any(_DIFFUSERS.match(k) for k in state):
        layout, out = "diffusers AutoencoderKL", _from_diffusers(state)
    else:
        layout, out = "official AutoencoderKL", dict(state)
    log.debug("%s: %s layout, %d -> %d tensors", source, layout, len(state), len(out))
    return out


def vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every `AutoencoderKL` parameter, built on the meta device."""
    return meta_shapes(lambda: AutoencoderKL(cfg))


def load_vae(
    path_or_state: str | Path | Mapping[str, torch.Tensor],
    cfg: VAEConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    official_reshape: bool = True,
) -> AutoencoderKL:
    """Read (if a path), convert and strictly load VAE weights; eval mode, no gradients."""
    raw, source = read_state(path_or_state)
    return build_strict(
        lambda: AutoencoderKL(cfg, official_reshape), vae_state(raw, source), source, device, dtype
    )
