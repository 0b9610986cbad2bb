"""The FlashFace pipeline over any backend: one request through `prepare` and a one-request executor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

from .executor import StepExecutor, Task
from .identities import Identity
from .prepare import Backend, Tokenizer, prepare_references, register_identity, warn_truncated
from .request import GenerationRequest

__all__ = ["Backend", "Tokenizer", "generate", "prepare_references", "register_identity", "warn_truncated"]


def generate(
    backend: Backend,
    request: GenerationRequest,
    faces: Sequence[Image.Image] | Identity,
    on_step: Callable[[int, int], None] | None = None,
    timings: dict[str, float] | None = None,
) -> list[Image.Image]:
    """Generate `request.num_samples` images of a person: face crops, or a registered identity.

    The request runs as a batch of one through `StepExecutor` (what the service and --batch-file
    run); `on_step(k, n)` follows its steps. `timings`, if given, receives the host wall-clock
    seconds of each stage (text, references, denoise, decode); on a GPU, work queued by one stage
    may finish in the next one that waits.
    """
    task = Task(request, faces, on_step=on_step)
    StepExecutor(backend).run([task])
    if timings is not None:
        timings.update(task.timings)
    if task.error is not None:
        raise task.error
    return task.images or []
