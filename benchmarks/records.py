"""Benchmark records: where they go, what names them (device, commit), and writing one (no torch)."""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name (what CPU records are named by)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit(repo: Path | str = ".") -> str:
    """The short commit of a checkout (default: the benchmark's own; 'unknown' outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_record(record: dict[str, Any], kind: str, path: Path | None = None, indent: str = "") -> Path:
    """Write `record` to `path` or `RESULTS/<device>-<kind>-<commit>.json`; print and return where."""
    tag = re.sub(r"[^A-Za-z0-9.-]+", "_", record["device"]).strip("_")
    out = path or RESULTS / f"{tag}-{kind}-{record['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"{indent}record -> {out}")
    return out
