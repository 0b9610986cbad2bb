"""One request's setup, written once for every path: validate, prompts, text, identity, mask, plan, noise.

`prepare` and `prefetch_kv` are what the step-level executor does when it admits a request
(`pipeline.generate` is a one-request executor); `step_eps` / `step_x0` probe one step of a prepared
request through its backend's batched UNet call, for the parity tests and the benchmarks' numerics checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..errors import InputError
from ..faces.images import reference_array
from .batch import Member, RequestContext, plan_batch
from .guidance import guided_x0
from .identities import Identity, ReferenceKVCache, array_key, identity_from_crops, nbytes
from .request import REFERENCE_SIZE, GenerationRequest, face_mask, full_prompts, initial_noise, pad_references
from .sampler import StepPlan, plan
from .tokenizer import Truncation

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    def encode(self, prompts: str | list[str]) -> np.ndarray: ...

    def truncation(self, text: str) -> Truncation | None: ...


class Backend(Protocol):
    """What a backend provides; arrays it returns stay on its device until `decode`."""

    name: str
    ref_size: int  # the side of the square reference crops its networks take (official: 224)
    kv_cache: ReferenceKVCache

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

    def mask_from_host(self, mask: np.ndarray) -> Any:
        """A face mask [h, w] as the steps read it ([1, 1, h, w] on the backend)."""

    def reference_kv(self, members: list[Member]) -> list[Any]:
        """One ReferenceNet call for one member per K/V group: each group's K/V [1, R*L, C] per layer."""

    def reference_groups(self, num_refs: int) -> int:
        """Timesteps per prefetch ReferenceNet call (graph range, memory bound `prefetch_images`; 0: off)."""

    def step(self, members: Sequence[Member]) -> list[Any]:
        """One batched step over several requests (`runtime.sampling.batch`): every member's next x."""

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
            message = "the %s is longer than CLIP's 75 tokens: %d tokens dropped from its end, where %s is "
            log.warning(message + "appended (dropped: %r); the model reads: %r", what, cut.dropped, appended,
                        _short(cut.lost), cut.kept)


@dataclass(frozen=True)
class Prepared:
    """A validated request ready for its first step.

    request: the validated request. ctx: its prompt embeddings [2, 77, C], identity, face mask and
    guidance on the backend, keyed by its negative prompt. steps: its plan. x: its initial noise
    [N, 4, H/8, W/8] on the backend (`request.initial_noise`).
    """

    request: GenerationRequest
    ctx: RequestContext
    steps: list[StepPlan]
    x: Any


def prepare(
    backend: Backend,
    request: GenerationRequest,
    identity: Identity | Sequence[Image.Image],
    timings: dict[str, float] | None = None,
) -> Prepared:
    """Validate `request` (before any network runs), then its text, identity (face crops are
    registered), mask, plan and noise; `timings` receives the seconds of 'text' and 'references'."""
    t0 = time.perf_counter()
    req = request.validated()
    positive, negative = full_prompts(req.prompt, req.negative_prompt)
    warn_truncated(backend.tokenizer, positive, negative)
    ids = backend.tokenizer.encode([positive, negative])  # [2, 77]
    texts = backend.encode_text(ids)  # [2, 77, C]
    t1 = time.perf_counter()
    if not isinstance(identity, Identity):
        identity = register_identity(backend, identity)
    mask = face_mask(req.face_bbox, req.height, req.width)  # [H/8, W/8]
    # reference K/V are cached per (identity, timestep, negative prompt's ids, reference size)
    ctx = RequestContext(texts, identity, backend.mask_from_host(mask), req.guidance, array_key(ids[1]))
    steps = plan(req.steps, req.guidance)
    x = backend.from_numpy(initial_noise(req.seed, req.num_samples, req.height, req.width))
    if timings is not None:
        timings.update(text=t1 - t0, references=time.perf_counter() - t1)
    log.info(
        "%s: %d steps (%d three-way), %d references, %dx%d",
        backend.name,
        len(steps),
        sum(s.three_way for s in steps),
        identity.num_refs,
        req.width,
        req.height,
    )
    return Prepared(req, ctx, steps, x)


def prefetch_kv(backend: Backend, prepared: Prepared) -> int:
    """Every step's reference K/V of `prepared` not cached yet, into the backend's cache with
    `backend.reference_groups` timesteps per ReferenceNet call (issue 23, item 3: saves launches, not
    FLOPs); returns the calls made. It stops before the request's K/V exceed the cache budget (more
    would evict the first steps' own): those steps compute theirs when they run (`batch.cached_kv`)."""
    ctx, cache = prepared.ctx, backend.kv_cache
    per_call = backend.reference_groups(ctx.identity.num_refs)
    distinct = {m.kv_key: m for m in (Member(ctx, prepared.x, s) for s in prepared.steps)}  # in step order
    todo, room, calls = [m for key, m in distinct.items() if key not in cache], cache.budget, 0
    while todo and per_call > 0:
        chunk, todo, calls = todo[:per_call], todo[per_call:], calls + 1
        for m, kv in zip(chunk, backend.reference_kv(chunk), strict=True):
            room -= nbytes(kv)
            if room < 0:
                return calls
            cache.put(m.kv_key, kv)
            cache.misses += 1  # computed, as a step's lookup would have counted it
        todo = todo[: room // nbytes(kv)]  # what the budget holds of the rest
    return calls


def stepper(backend: Backend, ctx: RequestContext) -> Callable[[Any, StepPlan], Any]:
    """`denoise(x, step) -> next x` of one request: the backend's batched step over it alone."""
    return lambda x, step: backend.step([Member(ctx, x, step)])[0]


def step_eps(backend: Any, ctx: RequestContext, x: Any, step: StepPlan) -> Any:
    """Raw model output of one request's step [k*N, 4, h, w] (k = 3 or 2): the backend's `batch_eps`."""
    member = Member(ctx, x, step)
    return backend.batch_eps([member], plan_batch([member]))


def step_x0(backend: Any, ctx: RequestContext, x: Any, step: StepPlan) -> Any:
    """Guided x0 prediction of one request's step (`guidance.guided_x0` over `step_eps`)."""
    return guided_x0(x, step_eps(backend, ctx, x, step), step.three_way, step.coefficients(ctx.guidance))
