"""The static (CUDA-graph capturable) PyTorch batched step: bit for bit the plain step on the CPU."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashface_trt.models.backend import TorchBackend, TorchSettings
from flashface_trt.models.config import TINY
from flashface_trt.models.loading import tiny_models
from flashface_trt.models.static_step import StaticSteps
from flashface_trt.models.unet import FlashFaceUNet
from flashface_trt.runtime.backends.graphs import StepGraphs
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.batch import Member, RequestContext
from flashface_trt.runtime.sampling.identities import Identity, ReferenceKVCache
from flashface_trt.runtime.sampling.pipeline import generate, register_identity
from flashface_trt.runtime.sampling.prepare import prepare, stepper
from flashface_trt.runtime.sampling.request import GenerationRequest
from flashface_trt.runtime.sampling.sampler import GuidanceParams, plan, sample

from .conftest import rel_err
from .test_sampler import oracle_request


@pytest.mark.parametrize("rescale", [0.5, 0.0])
def test_static_step_matches_the_sampler(rescale):
    """Same latents bit for bit, same images; one shape's buffers serve a new prompt and identity."""
    models = tiny_models()
    faces = [synthetic_face(150, seed=i) for i in range(2)]
    g = GuidanceParams(guide_rescale=rescale)
    req = GenerationRequest(prompt="a man", steps=6, height=64, width=48, num_samples=2, seed=5, guidance=g)
    plain_backend = TorchBackend(models, TorchSettings(static_loop=False))
    static_backend = TorchBackend(models, TorchSettings(static_loop=True))
    for prompt, seed in (("a man", 0), ("a woman", 1)):  # the second reuses the buffers, new values loaded
        r = replace(req, prompt=prompt)
        faces_r = [synthetic_face(150, seed=seed + i) for i in range(2)]
        z_plain = _z0(plain_backend, r, faces_r)
        z_static = _z0(static_backend, r, faces_r)
        print(
            f"\nstatic step vs plain denoiser ({prompt}, rescale {rescale}): max diff "
            f"{(z_static - z_plain).abs().max().item():.1e}"
        )
        torch.testing.assert_close(z_static, z_plain, rtol=0, atol=0)
    assert len(static_backend.static_steps.batches) == 2  # one bucket per batch layout (2-way, 3-way)
    images = generate(static_backend, req, faces)
    ref = generate(plain_backend, req, faces)
    for a, b in zip(images, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _z0(backend, req, faces):
    """z0 of a request through `prepare`, the backend's step of it alone and the shared loop."""
    p = prepare(backend, req, faces)
    return sample(stepper(backend, p.ctx), p.x, p.steps)


def test_interleaved_requests_keep_their_own_values():
    """Two requests of one shape stepped alternately: each gets its own prompt, mask and x."""
    models = tiny_models()
    backend = TorchBackend(models, TorchSettings(static_loop=True))
    g = GuidanceParams()
    steps = plan(4, g)
    identity = register_identity(backend, [synthetic_face(150)])
    ids = backend.tokenizer.encode(["a man", "a woman", "blurry"])
    text = backend.encode_text(ids)
    mask_a, mask_b = np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32)
    a = stepper(backend, RequestContext(text[[0, 2]], identity, backend.mask_from_host(mask_a), g, ""))
    b = stepper(backend, RequestContext(text[[1, 2]], identity, backend.mask_from_host(mask_b), g, ""))
    xa = xb = backend.from_numpy(np.ones((1, 4, 8, 8), np.float32))
    for step in steps:
        xa, xb = a(xa, step), b(xb, step)
    plain = TorchBackend(models, TorchSettings(static_loop=False))
    ones = torch.ones(1, 4, 8, 8)
    ctx_a = RequestContext(text[[0, 2]], identity, plain.mask_from_host(mask_a), g, "")
    ctx_b = RequestContext(text[[1, 2]], identity, plain.mask_from_host(mask_b), g, "")
    ref_a, ref_b = sample(stepper(plain, ctx_a), ones, steps), sample(stepper(plain, ctx_b), ones, steps)
    torch.testing.assert_close(xa, ref_a, rtol=0, atol=0)
    torch.testing.assert_close(xb, ref_b, rtol=0, atol=0)


@pytest.mark.oracle
def test_static_step_reproduces_the_official_runs(oracle_dir, oracle_config):
    static, ctx, d = oracle_request(oracle_dir, oracle_config, TorchSettings(static_loop=True))
    plain = TorchBackend(static.models, TorchSettings(static_loop=False))
    g = ctx.guidance
    runs = sorted(int(k[6:-3]) for k in d.files if k.startswith("sample") and k.endswith("/z0"))
    for steps in runs:
        noise = torch.from_numpy(d[f"sample{steps}/noise"])
        z0 = sample(stepper(static, ctx), noise, plan(steps, g))
        z_plain = sample(stepper(plain, ctx), noise, plan(steps, g))
        err = rel_err(z0.numpy(), d[f"sample{steps}/z0"])
        print(f"\nstatic step sample{steps}: rel err vs official {err:.2e}, vs plain: bitwise")
        assert err <= 1e-3
        torch.testing.assert_close(z0, z_plain, rtol=0, atol=0)


def test_static_step_cuda_graph_replay():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    models = tiny_models("cuda", torch.float16)
    faces = [synthetic_face(150)]
    req = GenerationRequest(prompt="a man", steps=5, height=64, width=64).validated()
    backend = TorchBackend(models, TorchSettings(static_loop=True))
    identity = register_identity(backend, faces)
    steps_seen = []
    first = generate(backend, req, identity, on_step=lambda k, n: steps_seen.append(k))
    second = generate(backend, req, identity)  # replays only
    eager = generate(TorchBackend(models, TorchSettings(static_loop=False)), req, faces)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(second[0]))
    assert np.abs(np.asarray(first[0], np.int16) - np.asarray(eager[0], np.int16)).max() <= 2
    assert backend.graphs.captures == 2 and len(steps_seen) == req.steps  # a 2-way and a 3-way bucket


class HostWork(TorchDispatchMode):
    """Records every op that would break CUDA-graph capture: host syncs and tensors off the loop device."""

    SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim"}

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.found, self.ops = device, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops += 1
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in self.SYNCS or any(t.device != self.device for t in tensors):
            self.found.append(name)
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves(out)
        if any(isinstance(t, torch.Tensor) and t.device != self.device for t in leaves):
            self.found.append(f"{name} -> host")
        return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_step_is_graph_capturable(channels_last):
    """The static step's body on the meta device: no .item(), no host tensors, no data-dependent shapes.

    Meta tensors have no values, so any host sync fails or is recorded: what a CUDA-graph capture
    needs, checked without a GPU (the capture itself runs in test_static_step_cuda_graph_replay).
    Two requests at different steps (one 2-way, one 3-way) share the batch. Before the body, a
    step copies the batch's values into the static tensors: device copies and small host index
    arrays (pinned, asynchronous on a GPU).
    """
    meta = torch.device("meta")
    cfg = TINY
    with meta:
        unet = FlashFaceUNet(cfg.unet).eval()
        if channels_last:
            unet.to_channels_last()
        texts = torch.empty(2, cfg.text.text_len, cfg.unet.context_dim)
        ident = Identity("meta", torch.empty(3, cfg.unet.ref_in_dim, 8, 8))
        other = Identity("meta2", torch.empty(3, cfg.unet.ref_in_dim, 8, 8))
        mask = torch.empty(1, 1, 8, 6)
        x = torch.empty(2, 4, 8, 6)
    g = GuidanceParams()
    steps = plan(5, g)  # 999, then 799 (2-way) and 599, 399, 199 (3-way)
    members = [
        Member(RequestContext(texts, ident, mask, g), x, steps[1]),
        Member(RequestContext(texts, other, mask, g), x[:1], steps[3]),
    ]
    assert {m.step.three_way for m in members} == {False, True}  # both layouts in one batch
    static = StaticSteps(unet, ReferenceKVCache(), StepGraphs(None), 4)
    with torch.inference_mode():
        static(members)  # makes and loads the static tensors
        (batch,) = static.batches.values()
        with HostWork(meta) as mode:
            batch.body()
    print(f"\nbatched step body on the meta device: {mode.ops} ops, host work: {mode.found}")
    assert mode.found == [] and mode.ops > 100
    x, host = torch.zeros(2, device=meta), torch.tensor(1.0)
    with HostWork(meta) as probe:  # the probe sees host work when there is some
        _ = x + host
        with pytest.raises(NotImplementedError):  # meta tensors have no values to sync
            x.nonzero()
    assert probe.found == ["aten::add", "aten::nonzero"]
