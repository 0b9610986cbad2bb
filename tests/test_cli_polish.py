"""CLI polish: --version, an empty --prompt, batch-file photo errors naming the line, one rule for a
batch line's output (beside the JSONL), SIGINT ending in one line and exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashface_trt import __version__
from flashface_trt.cli import main
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.faces.images import synthetic_face

TINY = ["generate", "--preset", "tiny", "--height", "64", "--width", "64", "--steps", "1"]
ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"flashface-trt {__version__}"


def test_empty_prompt_is_named(tmp_path, capsys):
    for prompt in ("", "   "):
        assert main([*TINY, "--prompt", prompt, "--out", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err
        assert f"--prompt {prompt!r} is empty" in err and "give --prompt" not in err
    batch = tmp_path / "r.jsonl"
    batch.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    assert main([*TINY, "--batch-file", str(batch)]) == 2
    assert "r.jsonl:2: the prompt is empty" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_batch_photo_errors_name_the_line(tmp_path, capsys):
    synthetic_face(96).save(tmp_path / "face.png")
    (tmp_path / "notes.png").write_text("not a photo")
    batch = tmp_path / "r.jsonl"
    lines = [{"prompt": "a", "face": "face.png"}, {"prompt": "b"}, {"prompt": "c", "face": "notes.png"}]
    batch.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main([*TINY, "--batch-file", str(batch)]) == 2
    err = capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    assert "r.jsonl:3: 'notes.png' is not a readable image" in err


def test_batch_detection_errors_name_the_line_and_the_flag(tmp_path, capsys, monkeypatch):
    """A photo with several faces, refused by detection on line 2: the line and the CLI's flag."""
    from PIL import Image

    Image.new("RGB", (150, 120), (255, 255, 255)).save(tmp_path / "group.png")
    batch = tmp_path / "r.jsonl"
    batch.write_text('{"prompt": "a"}\n{"prompt": "b", "face": "group.png"}\n')
    import flashface_trt.runtime.faces.references as refs

    def several(images, names, detector, largest=False, cfg=None):
        raise InputError(f"2 faces found in {names[0]!r}; crop it or use largest_face", None, "largest_face")

    monkeypatch.setattr(refs, "references_from_images", several)
    assert main([*TINY, "--batch-file", str(batch)]) == 2
    err = capsys.readouterr().err
    assert "r.jsonl:2: 2 faces found in 'group.png'; crop it or use --largest-face" in err


def test_batch_outputs_resolve_against_the_jsonl(tmp_path, monkeypatch, capsys):
    """A line without `out` writes beside the JSONL, as a line with a relative `out` does."""
    sub, elsewhere = tmp_path / "jobs", tmp_path / "cwd"
    sub.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    batch = sub / "r.jsonl"
    batch.write_text('{"prompt": "a", "out": "given.png"}\n{"prompt": "b"}\n')
    assert main([*TINY, "--batch-file", str(batch)]) == 0
    assert sorted(p.name for p in sub.glob("*.png")) == ["given.png", "out_2.png"]
    assert not list(elsewhere.iterdir())


def test_sigint_is_one_line_and_exit_130(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [*TINY[:-1], "400", "--prompt", "x", "--out", str(tmp_path / "o.png")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashface_trt.cli", *args], stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    seen, end = " ", time.monotonic() + 180
    while "denoising" not in seen and seen[-1:] and time.monotonic() < end:  # its progress bar is out
        seen += proc.stderr.read(1)
    assert "denoising" in seen, seen
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(60) == 130
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    assert rest.rstrip().endswith("flashface-trt: interrupted") and rest.count("interrupted") == 1
    assert not (tmp_path / "o.png").exists()
