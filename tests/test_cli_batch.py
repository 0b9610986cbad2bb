"""`generate --batch-file`: many requests in one call through the step-level executor."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from flashface_trt.cli import main
from flashface_trt.runtime.faces.images import synthetic_face

TINY = ["generate", "--preset", "tiny", "--cropped", "--height", "64", "--width", "64"]


def _faces(tmp_path) -> list[str]:
    names = []
    for i in range(3):
        synthetic_face(96, seed=i).save(tmp_path / f"face{i}.png")
        names.append(f"face{i}.png")
    return names


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.int16)


def test_batch_file_gives_each_request_its_solo_images(tmp_path, capsys):
    """Two identities, prompts, seeds, step counts and sample counts in one run = each run alone.

    The batched fp32 CPU step equals the solo one to ~1e-6 relative (tests/test_batching.py), so the
    8-bit images may differ by one level where a value sits at a rounding boundary, no more.
    """
    a, b, c = _faces(tmp_path)
    lines = [
        {"prompt": "a woman", "face": [a, b], "seed": 1, "steps": 3, "out": "out/first.png"},
        {"prompt": "a man with a hat", "face": c, "seed": 2, "steps": 2, "num_samples": 2},
        {"face": [a, b], "seed": 3, "text_guidance": 2.5, "face_bbox": [0.25, 0.25, 0.75, 0.75]},
    ]
    batch = tmp_path / "requests.jsonl"
    batch.write_text("# three requests\n" + "\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "b.png"
    args = [*TINY, "--prompt", "a child", "--steps", "4", "--out", str(out), "--batch-file", str(batch)]
    assert main(args) == 0
    written = capsys.readouterr().out.split()
    expected = [
        tmp_path / "out/first.png",
        tmp_path / "b_3_0.png",
        tmp_path / "b_3_1.png",
        tmp_path / "b_4.png",
    ]
    assert sorted(written) == sorted(map(str, expected))
    fa, fb, fc = (str(tmp_path / f) for f in (a, b, c))  # the batch file's paths are relative to it
    solo = [
        (["--prompt", "a woman", "--seed", "1", "--steps", "3", "--face", fa, "--face", fb], expected[:1]),
        (
            [
                "--prompt",
                "a man with a hat",
                "--seed",
                "2",
                "--steps",
                "2",
                "--face",
                fc,
                "--num-samples",
                "2",
            ],
            expected[1:3],
        ),
        (
            ["--prompt", "a child", "--seed", "3", "--steps", "4", "--face", fa, "--face", fb]
            + ["--text-guidance", "2.5", "--face-bbox", "0.25,0.25,0.75,0.75"],
            expected[3:],
        ),
    ]
    for flags, paths in solo:
        one = tmp_path / "solo.png"
        assert main([*TINY, *flags, "--out", str(one)]) == 0
        outs = [one] if len(paths) == 1 else [tmp_path / f"solo_{i}.png" for i in range(len(paths))]
        for got, want in zip(paths, outs):
            diff = np.abs(_pixels(got) - _pixels(want))
            print(f"{got.name}: max diff {diff.max()}, differing pixels {(diff > 0).mean():.4f}")
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_batch_requests_share_steps(tmp_path, monkeypatch):
    """Requests of one size run as one UNet batch per step: fewer batched steps than steps in all."""
    from flashface_trt.runtime.sampling import executor

    a, b, c = _faces(tmp_path)
    batch = tmp_path / "r.jsonl"
    batch.write_text("\n".join(json.dumps({"face": f, "seed": i}) for i, f in enumerate((a, b, c))))
    seen = []
    real = executor.StepExecutor._advance
    monkeypatch.setattr(
        executor.StepExecutor, "_advance", lambda self, tasks: seen.append(len(tasks)) or real(self, tasks)
    )
    args = [
        *TINY,
        "--prompt",
        "x",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "o.png"),
        "--batch-file",
        str(batch),
    ]
    assert main(args) == 0
    assert seen == [3, 3]  # 3 requests x 3 rows fit 12 rows: every step is one call for all three
    seen.clear()
    assert main([*args, "--max-batch-rows", "6"]) == 0
    assert seen == [2, 2, 1, 1]  # 2 at a time; the third joins when the first two leave


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"r.jsonl:2: not a JSON object"),
        ('["a"]', r"r.jsonl:2: expected a JSON object"),
        ('{"prompt": "x", "stpes": 3}', r"r.jsonl:2: unknown keys \['stpes'\]"),
        ('{"steps": "30"}', r"r.jsonl:2: 'steps' must be an integer, got '30'"),
        ('{"steps": 0}', r"r.jsonl:2: steps=0"),
        ('{"face": "nowhere.png"}', r"r.jsonl:2: photo '.*nowhere.png' does not exist"),
        ('{"face_bbox": [0, 0, 1]}', r"r.jsonl:2: 'face_bbox' must be a list of 4 numbers"),
        ('{"out": "first.png"}', r"r.jsonl:2: output '.*first.png' is also written by line 1"),
        ('{"out": "x.unknown"}', r"r.jsonl:2: .*x.unknown"),
    ],
)
def test_every_line_is_checked_before_loading(tmp_path, capsys, monkeypatch, line, message):
    import flashface_trt.commands.generate as generate

    monkeypatch.setattr(generate, "load_backend", lambda args: pytest.fail("loaded before the checks"))
    batch = tmp_path / "r.jsonl"
    batch.write_text(json.dumps({"out": "first.png"}) + "\n" + line + "\n")
    assert main([*TINY, "--prompt", "x", "--batch-file", str(batch)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert re.search(message, err), err


def test_batch_file_flag_errors(tmp_path, capsys):
    assert main([*TINY, "--batch-file", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    empty = tmp_path / "e.jsonl"
    empty.write_text("# nothing\n\n")
    assert main([*TINY, "--batch-file", str(empty)]) == 2
    assert "holds no requests" in capsys.readouterr().err
    plain = [a for a in TINY if a != "--cropped"]
    assert main(plain) == 2
    assert "give --prompt (or --batch-file" in capsys.readouterr().err
    assert main([*plain, "--prompt", "x", "--max-batch-rows", "6"]) == 2
    assert "--max-batch-rows 6 has no effect here" in capsys.readouterr().err
    assert main([*TINY, "--batch-file", str(empty), "--max-batch-rows", "2"]) == 2
    assert "--max-batch-rows 2 must be at least 3" in capsys.readouterr().err
    batch = tmp_path / "r.jsonl"
    batch.write_text('{"seed": 1}\n')
    assert main([*TINY, "--batch-file", str(batch)]) == 2
    assert "r.jsonl:1: no prompt" in capsys.readouterr().err
