"""Reading a directory written by `flashface-trt export`: its manifest, specs and checked graphs."""

from __future__ import annotations

from pathlib import Path

from .artifacts import check_artifact, load_manifest
from .errors import WeightsError
from .spec import EXPORT_FORMAT, NetworkSpec

MANIFEST = "manifest.json"
UNET_GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", "reference_net", "unet")  # what a pipeline runs


def read_export(root: str | Path, required: tuple[str, ...] = UNET_GRAPHS) -> dict:
    """The manifest of an exported directory, after checking every graph it names against its manifest.

    Each required graph must exist with the size and sha256 its own manifest records (hashed once
    per file size and modification time, see `artifacts.content_matches`).
    """
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise WeightsError(f"export directory {str(root)!r} does not exist; run `flashface-trt export`")
    manifest = load_manifest(path, EXPORT_FORMAT, WeightsError, "; run `flashface-trt export`")
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
