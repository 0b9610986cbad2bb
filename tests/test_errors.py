"""Every error the package raises survives pickling (Ray carries them between processes)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import flashface_trt
from flashface_trt.runtime.errors import FlashFaceError

SKIP = ("flashface_trt.engine.build",)  # imports polygraphy at module level


def _error_classes() -> list[type[FlashFaceError]]:
    for mod in pkgutil.walk_packages(flashface_trt.__path__, "flashface_trt."):
        if mod.name not in SKIP:
            try:
                importlib.import_module(mod.name)
            except ImportError:  # an optional extra (serve, ray, trt) that is not installed
                continue
    found, todo = [], [FlashFaceError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


ARGS = {"Stopped": ("timeout", "past its deadline"), "QueueFull": ("queue full", 7)}


def test_every_error_pickles_with_its_message_and_fields():
    classes = _error_classes()
    names = {c.__name__ for c in classes}
    assert {"InputError", "QueueFull", "Stopped", "ImageTooLarge", "StaleEngineError"} <= names
    for cls in classes:
        args = ARGS.get(cls.__name__, ("bad value 3",))
        err = cls(*args)
        if hasattr(err, "field"):
            err = cls(*args, "steps")
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back) == str(err), cls
        assert vars(back) == vars(err), cls
