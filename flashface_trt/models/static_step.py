"""The PyTorch denoising step over static buffers, replayed as a CUDA graph on a GPU.

Everything a step reads is a static tensor of one request shape, refilled per request and per
step with device-to-device copies: the 3-way context rows, the mask, the current step's
timesteps, λ and guidance/DDIM coefficient row (copied from per-request tables) and the current
step's reference K/V (copied from the identity cache, or computed by the ReferenceNet on a miss).
The step body has no host values, `.item()` calls or syncs, so on CUDA it is captured once per
(shape, batch layout) and replayed for every step of every request; on the CPU the same body runs
eagerly (what the CPU tests compare with the plain denoiser, bit for bit). The loop itself is the
shared `runtime.sampler.sample`, so progress and cancellation work between steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..runtime.errors import InputError
from ..runtime.graphs import Body, StepGraphs
from ..runtime.guidance import STEP_COEFFICIENTS
from ..runtime.layout import BatchLayout, context_table_rows
from ..runtime.sampler import StepPlan
from .guidance import GuidanceStepGraph
from .unet_blocks import RefInputs

log = logging.getLogger(__name__)


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


class StaticStep:
    """Static buffers of one request shape and the step body that reads them.

    x: [N, 4, h, w] float32 (updated in place by each step); context: the 3-way table
    [cond x N, cond x N, uncond x N]; t [3N], lam [2N], coef [10]: the current step's values;
    kv: the current step's reference K/V, one (K, V) per reference layer.
    """

    def __init__(self, unet, den, x_shape: tuple[int, ...]) -> None:
        self.unet = unet
        dev, dtype = den.cond.device, den.cond.dtype
        self.n = n = x_shape[0]
        self.key = (tuple(x_shape), tuple(den.identity.latents.shape), dtype, dev)
        with torch.inference_mode():
            self.kv = [(torch.empty_like(k), torch.empty_like(v)) for k, v in den.reference_kv(999)]
            self.x = torch.zeros(x_shape, device=dev, dtype=torch.float32)
            self.context = torch.zeros(3 * n, *den.cond.shape[1:], device=dev, dtype=dtype)
            self.mask = torch.zeros_like(den.mask)
            self.t = torch.zeros(3 * n, device=dev)
            self.lam = torch.zeros(2 * n, device=dev, dtype=dtype)
            self.coef = torch.zeros(len(STEP_COEFFICIENTS), device=dev)
        self.owner: object = None  # the denoiser whose context and mask the buffers hold
        self.update = {False: GuidanceStepGraph(three_way=False), True: GuidanceStepGraph(three_way=True)}

    def body(self, three_way: bool) -> None:
        """One step on the static tensors (no host values): what a CUDA graph records."""
        layout = BatchLayout(self.n, three_way)
        x, dtype = self.x, self.context.dtype
        ctx = self.context[layout.context_offset :]  # [k*N, 77, C]
        refs = RefInputs(self.kv, self.lam[: layout.ref_rows])
        xb = x.to(dtype).repeat(layout.k, 1, 1, 1)  # layout.sample_rows: x repeated k times
        eps = self.unet(xb, self.mask, self.t[: layout.rows], ctx, refs)
        self.x.copy_(self.update[three_way](x, eps.float(), self.coef))


class StaticDenoiser:
    """`denoise(x, step)` of one request over a `StaticStep`: copy the step's values in, run the body.

    The per-request tables (coefficients, timesteps, λ) are made once on the device; per step only
    device-to-device copies and the (replayed) body run, so nothing waits for the host.
    """

    def __init__(self, den, steps: Sequence[StepPlan], states: Callable[..., StaticStep], graphs: StepGraphs):
        self.den, self.steps, self.states, self.graphs = den, list(steps), states, graphs
        self.index = {s: i for i, s in enumerate(steps)}
        self.state: StaticStep | None = None

    def _load(self, x_shape: tuple[int, ...]) -> StaticStep:
        """This request's tables on the device, its context rows and mask in the shape's buffers."""
        den, steps = self.den, self.steps
        state = self.states(den, x_shape)
        dev = state.x.device
        self.coef = torch.tensor([s.coefficients(den.guidance) for s in steps], device=dev)  # [S, 10]
        self.t = torch.tensor([float(s.t) for s in steps], device=dev)  # [S]
        self.lam = torch.tensor([s.ref_strength for s in steps], device=dev).to(state.lam.dtype)  # [S]
        text = torch.cat([den.cond, den.uncond])  # [2, 77, C]
        state.context.copy_(text[context_table_rows(state.n)])
        state.mask.copy_(den.mask)
        state.owner = self
        return state

    def reference_kv(self, t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The request's reference K/V of one timestep (cached per identity)."""
        return self.den.reference_kv(t)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, step: StepPlan) -> torch.Tensor:
        i = self.index.get(step)
        if i is None:
            raise InputError(f"step t={step.t} is not in the plan this denoiser was made for")
        st = self.state
        if st is None or st.owner is not self or tuple(x.shape) != tuple(st.x.shape):
            st = self.state = self._load(tuple(x.shape))  # another request used these buffers meanwhile
        st.x.copy_(x)
        st.coef.copy_(self.coef[i])
        st.t.copy_(self.t[i].expand_as(st.t))
        st.lam.copy_(self.lam[i].expand_as(st.lam))
        for (k, v), (k_new, v_new) in zip(st.kv, self.den.reference_kv(step.t)):
            k.copy_(k_new)  # a cached identity: a copy; a new one: its ReferenceNet ran just above
            v.copy_(v_new)
        self.graphs.run((st.key, step.three_way), lambda: st.body(step.three_way))
        return st.x.clone()  # never hand out the static buffer: requests may interleave
