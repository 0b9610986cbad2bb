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
from ..runtime.errors import InputError
from ..runtime.sampling.params import DEFAULT_SIZE, GENERATE_PARAMS
from ..runtime.sampling.request import GenerationRequest, make_request
from .checks import check_generate_flags, check_weights_dir

log = logging.getLogger("flashface_trt")


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
    from .batch import read_batch_file, run_batch

    lines = read_batch_file(args, size, request_from)
    for line in lines:
        if args.weights and not line.faces:
            raise InputError(f"{args.batch_file}:{line.number}: no photo ('face' on the line or --face)")
        if manifest is not None:
            try:
                _check_ranges(args, manifest, line.request, max(len(line.faces), 1))
            except InputError as exc:
                raise InputError(f"{args.batch_file}:{line.number}: {exc}", exc.field) from exc
    sets = dict.fromkeys(line.faces for line in lines)  # each photo set decoded once
    photos = {faces: _read_photos(args, faces) for faces in sets}
    backend, detector = load_backend(args)

    def identity_of(paths: tuple[Path, ...]):
        return register_identity(backend, _crops(args, photos[paths], detector, paths))

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
    if args.batch_file:
        return _generate_batch(args, manifest, size)
    if not args.prompt:
        raise InputError("give --prompt (or --batch-file with a prompt on every line)", "prompt")
    request = request_from(args, size)
    if manifest is not None:
        _check_ranges(args, manifest, request, len(args.face))
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
