"""The package's import direction, read from the source: runtime/ is the ground floor.

deploy -> cli -> commands -> export -> models -> runtime, and commands -> engine -> runtime. runtime/ (what
every deployment needs) imports nothing of the project outside itself and no torch; engine/ (a
TensorRT build machine) imports no torch, no models and no export.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flashface_trt"

# what each room may import from the project (itself included)
ALLOWED = {
    "runtime": {"runtime"},
    "models": {"models", "runtime"},
    "engine": {"engine", "runtime"},
    "export": {"export", "models", "runtime"},
    "serve": {"serve", "runtime"},
    "backends": {"backends", "export", "models", "engine", "runtime"},
    "commands": {"commands", "backends", "export", "models", "engine", "runtime", "serve"},
    "cli": {"cli", "backends", "commands", "models", "runtime", "serve"},
    "deploy": {"deploy", "backends", "cli", "commands", "serve"},
}
TORCH_FREE = {"runtime", "engine", "serve"}
# runtime/'s own rooms, bottom to top: each imports only itself, the rooms below it and runtime/errors.py
RUNTIME_ROOMS = ("faces", "sampling", "artifacts", "backends")


def room(path: Path, package: Path = PACKAGE) -> str:
    """The room of a module: its first folder under the package, or its own name at the top."""
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, function-level ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["flashface_trt", *path.relative_to(root).parent.parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
                out += [(node.lineno, m) for m in names]
            else:
                out.append((node.lineno, node.module or ""))
    return out


def violations(path: Path, root: Path = PACKAGE) -> list[str]:
    """Imports of `path` that run against the direction (or into torch where that is not allowed)."""
    src = room(path, root)
    where = path.relative_to(root)
    bad = []
    for line, mod in imports(path, root):
        parts = mod.split(".")
        if parts[0] == "torch" and src in TORCH_FREE:
            bad.append(f"{where}:{line} imports {mod} (room {src} is torch-free)")
        if parts[0] != "flashface_trt" or len(parts) < 2:
            continue
        target = parts[1]
        if target not in ALLOWED.get(src, set()):
            bad.append(f"{where}:{line} imports {mod} ({src} -> {target} runs upward)")
        inner = runtime_room(where)
        if src == target == "runtime" and inner and len(parts) > 3 and parts[2] in RUNTIME_ROOMS:
            if RUNTIME_ROOMS.index(parts[2]) > RUNTIME_ROOMS.index(inner):
                upward = f"runtime/{inner} -> runtime/{parts[2]} runs upward"
                bad.append(f"{where}:{line} imports {mod} ({upward})")
    return bad


def runtime_room(where: Path) -> str | None:
    """The room of a runtime/ module (`faces`, `sampling`, ...), None for runtime/errors.py."""
    return where.parts[1] if len(where.parts) > 2 and where.parts[0] == "runtime" else None


def test_imports_point_down():
    files = sorted(PACKAGE.rglob("*.py"))
    assert {room(f) for f in files} >= {"runtime", "models", "engine", "export", "commands", "cli"}
    unknown = sorted({room(f) for f in files} - set(ALLOWED) - {"__init__"})
    assert not unknown, f"rooms without import rules: {unknown}"
    bad = [v for f in files for v in violations(f)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source, where, message",
    [
        ("from ..export.spec import NetworkSpec\n", "runtime/x.py", "runtime -> export"),
        ("from flashface_trt.models import loading\n", "runtime/x.py", "runtime -> models"),
        ("def f():\n    import torch\n", "engine/x.py", "torch-free"),
        ("from ..export.artifacts import sha256_file\n", "models/x.py", "models -> export"),
        ("from ..engine import build\n", "models/x.py", "models -> engine"),
        ("from .. import commands\n", "runtime/x.py", "runtime -> commands"),
        ("from .guidance import step_update\n", "runtime/x.py", ""),
        ("from ..runtime.artifacts.spec import NetworkSpec\n", "engine/x.py", ""),
    ],
)
def test_the_checker_sees_wrong_imports(tmp_path, source, where, message):
    """The checker itself: an upward or torch import is reported, a downward one is not."""
    root = tmp_path / "flashface_trt"
    path = root / where
    path.parent.mkdir(parents=True)
    path.write_text(source)
    found = violations(path, root)
    if message:
        assert len(found) == 1 and message in found[0], found
    else:
        assert found == []
