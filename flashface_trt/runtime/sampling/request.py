"""What a user asks for: the request (its parameters in `params`), prompts, face mask, references.

Torch-free so that every backend shares it. Prompt suffixes and the face-mask rule follow the
official demo (`flashface/all_finetune/demo_gradio.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from ..errors import InputError
from .params import DEFAULT_SIZE, DEFAULTS, GUIDANCE, PARAMS, RECIPES, REQUEST, REQUEST_PARAMS, validate_bbox
from .sampler import GuidanceParams

DEFAULT_POSITIVE_SUFFIX = "best quality, masterpiece,ultra-detailed, UHD 4K, photographic"
DEFAULT_NEGATIVE = (
    "blurry, ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face, out of frame, "
    "extra limbs, disfigured, deformed, body out of frame, bad anatomy, watermark, signature, cut off, "
    "low contrast, underexposed, overexposed, bad art, beginner, amateur, distorted face"
)
REFERENCE_SIZE = 224  # reference crops are padded to this square (official PadToSquare(224))
MIN_REFERENCES = 4  # the demo pads fewer reference faces to this many


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
    negative_prompt: str = DEFAULTS["negative_prompt"]
    steps: int = DEFAULTS["steps"]
    seed: int = DEFAULTS["seed"]
    num_samples: int = DEFAULTS["num_samples"]
    height: int = DEFAULT_SIZE["weights"]
    width: int = DEFAULT_SIZE["weights"]
    face_bbox: tuple[float, float, float, float] = RECIPES["identity"].face_bbox
    guidance: GuidanceParams = field(default_factory=GuidanceParams)

    def validated(self) -> GenerationRequest:
        """Return self after checking every field by `REQUEST_PARAMS`; InputError names value and range."""
        for name, value in self.values().items():
            PARAMS[name].check(value)
        return self

    def values(self) -> dict[str, Any]:
        """Every field by its schema name, the guidance flattened (as validated and job records keep it)."""
        fields = (p for p in REQUEST_PARAMS if p.group in (REQUEST, GUIDANCE))
        return {p.name: getattr(self if p.group == REQUEST else self.guidance, p.name) for p in fields}


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


def make_request(prompt: str, recipe: str | None = "identity", **given: Any) -> GenerationRequest:
    """A validated request from flat parameters (the CLI's flags, batch-file keys, the API's JSON fields).

    `given` holds any REQUEST or GUIDANCE parameter of `REQUEST_PARAMS` by name; None means "the
    recipe's value / the default". Unknown names raise InputError.
    """
    recipe = PARAMS["recipe"].check(recipe or DEFAULTS["recipe"])
    known = {p.name for p in REQUEST_PARAMS if p.group in (REQUEST, GUIDANCE)} - {"prompt"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InputError(f"unknown request parameters {unknown}", unknown[0])
    values = {k: v for k, v in given.items() if v is not None}
    req = RECIPES[recipe].apply(GenerationRequest(prompt=prompt))
    guidance = replace(req.guidance, **{k: v for k, v in values.items() if PARAMS[k].group == GUIDANCE})
    fields = {k: v for k, v in values.items() if PARAMS[k].group == REQUEST}
    if "face_bbox" in fields:
        fields["face_bbox"] = validate_bbox(fields["face_bbox"])
    return replace(req, guidance=guidance, **fields).validated()
