"""Cached export artifacts named by a hash of what made them, each with a manifest beside it.

An artifact `<name>-<digest>.onnx` is reused only when its manifest names the same inputs
(weights digest, settings, format version) and the file still has the recorded size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..runtime.artifacts.manifest import (
    ARTIFACT_FORMAT,
    content_matches,
    manifest_path,
    read_manifest,
    sha256_file,
)
from ..runtime.errors import FlashFaceError

log = logging.getLogger(__name__)


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes of a state dict given as NumPy arrays."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def artifact_key(name: str, weights_digest: str, settings: Mapping[str, object]) -> str:
    """Short digest of everything that determines an artifact."""
    blob = json.dumps(
        {"format": ARTIFACT_FORMAT, "name": name, "weights": weights_digest, "settings": settings},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_current(path: Path, key: str) -> bool:
    """True if `path` exists, its manifest carries `key`, and size and sha256 still match."""
    manifest = read_manifest(path)
    if manifest is None or manifest.get("key") != key or not path.is_file():
        return False
    if not content_matches(path, str(manifest.get("sha256")), manifest.get("bytes")):
        log.warning("%s no longer matches its manifest (size or sha256); rebuilding", path)
        return False
    return True


def cached_artifact(
    out_dir: str | Path,
    name: str,
    suffix: str,
    weights_digest: str,
    settings: Mapping[str, object],
    build: Callable[[Path], None],
) -> Path:
    """Return `<out_dir>/<name>-<key><suffix>`, building it with `build(path)` unless it is current."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = artifact_key(name, weights_digest, settings)
    path = out / f"{name}-{key}{suffix}"
    if is_current(path, key):
        log.info("reusing %s", path)
        return path
    # build in a scratch folder so that a graph and its external-data files appear together or not at all
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    try:
        build(scratch / path.name)
        for f in scratch.iterdir():
            f.replace(out / f.name)
    except Exception as exc:
        raise FlashFaceError(f"building {path.name} failed: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    manifest = {
        "format": ARTIFACT_FORMAT,
        "name": name,
        "key": key,
        "weights_sha256": weights_digest,
        "settings": dict(settings),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    manifest_path(path).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log.info("wrote %s", path)
    return path
