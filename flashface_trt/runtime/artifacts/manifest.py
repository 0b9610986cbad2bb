"""Reading the manifests of cached artifacts (ONNX graphs, engines' sources) and checking files.

An artifact `<name>-<digest>.onnx` has `<file>.json` beside it recording its key, size and sha256.
Writing them is the exporter's job (`export/artifacts.py`); runtimes only read and verify, so this
part needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..errors import WeightsError

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "flashface-trt-artifact/1"

STAMPS = ".verified.json"  # per directory: file -> [size, mtime_ns, sha256] of its last full check


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(path: Path, fmt: str, error: type[Exception] = WeightsError, hint: str = "") -> dict:
    """The JSON manifest at `path` if it has format `fmt`; else `error` naming the file (and `hint`)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise error(f"no readable manifest at {str(path)!r} ({exc}){hint}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise error(f"{str(path)!r} has format {found!r}, expected {fmt!r}{hint}")
    return manifest


def manifest_path(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".json")


def read_manifest(path: Path) -> dict | None:
    """The manifest of an artifact, or None when it is missing or unreadable."""
    try:
        manifest = json.loads(manifest_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == ARTIFACT_FORMAT else None


def _read_stamps(folder: Path) -> dict:
    try:
        stamps = json.loads((folder / STAMPS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def content_matches(path: Path, sha256: str, nbytes: int | None = None) -> bool:
    """True if `path` has `nbytes` bytes and sha256 `sha256`.

    A full hash is taken once per (size, mtime); the result is remembered in `.verified.json`
    beside the file (when the folder is writable), so a later process hashes again only when the
    file's size or modification time changed.
    """
    try:
        st = path.stat()
    except OSError:
        return False
    if nbytes is not None and st.st_size != nbytes:
        return False
    stamp = [st.st_size, st.st_mtime_ns, sha256]
    stamps = _read_stamps(path.parent)
    if stamps.get(path.name) == stamp:
        return True
    if sha256_file(path) != sha256:
        return False
    stamps[path.name] = stamp
    try:
        (path.parent / STAMPS).write_text(json.dumps(stamps, indent=0, sort_keys=True))
    except OSError as exc:  # a read-only export: hash again next time
        log.debug("could not record the check of %s: %s", path, exc)
    return True


def check_artifact(path: Path, command: str = "flashface-trt export") -> dict:
    """The manifest of `path` after checking that the file's size and sha256 still match it."""
    meta = read_manifest(path)
    if meta is None:
        raise WeightsError(f"{str(path)!r} has no readable manifest beside it; re-run `{command}`")
    if not content_matches(path, str(meta.get("sha256")), meta.get("bytes")):
        raise WeightsError(
            f"{str(path)!r} no longer matches its manifest (size or sha256 changed after it was written); "
            f"re-run `{command}`"
        )
    return meta
