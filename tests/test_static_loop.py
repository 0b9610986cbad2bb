"""The static (CUDA-graph capturable) PyTorch loop: same result as the plain sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashface_trt.models.backend import TorchBackend
from flashface_trt.models.loading import tiny_models
from flashface_trt.models.static_loop import StaticLoop
from flashface_trt.runtime.images import synthetic_face
from flashface_trt.runtime.pipeline import generate, register_identity
from flashface_trt.runtime.request import GenerationRequest
from flashface_trt.runtime.sampler import plan, sample

from .conftest import rel_err
from .test_sampler import oracle_guidance


@pytest.mark.parametrize("rescale", [0.5, 0.0])
def test_static_loop_matches_the_sampler(rescale):
    models = tiny_models()
    faces = [synthetic_face(150, seed=i) for i in range(2)]
    req = GenerationRequest(prompt="a man", steps=6, height=64, width=48, num_samples=2, seed=5)
    req = req.validated()
    req = type(req)(**{**req.__dict__, "guidance": type(req.guidance)(guide_rescale=rescale)})
    plain = generate(TorchBackend(models, static_loop=False), req, faces)
    static_backend = TorchBackend(models, static_loop=True)
    static = generate(static_backend, req, faces)
    for a, b in zip(plain, static):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        print(f"\nstatic loop vs sampler (rescale {rescale}): max pixel diff {diff.max()}")
        assert diff.max() <= 1
    assert len(static_backend.loops) == 1
    other = generate(static_backend, GenerationRequest(**{**req.__dict__, "prompt": "a woman"}), faces)
    assert len(static_backend.loops) == 1  # same shapes and identity: the loop is reused, new prompt loaded
    ref = generate(
        TorchBackend(models, static_loop=False),
        GenerationRequest(**{**req.__dict__, "prompt": "a woman"}),
        faces,
    )
    assert np.abs(np.asarray(other[0], np.int16) - np.asarray(ref[0], np.int16)).max() <= 1


@pytest.mark.oracle
def test_static_loop_reproduces_the_official_runs(oracle_dir, oracle_config):
    d = np.load(oracle_dir / "unet_cases.npz")
    from flashface_trt.models.backend import TorchDenoiser
    from flashface_trt.models.config import ModelConfig
    from flashface_trt.models.loading import build_loaded
    from flashface_trt.models.unet import unet_state
    from flashface_trt.models.weights import read_checkpoint
    from flashface_trt.runtime.identities import Identity

    cfg = ModelConfig.from_dict(oracle_config)
    path = oracle_dir / "flashface_unet.ckpt"
    unet = build_loaded(
        "unet", cfg, unet_state(read_checkpoint(path), str(path)), str(path), "cpu", torch.float32
    )
    g = oracle_guidance(oracle_config)
    den = TorchDenoiser(
        unet,
        torch.from_numpy(d["pos_context"]),
        torch.from_numpy(d["neg_context"]),
        Identity("oracle", torch.from_numpy(d["ref_latents"])),
        torch.from_numpy(d["mask"])[None, None],
        g,
    )
    runs = sorted(int(k[6:-3]) for k in d.files if k.startswith("sample") and k.endswith("/z0"))
    for steps in runs:
        noise = torch.from_numpy(d[f"sample{steps}/noise"])
        loop = StaticLoop(den, tuple(noise.shape), plan(steps, g), cuda_graph=False)
        loop.load(den, plan(steps, g))
        z0 = loop.run(noise)
        with torch.inference_mode():
            z_plain = sample(den, noise, plan(steps, g))
        err, err_plain = rel_err(z0.numpy(), d[f"sample{steps}/z0"]), rel_err(z0.numpy(), z_plain.numpy())
        print(f"\nstatic loop sample{steps}: rel err vs official {err:.2e}, vs plain sampler {err_plain:.2e}")
        assert err <= 1e-3 and err_plain <= 1e-5


def test_static_loop_cuda_graph_replay():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    models = tiny_models("cuda", torch.float16)
    faces = [synthetic_face(150)]
    req = GenerationRequest(prompt="a man", steps=5, height=64, width=64).validated()
    backend = TorchBackend(models, static_loop=True)
    identity = register_identity(backend, faces)
    first = generate(backend, req, identity)  # capture
    second = generate(backend, req, identity)  # replay
    eager = generate(TorchBackend(models, static_loop=False), req, faces)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(second[0]))
    assert np.abs(np.asarray(first[0], np.int16) - np.asarray(eager[0], np.int16)).max() <= 2
    assert all(loop.graph is not None for loop in backend.loops.values())
