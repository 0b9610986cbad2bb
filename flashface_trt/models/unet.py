"""FlashFace UNet: the main 5-channel UNet with reference attention, and its ReferenceNet.

Structure and parameter names follow the official `RefStableUNet` (ali-vilab/FlashFace,
`flashface/all_finetune/models/reference_unet.py` over `ldm/models/unet.py`). One module
holds both networks because they share weights: the ReferenceNet is `ref_encoder` +
the main UNet's `middle` + `ref_decoder` (the official `switch_mode` swaps only the encoder
and decoder, so `ref_middle` is never used) and both use the main `time_embedding`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..runtime.errors import InputError, WeightsError
from .config import CUTS, UNetConfig
from .unet_blocks import (
    AttentionBlock,
    GroupNorm32,
    RefInputs,
    RefSelfAttention,
    ResidualBlock,
    SharedRows,
    StackedAttention,
    Upsample,
    is_attention_scale,
    sinusoidal_embedding,
)
from .weights import StateDict, drop_aliases

# aliases in the released flashface.ckpt that share storage with the canonical names
_ALIASES = {"ori_encoder.": "encoder.", "ori_middle.": "middle.", "ori_decoder.": "decoder."}
_UNUSED_PREFIX = "ref_middle."  # stored by the official model, never read by its forward


def _build_encoder(cfg: UNetConfig, in_dim: int) -> tuple[nn.ModuleList, list[int], float]:
    """Encoder entries: stem conv, residual(+attention) blocks, stride-2 downsampling convs."""
    dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
    encoder = nn.ModuleList([nn.Conv2d(in_dim, cfg.dim, 3, padding=1)])
    skips = [cfg.dim]
    scale = 1.0
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(cfg.res_blocks(i)):
            block = nn.ModuleList([ResidualBlock(d_in, cfg.embed_dim, d_out)])
            if is_attention_scale(scale, cfg.attn_scales):
                heads = cfg.heads(d_out)
                block.append(StackedAttention(d_out, cfg.context_dim, heads, cfg.attn_blocks(i), False))
            encoder.append(block)
            skips.append(d_out)
            d_in = d_out
            if i != len(cfg.dim_mult) - 1 and j == cfg.res_blocks(i) - 1:
                encoder.append(nn.Conv2d(d_out, d_out, 3, stride=2, padding=1))
                skips.append(d_out)
                scale /= 2.0
    return encoder, skips, scale


def _build_middle(cfg: UNetConfig, ref_branch: bool) -> nn.ModuleList:
    d = cfg.dim * cfg.dim_mult[-1]
    return nn.ModuleList(
        [
            ResidualBlock(d, cfg.embed_dim, d),
            StackedAttention(d, cfg.context_dim, cfg.heads(d), cfg.middle_blocks, ref_branch),
            ResidualBlock(d, cfg.embed_dim, d),
        ]
    )


def _build_decoder(cfg: UNetConfig, skips: list[int], scale: float, ref_branch: bool) -> nn.ModuleList:
    """Decoder entries: residual(+attention) blocks over concatenated skips, nearest upsampling."""
    skips = list(skips)
    mult = cfg.dim_mult
    dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
    decoder = nn.ModuleList()
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        level = len(mult) - i - 1
        for j in range(cfg.res_blocks(level) + 1):
            block = nn.ModuleList([ResidualBlock(d_in + skips.pop(), cfg.embed_dim, d_out)])
            if is_attention_scale(scale, cfg.attn_scales):
                heads = cfg.heads(d_out)
                block.append(
                    StackedAttention(d_out, cfg.context_dim, heads, cfg.attn_blocks(level), ref_branch)
                )
            d_in = d_out
            if i != len(mult) - 1 and j == cfg.res_blocks(level):
                block.append(Upsample(d_out))
                scale *= 2.0
            decoder.append(block)
    return decoder


class FlashFaceUNet(nn.Module):
    """Main UNet (latent + face mask -> eps) and ReferenceNet (reference latents -> K/V)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.time_embedding = nn.Sequential(nn.Linear(cfg.dim, e), nn.SiLU(), nn.Linear(e, e))
        self.encoder, skips, scale = _build_encoder(cfg, cfg.in_dim)
        self.middle = _build_middle(cfg, ref_branch=True)
        self.decoder = _build_decoder(cfg, skips, scale, ref_branch=True)
        self.head = nn.Sequential(
            GroupNorm32(cfg.dim * cfg.dim_mult[0]),
            nn.SiLU(),
            nn.Conv2d(cfg.dim * cfg.dim_mult[0], cfg.out_dim, 3, padding=1),
        )
        self.memory_format = torch.contiguous_format  # of every 4-D activation; see `to_channels_last`
        self.ref_encoder, ref_skips, ref_scale = _build_encoder(cfg, cfg.ref_in_dim)
        self.ref_decoder = _build_decoder(cfg, ref_skips, ref_scale, ref_branch=False)
        main = self._attention_blocks(self.decoder)
        ref = self._attention_blocks(self.ref_decoder)
        for i, (a, b) in enumerate(zip(main, ref)):
            a.ref_index = b.ref_index = i
        self.reference_layers: list[str] = [
            name
            for name, m in self.named_modules()
            if isinstance(m, AttentionBlock) and m.ref_index >= 0 and not name.startswith("ref_")
        ]
        self.cuts = frozenset(CUTS)

    def set_cuts(self, cuts: Iterable[str]) -> FlashFaceUNet:
        """Switch the exact FLOP cuts (`config.CUTS`) named in `cuts` on, the others off."""
        unknown = sorted(set(cuts) - set(CUTS))
        if unknown:
            raise InputError(f"unknown UNet cuts {unknown}; known: {list(CUTS)}")
        self.cuts = frozenset(cuts)
        for m in self.modules():
            if isinstance(m, AttentionBlock):
                m.merge = "lse" in self.cuts
        return self

    def _attention_blocks(self, decoder: nn.ModuleList) -> list[AttentionBlock]:
        """Reference layers in traversal order: the middle's blocks, then the decoder's."""
        blocks = [
            m for part in (self.middle, decoder) for m in part.modules() if isinstance(m, AttentionBlock)
        ]
        return blocks

    def to_channels_last(self) -> FlashFaceUNet:
        """NHWC layout for every convolution: weights converted in place, inputs in `forward`."""
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (untyped kwarg)

    @property
    def num_reference_layers(self) -> int:
        return len(self.reference_layers)

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        dtype = next(self.time_embedding.parameters()).dtype
        return self.time_embedding(sinusoidal_embedding(t, self.cfg.dim).to(dtype))  # [B, 4*dim]

    def _block(self, block: nn.Module, x, e, context, ref, collect, size, widen=None) -> torch.Tensor:
        if isinstance(block, ResidualBlock):
            return block(x, e)
        if isinstance(block, StackedAttention):
            return block(x, context, ref, collect, self.num_reference_layers - 1, widen)
        if isinstance(block, Upsample):
            return block(x, size)
        if isinstance(block, nn.ModuleList):
            for sub in block:
                x = self._block(sub, x, e, context, ref, collect, size, widen)
                if collect is not None and len(collect) == self.num_reference_layers:
                    return x
            return x
        return block(x)

    def _run(
        self, x, e, context, encoder, decoder, ref=None, collect=None, share=None
    ) -> torch.Tensor | None:
        """UNet traversal of the official `encode`/`decode`; stops early once `collect` is full.

        `share` (`SharedRows`): the encoder runs on the distinct encoder rows (cut "encoder"), its
        layers before the first cross-attention on one row per sample (cut "stem"); the middle and
        decoder take every row's skips by index."""
        enc = share.enc_rows if share is not None and "encoder" in self.cuts else None  # [E]
        stem = share.stem_rows if share is not None and "stem" in self.cuts else None  # [S]
        e_in = e_enc = e if enc is None else e[enc]
        h, c_enc, widen = (x, context, None) if enc is None else (x[enc], context[enc], None)
        if share is not None and stem is not None and isinstance(encoder[1][-1], StackedAttention):
            h, e_in, widen = x[stem], e[stem], share.sample_rows if enc is None else share.sample_rows[enc]
        skips = []
        for i, block in enumerate(encoder):
            h = self._block(
                block, h, e_in if i < 2 else e_enc, c_enc, None, collect, None, widen if i == 1 else None
            )
            skips.append(h)
        if widen is not None:  # the stem's skip, then every skip, to the rows of the batch
            skips[0] = skips[0][widen]
        if share is not None and enc is not None:
            skips = [s[share.enc_index] for s in skips]
        x = skips[-1]
        for block in self.middle:
            x = self._block(block, x, e, context, ref, collect, None)
            if collect is not None and len(collect) == self.num_reference_layers:
                return None
        for block in decoder:
            x = torch.cat([x, skips.pop()], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            x = self._block(block, x, e, context, ref, collect, size)
            if collect is not None and len(collect) == self.num_reference_layers:
                return None
        return self.head(x)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        ref: RefInputs | None = None,
        share: SharedRows | None = None,
    ) -> torch.Tensor:
        """eps for latents x [B,4,h,w], face mask [B|1,1,h,w], t [B], context [B,77,C].

        Rows [:B_ref] (B_ref = len(ref.scale)) attend to the reference tokens; the rest do not.
        `share`: which rows have the same encoder input and latents (cuts "encoder", "stem").
        """
        b, _, h, w = x.shape
        x = torch.cat([x, mask.to(x.dtype).expand(b, 1, h, w)], dim=1)  # [B, 5, h, w]
        x = x.contiguous(memory_format=self.memory_format)
        out = self._run(x, self._embed(t), context.to(x.dtype), self.encoder, self.decoder, ref, None, share)
        assert out is not None
        return out  # [B, 4, h, w]

    def reference_features(
        self, ref_latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor]:
        """ReferenceNet: inputs of every middle/decoder self-attention, each [G*R, L_i, C_i].

        ref_latents [G*R, 4, hr, wr]: G groups (requests) of R references each, group after group;
        t [G] (or [1]): each group's timestep; context [G, 77, C]: each group's negative-prompt
        embedding, shared by the group's references (the official ReferenceNet call, per group).
        """
        g = t.reshape(-1).shape[0]
        r = ref_latents.shape[0] // g
        ref_latents = ref_latents.contiguous(memory_format=self.memory_format)
        e = self._embed(t.reshape(-1))  # [G, D]
        e = e.unsqueeze(1).expand(g, r, e.shape[-1]).reshape(g * r, e.shape[-1])
        ctx = context.to(ref_latents.dtype)
        ctx = ctx.unsqueeze(1).expand(g, r, *ctx.shape[1:]).reshape(g * r, *ctx.shape[1:])
        collect: list[torch.Tensor] = []
        self._run(ref_latents, e, ctx, self.ref_encoder, self.ref_decoder, collect=collect)
        return collect

    def reference_kv(
        self, features: list[torch.Tensor], groups: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Project reference features with each layer's SA1 k/v: [G*R, L, C] -> ([G, R*L, C], [G, R*L, C])."""
        out = []
        for block, f in zip(self._attention_blocks(self.decoder), features):
            sa1 = block.self_attn
            assert isinstance(sa1, RefSelfAttention)
            tokens = f.reshape(groups, -1, f.shape[-1])  # reference after reference, as the official reshape
            out.append((sa1.self_attn_first.k(tokens), sa1.self_attn_first.v(tokens)))
        return out


def unet_state(state: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """Official `flashface.ckpt` layout -> canonical keys (aliases merged, unused `ref_middle` dropped)."""
    out = drop_aliases(dict(state), _ALIASES, source)
    unused = {k: v for k, v in out.items() if k.startswith(_UNUSED_PREFIX)}
    for key, tensor in unused.items():
        twin = "middle." + key[len(_UNUSED_PREFIX) :]
        if twin not in out or tuple(out[twin].shape) != tuple(tensor.shape):
            raise WeightsError(f"{source}: unused key {key!r} {tuple(tensor.shape)} has no matching {twin!r}")
        del out[key]
    return out
