"""The trailing DDIM schedule, disentangled guidance and whole sampling runs against the oracle."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from flashface_trt.models.backend import TorchBackend
from flashface_trt.models.config import ModelConfig
from flashface_trt.models.loading import build_loaded, tiny_models
from flashface_trt.models.settings import TorchSettings
from flashface_trt.models.unet import unet_state
from flashface_trt.models.weights import read_checkpoint
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.sampling.batch import RequestContext
from flashface_trt.runtime.sampling.guidance import STEP_COEFFICIENTS, guided_eps, step_update
from flashface_trt.runtime.sampling.identities import Identity
from flashface_trt.runtime.sampling.prepare import step_eps, step_x0, stepper
from flashface_trt.runtime.sampling.sampler import GuidanceParams, plan, sample, single_step
from flashface_trt.runtime.sampling.schedule import ddim_steps, scaled_linear_sigmas, trailing_timesteps

from .conftest import rel_err


def oracle_guidance(cfg: dict) -> GuidanceParams:
    p = cfg["params"]
    return GuidanceParams(
        text_guidance=p["text_guidance"],
        face_guidance=p["face_guidance"],
        ref_strength=p["lamda_feat"],
        ref_strength_before=p["lamda_feat_before"],
        step_to_launch=p["step_to_launch"],
        guide_rescale=p["guide_rescale"],
    )


@pytest.mark.oracle
def test_trailing_timesteps_match_official(oracle_config):
    for steps, expected in oracle_config["timesteps_trailing"].items():
        assert [s.t for s in ddim_steps(int(steps))] == expected, steps


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 16, 25, 30, 35, 48, 50, 64, 99, 100, 128, 250, 333, 500, 1000])
def test_trailing_timesteps_follow_exact_arithmetic(steps):
    """Integer timesteps = round(999 - k*1000/N); at exact .5 ties either neighbour (float32 decides)."""
    got = [s.t for s in ddim_steps(steps)]
    assert len(got) == steps
    for k, t in enumerate(got):
        exact = 999 - k * 1000 / steps
        if abs(exact - math.floor(exact) - 0.5) < 1e-3:
            assert t in (math.floor(exact), math.ceil(exact))
        else:
            assert t == round(max(exact, 0.0)), (k, exact, t)


def test_schedule_values():
    s = scaled_linear_sigmas()
    betas = 1 - (1 - s**2) / np.concatenate([[1.0], 1 - s[:-1] ** 2])
    np.testing.assert_allclose(np.sqrt(betas[[0, -1]]), [0.00085**0.5, 0.012**0.5], rtol=1e-9)
    steps = ddim_steps(30)
    assert steps[-1].s_next == 0.0 and steps[-1].a_next == 1.0
    assert all(a.s_next == b.s_cur for a, b in zip(steps, steps[1:]))
    with pytest.raises(InputError, match="steps=0"):
        trailing_timesteps(0)


def test_plan_follows_launch_rule():
    g = GuidanceParams()
    p = plan(30, g)
    assert sum(not s.three_way for s in p) == 8 and sum(s.three_way for s in p) == 22
    assert all(s.ref_strength == (g.ref_strength if s.three_way else g.ref_strength_before) for s in p)
    assert all(s.three_way == (s.t <= 750) for s in p)
    # without face guidance the official sampler stays 2-way, switching λ at the launch
    p0 = plan(30, GuidanceParams(face_guidance=0.0))
    assert not any(s.three_way for s in p0)
    assert [s.ref_strength for s in p0] == [1.2 if s.t <= 750 else 0.85 for s in p0]
    assert p[0].layout(4).ref_rows == 8 and p[-1].layout(4).ref_rows == 4


def _reference_guide(eps: np.ndarray, n: int, three_way: bool, g: GuidanceParams) -> np.ndarray:
    """Independent NumPy statement of the official guidance (float64)."""
    eps = eps.astype(np.float64)
    if three_way:
        yr, y, u = eps[:n], eps[n : 2 * n], eps[2 * n :]
        out = u + g.text_guidance * (y - u) + g.face_guidance * (yr - y)
    else:
        y, u = eps[:n], eps[n:]
        out = u + g.text_guidance * (y - u)
    ratio = y.reshape(n, -1).std(axis=1, ddof=1) / (out.reshape(n, -1).std(axis=1, ddof=1) + 1e-12)
    return out * (g.guide_rescale * ratio + 1 - g.guide_rescale)[:, None, None, None]


@pytest.mark.parametrize("three_way", [False, True])
def test_guidance_same_on_numpy_and_torch(three_way):
    g = GuidanceParams()
    n = 2
    eps = np.random.default_rng(0).standard_normal(((3 if three_way else 2) * n, 4, 8, 8)).astype(np.float32)
    step = single_step(500 if three_way else 900, g)
    assert step.three_way == three_way
    expected = _reference_guide(eps, n, three_way, g)
    c = step.coefficients(g)
    assert len(c) == len(STEP_COEFFICIENTS)
    np.testing.assert_allclose(guided_eps(eps, n, three_way, c), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        guided_eps(torch.from_numpy(eps), n, three_way, c).numpy(), expected, rtol=1e-5, atol=1e-5
    )


def test_step_update_is_bitwise_the_same_with_tensor_coefficients():
    """Python-float coefficients (plain sampler) and a float32 row (update graphs) give the same bits."""
    rng = np.random.default_rng(3)
    for rescale in (0.0, 0.5, 0.7, 1.0):
        g = GuidanceParams(guide_rescale=rescale, text_guidance=7.3, face_guidance=2.9)
        for step in plan(10, g)[::3]:
            n = 2
            x = torch.from_numpy(rng.standard_normal((n, 4, 6, 5)).astype(np.float32))
            eps = torch.from_numpy(rng.standard_normal((step.layout(n).rows, 4, 6, 5)).astype(np.float32))
            c = step.coefficients(g)
            row = torch.tensor(c, dtype=torch.float32)
            a = step_update(x, eps, step.three_way, c)
            b = step_update(x, eps, step.three_way, [row[i] for i in range(len(c))])
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_loop_is_backend_agnostic():
    """The loop passes each step's x on and sees every step, in order, through `wrap` too."""
    seen, wrapped = [], []

    def denoise(x, step):
        seen.append(step.t)
        return x + 1

    def wrap(steps):
        for s in steps:
            wrapped.append(s.t)
            yield s

    z = sample(denoise, np.zeros((1, 4, 2, 2), np.float32), plan(5, GuidanceParams()), wrap)
    np.testing.assert_array_equal(z, np.full((1, 4, 2, 2), 5.0, np.float32))
    assert seen == wrapped == [s.t for s in ddim_steps(5)]


def test_constant_x0_ends_on_it():
    """A denoiser that always predicts the same x0 must end exactly on it (last step has sigma 0)."""
    target = np.full((1, 4, 2, 2), 0.25, dtype=np.float32)
    g = GuidanceParams()

    def denoise(x, step):
        from flashface_trt.runtime.sampling.guidance import ddim_update

        return ddim_update(x, target, step.coefficients(g))

    z = sample(denoise, np.ones_like(target), plan(5, g))
    np.testing.assert_array_equal(z, target)


def oracle_request(oracle_dir, oracle_config, settings: TorchSettings | None = None):
    """(backend, context, cases) of the oracle UNet and its fixture's prompts, references and mask."""
    cfg = ModelConfig.from_dict(oracle_config)
    path = oracle_dir / "flashface_unet.ckpt"
    unet = build_loaded(
        "unet", cfg, unet_state(read_checkpoint(path), str(path)), str(path), "cpu", torch.float32
    )
    backend = TorchBackend(replace(tiny_models(), config=cfg, unet=unet), settings)  # only its UNet runs
    d = np.load(oracle_dir / "unet_cases.npz")
    texts = torch.from_numpy(np.concatenate([d["pos_context"], d["neg_context"]]))  # [2, 77, C]
    ident = Identity("oracle", torch.from_numpy(d["ref_latents"]))
    mask = backend.mask_from_host(d["mask"])
    return backend, RequestContext(texts, ident, mask, oracle_guidance(oracle_config), ""), d


@pytest.fixture(scope="module")
def oracle_step(oracle_dir, oracle_config):
    return oracle_request(oracle_dir, oracle_config)


@pytest.mark.oracle
@pytest.mark.parametrize("case", ["two_way", "three_way"])
def test_one_guided_step_matches_official(oracle_step, oracle_config, case):
    backend, ctx, d = oracle_step
    step = single_step(int(d[f"{case}/t"][0]), oracle_guidance(oracle_config))
    assert step.three_way == (case == "three_way")
    assert step.ref_strength == pytest.approx(float(d[f"{case}/similarity"]))
    x = torch.from_numpy(d[f"{case}/x"])
    eps = step_eps(backend, ctx, x, step)
    x0 = step_x0(backend, ctx, x, step)
    e1, e2 = rel_err(eps.numpy(), d[f"{case}/eps"]), rel_err(x0.numpy(), d[f"{case}/x0"])
    print(f"{case}: eps rel err {e1:.2e}, x0 rel err {e2:.2e}")
    assert e1 <= 1e-4 and e2 <= 1e-4


@pytest.mark.oracle
def test_whole_sampling_runs_match_official(oracle_step, oracle_config):
    """Every `sampleN/*` case of the fixture: the official DDIM run from its noise."""
    backend, ctx, d = oracle_step
    runs = sorted(
        int(k[len("sample") : -len("/z0")]) for k in d.files if k.startswith("sample") and k.endswith("/z0")
    )
    assert runs, "fixture has no sampling runs"
    for steps in runs:
        noise = torch.from_numpy(d[f"sample{steps}/noise"])
        z0 = sample(stepper(backend, ctx), noise, plan(steps, oracle_guidance(oracle_config)))
        err = rel_err(z0.numpy(), d[f"sample{steps}/z0"])
        print(f"sample{steps}: z0 rel err {err:.2e}")
        assert err <= 1e-3, steps
