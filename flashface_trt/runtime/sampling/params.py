"""One schema of the request parameters: name, type, range, default and help of each, once.

The CLI's `generate` flags, the batch-file keys, the HTTP body model, the job records and the
validation of `GenerationRequest` are all derived from `REQUEST_PARAMS`; the service's settings
(`serve.config.SETTINGS`) use the same `Param`. Recipes follow the official README.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .sampler import GuidanceParams

MAX_SEED = 2**32 - 1
MAX_SIDE = 4096  # the schema's bound; what fits the device's memory is `cost.Admission`'s
MAX_PROMPT = 2000  # characters of a prompt (CLIP reads 77 tokens; longer text only costs storage)
# typical image side when a request gives none: the official 768; the tiny preset is a seconds-long CPU demo
DEFAULT_SIZE = {"weights": 768, "tiny": 128}
REQUIRED: Any = ...  # the default of a parameter every request must give

REQUEST, GUIDANCE, RECIPE, SERVICE = "request", "guidance", "recipe", "service"
KINDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "path": "a file path",
    "bbox": "a list of 4 numbers [x1, y1, x2, y2]",
}


@dataclass(frozen=True)
class Param:
    """One parameter as every edge (flags, batch lines, JSON, settings) names, types, bounds and documents it.

    name: the field's name (`--name-with-dashes` on the command line).
    kind: a key of KINDS; strict: a bool is no integer, a string no number (an integer is a number).
    help: what it is, for `--help` and the OpenAPI description.
    lo / hi: inclusive bounds (None: unbounded), of a string's length for "str"; lo_open: > lo.
    default: the value when none is given (REQUIRED: none; None: the recipe's, backend's or service's).
    group: REQUEST (a GenerationRequest field), GUIDANCE (a GuidanceParams field, default: the
        recipe's), RECIPE (the named set applied first) or SERVICE (the HTTP service's per-job fields).
    multiple_of: the value is a multiple of this; choices: the accepted strings, where listed.
    """

    name: str
    kind: str
    help: str
    lo: float | None = None
    hi: float | None = None
    default: Any = None
    group: str = REQUEST
    lo_open: bool = False
    multiple_of: int = 1
    choices: tuple[str, ...] = ()

    def rule(self) -> str:
        """The range in words: 'in [1, 1000]', 'in (0, 86400]', '>= 3', '> 0' ('' when unbounded)."""
        text = (lambda v: str(int(v))) if self.kind == "int" else (lambda v: f"{v:g}")
        lo, hi = (None if v is None else text(v) for v in (self.lo, self.hi))
        if self.choices:
            return f"one of {list(self.choices)}"
        if self.kind == "str":
            return "" if self.hi is None else f"of at most {int(self.hi)} characters"
        if lo is None:
            return ""
        if hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}]"

    def describe(self) -> str:
        """'an integer in [1, 1000]', 'a number > 0', 'one of [...]': what an error message asks for."""
        if self.choices:
            return self.rule()
        return " ".join(filter(None, (KINDS[self.kind], self.rule())))

    def typed(self, value: object) -> bool:
        """Whether `value` is of this kind, strictly (no bool for a number, no string for a number)."""
        if self.kind == "bbox":
            return isinstance(value, (list, tuple)) and len(value) == 4 and all(map(Param.number, value))
        if self.kind == "int":
            return not isinstance(value, bool) and isinstance(value, (int, np.integer))
        if self.kind == "float":
            return Param.number(value)
        if self.kind == "path":
            return isinstance(value, Path) or isinstance(value, str) and bool(value)
        return isinstance(value, str)

    @staticmethod
    def number(value: object) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))

    def check(self, value: Any) -> Any:
        """`value` if it has this kind and range; else InputError naming the parameter, value and rule."""
        if self.kind == "bbox":
            return validate_bbox(value)
        ok = self.typed(value) and (not self.choices or value in self.choices)
        ok = ok and not (self.kind == "str" and self.hi is not None and len(value) > self.hi)
        if ok and self.kind in ("int", "float"):
            ok = math.isfinite(value) and (self.hi is None or value <= self.hi)
            ok = ok and (self.lo is None or (value > self.lo if self.lo_open else value >= self.lo))
        if not ok:
            raise InputError(f"{self.name}={value!r} must be {self.describe()}", self.name)
        if self.multiple_of > 1 and value % self.multiple_of:
            raise InputError(f"{self.name}={value} must be a multiple of {self.multiple_of}", self.name)
        return value


def validate_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """A normalised [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1, or all zeros."""
    try:
        values = tuple(float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise InputError(f"face_bbox={bbox!r} must be four numbers [x1, y1, x2, y2]", "face_bbox") from exc
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InputError(f"face_bbox={bbox!r} must be four finite numbers [x1, y1, x2, y2]", "face_bbox")
    if values == (0.0, 0.0, 0.0, 0.0):
        return values
    x1, y1, x2, y2 = values
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise InputError(
            f"face_bbox={list(values)} must satisfy 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 "
            "(normalised coordinates), or be [0, 0, 0, 0] for no face position",
            "face_bbox",
        )
    return (x1, y1, x2, y2)


@dataclass(frozen=True)
class Recipe:
    """A named set of parameters recommended by the official README."""

    description: str
    face_bbox: tuple[float, float, float, float]
    guidance: GuidanceParams

    def apply(self, request: Any) -> Any:
        """`request` (a GenerationRequest) with this recipe's face position and guidance."""
        return replace(request, face_bbox=self.face_bbox, guidance=self.guidance)


RECIPES: dict[str, Recipe] = {
    "identity": Recipe(
        "stable identity fidelity (official README; the default)",
        (0.3, 0.2, 0.6, 0.5),
        GuidanceParams(text_guidance=7.5, face_guidance=3.2, ref_strength=1.2, step_to_launch=750),
    ),
    "age": Recipe(
        "changing the age: put the age words in the prompt, e.g. 'a very old woman' (official README)",
        (0.3, 0.2, 0.6, 0.5),
        GuidanceParams(text_guidance=8.5, face_guidance=2.5, ref_strength=0.9, step_to_launch=750),
    ),
}

# every request parameter, by the name the CLI, batch files, the API and `GenerationRequest` use;
# guidance ranges: the official demo's sliders, widened where the model stays well defined
REQUEST_PARAMS = (
    Param("prompt", "str", "what to draw; the official quality suffix is added", None, MAX_PROMPT, REQUIRED),
    Param("negative_prompt", "str", "what to avoid, before the official one", None, MAX_PROMPT, ""),
    Param("recipe", "str", "named settings", default="identity", group=RECIPE, choices=tuple(RECIPES)),
    Param("steps", "int", "DDIM steps", 1, 1000, 30),
    Param("seed", "int", "seed of the initial noise", 0, MAX_SEED, 0),
    Param("num_samples", "int", "images to generate", 1, 64, 1),
    Param("height", "int", "height in pixels, a multiple of 8, memory allowing;", 8, MAX_SIDE, multiple_of=8),
    Param("width", "int", "width in pixels, a multiple of 8, memory allowing;", 8, MAX_SIDE, multiple_of=8),
    Param("face_bbox", "bbox", "where the face goes, normalised [x1, y1, x2, y2]; 0,0,0,0 = anywhere"),
    Param("text_guidance", "float", "text guidance scale", 0, 30, None, GUIDANCE),
    Param("face_guidance", "float", "reference guidance scale", 0, 10, None, GUIDANCE),
    Param("ref_strength", "float", "reference strength λ once references are launched", 0, 3, None, GUIDANCE),
    Param("ref_strength_before", "float", "reference strength λ before the launch", 0, 3, None, GUIDANCE),
    Param("step_to_launch", "int", "3-way guidance for timesteps t <= this,", 0, 1000, None, GUIDANCE),
    Param("guide_rescale", "float", "CFG rescale", 0, 1, None, GUIDANCE),
    Param("identity", "str", "id returned by POST /v1/identities", default=REQUIRED, group=SERVICE),
    Param("priority", "int", "higher runs first, FIFO within a priority;", -100, 100, 0, SERVICE),
    Param("timeout_s", "float", "deadline in seconds from acceptance", 0, 86400, None, SERVICE, lo_open=True),
)
PARAMS = {p.name: p for p in REQUEST_PARAMS}
# what `generate` takes as flags and a batch file as keys: all but the service's per-job fields
GENERATE_PARAMS = tuple(p for p in REQUEST_PARAMS if p.group != SERVICE)
DEFAULTS = {p.name: p.default for p in REQUEST_PARAMS}
# UNet rows of a running batch (flag of `generate --batch-file` and `serve`): one 3-way sample takes 3
BATCH_ROWS = Param("max_batch_rows", "int", "UNet rows shared by requests per step, 3 a sample", 3, None, 12)
