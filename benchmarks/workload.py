"""Benchmark workloads, FLOP counts, the matmul peak, and the official-pattern baseline denoiser.

FLOPs are counted by torch's `FlopCounterMode` on the very calls a run makes, so they follow
whatever workload is benchmarked; the baseline reproduces the official computation pattern
(ReferenceNet features every step, reference keys/values projected for every row, the
reference branch for every row of the batch) on our modules, so both run in one process. It is
our re-implementation, not the official code: it does our work plus the duplicated work, so
its larger FLOP count holds by construction (`benchmarks/official.py` times the official code).
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from flashface_trt.models.backend import TorchBackend
from flashface_trt.models.batched import group_kv
from flashface_trt.models.config import CUTS, ModelConfig
from flashface_trt.models.unet import FlashFaceUNet
from flashface_trt.models.unet_blocks import RefInputs, SharedRows
from flashface_trt.models.vae import AutoencoderKL
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.batch import Member, RequestContext, plan_batch, shared_rows
from flashface_trt.runtime.sampling.guidance import step_update
from flashface_trt.runtime.sampling.identities import Identity, identity_from_crops
from flashface_trt.runtime.sampling.layout import BatchLayout
from flashface_trt.runtime.sampling.prepare import prepare, prepare_references, step_eps, stepper
from flashface_trt.runtime.sampling.request import REFERENCE_SIZE, GenerationRequest
from flashface_trt.runtime.sampling.sampler import StepPlan, plan, single_step

PATTERN_NOTE = (
    "our re-implementation of the official computation pattern, not the official code: our UNet "
    "and ReferenceNet with the official per-step work (ReferenceNet every step, reference K/V "
    "projected for every row, the reference branch on every row)"
)
PATTERN_FLOPS_NOTE = (
    "the official pattern is our modules plus its duplicated work, so that ours takes fewer FLOPs "
    "holds by construction; it is not a finding"
)


@dataclass(frozen=True)
class Workload:
    """What one benchmark run generates (W768: the issue's reference workload)."""

    height: int = 768
    width: int = 768
    refs: int = 4
    steps: int = 30
    samples: int = 1
    ref_size: int = REFERENCE_SIZE  # reference crop side (the official pipeline's 224)

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt="a handsome young man",
            steps=self.steps,
            num_samples=self.samples,
            height=self.height,
            width=self.width,
        ).validated()

    def crops(self) -> np.ndarray:
        return prepare_references([synthetic_face(seed=i) for i in range(self.refs)], self.ref_size)


W768 = Workload()


@dataclass
class OfficialPatternDenoiser:
    """The official computation pattern on our modules (same result, more work), for one request.

    Per step: ReferenceNet features recomputed (no cache), the reference keys/values projected once
    per row of the batch (the official projects `[y; refs]` row by row), and the reference branch
    run for every row (rows without references get λ = 0, which leaves them unchanged).
    """

    unet: FlashFaceUNet
    ctx: RequestContext  # the request's prompts [2, 77, C], identity, mask [1, 1, h, w] and guidance

    def eps(self, x: torch.Tensor, step: StepPlan) -> torch.Tensor:
        n, texts, lat = x.shape[0], self.ctx.texts, self.ctx.identity.latents
        layout = step.layout(n)
        context = torch.cat([texts[b : b + 1].expand(n, -1, -1) for b in layout.text_blocks])
        xb = x.to(texts.dtype).repeat(layout.k, 1, 1, 1)
        t = torch.full((layout.rows,), step.t, device=x.device, dtype=torch.long)
        feats = self.unet.reference_features(lat, t[:1], texts[1:2])
        kv = [self.unet.reference_kv(feats) for _ in range(layout.rows)][0]  # projected for every row
        scale = torch.zeros(layout.rows, device=x.device, dtype=texts.dtype)
        scale[: layout.ref_rows] = step.ref_strength
        cuts = self.unet.cuts  # the official computation takes none of our UNet cuts
        try:
            with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
                return self.unet.set_cuts(())(xb, self.ctx.mask, t, context, RefInputs(kv, scale))
        finally:
            self.unet.set_cuts(cuts)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, step: StepPlan) -> torch.Tensor:
        """One step the official way: this class's `eps`, then the guided DDIM update."""
        c = step.coefficients(self.ctx.guidance)
        return step_update(x, self.eps(x, step).float(), step.three_way, c)


def make_denoiser(backend: TorchBackend, workload: Workload, official_pattern: bool, identity=None):
    """(denoise, eps, prepared) of one run of `workload` (`identity` reused if given, else encoded).

    Ours is the backend's step of the request alone (its settings: the plain or the static step) and
    the shared `step_eps` probe; the official pattern is `OfficialPatternDenoiser`.
    """
    identity = identity or identity_from_crops(backend.encode_references, workload.crops())
    prepared = prepare(backend, workload.request(), identity)
    if official_pattern:
        den = OfficialPatternDenoiser(backend.models.unet, prepared.ctx)
        return den, den.eps, prepared
    return stepper(backend, prepared.ctx), functools.partial(step_eps, backend, prepared.ctx), prepared


def reference_kv(backend: TorchBackend, ctx: RequestContext, t: int):
    """Our ReferenceNet stage at timestep t: the request's reference K/V ([1, R*L, C] per layer; cached)."""
    member = Member(ctx, torch.zeros(1, 4, 8, 8, device=backend.device), single_step(t, ctx.guidance))
    return group_kv(backend.unet, [member], plan_batch([member]), backend.kv_cache)


def counted(fn, *args) -> tuple[object, int]:
    """(result, FLOPs) of one call, as torch's FlopCounterMode counts them (matmuls, convolutions, attention).

    Attention runs through the math kernel while counting: the CPU's fused SDPA kernel is not
    registered with the counter (it would count 0), the decomposed one is counted on every device;
    the fused kernel the log-sum-exp merge calls directly is counted as SDPA.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import sdpa_flop_count

    def fused_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    fused = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: fused_flops}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=fused) as counter:
        out = fn(*args)
    return out, int(counter.get_total_flops())


def count_flops(fn, *args) -> int:
    """FLOPs of one call (see `counted`)."""
    return counted(fn, *args)[1]


def loop_total(counts: dict[str, int], steps: list[StepPlan]) -> int:
    """FLOPs of the denoising loop over `steps` from the per-step counts of `counts`."""
    n2 = sum(not s.three_way for s in steps)
    per_step = n2 * counts["unet_2way_step"] + (len(steps) - n2) * counts["unet_3way_step"]
    return per_step + len(steps) * counts["reference_net_step"]


def loop_flops(
    backend: TorchBackend,
    workload: Workload,
    official_pattern: bool = False,
    identity: Identity | None = None,
) -> dict[str, int]:
    """FLOPs per component and for the whole denoising loop of `workload` (counted, not modelled).

    Counted on a real run of `backend` (`identity`: its encoded references, else encoded here).
    """
    den, _, prepared = make_denoiser(backend, workload, official_pattern, identity)
    x, steps, ctx = prepared.x, prepared.steps, prepared.ctx
    two = next((s for s in steps if not s.three_way), None)
    three = next((s for s in steps if s.three_way), None)
    out: dict[str, int] = {}
    with torch.inference_mode():
        if official_pattern:
            per = {s.three_way: count_flops(den, x, s) for s in (two, three) if s is not None}
            out["unet_2way_step"] = per.get(False, 0)
            out["unet_3way_step"] = per.get(True, 0)
            out["reference_net_step"] = 0  # inside every step above
        else:
            backend.kv_cache.clear()
            out["reference_net_step"] = count_flops(reference_kv, backend, ctx, steps[0].t)
            for s in (two, three):  # the UNet counts below must not include the ReferenceNet
                if s is not None:
                    reference_kv(backend, ctx, s.t)
            out["unet_2way_step"] = count_flops(den, x, two) if two else 0
            out["unet_3way_step"] = count_flops(den, x, three) if three else 0
        z = torch.zeros_like(x)
        out["vae_decode"] = count_flops(backend.decode, z)
        out["encode_references"] = count_flops(backend.encode_references, workload.crops())
    out["loop"] = loop_total(out, steps)
    return out


def meta_loop_flops(cfg: ModelConfig, workload: Workload) -> dict[str, dict[str, int]]:
    """`loop_flops` of ours and of the official pattern ("ours", "official_pattern"), on the meta device;
    also ours without the UNet cuts ("ours_uncut"), with each alone ("ours_cut_<name>_only") and with
    all but the log-sum-exp merge ("ours_without_lse", the default export's).

    Full-size workloads in seconds, no weights, no memory; the same components as a real run: the
    ReferenceNet (features + K/V projection) once per step and the 2-/3-way UNet batches. The
    official pattern is ours plus the duplicated work: the ReferenceNet inside every step, one K/V
    projection per row and the reference branch on every row.
    """
    return copy.deepcopy(_meta_loop_flops(cfg, workload))


@functools.lru_cache(maxsize=8)
def _meta_loop_flops(cfg: ModelConfig, workload: Workload) -> dict[str, dict[str, int]]:
    """`meta_loop_flops`, counted once per (config, workload) in a process: they depend on nothing else."""
    dev, f16 = torch.device("meta"), torch.float16
    with dev:
        unet, vae = FlashFaceUNet(cfg.unet).to(f16), AutoencoderKL(cfg.vae).to(f16)
    n, r = workload.samples, max(workload.refs, 4)  # fewer references are repeated up to 4
    h, w = workload.height // cfg.vae_factor, workload.width // cfg.vae_factor
    lat_ref = workload.ref_size // cfg.vae_factor
    lat = torch.empty(r, cfg.unet.ref_in_dim, lat_ref, lat_ref, device=dev, dtype=f16)
    ctx = torch.empty(1, cfg.text.text_len, cfg.unet.context_dim, device=dev, dtype=f16)
    feats, features = counted(unet.reference_features, lat, torch.zeros(1, device=dev, dtype=torch.long), ctx)
    kv, proj = counted(unet.reference_kv, feats)
    ref_step = features + proj
    unet_counts: dict[tuple, int] = {}

    def unet_step(layout: BatchLayout, ref_rows: int, cuts: tuple[str, ...]) -> int:
        key = (layout, ref_rows, cuts)
        if key not in unet_counts:  # ours uncut and the official pattern share the 2-way batch
            rows = layout.rows
            x = torch.empty(rows, cfg.unet.out_dim, h, w, device=dev, dtype=f16)
            mask = torch.empty(1, 1, h, w, device=dev, dtype=f16)
            t = torch.zeros(rows, device=dev, dtype=torch.long)
            c = torch.empty(rows, cfg.text.text_len, cfg.unet.context_dim, device=dev, dtype=f16)
            refs = RefInputs(kv, torch.ones(ref_rows, device=dev, dtype=f16))
            samples = np.asarray(layout.sample_rows)
            arrays = (*shared_rows(samples, np.asarray(layout.text_rows)).values(), samples)
            share = SharedRows(*(torch.from_numpy(a).to(dev) for a in arrays))
            unet_counts[key] = count_flops(unet.set_cuts(cuts), x, mask, t, c, refs, share)
        return unet_counts[key]

    crops = torch.empty(r, 3, workload.ref_size, workload.ref_size, device=dev, dtype=f16)
    vae_counts = {
        "vae_decode": count_flops(vae.decode, torch.empty(n, cfg.vae.z_dim, h, w, device=dev, dtype=f16)),
        "encode_references": count_flops(vae.encode, crops),
    }
    steps = plan(workload.steps, workload.request().guidance)
    out = {}
    runs = [("ours", False, CUTS), ("ours_uncut", False, ()), ("official_pattern", True, ())]
    runs += [(f"ours_cut_{c}_only", False, (c,)) for c in CUTS]
    runs += [("ours_without_lse", False, tuple(c for c in CUTS if c != "lse"))]  # the TensorRT export's
    for name, official, cuts in runs:
        counts = {"reference_net_step": 0 if official else ref_step}
        for three_way, key in ((False, "unet_2way_step"), (True, "unet_3way_step")):
            layout = BatchLayout(n, three_way)  # official: λ = 0 rows take the reference branch too
            counts[key] = unet_step(layout, layout.rows if official else layout.ref_rows, cuts)
            if official:  # the ReferenceNet inside the step, then its K/V projected once per row
                counts[key] += ref_step + (layout.rows - 1) * proj
        out[name] = {**counts, **vae_counts}
        out[name]["loop"] = loop_total(out[name], steps)
    unet.set_cuts(CUTS)
    return out


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of this device and dtype, median of `repeats`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return 2 * size**3 / float(np.median(times)) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "PATTERN_FLOPS_NOTE",
    "PATTERN_NOTE",
    "W768",
    "Identity",
    "OfficialPatternDenoiser",
    "Workload",
    "count_flops",
    "loop_flops",
]
