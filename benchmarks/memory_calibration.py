"""Peak host memory of one tiny-preset step and decode on the CPU (PyTorch, float32), per size.

Each size runs in a fresh process: the resident-set high-water mark (`ru_maxrss`) after loading,
after the first denoising step and after the decode, minus the mark after loading, is what that
phase added. `runtime/sampling/cost.py` CALIBRATION holds these numbers (its test re-checks the
estimate against them). Run: `python -m benchmarks.memory_calibration 128 256 384`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

MIB = 1 << 20


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


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
    base = _rss()
    marks: list[int] = []
    req = GenerationRequest(prompt="x", steps=1, height=side, width=side, num_samples=samples)
    generate(backend, req, [synthetic_face()], on_step=lambda k, n: marks.append(_rss()))
    return {
        "side": side,
        "samples": samples,
        "step_mib": (marks[0] - base) / MIB,
        "decode_mib": (_rss() - base) / MIB,
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
