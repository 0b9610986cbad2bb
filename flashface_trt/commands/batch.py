"""`generate --batch-file`: many requests in one call, run together by the step-level executor.

The file holds one JSON object per line (blank lines and lines starting with `#` are skipped).
Each object's keys are `generate` options by name (the schema's `GENERATE_PARAMS`: `prompt`,
`recipe`, `steps`, `seed`, ...) plus `face` (a photo or a list of photos) and `out` (the output
image); a key a line leaves out takes the command line's value. One rule for paths: relative ones
resolve against the batch file's directory, as does `<--out stem>_<line><suffix>`, the output of
a line without `out`. Every line is checked (keys, values, ranges, photos, outputs) before anything
loads; photo sets shared by several lines are detected and encoded once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.errors import FlashFaceError, InputError
from ..runtime.sampling.params import GENERATE_PARAMS, KINDS
from ..runtime.sampling.request import GenerationRequest

log = logging.getLogger("flashface_trt")

PARAMS = {p.name: p for p in GENERATE_PARAMS}
KEYS = (*PARAMS, "face", "out")  # the request parameters, the line's photos and its output


@dataclass
class Line:
    """One request of a batch file: its line number, request, photos and output files."""

    number: int
    request: GenerationRequest
    faces: tuple[Path, ...]
    paths: list[Path]


def _value(where: str, key: str, value: Any, base: Path) -> Any:
    """A line's value as `generate` would have parsed it, or an InputError naming line and key."""

    def bad(kind: str) -> InputError:
        return InputError(f"{where}: {key!r} must be {kind}, got {value!r}", key)

    if key in PARAMS:
        p = PARAMS[key]
        if not p.typed(value):
            raise bad(KINDS[p.kind])
        return float(value) if p.kind == "float" else tuple(map(float, value)) if p.kind == "bbox" else value
    if key == "face":
        photos = [value] if isinstance(value, str) else value
        if not isinstance(photos, list) or not photos or not all(isinstance(p, str) for p in photos):
            raise bad("a photo path or a non-empty list of photo paths")
        return [base / p for p in photos]
    if not isinstance(value, str) or not value:
        raise bad(KINDS["path"])
    return base / value


def read_batch_file(
    args: argparse.Namespace,
    size: tuple[int, int],
    make_request: Callable[[argparse.Namespace, tuple[int, int]], GenerationRequest],
) -> list[Line]:
    """Every line of `args.batch_file`, checked: requests validated, photos present, outputs writable."""
    from ..runtime.faces.outputs import image_paths

    path: Path = args.batch_file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--batch-file {str(path)!r} cannot be read: {exc}", "batch_file") from exc
    base, lines = path.parent, []
    taken: dict[Path, int] = {}  # output file -> the line that writes it
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not a JSON object ({exc.msg})", "batch_file") from exc
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a JSON object of generate options, got {raw.strip()[:60]!r}")
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            raise InputError(f"{where}: unknown keys {unknown}; known: {list(KEYS)}", unknown[0])
        values = {k: _value(where, k, v, base) for k, v in entry.items()}
        ns = argparse.Namespace(**{**vars(args), **values})
        if not ns.prompt or not ns.prompt.strip():
            what = "the prompt is empty" if isinstance(ns.prompt, str) else "no prompt"
            raise InputError(f"{where}: {what} (give 'prompt' on the line or --prompt)", "prompt")
        out = values.get("out", base / args.out.with_name(f"{args.out.stem}_{number}{args.out.suffix}"))
        try:
            request = make_request(ns, size)
            paths = image_paths(out, request.num_samples)
        except InputError as exc:
            raise InputError(f"{where}: {exc}", exc.field) from exc
        for p in paths:
            if p in taken:
                raise InputError(f"{where}: output {str(p)!r} is also written by line {taken[p]}", "out")
            taken[p] = number
        faces = tuple(ns.face)
        missing = [str(f) for f in faces if not f.is_file()]
        if missing:
            raise InputError(f"{where}: photo {missing[0]!r} does not exist", "face")
        lines.append(Line(number, request, faces, paths))
    if not lines:
        raise InputError(f"--batch-file {str(path)!r} holds no requests", "batch_file")
    return lines


def on_line(args: argparse.Namespace, number: int, fn: Callable[..., Any], *given: Any) -> Any:
    """`fn(*given)`, its InputError naming the batch file's line."""
    try:
        return fn(*given)
    except InputError as exc:
        raise InputError(f"{args.batch_file}:{number}: {exc}", exc.field, exc.option) from exc


def run_batch(
    args: argparse.Namespace, backend: Any, lines: list[Line], identity_of: Callable[[tuple[Path, ...]], Any]
) -> int:
    """Run every line through one StepExecutor; write each request's images as it finishes.

    Returns 0 when every request succeeded, 1 when some failed (each failure is reported, naming
    its line; the others are written all the same).
    """
    from tqdm.auto import tqdm

    from ..runtime.faces.outputs import save_image
    from ..runtime.sampling.executor import StepExecutor, Task

    identities: dict[tuple[Path, ...], Any] = {}
    tasks = []
    for line in lines:
        if line.faces not in identities:
            identities[line.faces] = identity_of(line.faces)
        tasks.append(Task(line.request, identities[line.faces], name=f"line {line.number}"))
    bar = tqdm(total=sum(t.request.steps for t in tasks), desc="denoising", unit="step", file=sys.stderr)
    for task in tasks:
        task.on_step = lambda k, n: bar.update(1)
    executor = StepExecutor(backend, args.max_batch_rows)
    t0 = time.perf_counter()
    try:
        executor.run(tasks)
    finally:
        bar.close()
    failed = 0
    for line, task in zip(lines, tasks):
        if task.error is not None:
            failed += 1
            reason = task.error if isinstance(task.error, FlashFaceError) else repr(task.error)
            print(f"flashface-trt: error: {args.batch_file}:{line.number}: {reason}", file=sys.stderr)
            continue
        for path, img in zip(line.paths, task.images or []):
            save_image(img, path)
            print(path)
    sizes = executor.batch_sizes
    log.info(
        "%d request(s) in %.1f s on %s: %d batched steps, %.2f requests per step on average",
        len(tasks),
        time.perf_counter() - t0,
        backend.name,
        len(sizes),
        sum(sizes) / max(len(sizes), 1),
    )
    return 1 if failed else 0
