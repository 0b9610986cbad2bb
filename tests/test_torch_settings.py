"""PyTorch backend options (channels-last, torch.compile): same results as the plain backend."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flashface_trt.models.backend import TorchBackend, TorchSettings
from flashface_trt.models.config import TINY
from flashface_trt.models.loading import random_models, tiny_models
from flashface_trt.models.settings import TORCH_PRESETS
from flashface_trt.models.unet_blocks import RefInputs
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.pipeline import generate
from flashface_trt.runtime.sampling.request import GenerationRequest


@pytest.mark.parametrize(
    ("field", "value"), [("compile_mode", "reduce-overhead"), ("kv_cache_bytes", -1), ("max_shapes", 0)]
)
def test_settings_out_of_range_are_named(field, value):
    with pytest.raises(InputError, match=f"{field}.*{value}"):
        TorchBackend(tiny_models(), TorchSettings(**{field: value}))


def _unet_inputs(models, batch: int = 3, refs: int = 2):
    """One 3-way UNet call's inputs on the tiny model: x, mask, t, context, reference K/V."""
    g = torch.Generator().manual_seed(0)
    cfg = models.config.unet
    x = torch.randn(batch, cfg.out_dim, 8, 6, generator=g)
    mask = torch.ones(1, 1, 8, 6)
    t = torch.full((batch,), 700)
    ctx = torch.randn(batch, models.config.text.text_len, cfg.context_dim, generator=g)
    lat = torch.randn(refs, cfg.ref_in_dim, 8, 8, generator=g)
    with torch.inference_mode():
        kv = models.unet.reference_kv(models.unet.reference_features(lat, t[:1], ctx[:1]))
    return x, mask, t, ctx, RefInputs(kv, torch.full((1,), 0.85))


def test_channels_last_matches_the_default_layout():
    """NHWC convolutions: same eps (float32 rounding) and the same images as the NCHW backend."""
    plain, nhwc = tiny_models(), tiny_models()
    backend = TorchBackend(nhwc, TORCH_PRESETS["channels-last"])
    conv = backend.unet.head[-1].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    inputs = _unet_inputs(plain)
    with torch.inference_mode():
        want, got = plain.unet(*inputs), backend.unet(*inputs)
    assert got.is_contiguous(memory_format=torch.channels_last)
    print(f"\nchannels-last eps: max abs diff {(got - want).abs().max():.2e}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    req = GenerationRequest(prompt="a man", steps=4, height=64, width=48).validated()
    faces = [synthetic_face(150, seed=1)]
    a = generate(TorchBackend(plain, TORCH_PRESETS["eager"]), req, faces)[0]
    b = generate(backend, req, faces)[0]
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


# The tiny UNet cut to two levels (attention on the first only): every kind of block (convolution
# and attention blocks, down/upsampling, the reference branch) at half the count.
TWO_LEVEL_CONFIG = dataclasses.replace(
    TINY, unet=dataclasses.replace(TINY.unet, dim_mult=(1, 2), attn_scales=(1.0,))
)
# ... and to one level for torch.compile: inductor compiles one C++ kernel per distinct fused
# operation and shape (over 1 s each on these CPUs); one level keeps what is ours to get right
# (the reference branch's inputs and guards, attention, skips, the middle block) with fewer kernels.
COMPILED_TEST_CONFIG = dataclasses.replace(
    TINY, unet=dataclasses.replace(TINY.unet, dim_mult=(1,), attn_scales=(1.0,))
)


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    """torch.compile (inductor) of the UNet forward: the steps call it, the ReferenceNet stays eager.

    Inductor's CPU kernels are compiled scalar (no SIMD): its vectorizer is PyTorch's code, and the
    GPU path this stands in for generates Triton instead. Cold cache, alone on the 2-core machine:
    29 s, against 50 s for the two-level UNet with SIMD kernels.
    """
    import torch._inductor.config

    models = random_models(COMPILED_TEST_CONFIG)
    backend = TorchBackend(models, TORCH_PRESETS["compiled"])
    assert backend.unet is not models.unet
    assert backend.unet.reference_kv.__self__ is models.unet  # eager ReferenceNet through the wrapper
    inputs = _unet_inputs(models)
    with torch.inference_mode(), torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        want, got = models.unet(*inputs), backend.unet(*inputs)
    print(f"\ncompiled eps: max abs diff {(got - want).abs().max():.2e}")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert backend.static_steps.unet is backend.unet  # the steps call the compiled forward
