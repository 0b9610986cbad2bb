"""What every dynamic axis of an exported network means: one table for export, engines and runtimes.

Each axis has a meaning, its size for one request (`LoopDims` and a k-way UNet batch) and its
range for a set of `ExportShapes`. The ONNX export names axes from here, TensorRT profiles take
their (min, opt, max) from `axis_range`, and the runtimes size their buffers with `axis_sizes`,
so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from .spec import AxisRange, ExportShapes, NetworkSpec

REF_TOKENS = "ref_tokens_"  # `ref_tokens_<i>`: tokens of reference layer i over all references


@dataclass(frozen=True)
class LoopDims:
    """The sizes of one engine call: a (padded) batched step, or a text/VAE call.

    rows / ref_rows: UNet rows and how many of them attend to references (`encoders`: the distinct
    encoder inputs, padded as `runtime.sampling.batch.PaddedPlan`); samples: latents of
    every request; members: requests (2 prompt rows each); groups: reference K/V groups;
    latent_h/latent_w: latent size; num_refs: references of one identity; prompts: text rows.
    """

    samples: int
    latent_h: int
    latent_w: int
    num_refs: int
    rows: int = 0
    ref_rows: int = 0
    members: int = 1
    groups: int = 1
    prompts: int = 2

    def __post_init__(self) -> None:
        for name in ("samples", "latent_h", "latent_w", "num_refs", "members", "groups", "prompts"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.ref_rows <= self.rows:
            raise InputError(f"ref_rows={self.ref_rows} must be in [0, rows={self.rows}]")

    @property
    def encoders(self) -> int:
        return self.ref_rows + (self.rows - self.ref_rows) // 2

    @classmethod
    def of(cls, key: tuple[int, int, int, int, int], latent_h: int, latent_w: int, num_refs: int) -> LoopDims:
        """A padded batch (`PaddedPlan.key`: ref rows, other rows, samples, groups, members)."""
        ref_b, rest_b, s_b, g_b, m_b = key
        return cls(s_b, latent_h, latent_w, num_refs, ref_b + rest_b, ref_b, m_b, g_b)


@dataclass(frozen=True)
class Axis:
    """One dynamic axis: its meaning, its size for a call (`LoopDims`) and its export range.

    `per_ref` is the token count of one reference (reference-token axes only).
    """

    meaning: str
    size: Callable[[LoopDims, int], int]
    range: Callable[[ExportShapes, int], AxisRange]


def _batched(s: ExportShapes, per_request: int, opt: int) -> AxisRange:
    """A batched axis: up to `per_request` x max_requests, padded to its power-of-two bucket."""
    hi = 1 << (per_request * s.max_requests - 1).bit_length()
    return AxisRange(1, min(opt, hi), hi)


def _encoders(s: ExportShapes) -> AxisRange:
    """Padded encoder rows: a reference rows' bucket plus half an other rows' bucket (`PaddedPlan`)."""
    hi = _batched(s, 2 * s.max_samples, 1).max
    return AxisRange(1, min(2 * s.opt_samples, hi), hi + hi // 2)


AXES: dict[str, Axis] = {
    "batch": Axis(
        "UNet rows of a batched step: k x samples per request (k = 2 or 3, `BatchLayout`)",
        lambda d, p: d.rows,
        lambda s, p: _batched(s, 3 * s.max_samples, 2 * s.opt_samples),
    ),
    "b_ref": Axis(
        "leading UNet rows that attend to the references (each request's `BatchLayout.ref_rows`)",
        lambda d, p: d.ref_rows,
        lambda s, p: _batched(s, 2 * s.max_samples, s.opt_samples),
    ),
    "encoders": Axis(
        "UNet rows with distinct encoder inputs: reference rows + half the others (`SharedRows`)",
        lambda d, p: d.encoders,
        lambda s, p: _encoders(s),
    ),
    "samples": Axis(
        "latents of a call (all requests of a batched step)",
        lambda d, p: d.samples,
        lambda s, p: _batched(s, s.max_samples, s.opt_samples),
    ),
    "images": Axis(
        "decoded images of one call",
        lambda d, p: d.samples,
        lambda s, p: AxisRange(1, s.opt_samples, s.max_samples),
    ),
    "members": Axis("requests of a batched step", lambda d, p: d.members, lambda s, p: _batched(s, 1, 1)),
    "texts": Axis(
        "prompt rows of a batched step (2 per request)",
        lambda d, p: 2 * d.members,
        lambda s, p: _batched(s, 2, 2),
    ),
    "groups": Axis(
        "reference K/V groups of a batched step", lambda d, p: d.groups, lambda s, p: _batched(s, 1, 1)
    ),
    "ref_images": Axis(
        "reference latents of a ReferenceNet call: groups x references",
        lambda d, p: d.groups * d.num_refs,
        lambda s, p: AxisRange(1, s.opt_refs, _batched(s, s.max_refs, 1).max),
    ),
    "latent_h": Axis(
        "latent rows (height / 8)", lambda d, p: d.latent_h, lambda s, p: s.latent(s.opt_height)
    ),
    "latent_w": Axis(
        "latent columns (width / 8)", lambda d, p: d.latent_w, lambda s, p: s.latent(s.opt_width)
    ),
    "height": Axis(
        "image rows in pixels",
        lambda d, p: 8 * d.latent_h,
        lambda s, p: AxisRange(s.min_size, s.opt_height, s.max_size),
    ),
    "width": Axis(
        "image columns in pixels",
        lambda d, p: 8 * d.latent_w,
        lambda s, p: AxisRange(s.min_size, s.opt_width, s.max_size),
    ),
    "num_refs": Axis(
        "reference faces of one identity",
        lambda d, p: d.num_refs,
        lambda s, p: AxisRange(1, s.opt_refs, s.max_refs),
    ),
    "prompts": Axis("prompts per text call", lambda d, p: d.prompts, lambda s, p: AxisRange(1, 2, 4)),
    "photos": Axis(
        "photos per face-detector call", lambda d, p: d.num_refs, lambda s, p: AxisRange(1, 1, 16)
    ),
    REF_TOKENS: Axis(
        "reference tokens of one layer in one group: tokens per reference x references",
        lambda d, p: p * d.num_refs,
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


def groups_per_call(spec: NetworkSpec, num_refs: int, images: int) -> int:
    """K/V groups one ReferenceNet call of `spec` takes at `num_refs` references and at most `images`
    reference images: within its `groups` and `ref_images` ranges (an engine profile refuses more)."""
    return min(spec.axes["groups"].max, spec.axes["ref_images"].max // num_refs, images // num_refs)


def axis_range(name: str, shapes: ExportShapes, per_ref: int = 0) -> AxisRange:
    return axis(name).range(shapes, per_ref)


def spec_axes(spec: NetworkSpec, shapes: ExportShapes) -> dict[str, AxisRange]:
    """Every dynamic axis of `spec` recomputed for `shapes` (what an engine profile is built from)."""
    return {n: axis_range(n, shapes, tokens_per_reference(spec, n)) for n in spec.axes}


def axis_sizes(spec: NetworkSpec, dims: LoopDims) -> dict[str, int]:
    """Concrete size of every dynamic axis of `spec` for a call of these sizes."""
    return {n: axis(n).size(dims, tokens_per_reference(spec, n)) for n in spec.axes}


def io_shapes(spec: NetworkSpec, dims: LoopDims) -> dict[str, tuple[int, ...]]:
    """Every input and output of `spec` at these sizes."""
    sizes = axis_sizes(spec, dims)
    return {t.name: t.concrete(sizes) for t in (*spec.inputs, *spec.outputs)}


def check_axes(spec: NetworkSpec) -> None:
    """Every dynamic axis a spec's tensors use is in the table and has a range."""
    for t in (*spec.inputs, *spec.outputs):
        for d in t.shape:
            if isinstance(d, str):
                axis(d)
                if d not in spec.axes:
                    raise InputError(f"{spec.name}: tensor {t.name!r} uses axis {d!r}, which has no range")
