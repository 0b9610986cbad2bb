"""Step-level batching: requests of different identities, prompts, guidance, sizes and steps share
UNet calls, join and leave between steps, and each gets the images it would get alone."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from flashface_trt.models.backend import TorchBackend
from flashface_trt.models.config import CUTS
from flashface_trt.models.loading import tiny_models
from flashface_trt.models.settings import TorchSettings
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.batch import Member, RequestContext, pad_plan, plan_batch
from flashface_trt.runtime.sampling.executor import StepExecutor, Stopped, Task
from flashface_trt.runtime.sampling.pipeline import generate, register_identity
from flashface_trt.runtime.sampling.prepare import prepare, stepper
from flashface_trt.runtime.sampling.request import GenerationRequest
from flashface_trt.runtime.sampling.sampler import GuidanceParams, plan, sample

from .conftest import rel_err

BOUND = 1e-5  # float32 CPU: a row's sums may run in another order in a larger batch


@pytest.fixture(scope="module")
def backend():
    return TorchBackend(tiny_models(), TorchSettings(static_loop=False))


def solo_z0(backend, req: GenerationRequest, identity) -> np.ndarray:
    """The request alone: `prepare`, then the sampler loop over the backend's step of it alone."""
    p = prepare(backend, req, identity)
    return backend.to_host(sample(stepper(backend, p.ctx), p.x, p.steps))


def _identities(backend, sizes=(4, 4, 5)):
    return [
        register_identity(backend, [synthetic_face(150, seed=10 * i + j) for j in range(r)])
        for i, r in enumerate(sizes)
    ]


def _requests():
    g = GuidanceParams()
    return [
        GenerationRequest("a man", steps=5, seed=1, height=64, width=64),
        GenerationRequest(
            "a woman",
            negative_prompt="hat",
            steps=4,
            seed=2,
            num_samples=2,
            height=64,
            width=64,
            guidance=replace(g, text_guidance=6.0, face_guidance=2.0, guide_rescale=0.7),
        ),
        GenerationRequest(
            "a child",
            steps=6,
            seed=3,
            height=64,
            width=64,
            face_bbox=(0.0, 0.0, 0.0, 0.0),
            guidance=replace(g, ref_strength=0.9, step_to_launch=850),
        ),
        GenerationRequest(
            "an old man", steps=5, seed=4, height=64, width=64, guidance=replace(g, face_guidance=0.0)
        ),
        GenerationRequest("a man, 5 references", steps=4, seed=5, height=64, width=64),
        GenerationRequest("a tall picture", steps=4, seed=6, height=128, width=64),
    ]


def test_plan_of_a_mixed_batch():
    """Rows, groups, guidance rows and coefficients of a 2-way and a 3-way request, by hand."""
    g = GuidanceParams()
    steps = plan(10, g)
    two, three = steps[0], steps[5]
    assert not two.three_way and three.three_way
    ident = type("Ident", (), {"key": "a", "num_refs": 4, "latents": np.zeros((4, 4, 28, 28))})
    other = type("Ident", (), {"key": "b", "num_refs": 4, "latents": np.zeros((4, 4, 28, 28))})
    a = Member(RequestContext(None, ident, None, g), np.zeros((1, 4, 8, 8)), two)  # rows [c, u]: both ref
    b = Member(RequestContext(None, other, None, g), np.zeros((2, 4, 8, 8)), three)  # [c+r, c, u] x 2
    p = plan_batch([a, b])
    # reference rows first: a's cond, a's uncond, b's cond+ref x 2; then b's cond x 2, uncond x 2
    assert p.sample_rows.tolist() == [0, 0, 1, 2, 1, 2, 1, 2]
    assert p.text_rows.tolist() == [0, 1, 2, 2, 2, 2, 3, 3]
    assert p.member_rows.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert p.t.tolist() == [two.t, two.t] + [three.t] * 6 and p.ref_rows == 4
    assert p.scale.tolist() == pytest.approx([two.ref_strength] * 2 + [three.ref_strength] * 2)
    assert p.group.tolist() == [0, 0, 1, 1] and len(p.groups) == 2
    assert p.guide.tolist() == [[0, 2, 3], [0, 4, 5], [1, 6, 7]]  # y_ref, y, u per sample
    assert p.coef[0, -1] == 0 and p.coef[1, -1] == p.coef[2, -1] == 1  # three_way
    # one encoder per (sample, text): b's cond+ref and cond rows share theirs; one stem per sample
    assert p.enc_rows.tolist() == [0, 1, 2, 6, 3, 7] and p.enc_index.tolist() == [0, 1, 2, 4, 2, 4, 3, 5]
    assert p.stem_rows.tolist() == [0, 2, 3]
    padded = pad_plan(p, 2)
    assert padded.key == (4, 4, 4, 2, 2) and padded.guide[:, :3].tolist() == p.guide.tolist()
    assert padded.enc_rows.tolist() == [0, 1, 2, 6, 3, 7] and padded.stem_rows.tolist() == [0, 2, 3, 0]
    c = replace(b, x=np.zeros((1, 4, 8, 8)))
    with pytest.raises(Exception, match="share size"):
        plan_batch([a, replace(c, x=np.zeros((1, 4, 16, 8)))])


@pytest.mark.parametrize("static", [False, True])
def test_mixed_batches_equal_each_request_alone(backend, static):
    """Different identities (two of 4 references, one of 5), prompts, guidance, sample counts,
    steps and sizes; some join later, one is cancelled midway; each equals its solo run."""
    b = backend if not static else TorchBackend(backend.models, TorchSettings(static_loop=True))
    idents = _identities(b)
    reqs = _requests()
    owners = [idents[0], idents[1], idents[0], idents[1], idents[2], idents[0]]
    cancel_at = {3: 2}  # request 3 is cancelled after its second step
    ex = StepExecutor(b, max_batch_rows=9)
    tasks = []
    for i, (req, ident) in enumerate(zip(reqs, owners)):
        task = Task(req, ident, name=str(i))
        if i in cancel_at:
            task.check = lambda t=task, k=cancel_at[i]: "cancelled: by the test" if t.index >= k else None
        tasks.append(task)
    ex.submit(tasks[0])
    ex.submit(tasks[1])
    ex.run_once()
    ex.run_once()
    for task in tasks[2:]:  # join at different steps of the first ones
        ex.submit(task)
        ex.run_once()
    ex.run()
    assert all(t.done.is_set() for t in tasks)
    assert isinstance(tasks[3].error, Stopped) and tasks[3].index == 2
    assert max(ex.batch_sizes) >= 3, ex.batch_sizes  # requests really shared UNet calls
    for i, task in enumerate(tasks):
        if i in cancel_at:
            continue
        assert task.error is None, task.error
        alone = solo_z0(b, task.request, task.identity)
        z = b.to_host(task.z0)
        err = rel_err(z, alone)
        print(f"\nrequest {i}: z0 rel err vs alone {err:.1e} (bitwise: {np.array_equal(z, alone)})")
        assert z.shape == alone.shape and err <= BOUND


def test_random_arrival_schedules(backend):
    """Property-style: random arrivals, priorities and cancellations; every request ends, each equals
    its solo run."""
    idents = _identities(backend, sizes=(4, 4))
    solo: dict[tuple, np.ndarray] = {}
    for seed in range(3):
        rng = random.Random(seed)
        ex = StepExecutor(backend, max_batch_rows=rng.choice([6, 9, 12]))
        tasks, arrivals = [], []
        for i in range(6):
            req = GenerationRequest(
                f"person {i % 3}",
                steps=rng.choice([3, 4, 5]),
                seed=i % 4,
                num_samples=rng.choice([1, 2]),
                height=64,
                width=64,
                guidance=GuidanceParams(guide_rescale=rng.choice([0.0, 0.5])),
            )
            task = Task(req, idents[i % 2], priority=rng.choice([0, 0, 1]))
            if rng.random() < 0.25:
                k = rng.randint(1, 2)
                task.check = lambda t=task, k=k: "cancelled: random" if t.index >= k else None
            tasks.append(task)
            arrivals.append(rng.randint(0, 6))
        for tick in range(200):
            for task, at in zip(tasks, arrivals):
                if at == tick:
                    ex.submit(task)
            ex.run_once()
            if tick > max(arrivals) and not ex.busy:
                break
        assert all(t.done.is_set() for t in tasks), seed
        for task in tasks:
            if task.error is not None:
                assert isinstance(task.error, Stopped) and task.check is not None
                continue
            key = (task.request, task.identity.key)
            if key not in solo:
                solo[key] = solo_z0(backend, task.request, task.identity)
            assert rel_err(backend.to_host(task.z0), solo[key]) <= BOUND


@pytest.mark.oracle
def test_mixed_batch_on_the_fixture_model(oracle_dir, oracle_config, tmp_path):
    """The official fixture's networks (its sizes and weights): two identities at different steps."""
    from flashface_trt.models.loading import load_models

    from .test_loading import OFFICIAL_NAMES

    for src, dst in OFFICIAL_NAMES.items():
        (tmp_path / dst).symlink_to(oracle_dir / src)
    backend = TorchBackend(load_models(tmp_path), TorchSettings(static_loop=False))
    size = int(oracle_config["image_size"])
    idents = [register_identity(backend, [synthetic_face(120, seed=s)]) for s in (1, 2)]
    reqs = [
        GenerationRequest("a", steps=4, seed=7, height=size, width=size),
        GenerationRequest(
            "b", steps=6, seed=8, height=size, width=size, guidance=GuidanceParams(text_guidance=5.0)
        ),
    ]
    ex = StepExecutor(backend, max_batch_rows=6)
    first = ex.submit(Task(reqs[0], idents[0]))
    ex.run_once()
    second = ex.submit(Task(reqs[1], idents[1]))
    ex.run()
    assert max(ex.batch_sizes) == 2
    for task in (first, second):
        err = rel_err(backend.to_host(task.z0), solo_z0(backend, task.request, task.identity))
        print(f"\nfixture model: z0 rel err vs alone {err:.1e}")
        assert task.error is None and err <= BOUND


def test_a_bad_request_fails_alone_before_any_network(backend, monkeypatch):
    """`prepare` validates first: a bad request ends with InputError naming the value before its
    text is encoded; the request beside it runs, and a single `generate` raises the same error."""
    ident = _identities(backend, (4,))[0]
    encoded = []
    encode = backend.encode_text
    monkeypatch.setattr(backend, "encode_text", lambda ids: encoded.append(len(ids)) or encode(ids))
    bad = Task(GenerationRequest("a man", steps=0, height=64, width=64), ident)
    good = Task(GenerationRequest("a man", steps=2, height=64, width=64), ident)
    StepExecutor(backend).run([bad, good])
    assert isinstance(bad.error, InputError) and "steps=0" in str(bad.error)
    assert good.error is None and len(good.images or []) == 1 and encoded == [2]
    with pytest.raises(InputError, match="face_bbox"):
        generate(backend, replace(good.request, face_bbox=(0.5, 0.5, 0.2, 0.2)), ident)
    assert encoded == [2]


def test_cuts_keep_each_request_z0(backend):
    """The UNet's FLOP cuts (issue 23) against the uncut UNet (same weights), over whole 2-/3-way
    sampling loops of two samples: z0 within 1e-5."""
    uncut = TorchBackend(tiny_models(), TorchSettings(static_loop=False, cuts=()))
    assert backend.models.unet.cuts == set(CUTS) and not uncut.models.unet.cuts
    ident = _identities(backend, sizes=(4,))[0]
    req = replace(_requests()[1], steps=5)
    assert {s.three_way for s in plan(req.steps, req.guidance)} == {False, True} and req.num_samples == 2
    err = rel_err(solo_z0(backend, req, ident), solo_z0(uncut, req, ident))  # equal weights: equal latents
    assert err <= BOUND
