"""Engine identity: an engine is keyed by its ONNX graph, build settings, TensorRT version and GPU.

A manifest beside each engine records that key. Loading compares it with the running TensorRT and
GPU and refuses a mismatch with a message saying what differs and how to rebuild: a TensorRT
engine only runs on the TensorRT version and GPU model it was built for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import FlashFaceError, WeightsError
from .manifest import content_matches, load_manifest, sha256_file

ENGINE_FORMAT = "flashface-trt-engine/1"
ENGINES_FORMAT = "flashface-trt-engines/1"  # engines.json of a directory written by `flashface-trt build`
ENGINES_MANIFEST = "engines.json"


NOT_INSTALLED = "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU and driver)"


def tensorrt_version() -> str:
    """The installed TensorRT's version; FlashFaceError where there is none (or only its type stubs)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise FlashFaceError(NOT_INSTALLED) from exc
    version = getattr(tensorrt, "__version__", None)
    if version is None:  # an importable `tensorrt` without the library: tensorrt-stubs, for one
        raise FlashFaceError(f"{NOT_INSTALLED}: the importable `tensorrt` has no __version__ (type stubs?)")
    return str(version)


class StaleEngineError(FlashFaceError):
    """An engine built for another graph, settings, TensorRT version or GPU."""


@dataclass(frozen=True)
class GpuIdentity:
    """The device an engine is built for: name and compute capability."""

    name: str
    compute_capability: str  # "9.0" for an H100


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes an engine: graph content, build settings, TensorRT version and GPU."""

    network: str
    onnx_sha256: str
    settings: dict
    tensorrt: str
    gpu: GpuIdentity

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def file_name(self) -> str:
        return f"{self.network}-{self.digest()}.plan"


def write_manifest(engine: Path, key: EngineKey, build_seconds: float) -> None:
    manifest = {
        "format": ENGINE_FORMAT,
        "key": asdict(key),
        "digest": key.digest(),
        "bytes": engine.stat().st_size,
        "sha256": sha256_file(engine),
        "build_seconds": round(build_seconds, 1),
    }
    engine.with_suffix(".plan.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def engines_manifest(root: str | Path) -> dict:
    """The `engines.json` of a directory written by `flashface-trt build`, without loading any engine."""
    root = Path(root)
    hint = "; run `flashface-trt build --onnx EXPORT --out DIR`"
    if not root.is_dir():
        what = "is a file, not an engine directory" if root.exists() else "does not exist"
        raise WeightsError(f"--engines {str(root)!r} {what}{hint}")
    return load_manifest(root / ENGINES_MANIFEST, ENGINES_FORMAT, WeightsError, hint)


def read_manifest(engine: Path) -> dict:
    return load_manifest(engine.with_suffix(".plan.json"), ENGINE_FORMAT, StaleEngineError, "; rebuild it")


def check_engine(engine: Path, tensorrt: str, gpu: GpuIdentity, onnx_sha256: str | None = None) -> dict:
    """The manifest of `engine` if it fits this TensorRT, GPU (and graph); else StaleEngineError.

    The file's sha256 is compared with the one recorded at build time once per (size, mtime), as
    for ONNX graphs (`artifacts.content_matches`).
    """
    if not engine.is_file():
        raise StaleEngineError(f"engine {str(engine)!r} does not exist; run `flashface-trt build`")
    manifest = read_manifest(engine)
    key = manifest["key"]
    problems = []
    if key["tensorrt"] != tensorrt:
        problems.append(f"built with TensorRT {key['tensorrt']}, running {tensorrt}")
    if key["gpu"]["name"] != gpu.name or key["gpu"]["compute_capability"] != gpu.compute_capability:
        built = f"{key['gpu']['name']} (sm {key['gpu']['compute_capability']})"
        problems.append(f"built for {built}, running on {gpu.name} (sm {gpu.compute_capability})")
    if onnx_sha256 is not None and key["onnx_sha256"] != onnx_sha256:
        problems.append("built from another ONNX graph than the export's current one")
    if "sha256" not in manifest:
        problems.append("its manifest records no sha256 (built by an older version)")
    elif not content_matches(engine, str(manifest["sha256"]), manifest.get("bytes")):
        problems.append("the engine file changed after it was built (size or sha256)")
    if problems:
        raise StaleEngineError(
            f"{engine.name} is stale: "
            + "; ".join(problems)
            + ". Rebuild with `flashface-trt build --onnx DIR --out DIR`"
        )
    return manifest
