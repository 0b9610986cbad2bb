"""Reading a directory written by `flashface-trt export` (or `export-detector`): manifest, specs, graphs."""

from __future__ import annotations

from pathlib import Path

from ..errors import WeightsError
from ..sampling.request import MIN_REFERENCES, GenerationRequest
from .manifest import check_artifact, load_manifest, read_manifest
from .spec import EXPORT_FORMAT, ExportShapes, NetworkSpec

MANIFEST = "manifest.json"
UNET_GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", "reference_net", "unet")  # what a pipeline runs
EXPORT_HINT = "run `flashface-trt export --out DIR`"


def export_dir(root: str | Path, flag: str = "--onnx") -> Path:
    """`root` if it is a directory; WeightsError saying whether it is missing or a file."""
    root = Path(root)
    if root.is_dir():
        return root
    if root.exists():
        raise WeightsError(
            f"{flag} {str(root)!r} is a file; {flag} takes the directory written by `flashface-trt export` "
            f"(or `export-detector`), e.g. {str(root.parent)!r}"
        )
    raise WeightsError(f"{flag} directory {str(root)!r} does not exist; {EXPORT_HINT}")


def export_manifest(root: str | Path) -> dict:
    """The manifest of an exported directory, without checking its graphs (cheap)."""
    root = export_dir(root)
    return load_manifest(root / MANIFEST, EXPORT_FORMAT, WeightsError, f"; {EXPORT_HINT}")


def read_export(root: str | Path, required: tuple[str, ...] = UNET_GRAPHS) -> dict:
    """The manifest of an exported directory, after checking every graph it names against its manifest.

    Each required graph must exist with the size and sha256 its own manifest records (hashed once
    per file size and modification time, see `artifacts.content_matches`).
    """
    root = Path(root)
    manifest = export_manifest(root)
    networks = manifest.get("networks", {})
    for name in required:
        entry = networks.get(name)
        if entry is None or not (root / entry["file"]).is_file():
            raise WeightsError(f"{str(root)!r} lacks the {name} graph; re-run `flashface-trt export`")
    for entry in networks.values():
        check_artifact(root / entry["file"])
    return manifest


def export_specs(manifest: dict) -> dict[str, NetworkSpec]:
    """Every network's spec from an export manifest."""
    return {name: NetworkSpec.from_dict(e["spec"]) for name, e in manifest["networks"].items()}


def reference_size(specs: dict[str, NetworkSpec]) -> int:
    """The reference crop side the graphs take: the VAE encoder's fixed image size."""
    (images,) = (t for t in specs["vae_encoder"].inputs if t.name == "images")  # [R, 3, S, S]
    return int(images.shape[-1])


def manifest_shapes(manifest: dict) -> ExportShapes:
    """The shape ranges an export (or a set of engines) accepts, from its manifest's `shapes`."""
    return ExportShapes(**manifest["shapes"])


def detector_graph(root: str | Path) -> Path:
    """The face detector graph of a directory written by `export` or `export-detector`, checked.

    An export's manifest names its detector; otherwise the directory must hold exactly one
    `detector-<hash>.onnx` with its manifest beside it.
    """
    root = export_dir(root)
    if (root / MANIFEST).is_file():
        entry = export_manifest(root)["networks"].get("detector")
        if entry is None:
            raise WeightsError(
                f"the export {str(root)!r} has no detector graph; write one there with "
                f"`flashface-trt export-detector --out-dir {root}`, or pass --cropped faces"
            )
        graphs = [root / entry["file"]]
    else:
        graphs = sorted(p for p in root.glob("detector-*.onnx") if read_manifest(p) is not None)
    if not graphs:
        raise WeightsError(
            f"{str(root)!r} holds no detector graph; run `flashface-trt export-detector --out-dir {root}`"
        )
    if len(graphs) > 1:
        names = ", ".join(p.name for p in graphs)
        raise WeightsError(f"{str(root)!r} holds several detector graphs ({names}); keep one")
    check_artifact(graphs[0], "flashface-trt export-detector")
    return graphs[0]


def range_problems(req: GenerationRequest, num_faces: int, shapes: ExportShapes) -> list[tuple[str, str]]:
    """(problem, export option that fixes it) for each size of `req` outside `shapes`' ranges.

    `num_faces` reference faces are repeated up to `MIN_REFERENCES`, as the pipeline does.
    """
    out = []
    sizes = f"[{shapes.min_size}, {shapes.max_size}]"
    for name in ("height", "width"):
        value = getattr(req, name)
        if not shapes.min_size <= value <= shapes.max_size:
            fix = f"--min-size {value}" if value < shapes.min_size else f"--max-size {value}"
            out.append((f"{name} {value} is outside the range {sizes}", fix))
    if req.num_samples > shapes.max_samples:
        problem = f"num_samples {req.num_samples} is outside the range [1, {shapes.max_samples}]"
        out.append((problem, f"--max-samples {req.num_samples}"))
    refs = max(num_faces, MIN_REFERENCES)
    if refs > shapes.max_refs:
        problem = (
            f"{refs} reference faces (fewer are repeated up to {MIN_REFERENCES}) are outside the range "
            f"[1, {shapes.max_refs}]"
        )
        out.append((problem, f"--max-refs {refs}"))
    return out
