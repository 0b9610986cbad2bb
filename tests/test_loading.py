"""Weights directories: official files, conversion to float16 safetensors, tampering, the tiny preset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from flashface_trt.models.loading import (
    COMPONENTS,
    component_shapes,
    convert_weights,
    load_detector,
    load_models,
    tiny_models,
    verify_converted,
)
from flashface_trt.models.retinaface import retinaface_shapes
from flashface_trt.runtime.errors import WeightsError

from .conftest import rel_err

# oracle fixture file -> the official file name it stands for
OFFICIAL_NAMES = {
    "flashface_unet.ckpt": "flashface.ckpt",
    "clip_text.pth": "openai-clip-vit-large-14.pth",
    "vae.pth": "sd-v1-vae.pth",
    "bpe_simple_vocab_16e6.txt.gz": "bpe_simple_vocab_16e6.txt.gz",
    "config.json": "config.json",
    "face/retinaface_resnet50.pth": "retinaface_resnet50.pth",
}


@pytest.fixture(scope="module")
def official_dir(oracle_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    for src, dst in OFFICIAL_NAMES.items():
        (root / dst).symlink_to(oracle_dir / src)
    return root


@pytest.fixture(scope="module")
def converted_dir(official_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    convert_weights(official_dir, out)
    return out


def _params(models):
    return {
        f"{n}.{k}": v for n in ("unet", "text", "vae") for k, v in getattr(models, n).state_dict().items()
    }


@pytest.mark.oracle
def test_official_directory_loads_and_runs(official_dir, oracle_dir):
    models = load_models(official_dir)
    cases = np.load(oracle_dir / "text_cases.npz")
    with torch.no_grad():
        hidden = models.text(torch.from_numpy(cases["ids"]))
    err = rel_err(hidden.numpy(), cases["hidden"])
    print(f"text via load_models: rel err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.oracle
def test_conversion_dedups_and_round_trips(official_dir, converted_dir, oracle_config):
    manifest = json.loads((converted_dir / "manifest.json").read_text())
    cfg = load_models(converted_dir).config
    for name, comp in COMPONENTS.items():
        entry = manifest["files"][comp.converted]
        assert {k: tuple(v["shape"]) for k, v in entry["tensors"].items()} == component_shapes(name, cfg)
    unet = manifest["files"]["unet.safetensors"]
    assert not any(k.startswith(("ori_", "ref_middle")) for k in unet["tensors"])
    assert unet["dropped_from_source"]["ori_encoder"] > 0 and unet["dropped_from_source"]["ref_middle"] > 0
    a, b = _params(load_models(official_dir)), _params(load_models(converted_dir))
    assert a.keys() == b.keys()
    for k in a:  # the oracle weights are float16 values, so float16 storage is lossless
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    verify_converted(converted_dir)
    from safetensors import safe_open

    with safe_open(str(converted_dir / "unet.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())


@pytest.mark.oracle
def test_tampered_conversion_is_refused(converted_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(converted_dir, bad)
    with (bad / "vae.safetensors").open("r+b") as f:  # same size, different bytes
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    with pytest.raises(WeightsError, match="vae.safetensors"):
        verify_converted(bad)
    with (bad / "vae.safetensors").open("ab") as f:  # different size
        f.write(b"\x00")
    with pytest.raises(WeightsError, match="re-run convert-weights"):
        load_models(bad)


@pytest.mark.oracle
def test_missing_component_is_named(official_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in ("flashface.ckpt", "config.json", "openai-clip-vit-large-14.pth"):
        (partial / f).symlink_to(official_dir / f)
    with pytest.raises(WeightsError, match="SD 1.x VAE.*sd-v1-vae.pth"):
        load_models(partial)
    with pytest.raises(WeightsError, match="does not exist"):
        load_models(tmp_path / "nowhere")


def test_tiny_preset_is_deterministic():
    a, b = _params(tiny_models()), _params(tiny_models())
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _params(tiny_models(seed=1))
    assert not torch.equal(a["unet.head.2.weight"], c["unet.head.2.weight"])


@pytest.mark.oracle
def test_detector_converts_in_float32_and_loads(official_dir, converted_dir):
    if not (official_dir / "retinaface_resnet50.pth").is_file():
        pytest.skip("no face/retinaface_resnet50.pth in the fixtures")
    manifest = json.loads((converted_dir / "manifest.json").read_text())
    entry = manifest["files"]["retinaface.safetensors"]
    assert {k: tuple(v["shape"]) for k, v in entry["tensors"].items()} == retinaface_shapes()
    a, b = load_detector(official_dir).state_dict(), load_detector(converted_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    from safetensors import safe_open

    with safe_open(str(converted_dir / "retinaface.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32", "I64"}


def test_missing_detector_points_to_cropped(tmp_path):
    with pytest.raises(WeightsError, match="retinaface_resnet50.pth.*--cropped"):
        load_detector(tmp_path)
