"""Exceptions raised by FlashFace-TRT; every message names the offending value."""


class FlashFaceError(Exception):
    """Base class of every error this package raises on purpose."""


class WeightsError(FlashFaceError):
    """A weights file or directory is missing, corrupt or of the wrong layout."""


class InputError(FlashFaceError, ValueError):
    """A user-supplied parameter, image or prompt is out of range or malformed; `field` names it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickled whole (Ray sends errors between processes)
        return self.__class__, (str(self), self.field)
