"""One parameter schema: the CLI flags, batch-file keys, HTTP body and settings are all derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from flashface_trt.cli import build_parser
from flashface_trt.commands.batch import KEYS
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.sampling.executor import StepExecutor
from flashface_trt.runtime.sampling.params import (
    BATCH_ROWS,
    GENERATE_PARAMS,
    PARAMS,
    REQUEST_PARAMS,
    REQUIRED,
    SERVICE,
)
from flashface_trt.runtime.sampling.request import GenerationRequest, make_request
from flashface_trt.serve.config import SETTINGS, ServeSettings


def _flags(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


def test_generate_flags_and_batch_keys_are_the_schema():
    flags = _flags("generate")
    for p in REQUEST_PARAMS:
        if p.group == SERVICE:
            assert p.name not in flags and p.name not in KEYS, p.name
            continue
        action = flags[p.name]
        assert action.option_strings == [f"--{p.name.replace('_', '-')}"], p.name
        assert action.default == (None if p.default is REQUIRED else p.default), p.name
        assert p.help in action.help and (p.rule() in action.help or action.choices == p.choices)
    assert KEYS == (*(p.name for p in GENERATE_PARAMS), "face", "out")
    assert flags["max_batch_rows"].default == BATCH_ROWS.default


def test_serve_flags_and_settings_are_the_schema():
    flags = _flags("serve")
    for p in SETTINGS:
        assert flags[p.name].default == p.default and p.help in flags[p.name].help, p.name
    fields = [f.name for f in dataclasses.fields(ServeSettings)]
    assert fields == [*(p.name for p in SETTINGS[:7]), "api_keys", *(p.name for p in SETTINGS[7:])]
    assert ServeSettings() == ServeSettings(**{p.name: p.default for p in SETTINGS})


def test_http_body_is_the_schema_and_strict():
    pytest.importorskip("fastapi")
    from pydantic import ValidationError

    from flashface_trt.serve.app import GenerationBody

    assert list(GenerationBody.model_fields) == [p.name for p in REQUEST_PARAMS]
    required = {n for n, f in GenerationBody.model_fields.items() if f.is_required()}
    assert required == {p.name for p in REQUEST_PARAMS if p.default is REQUIRED} == {"prompt", "identity"}
    body = {"identity": "i", "prompt": "x"}
    assert GenerationBody.model_validate({**body, "steps": 3, "guide_rescale": 1}).model_dump(
        exclude_none=True
    ) == {**body, "negative_prompt": "", "recipe": "identity", "steps": 3, "seed": 0, "num_samples": 1,
          "guide_rescale": 1.0, "priority": 0}  # fmt: skip
    for field, value in (("steps", True), ("priority", "1"), ("timeout_s", "10"), ("seed", 1.0)):
        with pytest.raises(ValidationError) as err:
            GenerationBody.model_validate({**body, field: value})
        assert err.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("p", [p for p in REQUEST_PARAMS if p.kind in ("int", "float")], ids=str)
def test_numbers_are_strict_and_ranged(p):
    for bad in (True, str(p.lo), p.hi + 1, p.lo - 1 if not p.lo_open else p.lo):
        with pytest.raises(InputError, match=f"^{p.name}=") as err:
            p.check(bad)
        assert err.value.field == p.name
    assert p.check(p.hi) == p.hi


def test_messages_name_value_and_range():
    cases = [
        (PARAMS["timeout_s"], 0, "timeout_s=0 must be a number in (0, 86400]"),
        (PARAMS["priority"], "1", "priority='1' must be an integer in [-100, 100]"),
        (PARAMS["steps"], True, "steps=True must be an integer in [1, 1000]"),
        (PARAMS["recipe"], "fastest", "recipe='fastest' must be one of ['identity', 'age']"),
        (PARAMS["height"], 100, "height=100 must be a multiple of 8"),
        (BATCH_ROWS, 2, "max_batch_rows=2 must be an integer >= 3"),
        (SETTINGS[4], 0, "max_upload_mb=0 must be a number > 0"),
    ]
    for p, value, message in cases:
        with pytest.raises(InputError) as err:
            p.check(value)
        assert str(err.value) == message
    with pytest.raises(InputError, match="max_batch_rows=2"):
        StepExecutor(None, 2)
    with pytest.raises(InputError, match=r"port=70000 must be an integer in \[0, 65535\]"):
        ServeSettings(port=70000).validated()


def test_make_request_takes_every_schema_field():
    given = {"negative_prompt": "n", "steps": 2, "seed": 5, "num_samples": 2, "height": 64, "width": 32,
             "face_bbox": [0, 0, 0, 0], "text_guidance": 1.0, "face_guidance": 2.0, "ref_strength": 0.5,
             "ref_strength_before": 0.25, "step_to_launch": 10, "guide_rescale": 0.0}  # fmt: skip
    req = make_request("x", "age", **given)
    assert req.values() == {"prompt": "x", **given, "face_bbox": (0.0, 0.0, 0.0, 0.0)}
    assert set(req.values()) == {p.name for p in GENERATE_PARAMS} - {"recipe"}
    assert json.loads(json.dumps(GenerationRequest(prompt="x").values()))["height"] == 768
    with pytest.raises(InputError, match=r"unknown request parameters \['priority'\]"):
        make_request("x", priority=1)
