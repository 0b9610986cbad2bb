"""Time the official implementation itself (ali-vilab/FlashFace), given a path to its source.

Only for measuring: the official modules are built with random weights at the sizes of our model
config and run the demo's sampling call (`ContextGaussianDiffusion.sample`, DDIM, trailing).
Nothing from the official source is copied here; it is imported from `--official-src`.

    python -m benchmarks.official --official-src ../FlashFace --preset tiny --device cpu --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import torch

from flashface_trt.models.config import SD15, TINY, ModelConfig

from .workload import Workload, sync


def import_official(src: Path):
    """(sd_v1_ref_unet, ContextGaussianDiffusion, noise_schedule) without running `ldm/__init__`.

    `ldm/__init__` imports the CLIP/RetinaFace/data modules (and torchvision); the sampler needs
    none of them, so the packages are registered empty and only the needed modules are imported.
    """
    src = Path(src).resolve()
    for pkg in ("ldm", "ldm.models", "ldm.ops"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(src / pkg.replace(".", "/"))]
        sys.modules.setdefault(pkg, mod)
    sys.path.insert(0, str(src))
    sys.path.insert(0, str(src / "flashface" / "all_finetune"))
    ref_unet = importlib.import_module("models.reference_unet")
    ctx_diff = importlib.import_module("ops.context_diffusion")
    schedules = importlib.import_module("ldm.ops.schedules")
    return ref_unet.sd_v1_ref_unet, ctx_diff.ContextGaussianDiffusion, schedules.noise_schedule


def five_channel_input(unet) -> None:
    """Latent + face-mask input conv: the 4-channel conv's weights, a zero 5th channel."""
    old = unet.encoder[0]
    new = torch.nn.Conv2d(5, old.out_channels, 3, padding=1, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :4].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.ori_encoder[0] = new


@contextlib.contextmanager
def cpu_for_cuda_calls(device: str):
    """On the CPU, the official forward's hard-coded `.cuda()` calls become no-ops."""
    if device != "cpu":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def official_unet(make_unet, cfg: ModelConfig, device: str):  # type: ignore[no-untyped-def]
    """The official UNet at `cfg`'s sizes, random weights, with FlashFace's 5-channel input, eval mode."""
    u = cfg.unet
    with torch.device(device):
        unet = make_unet(
            pretrained=False,
            dim=u.dim,
            context_dim=u.context_dim,
            dim_mult=list(u.dim_mult),
            num_heads=u.num_heads,
            num_res_blocks=u.num_res_blocks,
            attn_scales=list(u.attn_scales),
        )
    five_channel_input(unet)  # what the official `replace_input_conv` does, at this config's width
    return unet.eval().requires_grad_(False).to(device)


def time_official(src: Path, cfg: ModelConfig, workload: Workload, device: str, repeats: int = 2) -> dict:
    """Median seconds of the official denoising loop for `workload` (random weights)."""
    make_unet, Diffusion, noise_schedule = import_official(src)
    u = cfg.unet
    unet = official_unet(make_unet, cfg, device)
    sigmas = noise_schedule(schedule="scaled_linear", n=1000, beta_min=0.00085, beta_max=0.012)
    diffusion = Diffusion(sigmas=sigmas, prediction_type="eps")
    req = workload.request()
    g = req.guidance
    n, h, w = workload.samples, workload.height // 8, workload.width // 8
    lat_ref = workload.ref_size // 8
    lat = torch.randn(max(workload.refs, 4), 4, lat_ref, lat_ref, device=device)
    ctx = torch.randn(1, 77, u.context_dim, device=device)
    cache = unet.share_cache
    cache.update(
        num_pairs=4,
        ref=lat,
        similarity=torch.tensor(g.ref_strength, device=device),
        ori_similarity=torch.tensor(g.ref_strength, device=device),
        lamda_feat_before_ref_guidence=torch.tensor(g.ref_strength_before, device=device),
        ref_context=ctx.repeat(len(lat), 1, 1),
        masks=torch.ones(n, h, w, device=device),
        classifier=g.face_guidance,
        step_to_launch_face_guidence=g.step_to_launch,
    )
    diffusion.classifier = g.face_guidance
    diffusion.num_pairs = 4
    c, nc = {"context": ctx.repeat(n, 1, 1)}, {"context": ctx.repeat(n, 1, 1)}
    times = []
    for _ in range(repeats + 1):
        cache["ori_similarity"] = torch.tensor(g.ref_strength, device=device)
        noise = torch.randn(n, 4, h, w, device=device)
        sync(torch.device(device))
        t0 = time.perf_counter()
        amp = torch.autocast(device, dtype=torch.float16, enabled=device == "cuda")
        with amp, torch.no_grad(), cpu_for_cuda_calls(device):
            diffusion.sample(
                solver="ddim",
                noise=noise,
                model=unet,
                model_kwargs=[c, nc],
                steps=workload.steps,
                guide_scale=g.text_guidance,
                guide_rescale=g.guide_rescale,
                show_progress=False,
                discretization="trailing",
            )
        sync(torch.device(device))
        times.append(time.perf_counter() - t0)
    return {"loop_seconds_median": sorted(times[1:])[len(times[1:]) // 2], "runs": times[1:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official-src", type=Path, required=True, help="a checkout of ali-vilab/FlashFace")
    p.add_argument("--preset", choices=["tiny", "sd15"], default="sd15")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cfg = TINY if args.preset == "tiny" else SD15
    workload = Workload(args.height, args.width, 4, args.steps, args.samples)
    result = time_official(args.official_src, cfg, workload, args.device, args.repeats)
    record = {"official": result, "workload": asdict(workload), "device": args.device, "preset": args.preset}
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
