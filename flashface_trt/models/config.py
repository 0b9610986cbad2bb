"""Network sizes: one dataclass per network, with the SD 1.5 and tiny presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LATENT_SCALE = 0.18215  # SD 1.x VAE latent scale (official cfg.ae_scale)
# exact FLOP cuts of the main UNet (issue 23; `FlashFaceUNet.set_cuts`): one encoder per distinct
# encoder input, the layers before the first cross-attention once per sample, reference attention
# by log-sum-exp merge
CUTS = ("encoder", "stem", "lse")
EXPORT_CUTS = ("encoder", "stem")  # the ONNX export's default (`export.exporter.ExportSettings`)


@dataclass(frozen=True)
class UNetConfig:
    """Arguments of the official `sd_v1_ref_unet` (main UNet and ReferenceNet share them)."""

    dim: int = 320  # base channel width
    context_dim: int = 768  # text-embedding width
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per resolution level
    num_heads: int = 8  # attention heads (head_dim = width // num_heads) unless head_dim is set
    head_dim: int | None = None  # if set, heads = width // head_dim (official rule)
    num_res_blocks: int | tuple[int, ...] = 2  # residual blocks per encoder level (decoder: one more)
    num_attn_blocks: int | tuple[int, ...] = 1  # transformer blocks per attention stack, per level
    middle_attn_blocks: int | None = None  # transformer blocks in the middle (default: last level's)
    attn_scales: tuple[float, ...] = (1.0, 0.5, 0.25)  # resolutions (1 = latent) with attention
    in_dim: int = 5  # main UNet input: 4 latent channels + face mask
    ref_in_dim: int = 4  # ReferenceNet input: latent channels only
    out_dim: int = 4  # predicted eps channels

    @property
    def embed_dim(self) -> int:
        return self.dim * 4

    def res_blocks(self, level: int) -> int:
        n = self.num_res_blocks
        return n if isinstance(n, int) else n[level]

    def attn_blocks(self, level: int) -> int:
        n = self.num_attn_blocks
        return n if isinstance(n, int) else n[level]

    @property
    def middle_blocks(self) -> int:
        return self.middle_attn_blocks or self.attn_blocks(len(self.dim_mult) - 1)

    def heads(self, width: int) -> int:
        """Attention heads at a width (official: num_heads = width // head_dim if head_dim else num_heads)."""
        heads = width // self.head_dim if self.head_dim else self.num_heads
        if heads < 1 or width % heads:
            raise ValueError(f"attention width {width} does not split into {heads} heads")
        return heads


@dataclass(frozen=True)
class TextConfig:
    """Arguments of the official CLIP `TextTransformer` (ViT-L/14 text tower)."""

    vocab_size: int = 49408
    text_len: int = 77
    dim: int = 768
    mlp_ratio: int = 4
    out_dim: int = 768  # width of the pooled projection `head` (unused by FlashFace)
    num_heads: int = 12
    num_layers: int = 12


@dataclass(frozen=True)
class VAEConfig:
    """Arguments of the official `AutoencoderKL` (SD 1.x autoencoder)."""

    dim: int = 128
    z_dim: int = 4
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of every FlashFace network."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.dim_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from the `unet`/`text_encoder`/`vae` sections of an oracle `config.json`."""
        unet = dict(d["unet"])
        for key in ("dim_mult", "attn_scales", "num_res_blocks", "num_attn_blocks"):
            if isinstance(unet.get(key), list):
                unet[key] = tuple(unet[key])
        # official `in_dim` is the ReferenceNet input width; the main UNet adds the mask channel
        if "in_dim" in unet and "ref_in_dim" not in unet:
            unet["ref_in_dim"] = unet["in_dim"]
            unet["in_dim"] = unet["in_dim"] + 1
        for unused in ("y_dim", "dropout"):  # no class embedding in FlashFace; dropout is 0 at inference
            unet.pop(unused, None)
        text = dict(d.get("text_encoder", d.get("text", {})))
        vae = dict(d["vae"])
        if "dim_mult" in vae:
            vae["dim_mult"] = tuple(vae["dim_mult"])
        vae.pop("attn_scales", None)
        return cls(UNetConfig(**unet), TextConfig(**text), VAEConfig(**vae))

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


SD15 = ModelConfig()

# The embedded default: a deterministic random model that runs in seconds on a CPU. Its UNet keeps
# every kind of part SD 1.5 has (levels with and without attention, down/upsampling, skips, the
# middle block, reference K/V at several token counts) with one residual block per level and three
# levels, which halves the graph that exports, compiles and runs in the tests.
TINY = ModelConfig(
    unet=UNetConfig(
        dim=32, context_dim=32, dim_mult=(1, 2, 2), num_heads=2, num_res_blocks=1, attn_scales=(1.0, 0.5)
    ),
    text=TextConfig(dim=32, out_dim=32, num_heads=2, num_layers=2),
    vae=VAEConfig(dim=32, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
)

PRESETS: dict[str, ModelConfig] = {"sd15": SD15, "tiny": TINY}
