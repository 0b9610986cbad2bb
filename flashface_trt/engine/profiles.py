"""TensorRT optimisation profiles and build settings, derived from the export specs (no TensorRT here).

An engine profile gives every input a (min, opt, max) shape. The export spec already names each
dynamic axis; a build may ask for other ranges (more samples, other sizes, more references), so
the axes are recomputed from the build's `ExportShapes` through the axis table (`runtime.artifacts.axes`),
which says what each axis means. The batched step's engines (`BUCKETED`) get one profile per
bucket of requests in a step, each with the opt shape of that bucket's padded step, so TensorRT
tunes the batches that run (W768: 3, 6, 12, 24 rows) and a context needs only its profile's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..runtime.artifacts.axes import LoopDims, axis_sizes, spec_axes
from ..runtime.artifacts.spec import ExportShapes, NetworkSpec
from ..runtime.errors import InputError

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
BUCKETED = ("unet", "step")  # the captured step's engines: one profile per bucket of requests


@dataclass(frozen=True)
class BuildSettings:
    """How to build engines.

    shapes: ranges the engines accept (batch up to 3 x max samples, sizes, references);
    opt_level: builder optimisation level 0-5; workspace_gib: builder workspace limit;
    timing_cache: file that keeps kernel timings between builds (None: none). There is no
    precision setting: engines are built strongly typed, so an fp16 export gives fp16 engines.
    """

    shapes: ExportShapes = field(default_factory=ExportShapes)
    opt_level: int = 3
    workspace_gib: float = 8.0
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise InputError(f"builder optimisation level {self.opt_level} must be in [0, 5]")
        if self.workspace_gib <= 0:
            raise InputError(f"workspace limit {self.workspace_gib} GiB must be positive")

    def key(self) -> dict:
        """What changes an engine: every `ExportShapes` field (the timing cache only changes build time)."""
        return {
            "strongly_typed": True,
            "opt_level": self.opt_level,
            "workspace_gib": self.workspace_gib,
            "shapes": {f.name: getattr(self.shapes, f.name) for f in fields(ExportShapes)},
        }


def engine_spec(spec: NetworkSpec, shapes: ExportShapes) -> NetworkSpec:
    """The spec of an engine built for `shapes`: the export spec, axes recomputed from the axis table."""
    return NetworkSpec(spec.name, spec.inputs, spec.outputs, spec_axes(spec, shapes))


def engine_profile(spec: NetworkSpec, shapes: ExportShapes) -> Profile:
    """(min, opt, max) shape of every input of `spec` for a build with `shapes`."""
    axes = engine_spec(spec, shapes).axes
    out: Profile = {}
    for t in spec.inputs:
        points = [
            t.concrete({k: getattr(a, which) for k, a in axes.items()}) for which in ("min", "opt", "max")
        ]
        out[t.name] = (points[0], points[1], points[2])
    return out


def request_buckets(shapes: ExportShapes) -> list[int]:
    """Requests per step of each profile: powers of two below `max_requests`, then `max_requests`."""
    m = shapes.max_requests
    return [1 << i for i in range(m.bit_length()) if 1 << i < m] + [m]


def engine_profiles(spec: NetworkSpec, shapes: ExportShapes) -> list[Profile]:
    """The profiles of an engine: one per request bucket for `BUCKETED` networks (ranges up to the
    bucket, opt at its padded 3-way step of `opt_samples` each, `batch.pad_plan`), else one."""
    if spec.name not in BUCKETED:
        return [engine_profile(spec, shapes)]
    out = []
    for r in request_buckets(shapes):
        prof = engine_profile(spec, replace(shapes, max_requests=r))
        s, lat_h, lat_w = shapes.opt_samples, shapes.opt_height // 8, shapes.opt_width // 8
        ref, rest = 1 << (2 * r * s - 1).bit_length(), 1 << (r * s - 1).bit_length()
        dims = LoopDims(rest, lat_h, lat_w, shapes.opt_refs, ref + rest, ref, 1 << (r - 1).bit_length(), r)
        sizes = axis_sizes(spec, dims)
        for t in spec.inputs:
            lo, _, hi = prof[t.name]
            opt = tuple(min(max(a, o), b) for a, o, b in zip(lo, t.concrete(sizes), hi))
            prof[t.name] = (lo, opt, hi)
        out.append(prof)
    return out


def memory_estimate(profile: Profile, model_config: dict, itemsize: int = 2) -> int:
    """Bytes of the UNet's largest activation at a profile's max shape: the first level's GEGLU
    projection, rows x h x w x 8 dim (an estimate from the model config; TensorRT reports its own,
    `get_device_memory_size_for_profile_v2`, only where it is installed)."""
    rows, (h, w) = profile["timestep"][2][0], profile["x"][2][2:]  # UNet rows [B]; x [S, C, h, w]
    return int(rows * h * w * 8 * model_config["unet"]["dim"] * itemsize)
