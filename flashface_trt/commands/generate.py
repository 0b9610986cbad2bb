"""`generate`: check the whole request first (flags, numbers, files, output, ranges), then load and run."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..backends import load_backend
from ..runtime.backends.cuda import free_device_memory
from ..runtime.errors import InputError
from ..runtime.sampling.params import DEFAULT_SIZE, GENERATE_PARAMS
from ..runtime.sampling.request import GenerationRequest, make_request
from .checks import check_generate_flags, check_weights_dir

log = logging.getLogger("flashface_trt")
MARGIN = 0.2  # share of the free memory kept back from a request's estimated peak (as `serve`'s default)


def request_from(args: argparse.Namespace, size: tuple[int, int]) -> GenerationRequest:
    """The validated request of `generate`'s flags (GENERATE_PARAMS); `size` (height, width) unless given."""
    given = {p.name: getattr(args, p.name) for p in GENERATE_PARAMS if p.name not in ("prompt", "recipe")}
    given.update(height=args.height or size[0], width=args.width or size[1])
    return make_request(args.prompt, args.recipe, **given)


def _manifest(args: argparse.Namespace) -> dict | None:
    """The export's or the engines' manifest (read, not checked: cheap), or None for PyTorch."""
    if args.onnx:
        from ..runtime.artifacts.exports import export_manifest

        return export_manifest(args.onnx)
    if args.engines:
        from ..runtime.artifacts.engines import engines_manifest

        return engines_manifest(args.engines)
    return None


def _default_size(args: argparse.Namespace, manifest: dict | None) -> tuple[int, int]:
    if manifest is not None:
        return manifest["shapes"]["opt_height"], manifest["shapes"]["opt_width"]
    size = DEFAULT_SIZE["tiny" if args.preset else "weights"]
    return size, size


def _check_ranges(args: argparse.Namespace, manifest: dict, request: GenerationRequest, refs: int) -> None:
    """A request outside the export's (or the engines') shape ranges is refused, naming the fix."""
    from ..runtime.artifacts.exports import manifest_shapes, range_problems

    problems = range_problems(request, refs, manifest_shapes(manifest))
    if not problems:
        return
    fixes = " ".join(fix for _, fix in problems)
    if args.onnx:
        where = f"the export {str(args.onnx)!r}"
        remedy = (
            f"make a larger export: flashface-trt export (--weights DIR | --preset tiny) --out DIR {fixes}"
        )
    else:
        where = f"the engines {str(args.engines)!r}"
        remedy = f"build larger engines: flashface-trt build --onnx EXPORT --out DIR {fixes}"
    raise InputError(f"{'; '.join(p for p, _ in problems)} in {where}; {remedy}")


def _admission(args: argparse.Namespace, manifest: dict | None, rows: int = 0):
    """The model flags' footprint (weights by file size) and their device's free memory; nothing loaded."""
    from ..runtime.sampling.cost import Admission, Footprint, available_ram

    root, free = args.onnx or args.engines or args.weights, available_ram()
    if manifest is None:
        from ..backends import require_torch, torch_device

        require_torch("generate")  # what to install, before torch is imported here
        import torch

        from ..models.config import TINY
        from ..models.loading import model_config_for

        device, dtype = torch_device(args)
        config = (TINY if args.preset else model_config_for(args.weights)).to_dict()
        family, precision = "torch", "fp16" if dtype == torch.float16 else "fp32"
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else free
    else:
        config = manifest.get("model_config") or manifest["export"]["model_config"]
        family, precision = "onnxruntime" if args.onnx else "tensorrt", manifest["precision"]
        free = free_device_memory() if args.engines else free
    weights = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file()) if root else 0
    return Admission(0, Footprint.of(config, precision, family, weights), free, MARGIN, rows)


def _read_photos(args: argparse.Namespace, paths: Sequence[Path]) -> list[Image.Image] | None:
    """The decoded photos (None without any, where a drawn face stands in)."""
    from ..runtime.faces.images import load_image

    if paths:
        return [load_image(path, max_pixels=args.max_pixels) for path in paths]
    if args.weights:
        raise InputError("give at least one reference photo with --face (a drawn face is only for tests)")
    return None


def _generate_batch(args: argparse.Namespace, manifest: dict | None, size: tuple[int, int]) -> int:
    """`generate --batch-file`: every line checked first, then all run by the step-level executor."""
    from ..runtime.sampling.pipeline import register_identity
    from .batch import on_line, read_batch_file, run_batch

    lines = read_batch_file(args, size, request_from)
    admission = _admission(args, manifest, args.max_batch_rows)
    for line in lines:
        if args.weights and not line.faces:
            raise InputError(f"{args.batch_file}:{line.number}: no photo ('face' on the line or --face)")
        try:
            if manifest is not None:
                _check_ranges(args, manifest, line.request, max(len(line.faces), 1))
            admission.check(line.request, max(len(line.faces), 1))
        except InputError as exc:
            raise InputError(f"{args.batch_file}:{line.number}: {exc}", exc.field) from exc
    first: dict[tuple[Path, ...], int] = {}  # each photo set read once; errors name its first line
    for line in lines:
        first.setdefault(line.faces, line.number)
    photos = {faces: on_line(args, n, _read_photos, args, faces) for faces, n in first.items()}
    backend, detector = load_backend(args)

    def identity_of(paths: tuple[Path, ...]):
        crops = on_line(args, first[paths], _crops, args, photos[paths], detector, paths)
        return register_identity(backend, crops)

    return run_batch(args, backend, lines, identity_of)


def generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..runtime.faces.outputs import image_paths, save_image
    from ..runtime.sampling.pipeline import generate as run_pipeline

    check_generate_flags(args)
    if args.weights:
        check_weights_dir(args.weights)
    manifest = _manifest(args)
    size = _default_size(args, manifest)
    if args.prompt is not None and not args.prompt.strip():
        raise InputError(f"--prompt {args.prompt!r} is empty: say what to draw", "prompt")
    if args.batch_file:
        return _generate_batch(args, manifest, size)
    if not args.prompt:
        raise InputError("give --prompt (or --batch-file with a prompt on every line)", "prompt")
    request = request_from(args, size)
    if manifest is not None:
        _check_ranges(args, manifest, request, len(args.face))
    _admission(args, manifest).check(request, max(len(args.face), 1))  # before anything loads
    paths = image_paths(args.out, request.num_samples)
    photos = _read_photos(args, args.face)
    backend, detector = load_backend(args)
    faces = _crops(args, photos, detector, args.face)
    t0 = time.perf_counter()
    with tqdm(total=request.steps, desc="denoising", unit="step", file=sys.stderr) as bar:
        images = run_pipeline(backend, request, faces, on_step=lambda k, n: bar.update(1))
    log.info("generated %d image(s) in %.1f s on %s", len(images), time.perf_counter() - t0, backend.name)
    for path, img in zip(paths, images):
        save_image(img, path)
        print(path)
    return 0


def _crops(
    args: argparse.Namespace, photos: list[Image.Image] | None, detector, paths: Sequence[Path]
) -> list[Image.Image]:
    """Reference crops: the photos' detected faces, the photos themselves with --cropped, or a drawn face."""
    from ..runtime.faces.images import synthetic_face
    from ..runtime.faces.references import references_from_images

    if photos is None:
        log.info("no --face given: using a drawn stand-in face")
        return [synthetic_face()]
    if args.cropped:
        return photos
    names = [Path(p).name for p in paths]
    return [r.crop for r in references_from_images(photos, names, detector(), args.largest_face)]
