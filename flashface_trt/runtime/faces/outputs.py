"""Where commands write: output images and directories, checked before any work, created only to write.

Every check raises InputError naming the path, so that a command fails before it loads a model or
generates anything, rather than after.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from ..errors import InputError, StorageError

log = logging.getLogger(__name__)

COMMON_FORMATS = ".png (lossless), .jpg/.jpeg, .webp, .tif/.tiff, .bmp"


def image_format(path: Path) -> str:
    """The Pillow format `path`'s extension selects, if Pillow writes RGB images in it; else InputError."""
    ext = path.suffix.lower()
    if not ext:
        raise InputError(
            f"output {str(path)!r} has no extension to choose the image format by "
            f"(e.g. {path.name}.png; written: {COMMON_FORMATS}, or any other Pillow writes)"
        )
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(
            f"output {str(path)!r}: Pillow writes no image format with the extension {ext!r} "
            f"(written: {COMMON_FORMATS}, or any other Pillow writes)"
        )
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"output {str(path)!r}: Pillow cannot write an RGB image as {fmt} ({exc})") from exc
    return fmt


def image_paths(out: Path, count: int) -> list[Path]:
    """The files `count` images go to (`out`, or `<stem>_<i><suffix>` for several), checked writable."""
    if out.is_dir():
        raise InputError(f"output {str(out)!r} is a directory; name an image file, e.g. {out / 'out.png'}")
    image_format(out)
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]
    for path in paths:
        if path.is_dir():
            raise InputError(f"output {str(path)!r} is a directory")
        if path.exists() and not os.access(path, os.W_OK):
            raise InputError(f"output {str(path)!r} exists and is not writable")
    check_output_dir(out.parent, "the output image's directory")
    return paths


def check_output_dir(path: Path, what: str) -> None:
    """`path` is a writable directory, or can be created: its nearest existing ancestor is one."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise InputError(f"{what} {str(path)!r} is a file, not a directory")
        raise InputError(f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file")
    try:  # a probe, not os.access: root passes that, and /proc or a read-only mount refuse files
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if existing == path else f" cannot be created: {str(existing)!r}"
        raise InputError(f"{what} {str(path)!r}{where} is not writable ({exc.strerror})") from exc


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """`data` (bytes, or a writer of an open file) to `path` whole or not at all: a temporary file beside
    it, fsynced, renamed over it, removed on any failure (an OSError: StorageError naming the path)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
        raise


def save_image(image: Image.Image, path: Path) -> None:
    """`image` written atomically to `path` in the format its extension selects."""
    write_atomic(path, lambda f: image.save(f, format=image_format(path)))


def missing_dirs(paths: Iterable[Path]) -> list[Path]:
    """Every directory among `paths` and their ancestors that does not exist yet, deepest first."""
    out: set[Path] = set()
    for path in paths:
        p = path.absolute()
        while not p.exists() and p.parent != p:
            out.add(p)
            p = p.parent
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def remove_empty(dirs: Iterable[Path]) -> None:
    """Remove those of `dirs` (deepest first) that exist and are empty: what a failed command created."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            continue
        log.debug("removed the empty directory %s", d)
