"""CLIP tokenizer and text encoder: oracle parity, Hugging Face layout, checkpoint manifest, strict errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from flashface_trt.models.config import SD15, TINY, TextConfig
from flashface_trt.models.text_encoder import (
    TextEncoder,
    load_text_encoder,
    text_encoder_shapes,
    text_encoder_state,
)
from flashface_trt.models.weights import check_state_dict
from flashface_trt.runtime.errors import WeightsError
from flashface_trt.runtime.sampling.tokenizer import ClipTokenizer

from .conftest import REPO, rel_err


@pytest.fixture(scope="module")
def text_cfg(oracle_config) -> TextConfig:
    return TextConfig(**oracle_config["text_encoder"])


@pytest.fixture(scope="module")
def text_cases(oracle_dir) -> dict:
    return dict(np.load(oracle_dir / "text_cases.npz"))


def _random_state(cfg: TextConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in text_encoder_shapes(cfg).items()}


@pytest.mark.oracle
@pytest.mark.parametrize("vocab", ["oracle", "packaged"])
def test_tokenizer_matches_official_ids(oracle_dir, vocab):
    cases = json.loads((oracle_dir / "tokenizer_cases.json").read_text())
    tok = ClipTokenizer(oracle_dir / "bpe_simple_vocab_16e6.txt.gz" if vocab == "oracle" else None)
    ids = tok.encode(cases["prompts"])
    expected = np.asarray(cases["ids"], dtype=np.int64)
    assert ids.dtype == np.int64 and ids.shape == expected.shape
    for prompt, got, want in zip(cases["prompts"], ids, expected):
        assert got.tolist() == want.tolist(), f"prompt {prompt!r}"


def test_tokenizer_shapes_and_truncation():
    tok = ClipTokenizer(length=8)
    ids = tok.encode("a photo of a very very very very long prompt")
    assert ids.shape == (1, 8) and ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    short = tok.encode(["", "a"])
    assert short.tolist()[0] == [tok.sot_id] + [tok.eot_id] * 7
    assert short[1, 2:].tolist() == [tok.eot_id] * 6


def test_tokenizer_decode_and_truncation():
    """`decode` inverts `tokenize` up to CLIP's cleaning; `truncation` says what `encode` drops."""
    tok = ClipTokenizer()
    text = "A photo of Zoë, 4K &amp; ultra-detailed!"
    assert tok.decode(tok.tokenize(text)) == "a photo of zoë , 4 k & ultra - detailed !"
    assert tok.truncation("a man") is None
    cut = tok.truncation("one two " * 40)
    assert cut is not None and cut.dropped == 80 - 75
    assert cut.kept == " ".join(["one two"] * 37 + ["one"]) and cut.lost == " ".join(
        ["two"] + ["one two"] * 2
    )
    assert tok.encode("one two " * 40)[0, 1:-1].tolist() == tok.tokenize(cut.kept)


def test_tokenizer_cleaning():
    """Official `basic_clean`: ftfy and a double HTML unescape (library CLIP tokenizers skip these)."""
    tok = ClipTokenizer()
    assert tok.encode("fish &amp;amp; chips").tolist() == tok.encode("fish & chips").tolist()
    assert tok.encode(" ﬁne\tLIGATURE \n").tolist() == tok.encode("fine ligature").tolist()


def test_tokenizer_does_not_import_torch():
    code = (
        "import sys, flashface_trt.runtime.sampling.tokenizer as t; t.ClipTokenizer(); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.oracle
def test_hidden_states_match_official(oracle_dir, text_cfg, text_cases):
    model = load_text_encoder(oracle_dir / "clip_text.pth", text_cfg)
    assert isinstance(model, TextEncoder) and not model.training
    with torch.inference_mode():
        out = model(torch.from_numpy(text_cases["ids"]))  # [P, 77, C]
    assert out.dtype == torch.float32 and out.shape == text_cases["hidden"].shape
    err = rel_err(out.numpy(), text_cases["hidden"])
    print(f"text encoder float32 rel_err = {err:.3e}")
    assert err <= 1e-4


@pytest.mark.oracle
def test_hidden_states_float16(oracle_dir, text_cfg, text_cases):
    """float16 weights run (LayerNorm in float32, as the official one) and stay close."""
    model = load_text_encoder(oracle_dir / "clip_text.pth", text_cfg, dtype=torch.float16)
    with torch.inference_mode():
        out = model(torch.from_numpy(text_cases["ids"]))
    assert out.dtype == torch.float16
    err = rel_err(out.float().numpy(), text_cases["hidden"])
    print(f"text encoder float16 rel_err = {err:.3e}")
    assert err <= 1e-2


def _tiny_hf_model(cfg: TextConfig):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.dim * cfg.mlp_ratio,
        num_attention_heads=cfg.num_heads,
        num_hidden_layers=cfg.num_layers,
        max_position_embeddings=cfg.text_len,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=cfg.vocab_size - 2,
        eos_token_id=cfg.vocab_size - 1,
        pad_token_id=cfg.vocab_size - 1,
    )
    model = transformers.CLIPTextModel(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # random norms and biases too: every mapping is exercised
            scale = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            p.copy_(scale + 0.2 * torch.randn(p.shape, generator=g))
    return model


def _hf_state(model, prefix: str) -> dict[str, torch.Tensor]:
    """The model's tensors under `prefix` (files use `text_model.`; transformers 5 drops it in memory)."""
    return {prefix + k.removeprefix("text_model."): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", ["text_model.", ""])
def test_hugging_face_layout(prefix):
    cfg = TextConfig(vocab_size=1000, dim=32, out_dim=32, num_heads=2, num_layers=2)
    hf = _tiny_hf_model(cfg)
    state = _hf_state(hf, prefix)
    state["text_projection.weight"] = torch.zeros(cfg.dim, cfg.dim)
    converted = text_encoder_state(state, "hf")
    assert set(converted) == set(text_encoder_shapes(cfg))
    model = load_text_encoder(converted, cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.text_len), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = hf(input_ids=ids).last_hidden_state
        out = model(ids)
    err = rel_err(out.numpy(), ref.numpy())
    print(f"Hugging Face CLIPTextModel rel_err = {err:.3e}")
    assert err <= 1e-5


def test_hugging_face_unknown_and_incomplete_keys_are_reported():
    cfg = TINY.text
    hf = _hf_state(_tiny_hf_model(cfg), "text_model.")
    hf["text_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    del hf["text_model.encoder.layers.1.self_attn.v_proj.bias"]
    state = text_encoder_state(hf, "hf")
    with pytest.raises(WeightsError) as exc:
        check_state_dict(text_encoder_shapes(cfg), state, "hf")
    msg = str(exc.value)
    for key in (
        "text_model.encoder.layers.0.self_attn.extra.weight",
        "transformer.1.attn.to_qkv.bias",
        "text_model.encoder.layers.1.self_attn.q_proj.bias",
    ):
        assert key in msg


@pytest.mark.oracle
def test_official_clip_manifest(manifests):
    manifest = manifests["openai-clip-vit-large-14.pth"]
    fake = {k: torch.empty(tuple(shape), device="meta") for k, shape in manifest.items()}
    state = text_encoder_state(fake, "manifest")
    shapes = text_encoder_shapes(SD15.text)
    check_state_dict(shapes, state, "manifest")
    textual = {k.removeprefix("textual."): tuple(s) for k, s in manifest.items() if k.startswith("textual.")}
    textual.pop("head")
    assert textual == shapes


@pytest.mark.oracle
def test_bare_official_layout_drops_head(oracle_dir, text_cfg):
    raw = torch.load(oracle_dir / "clip_text.pth", weights_only=True)
    assert "head" in raw
    state = text_encoder_state(raw, "clip_text.pth")
    assert "head" not in state and set(state) == set(text_encoder_shapes(text_cfg))
    full = {"textual." + k: v for k, v in raw.items()} | {
        "log_scale": torch.ones(()),
        "mystery": torch.ones(1),
    }
    full = text_encoder_state(full, "full")
    assert set(full) == set(state) | {"mystery"}  # unknown keys survive for the strict check


@pytest.mark.parametrize(
    "edit, key",
    [
        ("missing", "norm.bias"),
        ("extra", "transformer.0.attn.bogus"),
        ("misshaped", "pos_embedding"),
        ("extra", "textual_typo.weight"),
    ],
)
def test_strict_errors_name_the_key(edit, key):
    state = _random_state(TINY.text)
    if edit == "missing":
        del state[key]
    elif edit == "extra":
        state[key] = torch.zeros(2)
    else:
        state[key] = torch.zeros(1, 3, TINY.text.dim)
    with pytest.raises(WeightsError, match=re.escape(key)):
        load_text_encoder(state, TINY.text)


def test_strict_load_roundtrip():
    state = _random_state(TINY.text)
    model = load_text_encoder(state, TINY.text, dtype=torch.float64)
    assert all(not p.requires_grad and p.dtype == torch.float64 for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k].float(), v) for k, v in state.items())


def test_corrupt_checkpoint_names_path(tmp_path):
    path = tmp_path / "x.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        load_text_encoder(path, TINY.text)


def test_missing_or_corrupt_vocab_names_path(tmp_path):
    missing = tmp_path / "none.txt.gz"
    with pytest.raises(WeightsError, match=re.escape(str(missing))):
        ClipTokenizer(missing)
    corrupt = tmp_path / "bad.txt.gz"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=re.escape(str(corrupt))):
        ClipTokenizer(corrupt)
