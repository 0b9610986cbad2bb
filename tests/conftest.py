"""Shared fixtures: the oracle directory (official-code outputs) and its config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ORACLE = REPO.parent / "shared" / "oracle"


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


def rel_err(out, ref) -> float:
    """max|out - ref| / max|ref| (the parity metric of the acceptance tests)."""
    import numpy as np

    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
