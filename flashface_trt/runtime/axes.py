"""What every dynamic axis of an exported network means: one table for export, engines and runtimes.

Each axis has a meaning, its size for one request (`LoopDims` and a k-way UNet batch) and its
range for a set of `ExportShapes`. The ONNX export names axes from here, TensorRT profiles take
their (min, opt, max) from `axis_range`, and the runtimes size their buffers with `axis_sizes`,
so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import InputError
from .layout import BatchLayout
from .spec import AxisRange, ExportShapes, NetworkSpec

REF_TOKENS = "ref_tokens_"  # `ref_tokens_<i>`: tokens of reference layer i over all references


@dataclass(frozen=True)
class LoopDims:
    """The sizes of one request: samples N, latent height/width, references, steps, text rows."""

    samples: int
    latent_h: int
    latent_w: int
    num_refs: int
    steps: int
    prompts: int = 2

    def __post_init__(self) -> None:
        for name in ("samples", "latent_h", "latent_w", "num_refs", "steps", "prompts"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be at least 1")


@dataclass(frozen=True)
class Axis:
    """One dynamic axis: its meaning, its size for a request (k-way batch) and its export range.

    `per_ref` is the token count of one reference (reference-token axes only).
    """

    meaning: str
    size: Callable[[LoopDims, int, int], int]
    range: Callable[[ExportShapes, int], AxisRange]


def _samples(s: ExportShapes, k: int = 1) -> AxisRange:
    return AxisRange(k, k * s.opt_samples, k * s.max_samples)


AXES: dict[str, Axis] = {
    "batch": Axis(
        "UNet rows: k x samples (k = 2 or 3, see BatchLayout)",
        lambda d, k, p: BatchLayout(d.samples, k == 3).rows,
        lambda s, p: AxisRange(1, 2 * s.opt_samples, 3 * s.max_samples),
    ),
    "b_ref": Axis(
        "leading UNet rows that attend to the references (BatchLayout.ref_rows)",
        lambda d, k, p: BatchLayout(d.samples, k == 3).ref_rows,
        lambda s, p: AxisRange(1, s.opt_samples, 2 * s.max_samples),
    ),
    "samples": Axis("images of one request", lambda d, k, p: d.samples, lambda s, p: _samples(s)),
    "batch2": Axis("2-way eps rows", lambda d, k, p: 2 * d.samples, lambda s, p: _samples(s, 2)),
    "batch3": Axis("3-way eps rows", lambda d, k, p: 3 * d.samples, lambda s, p: _samples(s, 3)),
    "latent_h": Axis(
        "latent rows (height / 8)",
        lambda d, k, p: d.latent_h,
        lambda s, p: s.latent(s.opt_height),
    ),
    "latent_w": Axis(
        "latent columns (width / 8)",
        lambda d, k, p: d.latent_w,
        lambda s, p: s.latent(s.opt_width),
    ),
    "height": Axis(
        "image rows in pixels",
        lambda d, k, p: 8 * d.latent_h,
        lambda s, p: AxisRange(s.min_size, s.opt_height, s.max_size),
    ),
    "width": Axis(
        "image columns in pixels",
        lambda d, k, p: 8 * d.latent_w,
        lambda s, p: AxisRange(s.min_size, s.opt_width, s.max_size),
    ),
    "num_refs": Axis(
        "reference faces of one identity",
        lambda d, k, p: d.num_refs,
        lambda s, p: AxisRange(1, s.opt_refs, s.max_refs),
    ),
    "prompts": Axis("prompts per text call", lambda d, k, p: d.prompts, lambda s, p: AxisRange(1, 2, 4)),
    "images": Axis(
        "photos per face-detector call",
        lambda d, k, p: d.num_refs,
        lambda s, p: AxisRange(1, 1, 16),
    ),
    REF_TOKENS: Axis(
        "reference tokens of one layer: tokens per reference x references",
        lambda d, k, p: p * d.num_refs,
        lambda s, p: AxisRange(p, p * s.opt_refs, p * s.max_refs),
    ),
}


def axis(name: str) -> Axis:
    """The table entry of an axis name (`ref_tokens_<i>` share one entry)."""
    entry = AXES.get(REF_TOKENS if name.startswith(REF_TOKENS) else name)
    if entry is None:
        raise InputError(f"unknown dynamic axis {name!r}; known: {sorted(AXES)}")
    return entry


def tokens_per_reference(spec: NetworkSpec, name: str) -> int:
    """Tokens of one reference on a reference-token axis (exported from one reference up: its min)."""
    return spec.axes[name].min if name.startswith(REF_TOKENS) else 0


def axis_range(name: str, shapes: ExportShapes, per_ref: int = 0) -> AxisRange:
    return axis(name).range(shapes, per_ref)


def spec_axes(spec: NetworkSpec, shapes: ExportShapes) -> dict[str, AxisRange]:
    """Every dynamic axis of `spec` recomputed for `shapes` (what an engine profile is built from)."""
    return {n: axis_range(n, shapes, tokens_per_reference(spec, n)) for n in spec.axes}


def axis_sizes(spec: NetworkSpec, dims: LoopDims, k: int = 3) -> dict[str, int]:
    """Concrete size of every dynamic axis of `spec` for a request with a k-way UNet batch."""
    return {n: axis(n).size(dims, k, tokens_per_reference(spec, n)) for n in spec.axes}


def io_shapes(spec: NetworkSpec, dims: LoopDims, k: int = 3) -> dict[str, tuple[int, ...]]:
    """Every input and output of `spec` at this request's sizes."""
    sizes = axis_sizes(spec, dims, k)
    return {t.name: t.concrete(sizes) for t in (*spec.inputs, *spec.outputs)}


def check_axes(spec: NetworkSpec) -> None:
    """Every dynamic axis a spec's tensors use is in the table and has a range."""
    for t in (*spec.inputs, *spec.outputs):
        for d in t.shape:
            if isinstance(d, str):
                axis(d)
                if d not in spec.axes:
                    raise InputError(f"{spec.name}: tensor {t.name!r} uses axis {d!r}, which has no range")
