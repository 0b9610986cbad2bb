"""Step-level batching: the rows of one UNet call over several requests, each at its own step.

Every request contributes its k-way block (`BatchLayout`): 3-way `[cond+ref, cond, uncond]` after
its launch, 2-way `[cond, uncond]` before. The rows that attend to reference K/V come first, request
after request, then the rest, so the UNet's "first B_ref rows" rule holds for the whole batch and
rows without references skip the reference branch. Each row carries its own timestep, mask,
context and λ; each reference row names its K/V group (one group per distinct identity, timestep
and negative prompt). A batch of one request is exactly today's single-request batch.

Requests in one batch must share the image size and the reference-token count (number of
references); that is all: identities, prompts, guidance, steps and sample counts may differ.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .guidance import STEP_COEFFICIENTS
from .identities import Identity, ReferenceKVCache, kv_key
from .sampler import GuidanceParams, StepPlan


@dataclass(frozen=True)
class RequestContext:
    """What a request brings to every step: its prompt embeddings [2, 77, C] ([cond; uncond]) and
    face mask [1, 1, h, w] on the backend, its identity (reference latents [R, 4, hr, wr]), its
    guidance and the key of its negative prompt (part of the reference K/V cache key)."""

    texts: Any
    identity: Identity
    mask: Any
    guidance: GuidanceParams
    uncond_key: str = ""
    scratch: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # backend-owned buffers


@dataclass
class Member:
    """One request's part of a batched step: its context, its x [n, 4, h, w] and its step."""

    ctx: RequestContext
    x: Any
    step: StepPlan

    @property
    def samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def kv_key(self) -> Hashable:
        return kv_key(self.ctx.identity, self.step.t, self.ctx.uncond_key)

    def compatibility(self) -> tuple:
        """What requests in one batch share: image size and references."""
        return tuple(int(d) for d in self.x.shape[2:]), self.ctx.identity.num_refs


# the host values of a batched step by the names of the exported graphs' inputs (`artifacts.axes`)
STEP_INPUTS = "sample_rows member_rows text_rows timestep ref_scale ref_group guide coef".split()


@dataclass(frozen=True)
class StepArrays:
    """Index arrays of one batched step (NumPy; every backend gathers with them).

    sample_rows [B]: the sample (row of the members' x, concatenated) each UNet row carries;
    text_rows [B]: row of the members' texts (concatenated, 2 per member) for its context;
    member_rows [B]: the member whose mask and timestep a row takes; t [B]: the row's timestep;
    scale [B_ref], group [B_ref]: λ and K/V group of the reference rows (the first B_ref rows);
    guide [3, S]: the rows of each sample's y_ref, y (cond) and u (uncond) (2-way: y_ref = y);
    coef [S, len(STEP_COEFFICIENTS)]: each sample's guidance and DDIM coefficients;
    enc_rows [E], enc_index [B], stem_rows [S]: rows that share UNet work (`shared_rows`).
    """

    sample_rows: np.ndarray
    text_rows: np.ndarray
    member_rows: np.ndarray
    t: np.ndarray
    scale: np.ndarray
    group: np.ndarray
    guide: np.ndarray
    coef: np.ndarray
    enc_rows: np.ndarray
    enc_index: np.ndarray
    stem_rows: np.ndarray

    def inputs(self) -> dict[str, np.ndarray]:
        """The arrays by the names the exported UNet and step graphs take (`STEP_INPUTS`, `SHARED_ROWS`);
        a graph exported without a cut takes fewer: callers keep the names their graph has."""
        values = self.sample_rows, self.member_rows, self.text_rows, self.t, self.scale, self.group
        shared = {name: getattr(self, name) for name in SHARED_ROWS}
        return dict(zip(STEP_INPUTS, (*values, self.guide, self.coef))) | shared


SHARED_ROWS = {"enc_rows": "encoder", "enc_index": "encoder", "stem_rows": "stem"}  # the UNet cut each serves


def shared_rows(sample_rows: np.ndarray, text_rows: np.ndarray) -> dict[str, np.ndarray]:
    """enc_rows [E], enc_index [B], stem_rows [S]: the first row of each distinct (sample, text), each
    row's position among them, the first row of each sample. A sample fixes its member (mask and
    timestep), so such rows have one encoder input, and one sample's rows the same latents."""
    keys = sample_rows.astype(np.int64) * (int(text_rows.max(initial=0)) + 1) + text_rows
    _, enc_rows, enc_index = np.unique(keys, return_index=True, return_inverse=True)
    stem_rows = np.unique(sample_rows, return_index=True)[1]
    return dict(zip(SHARED_ROWS, (a.reshape(-1).astype(np.int64) for a in (enc_rows, enc_index, stem_rows))))


@dataclass(frozen=True)
class BatchPlan(StepArrays):
    """A batched step's arrays, plus groups (the K/V cache key of each group) and offsets (each
    member's first sample)."""

    groups: tuple[Hashable, ...]
    offsets: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.sample_rows)

    @property
    def ref_rows(self) -> int:
        return len(self.scale)

    @property
    def samples(self) -> int:
        return len(self.coef)

    def split(self, x_next: Any) -> list[Any]:
        """The members' parts of the batch's next x [S, 4, h, w]."""
        ends = [*self.offsets[1:], self.samples]
        return [x_next[a:b] for a, b in zip(self.offsets, ends)]


def plan_batch(members: Sequence[Member]) -> BatchPlan:
    """Rows, groups and per-sample coefficients of one UNet call over `members`."""
    if not members:
        raise InputError("a batched step needs at least one request")
    kinds = {m.compatibility() for m in members}
    if len(kinds) > 1:
        raise InputError(f"requests of one batch must share size and references, got {sorted(kinds)}")
    groups: dict[Hashable, int] = {}
    offsets, start = [], 0
    ref: list[tuple[int, int, int, float, int]] = []  # (sample, text, member, λ, group) per row
    rest: list[tuple[int, int, int]] = []  # (sample, text, member)
    blocks: list[list[int]] = []  # per member, the positions of its blocks' first rows
    for m_index, m in enumerate(members):
        n, layout = m.samples, m.step.layout(m.samples)
        group = groups.setdefault(m.kv_key, len(groups))
        offsets.append(start)
        mine = []
        for b, text in enumerate(layout.text_blocks):
            uses_refs = b * n < layout.ref_rows
            mine.append(len(ref) if uses_refs else -1 - len(rest))
            for s in range(n):
                row = (start + s, 2 * m_index + text, m_index)
                if uses_refs:
                    ref.append((*row, m.step.ref_strength, group))
                else:
                    rest.append(row)
        blocks.append(mine)
        start += n
    b_ref = len(ref)
    rows = np.asarray([r[:3] for r in ref] + rest, np.int64).reshape(-1, 3)  # (sample, text, member) per row
    guide = np.zeros((3, start), np.int64)
    coef = np.zeros((start, len(STEP_COEFFICIENTS)), np.float32)
    for m, first, mine in zip(members, offsets, blocks):
        pos = [p if p >= 0 else b_ref + (-1 - p) for p in mine]  # block starts in the packed rows
        n, three = m.samples, m.step.three_way
        y_ref, y, u = (pos[0], pos[1], pos[2]) if three else (pos[0], pos[0], pos[1])
        for s in range(n):
            guide[:, first + s] = (y_ref + s, y + s, u + s)
        coef[first : first + n] = np.asarray(m.step.coefficients(m.ctx.guidance), np.float32)
    return BatchPlan(
        sample_rows=rows[:, 0],
        text_rows=rows[:, 1],
        member_rows=rows[:, 2],
        t=np.asarray([float(members[r[2]].step.t) for r in rows], np.float32),
        scale=np.asarray([r[3] for r in ref], np.float32),
        group=np.asarray([r[4] for r in ref], np.int32),
        guide=guide,
        coef=coef,
        **shared_rows(rows[:, 0], rows[:, 1]),
        groups=tuple(groups),
        offsets=tuple(offsets),
    )


def cached_kv(members: Sequence[Member], plan: BatchPlan, cache: ReferenceKVCache, compute: Callable) -> list:
    """Each group's reference K/V in `plan.groups` order: cached, or `compute(one member per missing
    group)` (a backend's one ReferenceNet call, its values per group in that order), then cached."""
    by_key = {m.kv_key: m for m in members}
    found = {key: cache.get(key) for key in plan.groups}
    missing = [key for key in plan.groups if found[key] is None]
    if missing:
        for key, kv in zip(missing, compute([by_key[key] for key in missing]), strict=True):
            cache.put(key, kv)
            found[key] = kv
    return [found[key] for key in plan.groups]


def bucket(n: int) -> int:
    """The padded size of an axis: the next power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class PaddedPlan(StepArrays):
    """A plan padded to bucket sizes, so that one captured step serves every batch of the bucket.

    Rows are [reference rows | padding | other rows | padding]; padding rows carry sample 0, text 0,
    member 0, timestep 0, λ 0 and group 0; padding samples' guidance rows point at row 0, their
    coefficients are 0 but alpha = s_cur = 1 (no division by zero): their next x is 0 (x finite),
    never read. Encoder rows (padding: row 0) are ref rows + other rows / 2: each other row is a
    3-way cond or uncond row. `key` names the bucket; `plan` is the unpadded plan.
    """

    key: tuple[int, int, int, int, int]  # (ref rows, other rows, samples, groups, members)
    plan: BatchPlan


def pad_plan(plan: BatchPlan, members: int) -> PaddedPlan:
    """`plan` padded to power-of-two buckets of every axis."""
    b_ref, rest = plan.ref_rows, plan.rows - plan.ref_rows
    key = (bucket(b_ref), bucket(rest), bucket(plan.samples), bucket(len(plan.groups)), bucket(members))
    ref_b, rest_b, s_b = key[0], key[1], key[2]

    def rows(values: np.ndarray) -> np.ndarray:
        out = np.zeros(ref_b + rest_b, values.dtype)
        out[:b_ref] = values[:b_ref]
        out[ref_b : ref_b + rest] = values[b_ref:]
        return out

    def moved(row: np.ndarray) -> np.ndarray:
        """Row numbers in the padded rows."""
        return np.where(row >= b_ref, row + (ref_b - b_ref), row)

    guide = np.zeros((3, s_b), np.int64)
    guide[:, : plan.samples] = moved(plan.guide)
    coef = np.zeros((s_b, plan.coef.shape[1]), np.float32)
    coef[: plan.samples] = plan.coef
    coef[plan.samples :, STEP_COEFFICIENTS.index("alpha")] = 1.0
    coef[plan.samples :, STEP_COEFFICIENTS.index("s_cur")] = 1.0
    scale, group = np.zeros(ref_b, np.float32), np.zeros(ref_b, np.int32)
    scale[:b_ref], group[:b_ref] = plan.scale, plan.group
    enc_rows, stem_rows = np.zeros(ref_b + rest_b // 2, np.int64), np.zeros(s_b, np.int64)
    enc_rows[: len(plan.enc_rows)], stem_rows[: plan.samples] = moved(plan.enc_rows), moved(plan.stem_rows)
    return PaddedPlan(
        sample_rows=rows(plan.sample_rows),
        text_rows=rows(plan.text_rows),
        member_rows=rows(plan.member_rows),
        t=rows(plan.t),
        scale=scale,
        group=group,
        guide=guide,
        coef=coef,
        enc_rows=enc_rows,
        enc_index=rows(plan.enc_index),
        stem_rows=stem_rows,
        key=key,
        plan=plan,
    )
