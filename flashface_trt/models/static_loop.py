"""The PyTorch denoising loop over static buffers, captured as one CUDA graph on a GPU.

Everything a step needs is a static tensor made before the loop and refilled per request: the
reference K/V of every step (copied from the identity cache, or computed by the ReferenceNet on a
miss), the 3-way context rows, the mask, and per-step tables of timesteps, reference strengths and
guidance/DDIM coefficients. The loop body has no host values, `.item()` calls or syncs, so on CUDA
it is captured once per (shapes, timesteps, references) and replayed for every request; on the
CPU the same body runs eagerly (which is what the CPU tests compare with the plain sampler).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..runtime.buffers import step_coefficients
from ..runtime.sampler import StepPlan
from .guidance import GuidanceStepGraph
from .unet_blocks import RefInputs

log = logging.getLogger(__name__)


class StaticLoop:
    """One request shape's loop: `run(x)` -> z0, eager on the CPU, one CUDA-graph replay on a GPU."""

    def __init__(self, den, x_shape: tuple[int, ...], steps: Sequence[StepPlan], cuda_graph: bool) -> None:
        self.unet = den.unet
        self.layout = [s.three_way for s in steps]
        dev, dtype = den.cond.device, den.cond.dtype
        self.n = n = x_shape[0]
        with torch.inference_mode():  # static K/V per step; `load` copies each request's K/V in
            self.kv = [[(k.clone(), v.clone()) for k, v in den.reference_kv(s.t)] for s in steps]
        s_count, ctx_shape = len(steps), (3 * n, *den.cond.shape[1:])
        self.coef = torch.zeros(s_count, 9, device=dev)  # guidance + DDIM coefficients per step
        self.t = torch.tensor([[float(s.t)] * 3 * n for s in steps], device=dev)  # [S, 3N]
        self.lam = torch.zeros(s_count, 2 * n, device=dev, dtype=dtype)  # λ per step and row
        self.context = torch.zeros(ctx_shape, device=dev, dtype=dtype)  # [cond x N, cond x N, uncond x N]
        self.mask = torch.zeros_like(den.mask)
        self.update = {2: GuidanceStepGraph(three_way=False), 3: GuidanceStepGraph(three_way=True)}
        self.x = torch.zeros(x_shape, device=dev, dtype=torch.float32)
        self.out = torch.zeros_like(self.x)
        self.use_graph = cuda_graph and dev.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.inference_mode()
    def load(self, den, steps: Sequence[StepPlan]) -> None:
        """Copy one request's values (prompt, mask, guidance, λ) into the static tensors."""
        n = self.n
        rows = torch.tensor([step_coefficients(s, den.guidance) for s in steps], device=self.coef.device)
        self.coef.copy_(rows)
        self.lam.copy_(torch.tensor([[s.ref_strength] * 2 * n for s in steps], device=self.lam.device))
        self.context.copy_(torch.cat([den.cond.expand(n, -1, -1)] * 2 + [den.uncond.expand(n, -1, -1)]))
        self.mask.copy_(den.mask)
        for static, s in zip(self.kv, steps):  # cached identity: a copy; new one: its ReferenceNet runs here
            for (k, v), (k_new, v_new) in zip(static, den.reference_kv(s.t)):
                k.copy_(k_new)
                v.copy_(v_new)

    def _body(self) -> None:
        """The whole loop on static tensors (no host values): what the CUDA graph records."""
        unet, n, x = self.unet, self.n, self.x
        mask, dtype = self.mask, self.context.dtype
        for i, three in enumerate(self.layout):
            k = 3 if three else 2
            ctx = self.context if three else self.context[n:]  # [cond, cond, uncond] or [cond, uncond]
            rows = n if three else 2 * n
            refs = RefInputs(self.kv[i], self.lam[i, :rows])
            eps = unet(x.to(dtype).repeat(k, 1, 1, 1), mask, self.t[i, : k * n], ctx, refs)
            x = self.update[k](x, eps.float(), self.coef[i])
        self.out.copy_(x)

    @torch.inference_mode()
    def run(self, x0: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x0)
        if not self.use_graph:
            self._body()
            return self.out.clone()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS/cuDNN workspaces, autotuning)
                self._body()
            torch.cuda.current_stream().wait_stream(side)
            self.x.copy_(x0)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()
            log.info("captured the %d-step loop as one CUDA graph", len(self.layout))
        self.graph.replay()
        return self.out.clone()


def loop_key(den, x_shape: tuple[int, ...], steps: Sequence[StepPlan]) -> tuple:
    """What a captured loop depends on: shapes, timesteps and layout, number of references.

    Prompts, masks, guidance values, λ and the references' K/V are copied into the loop's static
    tensors by `load`, so one captured graph serves every request of these shapes.
    """
    return (tuple(x_shape), tuple((s.t, s.three_way) for s in steps), tuple(den.identity.latents.shape))
