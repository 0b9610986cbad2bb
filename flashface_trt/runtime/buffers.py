"""Buffer plans of the engine runtime: K/V wiring between engines, per-request step tables (pure).

The engine runtime allocates its buffers from the axis table (`axes.io_shapes`) once per request
shape: the UNet's at the 3-way batch (2-way steps use a prefix), the ReferenceNet's K/V outputs
with exactly the UNet's K/V input shapes, so that the same device buffers serve both engines.
"""

from __future__ import annotations

import numpy as np

from .axes import LoopDims, io_shapes
from .errors import InputError
from .guidance import STEP_COEFFICIENTS
from .layout import BatchLayout
from .sampler import GuidanceParams, StepPlan
from .spec import NetworkSpec


def check_kv_wiring(reference_net: NetworkSpec, unet: NetworkSpec, dims: LoopDims) -> None:
    """The ReferenceNet's outputs must be exactly the UNet's K/V inputs (names, shapes, dtypes)."""
    outs = io_shapes(reference_net, dims)
    ins = io_shapes(unet, dims)
    for t in reference_net.outputs:
        if t.name not in ins:
            raise InputError(f"ReferenceNet output {t.name!r} is not a UNet input")
        if outs[t.name] != ins[t.name]:
            raise InputError(f"{t.name}: ReferenceNet gives {outs[t.name]}, the UNet takes {ins[t.name]}")
        if next(u.dtype for u in unet.inputs if u.name == t.name) != t.dtype:
            raise InputError(f"{t.name}: ReferenceNet and UNet dtypes differ")


def step_tables(steps: list[StepPlan], guidance: GuidanceParams, samples: int) -> dict[str, np.ndarray]:
    """Per-step rows a graphed step reads: coef [S, 10], UNet timesteps t [S, 3N], λ lam [S, 2N].

    Row i is copied into the step's static inputs before step i runs, so new guidance values,
    timesteps or λ never need a new capture. Timesteps and λ are given for the widest (3-way)
    batch and the widest B_ref (2-way); a step reads the prefix its layout needs.
    """
    rows = BatchLayout(samples, True).rows
    ref_rows = BatchLayout(samples, False).ref_rows
    coef = np.asarray([s.coefficients(guidance) for s in steps], dtype=np.float32)  # [S, 10]
    if coef.shape[1:] != (len(STEP_COEFFICIENTS),):
        raise InputError(f"coefficient rows have {coef.shape[1:]} values, expected {len(STEP_COEFFICIENTS)}")
    t = np.repeat(np.asarray([s.t for s in steps], np.float32)[:, None], rows, axis=1)  # [S, 3N]
    lam = np.repeat(np.asarray([s.ref_strength for s in steps], np.float32)[:, None], ref_rows, axis=1)
    return {"coef": coef, "t": t, "lam": lam}
