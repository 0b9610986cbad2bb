"""Weights directories: locating files, strict loading, the tiny preset, and float16 conversion.

A weights directory holds either the official files (`flashface.ckpt`,
`openai-clip-vit-large-14.pth`, `sd-v1-vae.pth`, `bpe_simple_vocab_16e6.txt.gz`, and
`retinaface_resnet50.pth` unless faces come pre-cropped), the
Hugging Face / diffusers layouts of the text encoder and VAE, or what
`flashface-trt convert-weights` writes (deduplicated float16 safetensors + `manifest.json`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..runtime.artifacts.manifest import load_manifest, sha256_file
from ..runtime.artifacts.spec import TINY_SHAPES
from ..runtime.errors import WeightsError
from ..runtime.faces.detection import preprocess, to_unit_tensor
from ..runtime.faces.images import synthetic_face
from ..runtime.sampling.tokenizer import ClipTokenizer
from .backend import TorchModels
from .config import TINY, ModelConfig
from .retinaface import TINY_RETINAFACE, RetinaFace, random_retinaface_state, retinaface_state
from .text_encoder import TextEncoder, text_encoder_state
from .unet import FlashFaceUNet, unet_state
from .vae import AutoencoderKL, vae_state
from .weights import StateDict, build_strict, check_state_dict, meta_shapes, read_checkpoint

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "flashface-trt-weights/1"
CONFIG = "config.json"
VOCAB = "bpe_simple_vocab_16e6.txt.gz"


@dataclass(frozen=True)
class Component:
    """One network's weights: converted file name, accepted source files (first found wins), converter."""

    name: str
    what: str
    converted: str
    sources: tuple[str, ...]
    convert: Callable[[Mapping[str, torch.Tensor], str], StateDict]
    dtype: torch.dtype = torch.float16  # storage dtype of the converted file


COMPONENTS = {
    "unet": Component(
        "unet", "FlashFace UNet + ReferenceNet", "unet.safetensors", ("flashface.ckpt",), unet_state
    ),
    "text": Component(
        "text",
        "CLIP ViT-L/14 text encoder",
        "text_encoder.safetensors",
        ("openai-clip-vit-large-14.pth", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
        text_encoder_state,
    ),
    "vae": Component(
        "vae",
        "SD 1.x VAE",
        "vae.safetensors",
        ("sd-v1-vae.pth", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
        vae_state,
    ),
}

# optional: only needed when reference photos go through face detection; kept in float32 so that
# converted weights detect exactly what the official file does
DETECTOR = Component(
    "detector",
    "RetinaFace-ResNet50 face detector",
    "retinaface.safetensors",
    ("retinaface_resnet50.pth",),
    retinaface_state,
    torch.float32,
)
ALL_COMPONENTS = {**COMPONENTS, "detector": DETECTOR}


def _factory(name: str, cfg: ModelConfig) -> nn.Module:
    if name == "detector":
        return RetinaFace()
    if name == "unet":
        return FlashFaceUNet(cfg.unet)
    if name == "text":
        return TextEncoder(cfg.text)
    return AutoencoderKL(cfg.vae)


def component_shapes(name: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a network, built on the meta device (no memory)."""
    return meta_shapes(lambda: _factory(name, cfg))


def build_loaded(
    name: str, cfg: ModelConfig, state: Mapping[str, torch.Tensor], source: str, device, dtype
) -> nn.Module:
    """Build a network on the meta device and strictly assign the canonical `state` into it."""
    return build_strict(lambda: _factory(name, cfg), state, source, device, dtype)


def _find_source(root: Path, comp: Component) -> tuple[Path, bool]:
    """The file to load for a component and whether it is a converted one."""
    manifest = root / MANIFEST
    if (root / comp.converted).is_file() and manifest.is_file():
        return root / comp.converted, True
    for rel in comp.sources:
        if (root / rel).is_file():
            return root / rel, False
    names = " or ".join([comp.converted, *comp.sources])
    raise WeightsError(f"weights directory {str(root)!r} has no {comp.what} ({names})")


def _read_manifest(root: Path) -> dict:
    return load_manifest(root / MANIFEST, MANIFEST_FORMAT, WeightsError, "; re-run convert-weights")


def read_component(root: Path, name: str) -> tuple[StateDict, str]:
    """Canonical state dict of one component of a weights directory, and where it came from."""
    comp = ALL_COMPONENTS[name]
    path, converted = _find_source(root, comp)
    if converted:
        entry = _read_manifest(root).get("files", {}).get(comp.converted)
        if entry is None:
            raise WeightsError(
                f"{str(root / MANIFEST)!r} does not list {comp.converted}; re-run convert-weights"
            )
        if path.stat().st_size != entry["bytes"]:
            raise WeightsError(
                f"{str(path)!r} has {path.stat().st_size} bytes but the manifest says {entry['bytes']}: "
                "the file changed after conversion; re-run convert-weights"
            )
        return read_checkpoint(path), str(path)
    return comp.convert(read_checkpoint(path), str(path)), str(path)


def model_config_for(root: Path) -> ModelConfig:
    """Sizes of the networks in a weights directory: its `config.json` if present, else SD 1.5."""
    path = root / CONFIG
    if path.is_file():
        try:
            return ModelConfig.from_json(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{str(path)!r} is not a valid model config: {exc}") from exc
    return ModelConfig()


def load_models(
    weights: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TorchModels:
    """Load every network of a weights directory strictly, onto `device` in `dtype`."""
    root = Path(weights)
    if not root.is_dir():
        raise WeightsError(f"weights directory {str(root)!r} does not exist")
    cfg = model_config_for(root)
    nets = {}
    for name in COMPONENTS:
        state, source = read_component(root, name)
        nets[name] = build_loaded(name, cfg, state, source, device, dtype)
        log.info("loaded %s from %s", COMPONENTS[name].what, source)
    vocab = root / VOCAB
    tokenizer = ClipTokenizer(vocab if vocab.is_file() else None)
    return TorchModels(cfg, nets["unet"], nets["text"], nets["vae"], tokenizer)  # type: ignore[arg-type]


def load_detector(
    weights: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> RetinaFace:
    """The face detector of a weights directory (official `retinaface_resnet50.pth` or converted)."""
    root = Path(weights)
    if not root.is_dir():
        raise WeightsError(f"weights directory {str(root)!r} does not exist")
    try:
        state, source = read_component(root, "detector")
    except WeightsError as exc:
        raise WeightsError(f"{exc}; pass already-cropped faces with --cropped to skip detection") from exc
    model = build_loaded("detector", model_config_for(root), state, source, device, dtype)
    log.info("loaded %s from %s", DETECTOR.what, source)
    return model  # type: ignore[return-value]


def tiny_detector(device: str | torch.device = "cpu", seed: int = 0, face_bias: float = 0.0) -> RetinaFace:
    """The tiny preset's detector: a narrow RetinaFace (`TINY_RETINAFACE`: the official layout with
    8-channel stem, one bottleneck per stage, a 32-channel FPN), random weights, BatchNorm
    calibrated once.

    Random BatchNorm statistics make a deep ResNet's activations explode, so the statistics are
    set from one pass over a drawn face (train-mode BatchNorm, cumulative average). Its 'faces' are
    random boxes; it exists to run the detection path without real weights. The official file
    loads into the full size (`load_detector`).
    """
    state = {k: v.clone() for k, v in _tiny_detector_state(seed, face_bias).items()}
    return build_strict(_tiny_retinaface, state, "tiny preset (detector)", device, torch.float32)


def _tiny_retinaface() -> RetinaFace:
    return RetinaFace(TINY_RETINAFACE)


@functools.lru_cache(maxsize=2)
def _tiny_detector_state(seed: int, face_bias: float) -> dict[str, torch.Tensor]:
    """`tiny_detector`'s calibrated weights, made once per process."""
    state = random_retinaface_state(seed, face_bias, TINY_RETINAFACE)
    model = build_strict(_tiny_retinaface, state, "tiny preset (detector)", "cpu", torch.float32)
    calib = synthetic_face(256, seed)
    x = torch.from_numpy(preprocess(to_unit_tensor(calib)[None]))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        model.train()(x)
    return {k: v.detach() for k, v in model.state_dict().items()}


def random_state(shapes: Mapping[str, tuple[int, ...]], seed: int) -> StateDict:
    """Deterministic random weights from NumPy (stable across torch versions and machines)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif key.endswith(".weight"):  # norm scales
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        out[key] = torch.from_numpy(value.astype(np.float32))
    return out


def random_models(
    config: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    label: str = "random",
) -> TorchModels:
    """Every network of `config` with deterministic random weights (`random_state`, one seed each)."""
    nets = {}
    for i, name in enumerate(COMPONENTS):
        state = random_state(component_shapes(name, config), seed + i)
        nets[name] = build_loaded(name, config, state, f"{label} ({name})", device, dtype)
    return TorchModels(config, nets["unet"], nets["text"], nets["vae"], ClipTokenizer())  # type: ignore[arg-type]


def tiny_models(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> TorchModels:
    """The embedded default: a deterministic random tiny FlashFace (its images are noise), which
    takes the tiny export's reference crops (`TINY_SHAPES.ref_size`)."""
    models = random_models(TINY, device, dtype, seed, "tiny preset")
    return replace(models, ref_size=TINY_SHAPES.ref_size)


def _summarise(keys: list[str]) -> dict[str, int]:
    """Count of dropped source keys per top-level prefix (aliases, unused or renamed tensors)."""
    out: dict[str, int] = {}
    for k in keys:
        out[k.split(".")[0]] = out.get(k.split(".")[0], 0) + 1
    return out


def convert_weights(src: str | Path, out: str | Path) -> dict:
    """Official files -> float16 safetensors with each tensor stored once, plus a manifest."""
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise WeightsError(f"weights directory {str(src)!r} does not exist")
    cfg = model_config_for(src)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": MANIFEST_FORMAT, "config": cfg.to_dict(), "files": {}}
    for name, comp in ALL_COMPONENTS.items():
        path = next((src / rel for rel in comp.sources if (src / rel).is_file()), None)
        if path is None and name == DETECTOR.name:
            log.info("no %s in %s: converted weights will need --cropped faces", comp.what, src)
            continue
        if path is None:
            raise WeightsError(f"{str(src)!r} has no {comp.what} ({' or '.join(comp.sources)})")
        raw = read_checkpoint(path)
        state = comp.convert(raw, str(path))
        check_state_dict(component_shapes(name, cfg), state, str(path))
        dropped = sorted(set(raw) - set(state))
        tensors = {
            k: (v.to(comp.dtype) if v.is_floating_point() else v).contiguous().clone()
            for k, v in sorted(state.items())
        }
        target = out / comp.converted
        save_file(tensors, str(target), metadata={"source": path.name, "format": MANIFEST_FORMAT})
        manifest["files"][comp.converted] = {
            "source": str(path.relative_to(src)),
            "bytes": target.stat().st_size,
            "sha256": sha256_file(target),
            "dropped_from_source": _summarise(dropped),
            "tensors": {
                k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.numpy().tobytes()).hexdigest()}
                for k, v in tensors.items()
            },
        }
        log.info("converted %s: %d tensors -> %s", path.name, len(tensors), target)
    vocab = src / VOCAB
    shutil.copyfile(vocab if vocab.is_file() else ClipTokenizer.packaged_vocab(), out / VOCAB)
    (out / CONFIG).write_text(
        json.dumps(
            {
                "unet": cfg.to_dict()["unet"],
                "text_encoder": cfg.to_dict()["text"],
                "vae": cfg.to_dict()["vae"],
            },
            indent=1,
        )
    )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_converted(root: str | Path) -> None:
    """Check every converted file's sha256 against the manifest (a full read of the weights)."""
    root = Path(root)
    manifest = _read_manifest(root)
    for fname, entry in manifest["files"].items():
        digest = sha256_file(root / fname)
        if digest != entry["sha256"]:
            raise WeightsError(
                f"{str(root / fname)!r} sha256 {digest[:12]}... != manifest {entry['sha256'][:12]}..."
            )
