"""One UNet call over several requests (`runtime.sampling.batch.plan_batch`), and its update, in PyTorch.

A step runs the ReferenceNet once for the groups whose K/V are not cached (batched over groups, each
with its own timestep and negative prompt; `prepare.prefetch_kv` fills the cache on admission). A
batch of one request computes exactly the single request's official 2-/3-way batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..runtime.sampling.batch import BatchPlan, Member, StepArrays, cached_kv
from ..runtime.sampling.guidance import batched_update
from ..runtime.sampling.identities import ReferenceKVCache
from .unet import FlashFaceUNet
from .unet_blocks import RefInputs, SharedRows

KV = list[tuple[torch.Tensor, torch.Tensor]]


def reference_kv(unet: FlashFaceUNet, ms: list[Member]) -> list[KV]:
    """One ReferenceNet call for the groups of `ms` (one member each): each group's K/V [1, R*L, C]."""
    lat = torch.cat([m.ctx.identity.latents for m in ms])  # [G*R, 4, hr, wr], group after group
    t = torch.tensor([m.step.t for m in ms], device=lat.device, dtype=torch.long)  # [G]
    ctx = torch.cat([m.ctx.texts[1:2] for m in ms])  # [G, 77, C]: each group's negative prompt
    fresh = unet.reference_kv(unet.reference_features(lat, t, ctx), len(ms))
    return [[(k[g : g + 1].clone(), v[g : g + 1].clone()) for k, v in fresh] for g in range(len(ms))]


def group_kv(unet: FlashFaceUNet, members: Sequence[Member], plan: BatchPlan, cache: ReferenceKVCache) -> KV:
    """Every group's reference K/V, stacked per layer as [G, R*L, C]: cached, or computed now."""
    per_group: list[KV] = cached_kv(members, plan, cache, lambda ms: reference_kv(unet, ms))  # [1, R*L, C]
    if len(per_group) == 1:
        return per_group[0]
    return [
        (torch.cat([g[i][0] for g in per_group]), torch.cat([g[i][1] for g in per_group]))
        for i in range(len(per_group[0]))
    ]


def indices(plan: StepArrays, device: torch.device) -> dict[str, torch.Tensor]:
    """The plan's index arrays and per-row values as tensors on `device`, by graph input name."""
    return {name: torch.from_numpy(values).to(device) for name, values in plan.inputs().items()}


def batch_eps(
    unet, x: torch.Tensor, texts: torch.Tensor, masks: torch.Tensor, ix: dict, kv: KV
) -> torch.Tensor:
    """Raw model output of every row [B, 4, h, w]: x [S, 4, h, w] (all samples), texts [2M, 77, C],
    masks [M, 1, h, w], `ix` the plan's index tensors (see `indices`), kv [G, R*L, C] per layer."""
    dtype = texts.dtype
    xb = x.to(dtype).index_select(0, ix["sample_rows"])  # [B, 4, h, w]
    mask = masks.index_select(0, ix["member_rows"])  # [B, 1, h, w]
    context = texts.index_select(0, ix["text_rows"])  # [B, 77, C]
    ref = RefInputs(kv, ix["ref_scale"].to(dtype), ix["ref_group"])
    share = SharedRows(ix.get("enc_rows"), ix.get("enc_index"), ix.get("stem_rows"), ix["sample_rows"])
    return unet(xb, mask, ix["timestep"], context, ref, share)


def step_members(
    unet, members: Sequence[Member], plan: BatchPlan, cache: ReferenceKVCache
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each member's next x, the batch's raw eps): one UNet call and the batched update."""
    device = members[0].x.device
    ix = indices(plan, device)
    kv = group_kv(unet, members, plan, cache)
    x = torch.cat([m.x for m in members]).float()  # [S, 4, h, w]
    texts = torch.cat([m.ctx.texts for m in members])
    masks = torch.cat([m.ctx.mask for m in members])
    eps = batch_eps(unet, x, texts, masks, ix, kv)
    return plan.split(batched_update(x, eps.float(), ix["guide"], ix["coef"])), eps
