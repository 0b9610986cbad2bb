"""Reading checkpoints safely and loading them strictly into modules."""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..runtime.errors import WeightsError

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_LIST_LIMIT = 12


def read_checkpoint(path: str | Path) -> StateDict:
    """Read a `.safetensors`, `.pth` or `.ckpt` state dict (torch files with `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # mmap keeps a 10 GB checkpoint out of RAM; only the zip format supports it
            mmap = zipfile.is_zipfile(path)
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"weights file {str(path)!r} is corrupt or not a checkpoint: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return dict(state)


def _clip_list(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f", ... ({more} more)" if more > 0 else "")


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    """Raise `WeightsError` listing missing, unexpected and mis-shaped keys of `state`."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_clip_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_clip_list(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped keys: {_clip_list(misshaped)}")
    if problems:
        raise WeightsError(f"weights from {source} do not fit the model: " + "; ".join(problems))


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter and persistent buffer of `module` (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def meta_shapes(factory: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the module `factory` builds, built on the meta device (no memory)."""
    with torch.device("meta"):
        return expected_shapes(factory())


M = TypeVar("M", bound=nn.Module)


def build_strict(
    factory: Callable[[], M], state: Mapping[str, torch.Tensor], source: str, device, dtype
) -> M:
    """Build on the meta device, check `state` strictly, assign it, then move: eval mode, no gradients."""
    with torch.device("meta"):
        module = factory()
    check_state_dict(expected_shapes(module), state, source)
    module.load_state_dict(dict(state), strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def read_state(path_or_state: str | Path | Mapping[str, torch.Tensor]) -> tuple[StateDict, str]:
    """A state dict and a name for error messages, from a file path or an in-memory mapping."""
    if isinstance(path_or_state, (str, Path)):
        return read_checkpoint(path_or_state), str(path_or_state)
    return dict(path_or_state), "the given state dict"


def drop_aliases(state: StateDict, aliases: Mapping[str, str], source: str) -> StateDict:
    """Remove aliased prefixes (`alias` -> `canonical`) after checking that both hold the same tensors."""
    out = dict(state)
    for alias, canonical in aliases.items():
        for key in [k for k in out if k.startswith(alias)]:
            twin = canonical + key[len(alias) :]
            if twin not in out:
                out[twin] = out.pop(key)
                continue
            a, b = out.pop(key), out[twin]
            same_storage = a.data_ptr() == b.data_ptr() and a.shape == b.shape
            if not same_storage and (a.shape != b.shape or not torch.equal(a, b)):
                raise WeightsError(f"{source}: aliased keys {key!r} and {twin!r} hold different tensors")
    return out
