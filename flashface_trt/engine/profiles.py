"""TensorRT optimisation profiles and build settings, derived from the export specs (no TensorRT here).

An engine profile gives every input a (min, opt, max) shape. The export spec already names each
dynamic axis; a build may ask for other ranges (more samples, other sizes, more references), so
the axes are recomputed from the build's `ExportShapes`, keeping what each axis means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..export.spec import AxisRange, ExportShapes, NetworkSpec

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class BuildSettings:
    """How to build engines.

    shapes: ranges the engines accept (batch up to 3 x max samples, sizes, references);
    fp16: allow float16 kernels (weakly typed networks; a float16 ONNX export is built strongly
    typed instead); opt_level: builder optimisation level 0-5; workspace_gib: builder workspace
    limit; timing_cache: file that keeps kernel timings between builds (None: none).
    """

    shapes: ExportShapes = field(default_factory=ExportShapes)
    fp16: bool = True
    opt_level: int = 3
    workspace_gib: float = 8.0
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise InputError(f"builder optimisation level {self.opt_level} must be in [0, 5]")
        if self.workspace_gib <= 0:
            raise InputError(f"workspace limit {self.workspace_gib} GiB must be positive")

    def key(self) -> dict:
        """What changes an engine (the timing cache only changes build time, not the engine)."""
        s = self.shapes
        return {
            "fp16": self.fp16,
            "opt_level": self.opt_level,
            "workspace_gib": self.workspace_gib,
            "shapes": [
                s.max_samples,
                s.min_size,
                s.max_size,
                s.opt_height,
                s.opt_width,
                s.max_refs,
                s.opt_refs,
            ],
        }


def build_axes(spec: NetworkSpec, shapes: ExportShapes) -> dict[str, AxisRange]:
    """The spec's dynamic axes recomputed for `shapes` (the detector keeps its own batch range)."""
    if spec.name == "detector":
        return dict(spec.axes)
    n, r = shapes.opt_samples, shapes
    lat = (shapes.min_size // 8, shapes.max_size // 8)
    axes: dict[str, AxisRange] = {}
    for name, old in spec.axes.items():
        if name == "batch":
            new = AxisRange(1, min(2 * n, 3 * r.max_samples), 3 * r.max_samples)
        elif name == "b_ref":
            new = AxisRange(1, n, 2 * r.max_samples)
        elif name == "samples":
            new = AxisRange(1, n, r.max_samples)
        elif name in ("batch2", "batch3"):
            k = int(name[-1])
            new = AxisRange(k, k * n, k * r.max_samples)
        elif name in ("latent_h", "latent_w"):
            opt = (shapes.opt_height if name == "latent_h" else shapes.opt_width) // 8
            new = AxisRange(lat[0], opt, lat[1])
        elif name in ("height", "width"):
            opt = shapes.opt_height if name == "height" else shapes.opt_width
            new = AxisRange(shapes.min_size, opt, shapes.max_size)
        elif name == "num_refs":
            new = AxisRange(1, r.opt_refs, r.max_refs)
        elif name.startswith("ref_tokens_"):
            per_ref = old.min  # exported with at least one reference: min = tokens of one reference
            new = AxisRange(per_ref, per_ref * r.opt_refs, per_ref * r.max_refs)
        else:
            new = old
        axes[name] = new
    return axes


def engine_profile(spec: NetworkSpec, shapes: ExportShapes) -> Profile:
    """(min, opt, max) shape of every input of `spec` for a build with `shapes`."""
    axes = build_axes(spec, shapes)
    out: Profile = {}
    for t in spec.inputs:
        points = [
            t.concrete({k: getattr(a, which) for k, a in axes.items()}) for which in ("min", "opt", "max")
        ]
        out[t.name] = (points[0], points[1], points[2])
    return out


def check_shapes(spec: NetworkSpec, shapes: ExportShapes, feeds: dict[str, tuple[int, ...]]) -> None:
    """Refuse input shapes outside the engine profile, naming the input, axis and range."""
    NetworkSpec(spec.name, spec.inputs, spec.outputs, build_axes(spec, shapes)).check_inputs(
        {k: _Shaped(v) for k, v in feeds.items()}
    )


class _Shaped:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
