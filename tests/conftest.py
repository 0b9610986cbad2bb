"""Shared fixtures: the oracle directory (official-code outputs) and its config."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ORACLE = REPO.parent / "shared" / "oracle"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several test processes (pytest-xdist, `-n 2` by default): one math thread each, set
    # before torch is imported, so that the workers do not wait on each other's threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")


HEAVY_GROUPS = ("ray", "tiny_export", "onnx_oracle")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into node ids
def pytest_collection_modifyitems(config, items):
    """Group the tests that share one expensive thing and run the expensive ones first.

    The local Ray cluster's tests run on one worker (one cluster per test process); so do the
    tests of the tiny export, so that no process waits while another one makes it. Those groups
    and the tests marked `slow` are handed out first and the short tests fill in after them, so
    that neither process is left with a long test at the end.
    """
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif "tiny_export" in getattr(item, "fixturenames", ()):
            if item.get_closest_marker("xdist_group") is None:
                item.add_marker(pytest.mark.xdist_group("tiny_export"))

    def heavy(item) -> bool:
        group = item.get_closest_marker("xdist_group")
        in_heavy_group = group is not None and group.args[0] in HEAVY_GROUPS
        return in_heavy_group or item.get_closest_marker("slow") is not None

    items.sort(key=lambda item: not heavy(item))  # stable: the order within each part is kept


def oracle_path() -> Path:
    return Path(os.environ.get("FLASHFACE_ORACLE", str(DEFAULT_ORACLE)))


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    path = oracle_path()
    if not (path / "config.json").is_file():
        pytest.skip(f"oracle fixtures not found at {path} (set FLASHFACE_ORACLE)")
    return path


@pytest.fixture(scope="session")
def oracle_config(oracle_dir: Path) -> dict:
    return json.loads((oracle_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def manifests(oracle_dir: Path) -> dict:
    path = oracle_dir / "checkpoint_manifests.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def face_dir(oracle_dir: Path) -> Path:
    """The RetinaFace fixtures (`face/` of the oracle directory)."""
    path = oracle_dir / "face"
    if not (path / "face_cases.npz").is_file():
        pytest.skip(f"face fixtures not found in {path}")
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """The tiny preset exported once per test session (every network and the detector, float32)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxslim", reason="exports are simplified with onnxslim (the export extra)")
    from flashface_trt.export.exporter import ExportSettings, export_models
    from flashface_trt.models.loading import tiny_detector, tiny_models
    from flashface_trt.runtime.artifacts.spec import TINY_SHAPES

    with shared_dir(tmp_path_factory, "onnx_tiny") as out:
        export_models(tiny_models(), out, ExportSettings(shapes=TINY_SHAPES), detector=tiny_detector())
    return out


@contextmanager
def shared_dir(tmp_path_factory, name: str) -> Iterator[Path]:
    """A directory that every test process of this run shares, held under a lock while in use.

    pytest-xdist workers share the parent of their temp dirs: the first process to get the lock
    makes what the directory holds (an export), the others wait, then find it current (exports
    check every graph against its manifest; nothing is trusted for existing).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with FileLock(str(root / f"{name}.lock")):
        yield root / name


@pytest.fixture(scope="module")
def fakes():
    """The CUDA and TensorRT doubles, installed for one test module (tests/fakes)."""
    from .trt_support import module_fakes

    yield from module_fakes()


@pytest.fixture(scope="module")
def engines(fakes, tiny_export, tmp_path_factory):
    """Engines of the tiny export built through the doubles, once per test module."""
    from .trt_support import build

    return build(tiny_export, tmp_path_factory.mktemp("engines"))


RAY_DEPLOYMENT = pytest.StashKey[object]()


@pytest.fixture(scope="session")
def ray_api(request, tmp_path_factory):
    """The API on a local Ray Serve cluster (2 model replicas, the tiny preset), shared by the tests;
    started by the first that uses it, stopped after this process's last Ray test."""
    pytest.importorskip("ray.serve")
    from .serving import RayDeployment

    deployment = RayDeployment(tmp_path_factory.mktemp("ray_serve"))
    request.config.stash[RAY_DEPLOYMENT] = deployment
    yield deployment
    deployment.close()


def pytest_runtest_teardown(item, nextitem):
    """After the last Ray test of a run of them (pytest-xdist hands each process its next test
    ahead), stop the cluster: the other tests should not share the CPUs with an idle one."""
    deployment = item.config.stash.get(RAY_DEPLOYMENT, None)
    if deployment is None or item.get_closest_marker("ray") is None:
        return
    if nextitem is None or nextitem.get_closest_marker("ray") is None:
        deployment.close()  # type: ignore[attr-defined]


def rel_err(out, ref) -> float:
    """max|out - ref| / max|ref| (the parity metric of the acceptance tests)."""
    import numpy as np

    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


TORCH_BLOCKER = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _BlockTorch())
"""


def run_without_torch(script: str, *args: str):
    """Run `script` in a fresh interpreter where importing torch fails; returns the CompletedProcess."""
    import subprocess
    import sys
    import textwrap

    code = TORCH_BLOCKER + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after (on a shared 2-core machine, two threads per
    process mostly wait on each other)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
