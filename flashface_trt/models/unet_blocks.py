"""UNet layers of SD 1.5 as the official FlashFace code defines them (`ldm/models/unet.py`).

Parameter names follow the official modules exactly so that released checkpoints load
without renaming. The reference-attention branch (`self_attn.self_attn_first`) follows
`flashface/all_finetune/models/reference_unet.py`, computed without the official code's
zero-weighted work: SA1(y) once per row, attention over reference tokens only for the rows
that use references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of a 4-D activation: channels-last (NHWC strides) or the default NCHW."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep embedding [cos | sin] of the official UNet (DDPM positional encoding)."""
    half = dim // 2
    t = t.float()  # [B]
    freqs = torch.pow(10000, -torch.arange(half, device=t.device).to(t).div(half))
    x = torch.outer(t, freqs)  # [B, half]
    x = torch.cat([torch.cos(x), torch.sin(x)], dim=1)
    if dim % 2:
        x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    return x  # [B, dim]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the weight dtype (official `GroupNorm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(32, dim, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).type_as(x)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (matches autocast's float32 layer_norm in the official demo)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        b = self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention, scale 1/sqrt(head_dim): [B, Lq, C] x [B, Lk, C] -> [B, Lq, C]."""
    b, lq, c = q.shape
    d = c // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)  # [B, n, Lq, d]
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)  # [B, n, Lk, d]
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, n, Lq, d]
    return out.transpose(1, 2).reshape(b, lq, c)


def attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` and its log-sum-exp [B, Lq, n] (for FlashAttention's split-KV combine, arXiv:2307.08691).

    The fused kernels that return the log-sum-exp on CPU and CUDA; explicit softmax elsewhere (meta
    device, ONNX export)."""
    b, lq, c = q.shape
    d = c // heads
    q, k, v = (t.view(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))  # [B, n, L, d]
    if q.device.type == "cpu" and not torch.onnx.is_in_onnx_export():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    elif q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        s = (q @ k.transpose(2, 3)) * d**-0.5  # [B, n, Lq, Lk]; positive dims: traced ranks may be unknown
        lse = torch.logsumexp(s.float(), dim=3)
        out = torch.exp(s.float() - lse.unsqueeze(3)).to(v.dtype) @ v
    return out.transpose(1, 2).reshape(b, lq, c), lse[..., :lq].transpose(1, 2).float()


class Attention(nn.Module):
    """Official `MultiHeadAttention`: bias-free q/k/v, biased output projection."""

    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim, dim, bias=False)
        self.v = nn.Linear(context_dim, dim, bias=False)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.o(attend(self.q(x), self.k(context), self.v(context), self.heads))


class RefSelfAttention(Attention):
    """Self-attention that also owns the reference branch SA1 (`self_attn.self_attn_first`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, None, heads)
        self.self_attn_first = Attention(dim, None, heads)


class GeGLU(nn.Module):
    """GEGLU feed-forward input projection (arXiv:2002.05202)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


@dataclass
class RefInputs:
    """Reference inputs of one main-UNet call.

    kv: per reference layer (middle, then decoder order) the projected reference keys and
        values, each [G, R*L, C]: one group per request (identity and timestep) in the batch.
    scale: [B_ref] reference strength λ of each of the first B_ref rows; the other rows use none.
    group: [B_ref] the K/V group each of those rows attends to (None: every row uses group 0).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    scale: torch.Tensor
    group: torch.Tensor | None = None

    def rows(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values for each of the n reference rows: [n, R*L, C]."""
        k, v = self.kv[index]
        if self.group is None:
            return k[:1].expand(n, -1, -1), v[:1].expand(n, -1, -1)
        return k.index_select(0, self.group), v.index_select(0, self.group)


@dataclass
class SharedRows:
    """Rows of one main-UNet call that share work (`runtime.sampling.batch.StepArrays`; None: not shared).

    enc_rows [E]: the first row of each distinct encoder input (latents, timestep, mask, text);
    enc_index [B]: each row's position in enc_rows; stem_rows [S]: the first row of each sample
    (the layers before the first cross-attention); sample_rows [B]: each row's sample.
    """

    enc_rows: torch.Tensor | None
    enc_index: torch.Tensor | None
    stem_rows: torch.Tensor | None
    sample_rows: torch.Tensor


class AttentionBlock(nn.Module):
    """Transformer block (self-attn, cross-attn, GEGLU FFN), optionally with the reference branch."""

    def __init__(self, dim: int, context_dim: int, heads: int, ref_branch: bool):
        super().__init__()
        self.norm1 = LayerNorm32(dim)
        self.self_attn: Attention = (
            RefSelfAttention(dim, heads) if ref_branch else Attention(dim, None, heads)
        )
        self.norm2 = LayerNorm32(dim)
        self.cross_attn = Attention(dim, context_dim, heads)
        self.norm3 = LayerNorm32(dim)
        self.ffn = nn.Sequential(GeGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))
        self.ref_index = -1  # position among reference layers; -1: not a reference layer
        self.merge = True  # the reference branch by log-sum-exp merge (`FlashFaceUNet.cuts` "lse")

    def reference_branch(self, y: torch.Tensor, ref: RefInputs | None) -> torch.Tensor:
        """SA1(y) + λ(SA1(y, [y; refs]) - SA1(y)) for the first B_ref rows, SA1(y) for the rest.

        `merge`: attention over [y; refs] as the log-sum-exp weighted mix of the attention over y
        (SA1's own) and over refs alone (split-KV combine), mixed before SA1's output projection."""
        assert isinstance(self.self_attn, RefSelfAttention)
        sa1: Attention = self.self_attn.self_attn_first
        q, k, v = sa1.q(y), sa1.k(y), sa1.v(y)  # [B, L, C]
        n = 0 if ref is None else ref.scale.shape[0]
        if ref is None or n == 0:
            return sa1.o(attend(q, k, v, sa1.heads))  # SA1(y), once per row
        k_ref, v_ref = ref.rows(self.ref_index, n)  # [B_ref, R*L, C]: each row its group's
        lam = ref.scale.to(y.dtype).view(n, 1, 1)
        if self.merge:
            img, lse_img = attend_lse(q, k, v, sa1.heads)  # [B, L, C], [B, L, n]
            refs, lse_ref = attend_lse(q[:n], k_ref.to(k.dtype), v_ref.to(v.dtype), sa1.heads)
            w = torch.sigmoid(lse_ref - lse_img[:n]).to(y.dtype).repeat_interleave(y.shape[2] // sa1.heads, 2)
            return sa1.o(torch.cat([img[:n] + lam * w * (refs - img[:n]), img[n:]]))
        plain = sa1.o(attend(q, k, v, sa1.heads))
        k_cat = torch.cat([k[:n], k_ref.to(k.dtype)], dim=1)  # [B_ref, L + R*L, C]
        v_cat = torch.cat([v[:n], v_ref.to(v.dtype)], dim=1)
        with_ref = sa1.o(attend(q[:n], k_cat, v_cat, sa1.heads))
        mixed = plain[:n] + lam * (with_ref - plain[:n])
        return torch.cat([mixed, plain[n:]], dim=0)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        ref: RefInputs | None = None,
        collect: list[torch.Tensor] | None = None,
        stop_after_collect: bool = False,
        widen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = self.norm1(x)  # [B, L, C]
        if collect is not None and self.ref_index >= 0:
            collect.append(y)  # ReferenceNet: the input of this self-attention is the feature
            if stop_after_collect:
                return x
        x = x + self.self_attn(y)
        if widen is not None:
            x = x.index_select(0, widen)  # [B', L, C]
        if isinstance(self.self_attn, RefSelfAttention) and collect is None:
            x = x + self.reference_branch(y, ref)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ffn(self.norm3(x))


class StackedAttention(nn.Module):
    """Official `StackedAttentionBlocks`: GroupNorm, 1x1 conv, transformer blocks, 1x1 conv, residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, num_blocks: int, ref_branch: bool):
        super().__init__()
        self.norm1 = GroupNorm32(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.blocks = nn.ModuleList(
            [AttentionBlock(dim, context_dim, heads, ref_branch) for _ in range(num_blocks)]
        )
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        ref: RefInputs | None = None,
        collect: list[torch.Tensor] | None = None,
        stop_at: int = -1,
        widen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`widen` [B']: rows continued after the first block's self-attention (`AttentionBlock`)."""
        b, c, h, w = x.shape
        identity, layout = x, memory_format(x)
        x = self.conv1(self.norm1(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C], a view in NHWC
        for i, block in enumerate(self.blocks):
            stop = collect is not None and block.ref_index == stop_at
            x = block(x, context, ref, collect, stop, widen if i == 0 else None)
            if stop:
                return identity  # the ReferenceNet has every feature it needs
        if widen is not None:
            identity = identity[widen]  # (keeps NHWC)
        x = (
            x.reshape(x.shape[0], h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        )  # [B', C, H, W]
        return self.conv2(x) + identity


class ResidualBlock(nn.Module):
    """Official UNet `ResidualBlock` with timestep-embedding injection."""

    def __init__(self, in_dim: int, embed_dim: int, out_dim: int):
        super().__init__()
        self.layer1 = nn.Sequential(GroupNorm32(in_dim), nn.SiLU(), nn.Conv2d(in_dim, out_dim, 3, padding=1))
        self.embedding = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_dim))
        self.layer2 = nn.Sequential(
            GroupNorm32(out_dim), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_dim, out_dim, 3, padding=1)
        )
        self.shortcut = nn.Identity() if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, 1)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.layer1(x)
        h = h + self.embedding(e).unsqueeze(-1).unsqueeze(-1).type_as(h)
        return self.layer2(h) + self.shortcut(x)


class _Nearest(nn.Module):
    """Placeholder at index 0 of the official `Sequential(Upsample, Conv2d)` (no parameters)."""


class Upsample(nn.Sequential):
    """Nearest-neighbour resize to the next skip connection's size, then a 3x3 conv (keys `.1.*`)."""

    def __init__(self, dim: int):
        super().__init__(_Nearest(), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        return self[1](F.interpolate(x, size=size, mode="nearest"))


def is_attention_scale(scale: float, scales: tuple[float, ...]) -> bool:
    """Official test `scale in attn_scales`, tolerant to float spelling (0.25 vs 1/4)."""
    return any(math.isclose(scale, s) for s in scales)
