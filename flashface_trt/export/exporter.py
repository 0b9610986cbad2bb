"""Export every FlashFace network to ONNX into one self-contained directory.

The directory holds hash-named graphs (reused while current, rebuilt when stale), the tokenizer
vocabulary and `manifest.json` with the model config, shape ranges and every graph's spec, so
that `generate --onnx DIR` (and the TensorRT builder) need nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models.backend import TorchModels
from ..models.config import EXPORT_CUTS
from ..models.retinaface import RetinaFace
from ..runtime.artifacts.spec import EXPORT_FORMAT, ExportShapes, NetworkSpec
from ..runtime.errors import InputError
from ..runtime.sampling.guidance import SAMPLE_STEP_ROW
from ..runtime.sampling.tokenizer import ClipTokenizer
from .artifacts import arrays_digest, cached_artifact
from .detector import cached_detector, detector_spec
from .networks import GRAPHS, NETWORKS, network_specs
from .onnx_io import EXTERNAL_DATA_BYTES, check_graph, export_graph, simplify

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VOCAB = "bpe_simple_vocab_16e6.txt.gz"


@dataclass(frozen=True)
class ExportSettings:
    """How to export: precision ('fp32' or 'fp16' weights and activations, normalisations in float32),
    ONNX opset, whether to simplify graphs with onnxslim, the shape ranges to support, and the UNet's
    FLOP cuts (`config.CUTS`; without "lse" by default: TensorRT fuses attention written softmax(QK^T)V,
    likely not the explicit log-sum-exp form (unverified); ONNX Runtime's CPU runs both unfused)."""

    precision: str = "fp32"
    opset: int = 18
    slim: bool = True
    shapes: ExportShapes = field(default_factory=ExportShapes)
    dynamo: bool = False  # the torch.export-based exporter instead of the TorchScript-based one
    cuts: tuple[str, ...] = EXPORT_CUTS

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise InputError(f"export precision must be 'fp32' or 'fp16', got {self.precision!r}")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "fp16" else torch.float32


def _module_for(models: TorchModels, name: str) -> nn.Module:
    return {"text_encoder": models.text, "vae_encoder": models.vae, "vae_decoder": models.vae}.get(
        name, models.unet
    )


def sample_inputs(spec: NetworkSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Tracing inputs of a spec: zeros, except timesteps and reference weights, at `sample_shapes`."""
    shapes = spec.sample_shapes()
    out = []
    for t in spec.inputs:
        dtype = getattr(torch, t.dtype)
        if t.name == "timestep":
            out.append(torch.full(shapes[t.name], 500.0, dtype=dtype, device=device))
        elif t.name == "coef":  # a plausible step per sample: guidance 7.5 / 3.2 / 0.5, DDIM coefficients
            row = torch.tensor(SAMPLE_STEP_ROW, dtype=dtype, device=device)
            out.append(row.expand(shapes[t.name][0], -1).contiguous())
        elif t.name in ("ref_scale", "masks"):
            out.append(torch.ones(shapes[t.name], dtype=dtype, device=device))
        else:
            out.append(torch.zeros(shapes[t.name], dtype=dtype, device=device))
    return tuple(out)


def export_network(
    models: TorchModels, name: str, spec: NetworkSpec, path: Path, settings: ExportSettings
) -> None:
    """Export one network's graph to `path`, simplify it and check it against its spec."""
    graph = GRAPHS[name](models).eval()
    device = next(models.unet.parameters()).device
    big = (
        sum(p.numel() * p.element_size() for p in _module_for(models, name).parameters())
        > EXTERNAL_DATA_BYTES
    )
    t0 = time.perf_counter()
    args = sample_inputs(spec, device)
    cuts = models.unet.cuts
    try:
        models.unet.set_cuts(settings.cuts)
        export_graph(graph, args, spec, path, settings.opset, external_data=big, dynamo=settings.dynamo)
    finally:
        models.unet.set_cuts(cuts)
    if settings.slim:
        simplify(path)
    check_graph(path, spec)
    log.info("exported %s in %.1f s", path.name, time.perf_counter() - t0)


def export_models(
    models: TorchModels,
    out_dir: str | Path,
    settings: ExportSettings | None = None,
    detector: RetinaFace | None = None,
    tokenizer_vocab: Path | None = None,
) -> dict:
    """Export every network (and the detector, if given) into `out_dir`; returns the manifest."""
    settings = settings or ExportSettings()
    if models.dtype != settings.dtype:
        raise InputError(f"models are {models.dtype} but the export asks for {settings.precision}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = network_specs(models, settings.shapes, settings.cuts)
    digests: dict[int, str] = {}
    entries = {}
    for name in NETWORKS:
        module = _module_for(models, name)
        if id(module) not in digests:
            digests[id(module)] = arrays_digest(
                {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
            )
        key_settings = {
            "precision": settings.precision,
            "opset": settings.opset,
            "slim": settings.slim,
            "exporter": "dynamo" if settings.dynamo else "torchscript",
            **({"cuts": list(settings.cuts)} if name == "unet" else {}),
            "spec": specs[name].to_dict(),
            "torch": torch.__version__,
        }

        def build(p: Path, n: str = name) -> None:
            export_network(models, n, specs[n], p, settings)

        path = cached_artifact(out, name, ".onnx", digests[id(module)], key_settings, build)
        entries[name] = {"file": path.name, "spec": specs[name].to_dict()}
    if detector is not None:
        path = cached_detector(detector, out)
        entries["detector"] = {"file": path.name, "spec": detector_spec().to_dict()}
    shutil.copyfile(tokenizer_vocab or ClipTokenizer.packaged_vocab(), out / VOCAB)
    manifest = {
        "format": EXPORT_FORMAT,
        "precision": settings.precision,
        "opset": settings.opset,
        "shapes": asdict(settings.shapes),
        "model_config": models.config.to_dict(),
        "vocab": VOCAB,
        "networks": entries,
    }
    _remove_stale(out, {str(e["file"]) for e in entries.values()})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete earlier graphs of the same networks that this export no longer uses."""
    for name in (*NETWORKS, "detector"):
        for f in out.glob(f"{name}-*.onnx"):
            if f.name not in keep:
                for extra in (f, f.with_suffix(".onnx.json"), f.with_suffix(".onnx.data")):
                    extra.unlink(missing_ok=True)
                log.info("removed stale %s", f.name)
