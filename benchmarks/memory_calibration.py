"""Peak host memory of one tiny-preset step and decode on the CPU (PyTorch, float32), per size.

Each size runs in a fresh process: after loading and a warm-up generation the resident-set
high-water mark is reset (`/proc/self/clear_refs`); the mark (VmHWM) after the first denoising step
and after the decode, minus the resident set before them, is what that phase added.
`runtime/sampling/cost.py` CALIBRATION holds these numbers (its test re-checks the estimate
against them). Run: `python -m benchmarks.memory_calibration 128 256 384`.
"""

from __future__ import annotations

import json
import subprocess
import sys

MIB = 1 << 20


def _vm(key: str) -> int:
    """VmRSS or VmHWM of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":"))


def measure(side: int, samples: int = 1) -> dict[str, float]:
    """(step MiB, decode MiB) added over the loaded models at `side` x `side`, `samples` samples."""
    import torch

    from flashface_trt.models.backend import TorchBackend
    from flashface_trt.models.loading import tiny_models
    from flashface_trt.models.settings import TORCH_PRESETS
    from flashface_trt.runtime.faces.images import synthetic_face
    from flashface_trt.runtime.sampling.pipeline import generate
    from flashface_trt.runtime.sampling.request import GenerationRequest

    torch.set_num_threads(1)
    backend = TorchBackend(tiny_models("cpu", torch.float32), TORCH_PRESETS["auto"])
    generate(backend, GenerationRequest(prompt="warm", steps=1, height=64, width=64), [synthetic_face()])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _vm("VmRSS")
    marks: list[int] = []
    req = GenerationRequest(prompt="x", steps=1, height=side, width=side, num_samples=samples)
    generate(backend, req, [synthetic_face()], on_step=lambda k, n: marks.append(_vm("VmHWM")))
    return {
        "side": side,
        "samples": samples,
        "step_mib": (marks[0] - base) / MIB,
        "decode_mib": (_vm("VmHWM") - base) / MIB,
    }


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(json.dumps(measure(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        for arg in sys.argv[1:]:
            side, _, n = arg.partition("x")
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory_calibration", "--one", side, n or "1"],
                capture_output=True,
                text=True,
                check=True,
            )
            print(out.stdout.strip().splitlines()[-1])
