"""`build`, `generate --engines` and `verify` end to end on the tiny preset through the doubles.

The doubles (tests/fakes) run every engine as its exported ONNX graph on ONNX Runtime's CPU
provider, with the CUDA runtime's streams, copies and graphs enforced as on a GPU: what this proves
is that the engine runtime (buffers, addresses, contexts, captured graphs, caches) computes what
the ONNX Runtime backend computes. The numbers are ONNX Runtime's, never TensorRT's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from flashface_trt.cli import main
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.pipeline import generate, register_identity

from .trt_support import max_diff, pixels, request

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy", reason="engines are built through polygraphy's API (the trt extra)")


def test_generate_with_engines_matches_onnx_runtime_across_identities_prompts_and_sizes(
    fakes, engines, tiny_export
):
    from flashface_trt.runtime.backends.ort import OrtBackend
    from flashface_trt.runtime.backends.trt import TrtBackend

    trt, ort = TrtBackend(engines), OrtBackend(tiny_export)
    faces = {
        "A": [synthetic_face(200, seed=0)],
        "B": [synthetic_face(200, seed=5), synthetic_face(200, seed=6)],
    }
    ids = {k: (register_identity(trt, f), register_identity(ort, f)) for k, f in faces.items()}
    refnet = trt.engines["reference_net"].engine  # the double counts its executions
    p1, p2 = {"prompt": "a man"}, {"prompt": "a woman in a red hat", "face_bbox": (0.1, 0.2, 0.5, 0.7)}
    small = {"size": (64, 96), "num_samples": 2}
    runs = [
        ("A", p1),
        ("B", p1),
        ("A", p2),
        ("A", {**p1, **small}),
        ("B", {**p1, **small}),
        ("A", {**p2, **small}),
        ("B", p2),  # back to the first size: its graphs replay after the second size's ran
    ]
    seen: dict[tuple, np.ndarray] = {}
    rows = []
    for who, kw in runs:
        before = (trt.graphs.captures, fakes.cuda.launches, trt.kv_cache.hits, refnet.runs)
        req = request(**kw)
        got, want = generate(trt, req, ids[who][0]), generate(ort, req, ids[who][1])
        after = (trt.graphs.captures, fakes.cuda.launches, trt.kv_cache.hits, refnet.runs)
        row = dict(
            zip(("captures", "launches", "kv_hits", "refnet_runs"), map(int, np.subtract(after, before)))
        )
        rows.append(
            {
                "identity": who,
                "prompt": req.prompt,
                "size": (req.height, req.width, req.num_samples),
                "max_diff": max_diff(got, want),
                **row,
            }
        )
        seen[(who, req.prompt, req.height)] = pixels(want)
    for r in rows:
        print(r)
    assert all(r["max_diff"] <= 1 for r in rows)  # 1/255: the CPU provider's summation order
    steps = request().steps
    first, second_identity, new_prompt = rows[0], rows[1], rows[2]
    assert (
        first["captures"] == 2 and first["launches"] == steps - 2
    )  # 2-way and 3-way: eager, capture, replay
    assert second_identity["captures"] == 0 and second_identity["launches"] == steps  # replays only...
    # ...of B's new K/V, all computed on admission, as many timesteps per call as the engine's profile takes
    chunk = trt.reference_groups(4)
    assert chunk == trt.specs["reference_net"].axes["groups"].max == 4
    assert second_identity["refnet_runs"] == math.ceil(steps / chunk)
    assert not np.array_equal(seen[("A", "a man", 64)], seen[("B", "a man", 64)])  # so B's K/V were read
    assert new_prompt["captures"] == 0 and new_prompt["launches"] == steps
    assert new_prompt["kv_hits"] == steps and new_prompt["refnet_runs"] == 0  # A's K/V from the cache
    assert not np.array_equal(seen[("A", "a man", 64)], seen[("A", p2["prompt"], 64)])  # prompt, mask read
    assert rows[3]["captures"] == 2 and rows[4]["captures"] == rows[5]["captures"] == 0  # the second size
    assert rows[5]["kv_hits"] == steps and rows[6]["captures"] == 0 and rows[6]["launches"] == steps
    assert not fakes.cuda.faults


def test_cli_build_generate_and_verify_through_the_doubles(fakes, tiny_export, tmp_path, capsys):
    out = tmp_path / "engines"
    before = len(fakes.builds)  # the module's engines, if another test of this process built them
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out)]) == 0
    assert len(fakes.builds) == before + 6  # every network built
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out)]) == 0  # cached: nothing rebuilt
    assert len(fakes.builds) == before + 6
    common = ["--prompt", "a man", "--steps", "6", "--step-to-launch", "500", "--seed", "3"]
    assert main(["generate", "--engines", str(out), *common, "--out", str(tmp_path / "trt.png")]) == 0
    assert main(["generate", "--onnx", str(tiny_export), *common, "--out", str(tmp_path / "ort.png")]) == 0
    images = [Image.open(tmp_path / f"{n}.png") for n in ("trt", "ort")]
    assert images[0].size == (128, 128) and max_diff(images[:1], images[1:]) <= 1
    capsys.readouterr()
    assert main(["verify", "--engines", str(out), "--onnx", str(tiny_export)]) == 0
    table = capsys.readouterr().out
    assert "unet" in table and "EXCEEDED" not in table and table.count("\n") >= 9


@pytest.mark.parametrize(
    ("network", "scale", "named"), [("unet", 1.05, "unet.eps"), ("step", 1.0001, "step.x_next")]
)
def test_verify_exits_2_naming_a_network_over_its_bound(
    fakes, engines, tiny_export, capsys, network, scale, named
):
    fakes.trt.tamper[network] = lambda name, value: value * scale  # a wrong engine
    try:
        assert main(["verify", "--engines", str(engines), "--onnx", str(tiny_export)]) == 2
    finally:
        fakes.trt.tamper.clear()
    captured = capsys.readouterr()
    assert "EXCEEDED" in captured.out and named in captured.err
    assert captured.out.count("EXCEEDED") == 1  # only the tampered network
