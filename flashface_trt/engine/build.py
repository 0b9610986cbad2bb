"""Build TensorRT engines from an export directory with polygraphy (the thin TensorRT-specific part).

TensorRT cannot be installed on these machines: the tests run this module with polygraphy's two
build calls replaced by a fake (tests/fakes) whose engines run the ONNX graph on ONNX Runtime, and
mypy checks it against `tensorrt-stubs` 10.13. Supported: TensorRT 10.1 to 11.x.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..runtime.artifacts.engines import (
    EngineKey,
    GpuIdentity,
    StaleEngineError,
    check_engine,
    tensorrt_version,
    write_manifest,
)
from ..runtime.artifacts.exports import read_export
from ..runtime.artifacts.manifest import read_manifest
from ..runtime.artifacts.spec import ExportShapes, NetworkSpec
from ..runtime.backends.cuda import device_info
from .profiles import BuildSettings, engine_profiles, engine_spec, memory_estimate

log = logging.getLogger(__name__)

ENGINES_MANIFEST = "engines.json"


def current_gpu() -> GpuIdentity:
    info = device_info(0)
    return GpuIdentity(info.name, info.compute_capability)


def build_engine(onnx_path: Path, spec: NetworkSpec, settings: BuildSettings, out: Path) -> None:
    """One engine: parse the ONNX graph strongly typed, its optimisation profiles (`engine_profiles`), build.

    The graph's own dtypes decide the engine's precision (an fp16 export gives an fp16 engine), the
    same on TensorRT 10 and 11: 11 has no weak typing (no `BuilderFlag.FP16`), so no precision flag
    is ever set.
    """
    import tensorrt as trt
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_bytes_from_network,
        network_from_onnx_path,
    )

    network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
    profiles = []
    for points in engine_profiles(spec, settings.shapes):
        profile = Profile()
        for name, (lo, opt, hi) in points.items():
            profile.add(name, lo, opt, hi)
        profiles.append(profile)
    cache = settings.timing_cache
    config = CreateConfig(
        profiles=profiles,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(settings.workspace_gib * (1 << 30))},
        builder_optimization_level=settings.opt_level,
        load_timing_cache=str(cache) if cache is not None and cache.is_file() else None,
    )
    serialized = engine_bytes_from_network(
        network, config=config, save_timing_cache=str(cache) if cache else None
    )
    out.write_bytes(bytes(serialized))


def export_shapes(export: dict) -> ExportShapes:
    """The shape ranges an export was made for (its manifest's `shapes`)."""
    return ExportShapes(**export["shapes"])


def profile_estimates(export: dict, shapes: ExportShapes) -> dict:
    """Profiles per engine and the UNet's largest activation per profile (estimates: TensorRT's own
    figures, `get_device_memory_size_for_profile_v2`, exist only where it runs)."""
    specs = {n: NetworkSpec.from_dict(e["spec"]) for n, e in export["networks"].items() if n != "detector"}
    itemsize = 2 if export["precision"] == "fp16" else 4
    return {
        "note": "estimated without TensorRT; build time grows about linearly with the profiles it tunes",
        "profiles": {n: len(engine_profiles(s, shapes)) for n, s in specs.items()},
        "unet_largest_activation_bytes": [
            memory_estimate(p, export["model_config"], itemsize)
            for p in engine_profiles(specs["unet"], shapes)
        ],
    }


def build_engines(onnx_dir: str | Path, out_dir: str | Path, settings: BuildSettings | None = None) -> dict:
    """Build (or reuse) one engine per exported graph; write `engines.json` and the tokenizer vocabulary.

    Without settings, the engines accept exactly the export's shape ranges.
    """
    src, out = Path(onnx_dir), Path(out_dir)
    export = read_export(src)
    settings = settings or BuildSettings(export_shapes(export))
    trt_version, gpu = tensorrt_version(), current_gpu()
    out.mkdir(parents=True, exist_ok=True)
    engines = {}
    for name, entry in export["networks"].items():
        if name == "detector":  # detection runs on ONNX Runtime (its graph is copied below)
            continue
        spec = NetworkSpec.from_dict(entry["spec"])
        graph = src / entry["file"]
        onnx_sha = str((read_manifest(graph) or {}).get("sha256", ""))  # read_export checked it exists
        key = EngineKey(name, onnx_sha, settings.key(), trt_version, gpu)
        path = out / key.file_name()
        try:
            check_engine(path, trt_version, gpu, onnx_sha)
            log.info("reusing %s", path.name)
        except StaleEngineError:
            log.info("building %s (%s, TensorRT %s, %s) ...", path.name, name, trt_version, gpu.name)
            t0 = time.perf_counter()
            build_engine(graph, spec, settings, path)
            seconds = time.perf_counter() - t0
            write_manifest(path, key, seconds)
            log.info("built %s in %.0f s", path.name, seconds)
        engines[name] = {"file": path.name, "spec": engine_spec(spec, settings.shapes).to_dict()}
    shutil.copyfile(src / export["vocab"], out / export["vocab"])
    detector = export["networks"].get("detector")
    if detector is not None:  # detection stays on ONNX Runtime: keep its graph with the engines
        for suffix in ("", ".json"):
            shutil.copyfile(src / (detector["file"] + suffix), out / (detector["file"] + suffix))
    manifest = {
        "format": "flashface-trt-engines/1",
        "tensorrt": trt_version,
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "precision": export["precision"],
        "shapes": asdict(settings.shapes),
        "export": export,
        "vocab": export["vocab"],
        "engines": engines,
        "estimates": profile_estimates(export, settings.shapes),
    }
    (out / ENGINES_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
