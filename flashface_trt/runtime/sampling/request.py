"""What a user asks for: parameters, named recipes, validation, prompts, face mask, references.

Torch-free so that every backend shares it. Prompt suffixes, the face-mask rule and the
recipes follow the official demo (`flashface/all_finetune/demo_gradio.py`) and README.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from ..errors import InputError
from .sampler import GuidanceParams

DEFAULT_POSITIVE_SUFFIX = "best quality, masterpiece,ultra-detailed, UHD 4K, photographic"
DEFAULT_NEGATIVE = (
    "blurry, ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face, out of frame, "
    "extra limbs, disfigured, deformed, body out of frame, bad anatomy, watermark, signature, cut off, "
    "low contrast, underexposed, overexposed, bad art, beginner, amateur, distorted face"
)
REFERENCE_SIZE = 224  # reference crops are padded to this square (official PadToSquare(224))
MIN_REFERENCES = 4  # the demo pads fewer reference faces to this many
MAX_SEED = 2**32 - 1
MAX_SIDE = 4096


@dataclass(frozen=True)
class GenerationRequest:
    """One generation.

    prompt / negative_prompt: user text; the official suffix and default negative are appended.
    steps: DDIM steps (trailing timesteps). seed: NumPy seed of the initial noise.
    num_samples: images per request. height / width: output pixels, multiples of 8.
    face_bbox: normalised [x1, y1, x2, y2] face position; (0, 0, 0, 0) means no position constraint.
    guidance: guidance strengths and the launch timestep.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    seed: int = 0
    num_samples: int = 1
    height: int = 768
    width: int = 768
    face_bbox: tuple[float, float, float, float] = (0.3, 0.2, 0.6, 0.5)
    guidance: GuidanceParams = field(default_factory=GuidanceParams)

    def validated(self) -> GenerationRequest:
        """Return self after checking every field; raises InputError naming the bad value and range."""
        for name in ("steps", "seed", "num_samples", "height", "width"):
            check_range(name, getattr(self, name))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % 8:
                raise InputError(f"{name}={value} must be a multiple of 8", name)
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a string, got {type(getattr(self, name)).__name__}", name)
        validate_bbox(self.face_bbox)
        validate_guidance(self.guidance)
        return self


@dataclass(frozen=True)
class Range:
    """The accepted values of one request parameter: integers or finite numbers in [lo, hi]."""

    lo: float
    hi: float
    integer: bool

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo, hi = (int(self.lo), int(self.hi)) if self.integer else (self.lo, self.hi)
        return f"{kind} in [{lo}, {hi}]"


# every numeric request parameter, by the name the CLI, the API and `GenerationRequest` use
RANGES: dict[str, Range] = {
    "steps": Range(1, 1000, True),
    "seed": Range(0, MAX_SEED, True),
    "num_samples": Range(1, 64, True),
    "height": Range(8, MAX_SIDE, True),
    "width": Range(8, MAX_SIDE, True),
    # guidance: the official demo's sliders, widened where the model stays well defined
    "text_guidance": Range(0.0, 30.0, False),
    "face_guidance": Range(0.0, 10.0, False),
    "ref_strength": Range(0.0, 3.0, False),
    "ref_strength_before": Range(0.0, 3.0, False),
    "step_to_launch": Range(0, 1000, True),
    "guide_rescale": Range(0.0, 1.0, False),
}


def check_range(name: str, value: object) -> None:
    """InputError naming `name`, `value` and the range unless `value` is in RANGES[name]."""
    r = RANGES[name]
    if r.integer:
        ok = not isinstance(value, bool) and isinstance(value, (int, np.integer)) and r.lo <= value <= r.hi
        if not ok:
            raise InputError(f"{name}={value!r} must be {r.describe()}", name)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name}={value!r} must be a finite number in [{r.lo}, {r.hi}]", name)
    if not r.lo <= value <= r.hi:
        raise InputError(f"{name}={value!r} is out of range [{r.lo}, {r.hi}]", name)


def validate_guidance(g: GuidanceParams) -> None:
    """Every guidance value within its range in `RANGES`."""
    for name in ("text_guidance", "face_guidance", "ref_strength", "ref_strength_before"):
        check_range(name, getattr(g, name))
    check_range("step_to_launch", g.step_to_launch)
    check_range("guide_rescale", g.guide_rescale)


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


def face_mask(bbox: Sequence[float], height: int, width: int) -> np.ndarray:
    """Latent face mask [height/8, width/8] as the demo builds it, of a validated bbox (`validate_bbox`).

    Pixel box (int(x1*W), int(y1*H), int(x2*W), int(y2*H)); a square of side max(w, h) anchored at
    (x1, y1) is set to 1 (clipped at the image border), then every 8th pixel is kept.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox)
    mask = np.zeros((height, width), dtype=np.float32)
    if (x1, y1, x2, y2) != (0.0, 0.0, 0.0, 0.0):
        px1, py1, px2, py2 = int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)
        side = max(px2 - px1, py2 - py1)
        mask[py1 : py1 + side, px1 : px1 + side] = 1.0
    return mask[::8, ::8]


def full_prompts(prompt: str, negative_prompt: str) -> tuple[str, str]:
    """Append the official default positive suffix and default negative prompt as the demo does."""
    positive = prompt + ", " + DEFAULT_POSITIVE_SUFFIX
    negative = negative_prompt + ", " + DEFAULT_NEGATIVE if negative_prompt else DEFAULT_NEGATIVE
    return positive, negative


T = TypeVar("T")


def pad_references(refs: Sequence[T], minimum: int = MIN_REFERENCES) -> list[T]:
    """Pad fewer than `minimum` references by repeating them in order (the demo picks at random)."""
    if len(refs) == 0:
        raise InputError("at least one reference face is required")
    out = list(refs)
    i = 0
    while len(out) < minimum:
        out.append(refs[i % len(refs)])
        i += 1
    return out


def initial_noise(
    seed: int, num_samples: int, height: int, width: int, channels: int = 4, factor: int = 8
) -> np.ndarray:
    """Initial latent noise [N, 4, H/8, W/8] from NumPy's PCG64, identical for every backend."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal((num_samples, channels, height // factor, width // factor), dtype=np.float32)


@dataclass(frozen=True)
class Recipe:
    """A named set of parameters recommended by the official README."""

    description: str
    face_bbox: tuple[float, float, float, float]
    guidance: GuidanceParams

    def apply(self, request: GenerationRequest) -> GenerationRequest:
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


GUIDANCE_FIELDS = tuple(GuidanceParams.__dataclass_fields__)


def make_request(prompt: str, recipe: str = "identity", **given: Any) -> GenerationRequest:
    """A validated request from flat parameters (the CLI's flags, the API's JSON fields).

    `given` holds any of GenerationRequest's fields and GuidanceParams' fields by name; None
    means "the recipe's value / the default". Unknown names raise InputError.
    """
    if recipe not in RECIPES:
        raise InputError(f"recipe={recipe!r} is not one of {sorted(RECIPES)}", "recipe")
    known = set(GenerationRequest.__dataclass_fields__) - {"prompt", "guidance"}
    unknown = sorted(set(given) - known - set(GUIDANCE_FIELDS))
    if unknown:
        raise InputError(f"unknown request parameters {unknown}", unknown[0])
    values = {k: v for k, v in given.items() if v is not None}
    req = RECIPES[recipe].apply(GenerationRequest(prompt=prompt))
    guidance = replace(req.guidance, **{k: v for k, v in values.items() if k in GUIDANCE_FIELDS})
    fields = {k: v for k, v in values.items() if k in known}
    if "face_bbox" in fields:
        fields["face_bbox"] = validate_bbox(fields["face_bbox"])
    return replace(req, guidance=guidance, **fields).validated()
