"""Exceptions raised by FlashFace-TRT; every message names the offending value."""

from typing import Any


class FlashFaceError(Exception):
    """Base class of every error this package raises on purpose.

    Errors pickle whole (Ray carries them between processes): the message and every attribute a
    subclass sets, whatever its constructor takes (Exception's own pickling would call it with
    the message alone).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (self.__class__, self.args, self.__dict__)


def _rebuild(cls: type[FlashFaceError], args: tuple, state: dict[str, Any]) -> FlashFaceError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class WeightsError(FlashFaceError):
    """A weights file or directory is missing, corrupt or of the wrong layout."""


class InputError(FlashFaceError, ValueError):
    """A user-supplied parameter, image or prompt is out of range or malformed; `field` names it."""

    def __init__(self, message: str, field: str | None = None, option: str | None = None) -> None:
        super().__init__(message)
        self.field, self.option = field, option  # option: a remedy the message names (the CLI: its flag)


class StorageError(FlashFaceError):
    """A file could not be written (disk full, read-only, no permission); nothing partial was left."""
