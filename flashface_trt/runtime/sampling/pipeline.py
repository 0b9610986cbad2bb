"""The FlashFace pipeline over any backend: prompts -> text -> references -> guided DDIM -> images."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..errors import InputError
from ..faces.images import reference_array
from .batch import Member, RequestContext
from .identities import Identity, array_key, identity_from_crops
from .request import REFERENCE_SIZE, GenerationRequest, face_mask, full_prompts, initial_noise, pad_references
from .sampler import GuidanceParams, StepPlan, Wrap, plan, sample
from .tokenizer import Truncation

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    def encode(self, prompts: str | list[str]) -> np.ndarray: ...

    def truncation(self, text: str) -> Truncation | None: ...


class Backend(Protocol):
    """What a backend provides; arrays it returns stay on its device until `decode`."""

    name: str
    ref_size: int  # the side of the square reference crops its networks take (official: 224)

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def precision(self) -> str:
        """'fp32' or 'fp16': what the networks compute in (stored latents are tagged with it)."""

    def from_numpy(self, x: np.ndarray) -> Any: ...

    def to_host(self, x: Any) -> np.ndarray:
        """A backend array (latents) as a float32 NumPy array."""

    def latents_from_host(self, latents: np.ndarray) -> Any:
        """Stored reference latents [R, 4, hr, wr] as the backend's identities hold them."""

    def encode_text(self, ids: np.ndarray) -> Any:
        """Token ids [P, 77] int64 -> hidden states [P, 77, C]."""

    def encode_references(self, images: np.ndarray) -> Any:
        """Crops [R, 3, S, S] in [-1, 1] -> scaled latents [R, 4, S/8, S/8]."""

    def context(
        self, texts: Any, identity: Identity, mask: np.ndarray, guidance: GuidanceParams, uncond_key: str
    ) -> RequestContext:
        """What a request brings to every batched step (texts [2, 77, C], mask [h, w])."""

    def step(self, members: Sequence[Member]) -> list[Any]:
        """One batched step over several requests (`runtime.batch`): every member's next x."""

    def denoiser(
        self,
        texts: Any,
        identity: Identity,
        mask: np.ndarray,
        guidance: GuidanceParams,
        steps: Sequence[StepPlan],
        uncond_key: str = "",
    ) -> Callable[[Any, StepPlan], Any]:
        """`denoise(x, step) -> x of the next step` of one request (the batch of one); texts [2, 77, C],
        mask [h, w]; reference K/V cached per (identity, timestep, `uncond_key` = the negative
        prompt's ids, reference size)."""

    def decode(self, z: Any) -> np.ndarray:
        """Scaled latents [N, 4, h, w] -> uint8 images [N, H, W, 3]."""


def prepare_references(faces: Sequence[Image.Image], size: int = REFERENCE_SIZE) -> np.ndarray:
    """Face crops -> [R, 3, size, size] in [-1, 1] (official: 224); fewer than 4 are repeated in
    order, as the demo pads."""
    if len(faces) == 0:
        raise InputError("at least one reference face is required")
    return np.stack([reference_array(f, size) for f in pad_references(list(faces))])


def register_identity(backend: Backend, faces: Sequence[Image.Image], photos: Sequence[str] = ()) -> Identity:
    """Encode face crops once; the identity's latents (and its cached K/V) serve later requests."""
    crops = prepare_references(faces, backend.ref_size)  # [R, 3, S, S]
    return identity_from_crops(backend.encode_references, crops, photos)


def _short(text: str, limit: int = 100) -> str:
    """`text`, or its beginning and end around an ellipsis when longer than `limit` characters."""
    half = (limit - 5) // 2
    return text if len(text) <= limit else f"{text[:half]} ... {text[-half:]}"


def warn_truncated(tokenizer: Tokenizer, positive: str, negative: str) -> None:
    """Warn what CLIP's 77-token limit (75 + start and end) cuts from the full prompts; the cut is kept.

    The official suffix and default negative prompt are appended before tokenising, so they are the
    first to go.
    """
    for what, appended, text in (
        ("prompt", "the official suffix", positive),
        ("negative prompt", "the official default negative prompt", negative),
    ):
        cut = tokenizer.truncation(text)
        if cut is not None:
            log.warning(
                "the %s is longer than CLIP's 75 tokens: %d tokens dropped from its end, where %s is "
                "appended (dropped: %r); the model reads: %r",
                what,
                cut.dropped,
                appended,
                _short(cut.lost),
                cut.kept,
            )


def generate(
    backend: Backend,
    request: GenerationRequest,
    faces: Sequence[Image.Image] | Identity,
    wrap: Wrap | None = None,
    timings: dict[str, float] | None = None,
) -> list[Image.Image]:
    """Generate `request.num_samples` images of a person: face crops, or a registered identity.

    `timings`, if given, receives the host wall-clock seconds of each stage (text, references,
    denoise, decode); on a GPU, work queued by one stage may finish in the next one that waits.
    """
    clock = _Stages(timings)
    req = request.validated()
    positive, negative = full_prompts(req.prompt, req.negative_prompt)
    warn_truncated(backend.tokenizer, positive, negative)
    ids = backend.tokenizer.encode([positive, negative])  # [2, 77]
    texts = backend.encode_text(ids)  # [2, 77, C]
    clock("text")
    identity = faces if isinstance(faces, Identity) else register_identity(backend, faces)
    clock("references")
    mask = face_mask(req.face_bbox, req.height, req.width)  # [H/8, W/8]
    steps = plan(req.steps, req.guidance)
    denoise = backend.denoiser(texts, identity, mask, req.guidance, steps, array_key(ids[1]))
    x = backend.from_numpy(initial_noise(req.seed, req.num_samples, req.height, req.width))
    log.info(
        "%s: %d steps (%d three-way), %d references, %dx%d",
        backend.name,
        len(steps),
        sum(s.three_way for s in steps),
        identity.num_refs,
        req.width,
        req.height,
    )
    z0 = sample(denoise, x, steps, wrap)
    clock("denoise")
    images = [Image.fromarray(img) for img in backend.decode(z0)]
    clock("decode")
    return images


class _Stages:
    """Wall-clock seconds since the previous mark, stored under each stage's name (if asked for)."""

    def __init__(self, out: dict[str, float] | None) -> None:
        self.out, self.t = out, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        if self.out is not None:
            self.out[stage] = now - self.t
        self.t = now
