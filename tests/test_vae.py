"""SD VAE: oracle parity, official attention reshape, diffusers layout, checkpoint manifest, strict errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flashface_trt.models.config import SD15, TINY, VAEConfig
from flashface_trt.models.vae import AttentionBlock, AutoencoderKL, load_vae, vae_shapes, vae_state
from flashface_trt.runtime.errors import WeightsError

from .conftest import rel_err


def _vae_cfg(section: dict) -> VAEConfig:
    """VAEConfig from the oracle `config.json` `vae` section (constructor arguments of the official class)."""
    args = dict(section)
    assert not args.pop("attn_scales", []), "attention inside the VAE levels is not supported"
    args["dim_mult"] = tuple(args["dim_mult"])
    return VAEConfig(**args)


def _random_state(cfg: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in vae_shapes(cfg).items()}


@pytest.fixture(scope="module")
def oracle_vae_cfg(oracle_config) -> VAEConfig:
    return _vae_cfg(oracle_config["vae"])


@pytest.fixture(scope="module")
def vae_cases(oracle_dir) -> dict:
    return dict(np.load(oracle_dir / "vae_cases.npz"))


@pytest.mark.oracle
def test_oracle_parity(oracle_dir, oracle_vae_cfg, vae_cases):
    vae = load_vae(oracle_dir / "vae.pth", oracle_vae_cfg)
    with torch.no_grad():
        mu = vae.encode(torch.from_numpy(vae_cases["images"])).numpy()
        decoded = vae.decode(torch.from_numpy(vae_cases["latents"])).numpy()
    assert mu.shape == vae_cases["mu"].shape and decoded.shape == vae_cases["decoded"].shape
    e_mu, e_dec = rel_err(mu, vae_cases["mu"]), rel_err(decoded, vae_cases["decoded"])
    print(f"\nVAE oracle rel_err: encode {e_mu:.3e}, decode {e_dec:.3e}")
    assert e_mu <= 1e-4 and e_dec <= 1e-4


@pytest.mark.oracle
def test_oracle_float16(oracle_dir, oracle_vae_cfg, vae_cases):
    vae16 = load_vae(oracle_dir / "vae.pth", oracle_vae_cfg, dtype=torch.float16)
    vae32 = load_vae(oracle_dir / "vae.pth", oracle_vae_cfg)
    z = torch.from_numpy(vae_cases["latents"])[..., :8, :8]  # CPU float16 convolutions are slow: crop
    with torch.no_grad():
        mu = vae16.encode(torch.from_numpy(vae_cases["images"]).half()).float().numpy()
        decoded, want = vae16.decode(z.half()).float().numpy(), vae32.decode(z).numpy()
    assert np.isfinite(mu).all() and np.isfinite(decoded).all()
    e_mu, e_dec = rel_err(mu, vae_cases["mu"]), rel_err(decoded, want)
    print(f"\nVAE float16 rel_err: encode {e_mu:.3e} (vs oracle), decode {e_dec:.3e} (vs float32)")
    assert e_mu <= 1e-2 and e_dec <= 1e-2


def _reference_attention(block: AttentionBlock, x: torch.Tensor, official: bool) -> torch.Tensor:
    """Explicit softmax attention; `official` reads the [B, HW, C] result as [B, C, H, W] (official code)."""
    b, c, h, w = x.shape
    qkv = block.to_qkv(block.norm(x)).reshape(b, 3 * c, h * w)  # [B, 3C, HW]
    q, k, v = qkv.permute(0, 2, 1).chunk(3, dim=-1)  # 3 x [B, HW, C]
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)  # [B, HW, HW]
    out = attn @ v  # [B, HW, C]
    out = out.reshape(b, c, h, w) if official else out.permute(0, 2, 1).reshape(b, c, h, w)
    return block.proj(out) + x


@pytest.mark.parametrize("official", [True, False])
def test_attention_reshape(official):
    torch.manual_seed(0)
    block = AttentionBlock(64, official_reshape=official)
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
        assert rel_err(block(x), _reference_attention(block, x, official)) <= 1e-5
        assert rel_err(block(x), _reference_attention(block, x, not official)) > 1e-2
        block.proj.weight.zero_()  # the official init: both readings agree
        assert rel_err(block(x), _reference_attention(block, x, not official)) <= 1e-6


def _diffusers_vae(block_out: tuple[int, ...], layers: int, z_dim: int):
    from diffusers import AutoencoderKL as DiffusersVAE

    return DiffusersVAE(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out),
        up_block_types=("UpDecoderBlock2D",) * len(block_out),
        block_out_channels=block_out,
        layers_per_block=layers,
        norm_num_groups=32,
        latent_channels=z_dim,
    )


@pytest.mark.parametrize("names", ["current", "legacy"])
def test_diffusers_layout_parity(names):
    torch.manual_seed(0)
    ref = _diffusers_vae((32, 64), 1, 4).eval()
    with torch.no_grad():  # diffusers zero-inits some layers: randomise everything
        for name, p in ref.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    state = ref.state_dict()
    if names == "legacy":  # diffusers < 0.14 attention names
        legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        for new, old in legacy.items():
            for key in [k for k in state if f".attentions.0.{new}." in k]:
                state[key.replace(f".{new}.", f".{old}.")] = state.pop(key)
    cfg = VAEConfig(dim=32, z_dim=4, dim_mult=(1, 2), num_res_blocks=1)
    ours = load_vae(vae_state(state, "diffusers"), cfg, official_reshape=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # [B, 3, H, W]
    z = torch.randn(1, 4, 12, 10)  # [B, z, h, w]
    with torch.no_grad():
        e_mu = rel_err(ours.encode(x), ref.encode(x).latent_dist.mean)
        e_dec = rel_err(ours.decode(z), ref.decode(z).sample)
    print(f"\nVAE diffusers ({names} names) rel_err: encode {e_mu:.3e}, decode {e_dec:.3e}")
    assert e_mu <= 1e-4 and e_dec <= 1e-4


def test_diffusers_layout_full_size_keys():
    cfg = SD15.vae
    with torch.device("meta"):
        ref = _diffusers_vae(tuple(cfg.dim * m for m in cfg.dim_mult), cfg.num_res_blocks, cfg.z_dim)
    out = vae_state(ref.state_dict(), "diffusers")
    assert {k: tuple(v.shape) for k, v in out.items()} == vae_shapes(cfg)


@pytest.mark.oracle
def test_manifest_keys_and_shapes(manifests):
    manifest = {k: tuple(s) for k, s in manifests["sd-v1-vae.pth"].items()}
    assert vae_shapes(SD15.vae) == manifest
    state = {k: torch.empty(s, device="meta") for k, s in manifest.items()}
    out = vae_state(state, "sd-v1-vae.pth")
    assert list(out) == list(state) and all(out[k] is state[k] for k in state)


def test_load_from_file(tmp_path):
    cfg = TINY.vae
    state = _random_state(cfg)
    path = tmp_path / "vae.pth"
    torch.save({k: v.half() for k, v in state.items()}, path)
    vae = load_vae(path, cfg)
    assert isinstance(vae, AutoencoderKL) and not vae.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in vae.parameters())
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 16, 16)).shape == (1, cfg.z_dim, 2, 2)
        assert vae.decode(torch.zeros(1, cfg.z_dim, 2, 3)).shape == (1, 3, 16, 24)


def test_strict_errors():
    cfg = TINY.vae
    state = _random_state(cfg)
    missing = dict(state)
    del missing["decoder.upsamples.1.residual.6.bias"]
    with pytest.raises(WeightsError, match=r"missing keys: decoder\.upsamples\.1\.residual\.6\.bias"):
        load_vae(missing, cfg)
    with pytest.raises(WeightsError, match=r"unexpected keys: encoder\.extra\.weight"):
        load_vae({**state, "encoder.extra.weight": torch.zeros(1)}, cfg)
    bad = {**state, "conv2.weight": torch.zeros(cfg.z_dim, cfg.z_dim, 3, 3)}
    with pytest.raises(WeightsError, match=r"mis-shaped keys: conv2\.weight \(4, 4, 3, 3\)"):
        load_vae(bad, cfg)


def test_diffusers_unknown_keys_survive():
    with torch.device("meta"):
        state = _diffusers_vae((32, 64), 1, 4).state_dict()
    state["encoder.mid_block.attentions.0.rel_pos.weight"] = torch.zeros(1)
    del state["decoder.mid_block.attentions.0.to_v.weight"]
    out = vae_state(state, "diffusers")
    assert "encoder.mid_block.attentions.0.rel_pos.weight" in out
    kept = {f"decoder.mid_block.attentions.0.to_{p}.weight" for p in "qk"}
    assert kept <= set(out)
    cfg = VAEConfig(dim=32, z_dim=4, dim_mult=(1, 2), num_res_blocks=1)
    with pytest.raises(WeightsError, match=r"decoder\.middle\.1\.to_qkv\.weight") as info:
        load_vae(state, cfg)
    assert "rel_pos" in str(info.value) and "attentions.0.to_q.weight" in str(info.value)
