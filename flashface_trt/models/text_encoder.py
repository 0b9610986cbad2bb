"""CLIP ViT-L/14 text tower as FlashFace uses it: last hidden states, no pooling or projection.

Re-implements the official `ldm/models/clip.py` `TextTransformer` as called by the FlashFace demo's
`encode_text` (token + position embedding, pre-norm causal blocks with QuickGELU MLPs, final
LayerNorm), with the official parameter names minus `head`. `text_encoder_state` converts the
official full CLIP file, the bare `TextTransformer` and the Hugging Face `CLIPTextModel` layouts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.errors import InputError
from .config import TextConfig
from .weights import StateDict, build_strict, meta_shapes, read_state

log = logging.getLogger(__name__)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (official `clip.LayerNorm`), so float16 weights work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused q/k/v projection (official `clip.SelfAttention`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise InputError(f"text width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape  # [B, L, C]
        n = self.num_heads
        q, k, v = self.to_qkv(x).view(b, s, 3, n, c // n).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, N, L, D]
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, N, L, D]
        return self.proj(x.transpose(1, 2).reshape(b, s, c))  # [B, L, C]


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (official `AttentionBlock`)."""

    def __init__(self, dim: int, mlp_ratio: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token ids [B, L] -> final-LayerNorm hidden states [B, L, dim] (the demo's `encode_text`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.text_len, cfg.dim))
        self.transformer = nn.Sequential(
            *[AttentionBlock(cfg.dim, cfg.mlp_ratio, cfg.num_heads) for _ in range(cfg.num_layers)]
        )
        self.norm = LayerNorm(cfg.dim, eps=1e-5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.cfg.text_len:
            raise InputError(f"token ids must be [B, L<={self.cfg.text_len}], got {tuple(ids.shape)}")
        x = self.token_embedding(ids) + self.pos_embedding[:, : ids.shape[1]]  # [B, L, C]
        x = self.transformer(x)
        return self.norm(x)


# Hugging Face `CLIPTextModel` name (after `text_model.`) -> official name (regex, group 1 = layer index).
_HF_RENAMES = [
    (r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"final_layer_norm\.(weight|bias)", r"norm.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"transformer.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"transformer.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"transformer.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.\1.mlp.0.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.\1.mlp.2.\2"),
]
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_HF_POS = "embeddings.position_embedding.weight"
_HF_IGNORED = ("embeddings.position_ids",)
_HF_ROOTS = ("embeddings.", "encoder.layers.", "final_layer_norm.")
# Other towers of a full CLIP checkpoint, dropped (official / Hugging Face `CLIPModel` names).
_OTHER_TOWERS = ("visual.", "vision_model.")
_OTHER_KEYS = ("log_scale", "logit_scale", "text_projection.weight", "visual_projection.weight")


def _from_hf(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Hugging Face `CLIPTextModel` layout -> official names; keys not understood keep their name."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name in _HF_IGNORED or key in _OTHER_KEYS or key.startswith(_OTHER_TOWERS):
            continue
        if name is None:
            out[key] = value
            continue
        m = _HF_QKV.fullmatch(name)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif name == _HF_POS:
            out["pos_embedding"] = value.unsqueeze(0)  # [77, C] -> [1, 77, C]
        else:
            new = next((re.sub(p, r, name) for p, r in _HF_RENAMES if re.fullmatch(p, name)), None)
            out[new if new is not None else key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # incomplete: keep the originals so the strict check reports them
            for p, t in parts.items():
                out[f"{prefix}encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] = t
    return out


def text_encoder_state(state: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """Official full CLIP (`textual.*`), bare `TextTransformer` or Hugging Face layout -> our names."""
    keys = set(state)
    if any(k.startswith("textual.") for k in keys):
        layout = "official CLIP"
        out: StateDict = {}
        for k, v in state.items():  # other towers dropped; unknown top-level keys kept for the strict check
            if k.startswith("textual."):
                out[k.removeprefix("textual.")] = v
            elif not k.startswith(_OTHER_TOWERS) and k not in _OTHER_KEYS:
                out[k] = v
        out.pop("head", None)
    elif any(k.startswith("text_model.") for k in keys):
        layout, out = "Hugging Face CLIPTextModel", _from_hf(state, "text_model.")
    elif any(k.startswith(_HF_ROOTS) for k in keys) and "token_embedding.weight" not in keys:
        layout, out = "Hugging Face CLIPTextModel (no prefix)", _from_hf(state, "")
    else:
        layout = "official TextTransformer"
        out = {k: v for k, v in state.items() if k not in ("head", "head.weight", "head.bias")}
    log.debug("%s: %s text-encoder layout, %d -> %d tensors", source, layout, len(state), len(out))
    return out


def text_encoder_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every `TextEncoder` parameter, built on the meta device."""
    return meta_shapes(lambda: TextEncoder(cfg))


def load_text_encoder(
    path_or_state: str | Path | Mapping[str, torch.Tensor],
    cfg: TextConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> TextEncoder:
    """Read (if a path), convert and strictly load text-encoder weights; eval mode, no gradients."""
    raw, source = read_state(path_or_state)
    return build_strict(lambda: TextEncoder(cfg), text_encoder_state(raw, source), source, device, dtype)
