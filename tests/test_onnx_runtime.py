"""ONNX export of every network and the torch-free ONNX Runtime pipeline."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxslim", reason="exports are simplified with onnxslim (the export extra)")

import onnx  # noqa: E402

from flashface_trt.export.exporter import ExportSettings, export_models, export_network  # noqa: E402
from flashface_trt.export.networks import NETWORKS, network_specs  # noqa: E402
from flashface_trt.models.backend import TorchBackend  # noqa: E402
from flashface_trt.models.config import CUTS, ModelConfig  # noqa: E402
from flashface_trt.models.loading import load_models, random_models, tiny_models  # noqa: E402
from flashface_trt.runtime.artifacts.spec import TINY_SHAPES, ExportShapes  # noqa: E402
from flashface_trt.runtime.backends.ort import OrtBackend, OrtSettings, Session  # noqa: E402
from flashface_trt.runtime.faces.images import synthetic_face  # noqa: E402
from flashface_trt.runtime.sampling.batch import Member, RequestContext, plan_batch  # noqa: E402
from flashface_trt.runtime.sampling.guidance import step_update  # noqa: E402
from flashface_trt.runtime.sampling.identities import Identity, ReferenceKVCache, kv_key  # noqa: E402
from flashface_trt.runtime.sampling.pipeline import generate, register_identity  # noqa: E402
from flashface_trt.runtime.sampling.prepare import step_eps, step_x0  # noqa: E402
from flashface_trt.runtime.sampling.request import GenerationRequest  # noqa: E402
from flashface_trt.runtime.sampling.sampler import GuidanceParams, plan, single_step  # noqa: E402

from .conftest import REPO, rel_err, run_without_torch, shared_dir  # noqa: E402
from .test_sampler import oracle_guidance  # noqa: E402
from .test_torch_settings import TWO_LEVEL_CONFIG  # noqa: E402

REQUEST = GenerationRequest(prompt="a woman with a hat", steps=4, height=96, width=64, num_samples=2, seed=3)


def _faces():
    return [synthetic_face(180, seed=i) for i in range(3)]


def test_onnx_runtime_pipeline_matches_torch(tiny_export):
    ours = generate(OrtBackend(tiny_export), REQUEST, _faces())
    ref = generate(TorchBackend(tiny_models()), REQUEST, _faces())
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref):
        assert a.size == b.size == (64, 96)
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        print(
            f"\nONNX Runtime vs PyTorch image: max pixel diff {diff.max()}, differing {(diff > 0).mean():.2%}"
        )
        assert diff.max() <= 2  # float32 rounding of two runtimes; the decoded uint8 may flip by one


def test_identity_cache_skips_the_reference_net(tiny_export):
    backend = OrtBackend(tiny_export, OrtSettings(prefetch_images=0))  # one call per step (`test_prefetch`)
    identity = register_identity(backend, _faces(), ["a.jpg", "b.jpg", "c.jpg"])
    first = generate(backend, REQUEST, identity)
    assert backend.kv_cache.stats()["misses"] == REQUEST.steps and backend.kv_cache.hits == 0
    calls = []
    ref_net = backend.sessions["reference_net"]
    original = ref_net.run
    ref_net.run = lambda **kw: calls.append(1) or original(**kw)  # type: ignore[method-assign]
    again = generate(backend, REQUEST, identity)
    assert calls == [] and backend.kv_cache.hits == REQUEST.steps
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other_negative = generate(
        backend, GenerationRequest(**{**REQUEST.__dict__, "negative_prompt": "hat"}), identity
    )
    assert len(calls) == REQUEST.steps and len(other_negative) == 2  # new negative prompt: new K/V


def test_kv_cache_lru_budget():
    cache = ReferenceKVCache(budget_bytes=3 * 400)
    for i in range(4):
        cache.put(i, [np.zeros(50, np.float32), np.zeros(50, np.float32)])  # 400 bytes each
    assert len(cache) == 3 and cache.evictions == 1 and cache.bytes == 1200
    assert cache.get(0) is None and cache.get(1) is not None
    cache.put(4, [np.zeros(100, np.float32)])  # evicts 2, the least recently used (1 was just read)
    assert cache.get(2) is None and cache.get(1) is not None
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 2
    cache.put(5, np.zeros(1000, np.float32))  # larger than the whole budget: not kept
    assert cache.get(5) is None


def test_export_is_reused_and_stale_graphs_are_rebuilt(tiny_export, tmp_path):
    models = tiny_models()
    settings = ExportSettings(shapes=TINY_SHAPES)
    out = tmp_path / "exp"
    shutil.copytree(tiny_export, out)  # an existing export of the same models and settings
    files = {k: v["file"] for k, v in json.loads((out / "manifest.json").read_text())["networks"].items()}
    files.pop("detector")
    stamps = {f: (out / f).stat().st_mtime_ns for f in files.values()}
    assert {k: v["file"] for k, v in export_models(models, out, settings)["networks"].items()} == files
    assert all((out / f).stat().st_mtime_ns == t for f, t in stamps.items())  # nothing rebuilt
    with torch.no_grad():
        models.text.norm.bias.add_(1.0)  # new text weights: only the text encoder changes name
    changed = {k: v["file"] for k, v in export_models(models, out, settings)["networks"].items()}
    assert [k for k in files if files[k] != changed[k]] == ["text_encoder"]
    assert not (out / files["text_encoder"]).exists()  # the stale graph is removed
    graph = out / changed["vae_encoder"]
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1  # same size, different bytes
    graph.write_bytes(bytes(data))
    export_models(models, out, settings)
    assert (out / changed["vae_encoder"]).stat().st_mtime_ns != stamps[changed["vae_encoder"]]
    OrtBackend(out)  # loads after the rebuild


def test_graphs_use_only_tensorrt_operators(tiny_export):
    data = json.loads((REPO / "flashface_trt" / "export" / "data" / "tensorrt_onnx_ops.json").read_text())
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert set(manifest["networks"]) == {*NETWORKS, "detector"}
    for name, entry in manifest["networks"].items():
        model = onnx.load(str(tiny_export / entry["file"]), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, name
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert data["opset_min"] <= opset <= data["opset_max"], (name, opset)
        missing = sorted(ops - set(data["supported"]))
        print(
            f"\n{name}: {len(ops)} op types, all in TensorRT {data['tensorrt']}'s parser list: {not missing}"
        )
        assert not missing, (name, missing)
    unet = json.loads((tiny_export / "manifest.json").read_text())["networks"]["unet"]["spec"]
    kv_inputs = [t["name"] for t in unet["inputs"] if t["name"].startswith(("ref_k.", "ref_v."))]
    assert kv_inputs and all(n.split(".", 1)[1].startswith(("middle.", "decoder.")) for n in kv_inputs)


def test_runtime_runs_without_torch(tiny_export, tmp_path):
    photo = tmp_path / "me.png"
    synthetic_face(300, seed=7).save(photo)
    script = f"""
        import sys
        from flashface_trt.cli import main
        code = main(["generate", "--onnx", {str(tiny_export)!r}, "--face", {str(photo)!r}, "--largest-face",
                     "--prompt", "a man", "--steps", "2", "--height", "64", "--width", "64",
                     "--out", {str(tmp_path / "o.png")!r}])
        assert code == 0, code
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
        """
    out = run_without_torch(script)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert (tmp_path / "o.png").is_file()


@pytest.mark.slow
def test_float16_export_against_float32(tmp_path):
    """float16 graphs on ONNX Runtime's CPU provider vs the float32 PyTorch modules, same inputs.

    float16 keeps 11 significant bits (unit roundoff 4.9e-4); through a few dozen layers with
    float32 normalisations the rounding errors add up to well under 1% of eps, so 2e-2 is a bound
    that a wrong cast (or a normalisation left in float16) exceeds by far, and decoded images
    stay within a few levels of 255. The UNet is the tiny one cut to two levels (every kind of
    block, half the graph: float16 tracing takes the CPU's slow convolutions); the float32 side
    is the modules themselves, which the float32 graphs match to 1e-6 (the tests above).
    """
    config = TWO_LEVEL_CONFIG
    fp16 = tmp_path / "fp16"
    models16 = random_models(config, dtype=torch.float16)
    shapes = replace(TINY_SHAPES, min_size=16)  # traced at the smallest size: a 16 px decode, not 64
    export_models(models16, fp16, ExportSettings("fp16", shapes=shapes))
    b16 = OrtBackend(fp16)
    b32 = TorchBackend(replace(random_models(config), ref_size=b16.ref_size))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 12)).astype(np.float32)
    texts = rng.standard_normal((2, 77, config.unet.context_dim)).astype(np.float32) * 0.5
    lat = b16.ref_size // config.vae_factor
    latents = rng.standard_normal((2, 4, lat, lat)).astype(np.float32)
    g = GuidanceParams()
    step = next(s for s in plan(10, g) if s.three_way)  # reference, text and unconditional rows
    mask = np.ones((16, 12), np.float32)
    ident = Identity("fp16", latents)
    e16 = step_eps(b16, RequestContext(texts, ident, b16.mask_from_host(mask), g, ""), x, step)
    with torch.inference_mode():
        ident32 = Identity("fp16", b32.latents_from_host(latents))
        ctx32 = RequestContext(torch.from_numpy(texts), ident32, b32.mask_from_host(mask), g, "")
        e32 = step_eps(b32, ctx32, torch.from_numpy(x), step).numpy()
    assert next(iter(b16.kv_cache.get(kv_key(ident, step.t, "")).values())).dtype == np.float16
    err = rel_err(e16, e32)
    img16 = generate(b16, REQUEST, _faces())[0]
    img32 = generate(b32, REQUEST, _faces())[0]
    pix = int(np.abs(np.asarray(img16, np.int16) - np.asarray(img32, np.int16)).max())
    print(f"\nfloat16 ONNX Runtime vs float32 PyTorch: eps rel err {err:.2e}, image max pixel diff {pix}")
    assert err <= 2e-2 and pix <= 8


@pytest.fixture(scope="session")
def oracle_export(oracle_dir, oracle_config, tmp_path_factory) -> Path:
    """The oracle checkpoint (official file names) exported once for every test process, float32."""
    from .test_loading import OFFICIAL_NAMES

    official = tmp_path_factory.mktemp("official_for_onnx")
    for src, dst in OFFICIAL_NAMES.items():
        (official / dst).symlink_to(oracle_dir / src)
    size, refs = int(oracle_config["image_size"]), int(oracle_config["num_refs"])
    shapes = ExportShapes(
        max_samples=2,
        min_size=64,
        max_size=max(256, size),
        opt_height=size,
        opt_width=size,
        max_refs=max(refs, 4),
        opt_refs=refs,
        ref_size=int(oracle_config["ref_image_size"]),
    )
    models = load_models(official)
    assert models.config == ModelConfig.from_dict(oracle_config)
    with shared_dir(tmp_path_factory, "onnx_oracle") as out:
        export_models(models, out, ExportSettings(shapes=shapes))
    return out


@pytest.mark.oracle
@pytest.mark.xdist_group("onnx_oracle")  # both cases in one test process: no other waits for its export
@pytest.mark.parametrize("case", ["two_way", "three_way"])
def test_exported_unet_matches_official(oracle_dir, oracle_config, oracle_export, case):
    """The oracle checkpoint exported and run by ONNX Runtime in float32: eps and x0 of one guided step."""
    backend = OrtBackend(oracle_export)
    d = np.load(oracle_dir / "unet_cases.npz")
    guidance = oracle_guidance(oracle_config)
    texts = np.concatenate([d["pos_context"], d["neg_context"]])  # [2, 77, C]
    mask = backend.mask_from_host(d["mask"])
    ctx = RequestContext(texts, Identity("oracle", d["ref_latents"]), mask, guidance, "")
    step = single_step(int(d[f"{case}/t"][0]), guidance)
    x = d[f"{case}/x"]
    e1 = rel_err(step_eps(backend, ctx, x, step), d[f"{case}/eps"])
    e2 = rel_err(step_x0(backend, ctx, x, step), d[f"{case}/x0"])
    print(f"\nONNX Runtime {case}: eps rel err {e1:.2e}, x0 rel err {e2:.2e}")
    assert e1 <= 1e-4 and e2 <= 1e-4


def test_large_graphs_use_external_data(tmp_path, monkeypatch):
    """Above the threshold the weights go to `<graph>.onnx.data`, which the cache keeps with the graph.

    Shown on the text encoder and the VAE decoder (the UNet takes the same path at full size).
    """
    import flashface_trt.export.exporter as exporter
    import flashface_trt.export.onnx_io as onnx_io
    from flashface_trt.runtime.artifacts.exports import export_specs
    from flashface_trt.runtime.backends.ort import OrtSettings, Session

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(exporter, "NETWORKS", ("text_encoder", "vae_decoder"))
    models = tiny_models()
    out = tmp_path / "ext"
    manifest = export_models(models, out, ExportSettings(shapes=TINY_SHAPES))
    assert set(manifest["networks"]) == {"text_encoder", "vae_decoder"}
    for entry in manifest["networks"].values():
        data = out / (entry["file"] + ".data")
        assert data.is_file() and data.stat().st_size > (out / entry["file"]).stat().st_size
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".verified.json"]
    assert export_models(models, out, ExportSettings(shapes=TINY_SHAPES)) == manifest  # reused as it is
    specs = export_specs(manifest)
    session = Session(
        out / manifest["networks"]["text_encoder"]["file"], specs["text_encoder"], OrtSettings()
    )
    ids = models.tokenizer.encode(["a face"])
    hidden = session.run(input_ids=ids.astype(np.int32))["hidden"]
    ref = TorchBackend(models).encode_text(ids).numpy()
    assert rel_err(hidden, ref) <= 1e-5


def test_cli_export_and_backend_choice(tiny_export, tmp_path, capsys, monkeypatch):
    """Flags reach the export settings; a CLI export over a current directory reuses it; generate uses it."""
    import flashface_trt.export.exporter as exporter
    from flashface_trt.cli import main

    out = tmp_path / "cli_onnx"
    args = ["export", "--preset", "tiny", "--out", str(out), "--max-samples", "1", "--height", "64"]
    assert main([*args, "--width", "70"]) == 2  # not a multiple of 8
    assert "opt_width=70" in capsys.readouterr().err
    seen = []
    with monkeypatch.context() as m:
        m.setattr(
            exporter,
            "export_models",
            lambda models, o, settings, *a: seen.append(settings) or {"networks": {}},
        )
        assert main([*args, "--width", "64", "--precision", "fp16"]) == 0
    (settings,) = seen
    assert settings.precision == "fp16" and settings.shapes.max_samples == 1
    assert (settings.shapes.opt_height, settings.shapes.opt_width) == (64, 64)
    shutil.copytree(tiny_export, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}
    assert main(["export", "--preset", "tiny", "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")} == stamps  # every graph reused
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shapes"] == json.loads((tiny_export / "manifest.json").read_text())["shapes"]
    gen = ["generate", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o.png")]
    assert main([*gen, "--onnx", str(out)]) == 0
    size = manifest["shapes"]["opt_width"], manifest["shapes"]["opt_height"]
    assert Image.open(tmp_path / "o.png").size == size  # the export's typical size


@pytest.mark.parametrize("rescale", [0.5, 0.0, 0.7])
def test_update_step_graphs_match_the_numpy_sampler(tiny_export, rescale):
    """The batched guidance + DDIM update graph (what a CUDA-graphed step replays) vs `step_update`.

    One batch holds three requests at a 2-way, a 3-way and the last step; each one's part of the
    output is compared with NumPy's update of that request alone.

    Elementwise float32 arithmetic is correctly rounded everywhere, so without rescale the graph is
    bit for bit NumPy's; with rescale its row sums are reduced by ONNX Runtime in another order
    than NumPy's pairwise sum, which moves the ratio by a few ulps (bounded here at 1e-6).
    """
    import onnxruntime as ort

    manifest = json.loads((tiny_export / "manifest.json").read_text())
    session = ort.InferenceSession(str(tiny_export / manifest["networks"]["step"]["file"]))
    g = GuidanceParams(guide_rescale=rescale)
    steps = plan(10, g)
    picks = [steps[0], next(s for s in steps if s.three_way), steps[-1]]  # 2-way, 3-way, last (s_next = 0)
    rng = np.random.default_rng(1)
    members = []
    for i, (step, n) in enumerate(zip(picks, (2, 1, 2))):
        ctx = RequestContext(None, Identity(f"id{i}", np.zeros((1, 4, 8, 8))), None, g)
        members.append(Member(ctx, rng.standard_normal((n, 4, 12, 10)).astype(np.float32), step))
    bp = plan_batch(members)  # one batch: every member at its own step
    eps = rng.standard_normal((bp.rows, 4, 12, 10)).astype(np.float32)
    x = np.concatenate([m.x for m in members])
    feeds = {"x": x, "eps": eps, "coef": bp.coef, "guide": bp.guide.astype(np.int32)}
    (ours,) = session.run(None, feeds)
    for m, part, first in zip(members, bp.split(ours), bp.offsets):
        guide = bp.guide[:, first : first + m.samples]  # [3, n]: rows of y_ref, y, u
        mine = eps[np.concatenate(guide if m.step.three_way else guide[[0, 2]])]  # its own [k*n] batch
        ref = step_update(m.x, mine, m.step.three_way, m.step.coefficients(g))
        err = rel_err(part, ref)
        print(f"\nstep t={m.step.t} rescale={rescale}: rel err {err:.2e}, equal {np.array_equal(part, ref)}")
        assert part.shape == ref.shape and err <= (0 if rescale == 0 else 1e-6)


def test_unet_graph_cuts_equal_the_uncut_graph(tmp_path):
    """The UNet graph with every FLOP cut (the log-sum-exp form included) against the uncut graph on
    ONNX Runtime, on a batch of a 2-way and a 3-way request: eps within 1e-5."""
    models = tiny_models()
    steps, g = plan(10, GuidanceParams()), np.random.default_rng(0)
    ident = Identity("a", np.zeros((2, 4, 8, 8), np.float32))
    ctx = RequestContext(None, ident, None, GuidanceParams())
    p = plan_batch(
        [Member(ctx, np.zeros((1, 4, 8, 8)), steps[0]), Member(ctx, np.zeros((2, 4, 8, 8)), steps[5])]
    )
    feeds = {
        "x": g.standard_normal((3, 4, 8, 8)),
        "masks": (g.random((2, 1, 8, 8)) > 0.5).astype(np.float32),
        "texts": g.standard_normal((4, 77, models.config.unet.context_dim)),
        **{n: getattr(p, n) for n in ("sample_rows", "member_rows", "text_rows", "enc_rows", "enc_index")},
        "stem_rows": p.stem_rows,
        "timestep": p.t,
        "ref_scale": p.scale,
        "ref_group": p.group,
    }
    eps = {}
    for cuts in ((), ("encoder",), ("stem",), ("lse",), CUTS):
        spec = network_specs(models, TINY_SHAPES, cuts)["unet"]
        for t in spec.inputs:
            if t.name.startswith(("ref_k.", "ref_v.")) and t.name not in feeds:  # 2 groups of 2 references
                feeds[t.name] = g.standard_normal((2, 2 * spec.axes[t.shape[1]].min, t.shape[2]))
        path = tmp_path / f"unet-{'-'.join(cuts)}.onnx"
        export_network(models, "unet", spec, path, ExportSettings(shapes=TINY_SHAPES, slim=False, cuts=cuts))
        eps[cuts] = Session(path, spec, OrtSettings()).run(**{n: feeds[n] for n in spec.input_names})["eps"]
    assert p.rows == 8 and len(p.enc_rows) == 6
    assert all(rel_err(e, eps[()]) <= 1e-5 for e in eps.values())
