"""What an exported network looks like from outside: tensor names, dtypes, dynamic axes, profiles.

One `NetworkSpec` per network is the single source for the ONNX export (names, dynamic axes),
the TensorRT optimisation profiles (min/opt/max shapes) and the runtimes' input checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import InputError
from ..sampling.params import DEFAULT_SIZE
from ..sampling.request import REFERENCE_SIZE

Dim = int | str  # a fixed size, or the name of a dynamic axis

EXPORT_FORMAT = "flashface-trt-onnx/1"  # manifest.json of an exported directory


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype name (numpy spelling) and shape, dynamic axes by name."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with every dynamic axis replaced by its size in `sizes`."""
        try:
            return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.shape)
        except KeyError as exc:
            raise InputError(f"{self.name}: no size given for the dynamic axis {exc.args[0]!r}") from exc


@dataclass(frozen=True)
class AxisRange:
    """Sizes a dynamic axis may take in an engine profile: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InputError(
                f"axis range needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}"
            )


@dataclass(frozen=True)
class NetworkSpec:
    """An exported network: inputs, outputs, and the default range of each dynamic axis."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: Mapping[str, AxisRange] = field(default_factory=dict)
    samples: Mapping[str, int] = field(default_factory=dict)  # tracing sizes that override the default

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`torch.onnx.export(dynamic_axes=...)` form, for inputs and outputs."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def profile(self, which: str) -> dict[str, tuple[int, ...]]:
        """Input shapes at the `min`, `opt` or `max` end of every axis range (a TensorRT profile point)."""
        if which not in ("min", "opt", "max"):
            raise InputError(f"profile point must be 'min', 'opt' or 'max', got {which!r}")
        sizes = {k: getattr(r, which) for k, r in self.axes.items()}
        return {t.name: t.concrete(sizes) for t in self.inputs}

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Input shapes for tracing: the smallest sizes, but at least 2 where allowed (torch.export
        specialises 1). Every axis is symbolic in the graph, so the size traced at only sets the cost
        of the one forward pass that tracing runs (a float16 VAE on a CPU takes seconds at 128 px)."""
        sizes = {k: min(max(r.min, 2), r.max) for k, r in self.axes.items()}
        return {t.name: t.concrete({**sizes, **self.samples}) for t in self.inputs}

    def to_dict(self) -> dict:
        """JSON-ready form (kept in an export's manifest so that runtimes need no model code)."""

        def tensors(ts: tuple[TensorSpec, ...]) -> list[dict]:
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]

        return {
            "name": self.name,
            "inputs": tensors(self.inputs),
            "outputs": tensors(self.outputs),
            "axes": {k: [r.min, r.opt, r.max] for k, r in self.axes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> NetworkSpec:
        def tensors(ts: list) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in ts)

        axes = {k: AxisRange(*v) for k, v in d.get("axes", {}).items()}
        return cls(d["name"], tensors(d["inputs"]), tensors(d["outputs"]), axes)

    def check_inputs(self, feeds: Mapping[str, object], ranges: bool = True) -> None:
        """Names, ranks and fixed sizes (and with `ranges`, axis ranges) of `feeds` against the spec."""
        self.check_shapes({k: tuple(getattr(v, "shape", ())) for k, v in feeds.items()}, ranges)

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]], ranges: bool = True) -> None:
        """Input shapes against the spec: names, ranks, fixed sizes, and (with `ranges`) axis ranges."""
        missing = [n for n in self.input_names if n not in shapes]
        extra = [n for n in shapes if n not in self.input_names]
        if missing or extra:
            raise InputError(f"{self.name}: inputs {sorted(shapes)} do not match {self.input_names}")
        for t in self.inputs:
            shape = tuple(shapes[t.name])
            ok = len(shape) == len(t.shape) and all(
                isinstance(d, str) or d == s for d, s in zip(t.shape, shape)
            )
            if not ok:
                raise InputError(
                    f"{self.name}: input {t.name!r} has shape {list(shape)}, expected {list(t.shape)}"
                )
            for d, s in zip(t.shape, shape):
                r = self.axes.get(d) if isinstance(d, str) and ranges else None
                if r is not None and not r.min <= s <= r.max:
                    raise InputError(
                        f"{self.name}: input {t.name!r} axis {d!r} = {s} is outside [{r.min}, {r.max}]"
                    )


@dataclass(frozen=True)
class ExportShapes:
    """Ranges the exported graphs (and TensorRT profiles built from them) must accept.

    max_samples: images per request (UNet batch up to 3 x this); min_size/max_size: output pixels
    per side (multiples of 8); opt_height/opt_width: the typical output size; max_refs: reference
    faces (the demo pads to 4); opt_refs/opt_samples: typical values; ref_size: reference crop side;
    max_requests: requests sharing one batched step (step-level batching; batched axes are
    padded to powers of two, see `runtime.sampling.batch.pad_plan`).
    """

    max_samples: int = 4
    min_size: int = 256
    max_size: int = 1024
    opt_height: int = DEFAULT_SIZE["weights"]
    opt_width: int = DEFAULT_SIZE["weights"]
    max_refs: int = 4
    opt_refs: int = 4
    opt_samples: int = 1
    ref_size: int = REFERENCE_SIZE  # reference crops are padded to this square
    max_requests: int = 4

    def __post_init__(self) -> None:
        for name in ("min_size", "max_size", "opt_height", "opt_width", "ref_size"):
            if getattr(self, name) % 8:
                raise InputError(f"{name}={getattr(self, name)} must be a multiple of 8")
        AxisRange(self.min_size, self.opt_height, self.max_size)
        AxisRange(self.min_size, self.opt_width, self.max_size)
        AxisRange(1, self.opt_refs, self.max_refs)
        AxisRange(1, self.opt_samples, self.max_samples)
        AxisRange(1, 1, self.max_requests)

    def latent(self, opt: int) -> AxisRange:
        return AxisRange(self.min_size // 8, opt // 8, self.max_size // 8)


# the tiny preset's ranges; its reference crops are 64 px (the oracle fixtures' size), not the
# official 224: the ReferenceNet and the VAE encoder then cost a twelfth as much on a CPU
TINY_SHAPES = ExportShapes(
    max_samples=2, min_size=64, max_size=256, ref_size=64,
    opt_height=DEFAULT_SIZE["tiny"], opt_width=DEFAULT_SIZE["tiny"],
)
