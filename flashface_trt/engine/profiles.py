"""TensorRT optimisation profiles and build settings, derived from the export specs (no TensorRT here).

An engine profile gives every input a (min, opt, max) shape. The export spec already names each
dynamic axis; a build may ask for other ranges (more samples, other sizes, more references), so
the axes are recomputed from the build's `ExportShapes` through the axis table (`runtime.artifacts.axes`),
which says what each axis means.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ..runtime.artifacts.axes import spec_axes
from ..runtime.artifacts.spec import ExportShapes, NetworkSpec
from ..runtime.errors import InputError

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


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
