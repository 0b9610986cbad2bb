"""K/V wiring between the ReferenceNet and UNet engines (pure).

The engine runtime allocates static buffers per padded batch (`axes.io_shapes` of its `LoopDims`)
and copies each group's ReferenceNet K/V into the UNet's K/V inputs, row `group` of each: the
ReferenceNet's outputs must have exactly those inputs' names, shapes and dtypes.
"""

from __future__ import annotations

from ..artifacts.axes import LoopDims, io_shapes
from ..artifacts.spec import NetworkSpec
from ..errors import InputError


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
