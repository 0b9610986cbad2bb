"""UNet + ReferenceNet: oracle parity, batch semantics of the reference branch, checkpoint layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashface_trt.models import unet_blocks
from flashface_trt.models.batched import batch_eps, indices
from flashface_trt.models.config import CUTS, SD15, TINY, ModelConfig
from flashface_trt.models.loading import build_loaded, component_shapes, random_state
from flashface_trt.models.unet import FlashFaceUNet, unet_state
from flashface_trt.models.unet_blocks import RefInputs
from flashface_trt.models.weights import read_checkpoint
from flashface_trt.runtime.errors import WeightsError
from flashface_trt.runtime.sampling.batch import Member, RequestContext, plan_batch
from flashface_trt.runtime.sampling.sampler import GuidanceParams, plan

from .conftest import rel_err


@pytest.fixture(scope="module")
def oracle_unet(oracle_dir, oracle_config) -> FlashFaceUNet:
    cfg = ModelConfig.from_dict(oracle_config)
    path = oracle_dir / "flashface_unet.ckpt"
    state = unet_state(read_checkpoint(path), str(path))
    return build_loaded("unet", cfg, state, str(path), "cpu", torch.float32)


@pytest.fixture(scope="module")
def cases(oracle_dir):
    return dict(np.load(oracle_dir / "unet_cases.npz"))


def _ref_rows(case: str, n: int) -> int:
    return 2 * n if case == "two_way" else n


@pytest.mark.oracle
@pytest.mark.parametrize("case", ["two_way", "three_way"])
def test_eps_matches_official_batch(oracle_unet, cases, case):
    """The raw model output for the official 2-way / 3-way batch, with references at λ."""
    x = torch.from_numpy(cases[f"{case}/x"])
    t = torch.from_numpy(cases[f"{case}/t"])
    n = x.shape[0]
    k = 2 if case == "two_way" else 3
    with torch.no_grad():
        feats = oracle_unet.reference_features(
            torch.from_numpy(cases["ref_latents"]), t[:1], torch.from_numpy(cases["neg_context"])
        )
        kv = oracle_unet.reference_kv(feats)
        lam = torch.full((_ref_rows(case, n),), float(cases[f"{case}/similarity"]))
        mask = torch.from_numpy(cases["mask"])[None, None]
        eps = oracle_unet(
            x.repeat(k, 1, 1, 1),
            mask,
            t.repeat(k),
            torch.from_numpy(cases[f"{case}/context"]),
            RefInputs(kv, lam),
        )
    err = rel_err(eps.numpy(), cases[f"{case}/eps"])
    print(f"{case} eps rel err {err:.2e}")
    assert err <= 1e-4


def _random_inputs(unet: FlashFaceUNet, batch: int, refs: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = unet.cfg
    x = torch.randn(batch, 4, 16, 16, generator=g)
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    t = torch.full((batch,), 500)
    ctx = torch.randn(batch, 77, c.context_dim, generator=g)
    ref_lat = torch.randn(refs, 4, 8, 8, generator=g)
    return x, mask, t, ctx, ref_lat


@pytest.fixture(scope="module")
def tiny_unet() -> FlashFaceUNet:
    return build_loaded(
        "unet", TINY, random_state(component_shapes("unet", TINY), 3), "tiny", "cpu", torch.float32
    )


def test_rows_without_references_ignore_them(tiny_unet):
    """Rows past B_ref give the same output whatever the reference K/V (and as with B_ref = 0)."""
    x, mask, t, ctx, ref_lat = _random_inputs(tiny_unet, batch=3)
    with torch.no_grad():
        kv = tiny_unet.reference_kv(tiny_unet.reference_features(ref_lat, t[:1], ctx[:1]))
        other = [(k * 3 + 1, v - 2) for k, v in kv]
        a = tiny_unet(x, mask, t, ctx, RefInputs(kv, torch.tensor([1.2])))
        b = tiny_unet(x, mask, t, ctx, RefInputs(other, torch.tensor([1.2])))
        c = tiny_unet(x, mask, t, ctx, None)
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)
    torch.testing.assert_close(a[1:], c[1:], rtol=1e-6, atol=1e-6)
    assert (a[0] - b[0]).abs().max() > 1e-3  # the reference row does see them


def test_zero_strength_equals_no_references(tiny_unet):
    """λ = 0 reduces the branch to SA1(y): x + SA(y) + SA1(y)."""
    x, mask, t, ctx, ref_lat = _random_inputs(tiny_unet, batch=2)
    with torch.no_grad():
        kv = tiny_unet.reference_kv(tiny_unet.reference_features(ref_lat, t[:1], ctx[:1]))
        a = tiny_unet(x, mask, t, ctx, RefInputs(kv, torch.zeros(2)))
        b = tiny_unet(x, mask, t, ctx, None)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_work_per_row(tiny_unet, monkeypatch):
    """Only the first B_ref rows attend over reference tokens; SA1(y) runs once per row and layer."""
    calls: list[tuple[int, int, int]] = []

    def spy(real):
        def wrapped(q, k, v, heads):
            calls.append((q.shape[0], q.shape[1], k.shape[1]))
            return real(q, k, v, heads)

        return wrapped

    for name in ("attend", "attend_lse"):  # the reference branch by log-sum-exp merge uses the latter
        monkeypatch.setattr(unet_blocks, name, spy(getattr(unet_blocks, name)))
    x, mask, t, ctx, ref_lat = _random_inputs(tiny_unet, batch=6, refs=2)
    with torch.no_grad():
        kv = tiny_unet.reference_kv(tiny_unet.reference_features(ref_lat, t[:1], ctx[:1]))
        calls.clear()
        tiny_unet(x, mask, t, ctx, RefInputs(kv, torch.full((2,), 1.2)))
    over_refs = [c for c in calls if c[2] not in (c[1], 77)]  # over the reference tokens (and own ones)
    layers = tiny_unet.num_reference_layers
    assert len(over_refs) == layers and all(c[0] == 2 for c in over_refs)
    own = [c for c in calls if c[2] == c[1]]  # self-attention SA and SA1 over the row's own tokens
    enc_blocks = sum(
        1 for n, _ in tiny_unet.named_modules() if n.startswith("encoder") and n.endswith("blocks.0")
    )
    assert len(own) == enc_blocks + 2 * layers and all(c[0] == 6 for c in own)


def test_reference_net_stops_after_last_feature(tiny_unet):
    """The ReferenceNet returns one feature per reference layer, in layer order, at the right widths."""
    x, mask, t, ctx, ref_lat = _random_inputs(tiny_unet, batch=1, refs=3)
    feats = tiny_unet.reference_features(ref_lat, t[:1], ctx[:1])
    assert len(feats) == tiny_unet.num_reference_layers
    widths = [b.norm1.normalized_shape[0] for b in tiny_unet._attention_blocks(tiny_unet.decoder)]
    assert [f.shape[-1] for f in feats] == widths
    assert all(f.shape[0] == 3 for f in feats)
    kv = tiny_unet.reference_kv(feats)
    assert all(k.shape == (1, 3 * f.shape[1], f.shape[2]) for (k, _), f in zip(kv, feats))


@pytest.mark.oracle
def test_official_checkpoint_layout_maps_onto_model(manifests):
    """Every key of the released flashface.ckpt maps to a parameter of the same shape, and back."""
    layout = manifests["flashface.ckpt"]
    fake = {k: torch.empty(tuple(s), device="meta") for k, s in layout.items()}
    state = unet_state(fake, "flashface.ckpt manifest")
    expected = component_shapes("unet", SD15)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    dropped = set(layout) - set(state)
    assert all(k.startswith(("ori_", "ref_middle.")) for k in dropped)


def test_strict_loading_names_bad_keys(tiny_unet):
    state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    missing = dict(state)
    del missing["head.2.weight"]
    with pytest.raises(WeightsError, match="head.2.weight"):
        build_loaded("unet", TINY, missing, "test", "cpu", torch.float32)
    extra = dict(state, **{"decoder.99.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="decoder.99.weight"):
        build_loaded("unet", TINY, extra, "test", "cpu", torch.float32)
    bad = dict(state, **{"encoder.0.weight": torch.zeros(3, 3)})
    with pytest.raises(WeightsError, match=r"encoder.0.weight \(3, 3\)"):
        build_loaded("unet", TINY, bad, "test", "cpu", torch.float32)


def test_aliases_must_agree(tiny_unet):
    state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    state["ori_encoder.0.weight"] = state["encoder.0.weight"] + 1
    with pytest.raises(WeightsError, match="ori_encoder.0.weight"):
        unet_state(state, "test")
    same = dict(state, **{"ori_encoder.0.weight": state["encoder.0.weight"]})
    assert "ori_encoder.0.weight" not in unet_state(same, "test")


def test_corrupt_checkpoint_names_file(tmp_path):
    path = tmp_path / "flashface.ckpt"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(WeightsError, match="flashface.ckpt"):
        read_checkpoint(path)
    with pytest.raises(WeightsError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_official_constructor_arguments_build_the_same_network():
    """Official `sd_v1_ref_unet` kwargs (in_dim=4, per-level lists, head_dim, y_dim) -> the SD 1.5 layout."""
    official = {
        "in_dim": 4,
        "dim": 320,
        "y_dim": None,
        "context_dim": 768,
        "out_dim": 4,
        "dim_mult": [1, 2, 4, 4],
        "num_heads": 8,
        "head_dim": None,
        "num_res_blocks": [2, 2, 2, 2],
        "num_attn_blocks": [1, 1, 1, 1],
        "attn_scales": [1 / 4, 1 / 2, 1],
        "dropout": 0.0,
    }
    cfg = ModelConfig.from_dict({"unet": official, "text_encoder": {}, "vae": {"dim_mult": [1, 2, 4, 4]}})
    assert cfg.unet.in_dim == 5 and cfg.unet.ref_in_dim == 4
    assert component_shapes("unet", cfg) == component_shapes("unet", SD15)
    by_head_dim = ModelConfig.from_dict({"unet": dict(official, head_dim=40), "text_encoder": {}, "vae": {}})
    assert by_head_dim.unet.heads(320) == 8 and by_head_dim.unet.heads(1280) == 32


@pytest.mark.parametrize("cuts", [("encoder",), ("stem",), ("lse",), CUTS])
def test_each_cut_equals_the_uncut_unet(tiny_unet, cuts):
    """Each exact FLOP cut, alone and all together, on a batch of a 2-way and a 3-way request
    (shared encoder rows, per-sample stems, per-row λ and K/V groups): eps within 1e-5 of uncut."""
    g = torch.Generator().manual_seed(1)
    c, steps = tiny_unet.cfg, plan(10, GuidanceParams())
    ident = type("Ident", (), {"key": "a", "num_refs": 2, "latents": np.zeros((2, 4, 8, 8))})
    members = [
        Member(RequestContext(None, ident, None, GuidanceParams()), torch.zeros(1, 4, 16, 16), steps[0]),
        Member(RequestContext(None, ident, None, GuidanceParams()), torch.zeros(2, 4, 16, 16), steps[5]),
    ]
    p = plan_batch(members)
    x, texts = torch.randn(3, 4, 16, 16, generator=g), torch.randn(4, 77, c.context_dim, generator=g)
    masks = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    ref_t = torch.tensor([steps[0].t, steps[5].t])
    with torch.no_grad():
        feats = tiny_unet.reference_features(torch.randn(4, 4, 8, 8, generator=g), ref_t, texts[1::2])
        kv = tiny_unet.reference_kv(feats, 2)
        eps = {}
        for on in ((), cuts):
            eps[on] = batch_eps(tiny_unet.set_cuts(on), x, texts, masks, indices(p, x.device), kv)
    tiny_unet.set_cuts(CUTS)
    assert len(p.enc_rows) == 6 < p.rows == 8 and len(p.stem_rows) == 3
    assert rel_err(eps[cuts].numpy(), eps[()].numpy()) <= 1e-5
