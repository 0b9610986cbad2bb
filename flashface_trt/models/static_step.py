"""The PyTorch batched step over static buffers, replayed as a CUDA graph on a GPU.

Every batch is padded to power-of-two buckets (`runtime.sampling.batch.pad_plan`): reference rows, other
rows, samples, K/V groups, requests. One set of static tensors per bucket holds what a step reads:
every sample's x, the requests' prompt embeddings and masks, the plan's index arrays, per-row
timesteps and λ, per-sample coefficient rows and every group's reference K/V. They are refilled
with copies before each step, and the step body has no host values, `.item()` calls or syncs, so
on CUDA it is captured once per bucket (and image size) and replayed for every step of every
batch; on the CPU the same body runs eagerly (what the CPU tests compare with the plain step, bit
for bit). The loops (one request's `sample`, the executor's) stay outside, so progress and
cancellation work between steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..runtime.backends.graphs import Body, StepGraphs
from ..runtime.sampling.batch import Member, PaddedPlan, pad_plan, plan_batch
from ..runtime.sampling.guidance import batched_update
from ..runtime.sampling.identities import ReferenceKVCache
from .batched import KV, batch_eps, group_kv


class TorchGraph:
    """A captured `torch.cuda.CUDAGraph` (the `graphs.Graph` protocol)."""

    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()

    def destroy(self) -> None:
        self.graph.reset()


class TorchCapture:
    """CUDA-graph capture for `StepGraphs`: warm-up on a side stream, capture into one shared pool."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: they share memory

    def eager(self, body: Body) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy cuBLAS/cuDNN workspaces are made outside the capture
            body()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, body: Body) -> TorchGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        return TorchGraph(graph)


def static_key(padded: PaddedPlan, members: Sequence[Member]) -> tuple:
    """What a static batch's tensors depend on: the bucket, image size, references, dtype, device."""
    first = members[0]
    shape = tuple(int(d) for d in first.x.shape[2:])
    return (padded.key, shape, first.ctx.identity.num_refs, str(first.ctx.texts.dtype), str(first.x.device))


class StaticBatch:
    """Static tensors of one bucket (and image size) and the step body that reads them."""

    def __init__(self, unet, padded: PaddedPlan, members: Sequence[Member], kv: KV) -> None:
        self.unet = unet
        _, _, s_b, g_b, m_b = padded.key
        first = members[0]
        dev, dtype = first.ctx.texts.device, first.ctx.texts.dtype
        h, w = first.x.shape[2:]
        self.key = static_key(padded, members)
        with torch.inference_mode():
            self.x = torch.zeros(s_b, first.x.shape[1], h, w, device=dev)
            self.texts = torch.zeros(2 * m_b, *first.ctx.texts.shape[1:], device=dev, dtype=dtype)
            self.masks = torch.zeros(m_b, *first.ctx.mask.shape[1:], device=dev, dtype=first.ctx.mask.dtype)
            self.kv = [
                (
                    torch.zeros(g_b, *k.shape[1:], device=dev, dtype=k.dtype),
                    torch.zeros(g_b, *v.shape[1:], device=dev, dtype=v.dtype),
                )
                for k, v in kv
            ]
            self.ix = {
                n: torch.zeros_like(torch.from_numpy(v), device=dev) for n, v in padded.inputs().items()
            }

    def load(self, padded: PaddedPlan, members: Sequence[Member], kv: KV) -> None:
        """Copy one batch's values into the static tensors (host index arrays, device data)."""
        plan = padded.plan
        self.x[: plan.samples].copy_(torch.cat([m.x for m in members]).float())
        self.texts[: 2 * len(members)].copy_(torch.cat([m.ctx.texts for m in members]))
        self.masks[: len(members)].copy_(torch.cat([m.ctx.mask for m in members]))
        for (k, v), (k_new, v_new) in zip(self.kv, kv):
            k[: k_new.shape[0]].copy_(k_new)  # a cached identity: a copy; a new one: its ReferenceNet ran
            v[: v_new.shape[0]].copy_(v_new)
        pinned = self.x.device.type == "cuda"
        for name, values in padded.inputs().items():
            host = torch.from_numpy(values)
            if pinned:  # async: the caching host allocator keeps the block until the copy is done
                host = host.pin_memory()
            self.ix[name].copy_(host, non_blocking=pinned)

    def body(self) -> None:
        """One batched step on the static tensors (no host values): what a CUDA graph records."""
        eps = batch_eps(self.unet, self.x, self.texts, self.masks, self.ix, self.kv)
        self.x.copy_(batched_update(self.x, eps.float(), self.ix["guide"], self.ix["coef"]))


class StaticSteps:
    """The static, graph-replayed batched step of a backend: one `StaticBatch` per bucket (LRU)."""

    def __init__(self, unet, cache: ReferenceKVCache, graphs: StepGraphs, max_buckets: int) -> None:
        self.unet, self.cache, self.graphs, self.max_buckets = unet, cache, graphs, max_buckets
        self.batches: dict[tuple, StaticBatch] = {}

    @torch.inference_mode()
    def __call__(self, members: Sequence[Member]) -> list[torch.Tensor]:
        plan = plan_batch(members)
        padded = pad_plan(plan, len(members))
        kv = group_kv(self.unet, members, plan, self.cache)
        key = static_key(padded, members)
        batch = self.batches.pop(key, None) or StaticBatch(self.unet, padded, members, kv)
        self.batches[key] = batch
        while len(self.batches) > self.max_buckets:
            old = next(iter(self.batches))
            self.graphs.discard(self.batches.pop(old).key)  # they read its tensors
        batch.load(padded, members, kv)
        self.graphs.run(batch.key, batch.body)
        return plan.split(batch.x[: plan.samples].clone())
