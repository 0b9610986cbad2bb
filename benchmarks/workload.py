"""Benchmark workloads, FLOP counts, the matmul peak, and the official-pattern baseline denoiser.

FLOPs are counted by torch's `FlopCounterMode` on the very calls a run makes, so they follow
whatever workload is benchmarked; the baseline reproduces the official computation pattern
(ReferenceNet features every step, reference keys/values projected for every row, the
reference branch for every row of the batch) on our modules, so both run in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from flashface_trt.models.backend import TorchBackend, TorchDenoiser
from flashface_trt.models.config import ModelConfig
from flashface_trt.models.unet import FlashFaceUNet
from flashface_trt.models.unet_blocks import RefInputs
from flashface_trt.models.vae import AutoencoderKL
from flashface_trt.runtime.guidance import step_update
from flashface_trt.runtime.identities import Identity, identity_from_crops
from flashface_trt.runtime.images import synthetic_face
from flashface_trt.runtime.pipeline import prepare_references
from flashface_trt.runtime.request import (
    REFERENCE_SIZE,
    GenerationRequest,
    face_mask,
    full_prompts,
    initial_noise,
)
from flashface_trt.runtime.sampler import StepPlan, plan


@dataclass(frozen=True)
class Workload:
    """What one benchmark run generates (W768: the issue's reference workload)."""

    height: int = 768
    width: int = 768
    refs: int = 4
    steps: int = 30
    samples: int = 1

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt="a handsome young man",
            steps=self.steps,
            num_samples=self.samples,
            height=self.height,
            width=self.width,
        ).validated()

    def crops(self) -> np.ndarray:
        return prepare_references([synthetic_face(seed=i) for i in range(self.refs)])


W768 = Workload()


class OfficialPatternDenoiser(TorchDenoiser):
    """The official computation pattern on our modules (same result, more work).

    Per step: ReferenceNet features recomputed (no cache), the reference keys/values projected once
    per row of the batch (the official projects `[y; refs]` row by row), and the reference branch
    run for every row (rows without references get λ = 0, which leaves them unchanged).
    """

    def reference_kv(self, t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lat = self.identity.latents
        tt = torch.full((1,), t, device=lat.device, dtype=torch.long)
        return self.unet.reference_kv(self.unet.reference_features(lat, tt, self.uncond))

    def eps(self, x: torch.Tensor, step: StepPlan) -> torch.Tensor:
        n = x.shape[0]
        layout = step.layout(n)
        text = (self.cond, self.uncond)
        context = torch.cat([text[b].expand(n, -1, -1) for b in layout.text_blocks])
        xb = x.to(self.cond.dtype).repeat(layout.k, 1, 1, 1)
        t = torch.full((layout.rows,), step.t, device=x.device, dtype=torch.long)
        feats = self.unet.reference_features(self.identity.latents, t[:1], self.uncond)
        kv = [self.unet.reference_kv(feats) for _ in range(layout.rows)][0]  # projected for every row
        scale = torch.zeros(layout.rows, device=x.device, dtype=self.cond.dtype)
        scale[: layout.ref_rows] = step.ref_strength
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
            return self.unet(xb, self.mask, t, context, RefInputs(kv, scale))

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, step: StepPlan) -> torch.Tensor:
        """One step the official way: this class's `eps`, then the guided DDIM update."""
        return step_update(x, self.eps(x, step).float(), step.three_way, step.coefficients(self.guidance))


def encode_prompts(backend: TorchBackend, workload: Workload):
    """Text stage: [positive; negative] hidden states [2, 77, C]."""
    req = workload.request()
    return backend.encode_text(backend.tokenizer.encode(list(full_prompts(req.prompt, req.negative_prompt))))


def make_denoiser(
    backend: TorchBackend, workload: Workload, official_pattern: bool, identity=None, text=None
):
    """(denoiser, initial noise, plan, identity) for one run of `workload` (text/identity reused if given).

    Ours is what the backend's settings give (the plain or the static denoiser); the official
    pattern is always the plain loop over `OfficialPatternDenoiser`.
    """
    req = workload.request()
    text = encode_prompts(backend, workload) if text is None else text
    identity = identity or identity_from_crops(backend.encode_references, workload.crops())
    mask = face_mask(req.face_bbox, req.height, req.width)
    steps = plan(req.steps, req.guidance)
    x = backend.from_numpy(initial_noise(req.seed, req.num_samples, req.height, req.width))
    if not official_pattern:
        den = backend.denoiser(text, identity, mask, req.guidance, steps, "neg")
        return den, x, steps, identity
    m = backend.from_numpy(mask.astype(np.float32))[None, None].to(backend.dtype)
    unet = backend.models.unet
    den = OfficialPatternDenoiser(
        unet, text[:1], text[1:2], identity, m, req.guidance, backend.kv_cache, "neg"
    )
    return den, x, steps, identity


def count_flops(fn, *args) -> int:
    """FLOPs of one call, as torch's FlopCounterMode counts them (matmuls, convolutions, attention).

    Attention runs through the math kernel while counting: the CPU's fused SDPA kernel is not
    registered with the counter (it would count 0), the decomposed one is counted on every device.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def loop_flops(backend: TorchBackend, workload: Workload, official_pattern: bool = False) -> dict[str, int]:
    """FLOPs per component and for the whole denoising loop of `workload` (counted, not modelled)."""
    den, x, steps, identity = make_denoiser(backend, workload, official_pattern)
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
            out["reference_net_step"] = count_flops(den.reference_kv, steps[0].t)
            for s in (two, three):  # the UNet counts below must not include the ReferenceNet
                if s is not None:
                    den.reference_kv(s.t)
            out["unet_2way_step"] = count_flops(den, x, two) if two else 0
            out["unet_3way_step"] = count_flops(den, x, three) if three else 0
        z = torch.zeros_like(x)
        out["vae_decode"] = count_flops(backend.decode, z)
        out["encode_references"] = count_flops(backend.encode_references, workload.crops())
    n2 = sum(not s.three_way for s in steps)
    n3 = len(steps) - n2
    out["loop"] = (
        n2 * out["unet_2way_step"] + n3 * out["unet_3way_step"] + len(steps) * out["reference_net_step"]
    )
    return out


def meta_loop_flops(cfg: ModelConfig, workload: Workload, official_pattern: bool = False) -> dict[str, int]:
    """`loop_flops` counted on the meta device: full-size workloads in seconds, no weights, no memory.

    The same components as a real run: the ReferenceNet (features + K/V projection) once per step,
    the 2-/3-way UNet batches; the official pattern adds the reference branch on every row and
    one K/V projection per row.
    """
    dev, f16 = torch.device("meta"), torch.float16
    with dev:
        unet, vae = FlashFaceUNet(cfg.unet).to(f16), AutoencoderKL(cfg.vae).to(f16)
    n, r = workload.samples, max(workload.refs, 4)  # fewer references are repeated up to 4
    h, w = workload.height // cfg.vae_factor, workload.width // cfg.vae_factor
    lat_ref = REFERENCE_SIZE // cfg.vae_factor
    lat = torch.empty(r, cfg.unet.ref_in_dim, lat_ref, lat_ref, device=dev, dtype=f16)
    ctx = torch.empty(1, cfg.text.text_len, cfg.unet.context_dim, device=dev, dtype=f16)
    t0 = torch.zeros(1, device=dev, dtype=torch.long)
    feats = unet.reference_features(lat, t0, ctx)
    kv = unet.reference_kv(feats)

    def unet_step(k: int) -> int:
        rows = k * n if official_pattern else (n if k == 3 else 2 * n)
        x = torch.empty(k * n, cfg.unet.out_dim, h, w, device=dev, dtype=f16)
        mask = torch.empty(1, 1, h, w, device=dev, dtype=f16)
        t = torch.zeros(k * n, device=dev, dtype=torch.long)
        c = torch.empty(k * n, cfg.text.text_len, cfg.unet.context_dim, device=dev, dtype=f16)
        return count_flops(unet, x, mask, t, c, RefInputs(kv, torch.ones(rows, device=dev, dtype=f16)))

    ref_step = count_flops(lambda: unet.reference_kv(unet.reference_features(lat, t0, ctx)))
    proj = count_flops(unet.reference_kv, feats)
    out = {"reference_net_step": 0 if official_pattern else ref_step}
    for k, key in ((2, "unet_2way_step"), (3, "unet_3way_step")):
        out[key] = unet_step(k) + ((ref_step + (k * n - 1) * proj) if official_pattern else 0)
    out["vae_decode"] = count_flops(vae.decode, torch.empty(n, cfg.vae.z_dim, h, w, device=dev, dtype=f16))
    crops = torch.empty(r, 3, REFERENCE_SIZE, REFERENCE_SIZE, device=dev, dtype=f16)
    out["encode_references"] = count_flops(vae.encode, crops)
    steps = plan(workload.steps, workload.request().guidance)
    n2 = sum(not s.three_way for s in steps)
    out["loop"] = n2 * out["unet_2way_step"] + (len(steps) - n2) * out["unet_3way_step"]
    out["loop"] += len(steps) * out["reference_net_step"]
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


__all__ = ["W768", "Identity", "OfficialPatternDenoiser", "Workload", "count_flops", "loop_flops"]
