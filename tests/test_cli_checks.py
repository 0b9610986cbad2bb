"""What a new user hits in the first hour (issue 12): checks before loading, refusals, help, cleanup."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from flashface_trt.cli import build_parser, main
from flashface_trt.runtime.faces.images import synthetic_face

from .conftest import run_without_torch
from .scripted import wild_detector

TINY = ["generate", "--preset", "tiny", "--prompt", "x", "--steps", "1", "--height", "64", "--width", "64"]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any backend fails the test: every check must come before it."""
    import flashface_trt.backends as backends

    def loaded(*args, **kwargs):
        raise AssertionError("a backend was loaded before the arguments were checked")

    for name in ("torch_backend", "ort_backend", "trt_backend"):
        monkeypatch.setattr(backends, name, loaded)


def _face(tmp_path, name="face.png", size=120):
    path = tmp_path / name
    synthetic_face(size).save(path)
    return str(path)


# ---------------------------------------------------------------- items 2 and 3: checks before loading


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "steps=0"),
        (["--width", "70"], "width=70 must be a multiple of 8"),
        (["--seed", "-1"], "seed=-1"),
        (["--num-samples", "0"], "num_samples=0"),
        (["--guide-rescale", "2"], "guide_rescale=2.0"),
        (["--face", "{tmp}/missing.png"], "missing.png' does not exist"),
        (["--face", "{tmp}"], "is not a file"),
        (["--out", "{tmp}/o"], "has no extension"),
        (["--out", "{tmp}"], "is a directory"),
        (["--out", "{tmp}/o.xyz"], "no image format with the extension '.xyz'"),
        (["--out", "{tmp}/o.xbm"], "cannot write an RGB image as XBM"),
        (["--out", "{tmp}/file.txt/o.png"], "file.txt' is a file"),
    ],
)
def test_generate_checks_everything_before_loading(tmp_path, capsys, no_loading, extra, message):
    (tmp_path / "file.txt").write_text("")
    extra = [a.format(tmp=tmp_path) for a in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "o.png")]
    assert main([*TINY, *out, *extra]) == 2
    assert message in capsys.readouterr().err


def test_output_directory_must_be_writable(tmp_path, capsys, no_loading, monkeypatch):
    """A parent that cannot be written (faked: the tests run as root, whom permissions do not stop;
    the check creates a file there, as the write will) is refused before loading."""
    import errno
    import os
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if os.fspath(kwargs.get("dir")) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert main([*TINY, "--out", str(locked / "new" / "o.png")]) == 2
    assert "cannot be created" in capsys.readouterr().err and not (locked / "new").exists()
    assert main([*TINY, "--out", str(locked / "o.png")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_output_format_follows_the_extension_and_the_help_says_so(tmp_path):
    assert main([*TINY, "--out", str(tmp_path / "o.JPG")]) == 0
    assert Image.open(tmp_path / "o.JPG").format == "JPEG"
    out = next(a for name, _, a in _options(build_parser()) if name == "generate" and a.dest == "out")
    assert ".png" in out.help and ".jpg" in out.help and ".webp" in out.help


# ---------------------------------------------------------------- item 1: wild detector boxes


def test_detect_and_generate_survive_wild_detector_boxes(tmp_path, capsys, monkeypatch):
    """Huge, far-away, inf and NaN boxes: ignored or the photo refused by name, never a traceback."""
    import flashface_trt.backends as backends
    import flashface_trt.commands.detect as detect_cmd

    photo = _face(tmp_path, "me.png", 300)
    sane = wild_detector((200, 200, 400, 420))
    for i, run in enumerate((sane, wild_detector(), wild_detector(landmarks=np.nan))):
        monkeypatch.setattr(detect_cmd, "torch_detector", lambda args, device="cpu", run=run: run)
        monkeypatch.setattr(backends, "torch_detector", lambda args, device="cpu", run=run: run)
        out = tmp_path / f"crops{i}"
        rc = main(["detect", photo, "--preset", "tiny", "--largest-face", "--out-dir", str(out)])
        text = capsys.readouterr().out
        gen = main([*TINY, "--face", photo, "--largest-face", "--out", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        if run is sane:
            assert rc == 0 and gen == 0
            assert Image.open(out / "me_face.png").size == (93, 103)  # the sane face, not a wild box
        else:
            assert rc == 2 and "refused: no face found in 'me.png'" in text and not out.exists()
            assert gen == 2 and "no face found in 'me.png'" in err


@pytest.mark.oracle
def test_tiny_detector_largest_face_on_the_fixture_photos(face_dir, tmp_path, capsys):
    """The issue's report: `--largest-face` on the tiny preset died in our crop or wrote 2290x30808 crops."""
    photos = [face_dir / "face_input.png", *sorted(face_dir.glob("face_crop*.png"))]
    out = tmp_path / "crops"
    rc = main(["detect", *map(str, photos), "--preset", "tiny", "--largest-face", "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().out
    for photo in photos:
        crop, side = Image.open(out / f"{photo.stem}_face.png"), max(Image.open(photo).size)
        assert max(crop.size) <= 2 * side, (photo.name, crop.size)
    assert main([*TINY, "--face", str(photos[0]), "--largest-face", "--out", str(tmp_path / "o.png")]) == 0


# ---------------------------------------------------------------- items 4, 7, 8: exports and engines


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    copy = tmp_path / "onnx"
    shutil.copytree(tiny_export, copy)
    return copy


def test_generate_refuses_a_graph_altered_after_export(export_copy, capsys):
    unet = export_copy / json.loads((export_copy / "manifest.json").read_text())["networks"]["unet"]["file"]
    data = bytearray(unet.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    unet.write_bytes(bytes(data))
    for _ in range(2):  # refused again: a failed check is not remembered as a pass
        args = ["generate", "--onnx", str(export_copy), *TINY[3:], "--out", str(export_copy / "o.png")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert unet.name in err and "no longer matches its manifest" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--width", "512"], "width 512 is outside the range [64, 256] in the export"),
        (["--height", "32"], "height 32 is outside the range [64, 256]"),
        (["--num-samples", "3"], "num_samples 3 is outside the range [1, 2]"),
        (
            ["--face", "{face}"] * 5,
            "5 reference faces (fewer are repeated up to 4) are outside the range [1, 4]",
        ),
        (["--device", "cuda"], "--device cuda has no effect here"),
        (["--precision", "fp32"], "the graphs' precision is the export's"),
        (["--torch-preset", "static"], "--torch-preset static has no effect here"),
    ],
)
def test_onnx_requests_outside_the_export_are_refused_before_loading(
    tiny_export, tmp_path, capsys, no_loading, extra, message
):
    face = _face(tmp_path)
    fixes = {"512": "--max-size 512", "32": "--min-size 32", "3": "--max-samples 3", "{face}": "--max-refs 5"}
    fix = fixes.get(extra[1])
    extra = [a.format(face=face) for a in extra]
    args = ["generate", "--onnx", str(tiny_export), "--prompt", "x", "--out", str(tmp_path / "o.png"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    if fix is not None:
        assert f"flashface-trt export (--weights DIR | --preset tiny) --out DIR {fix}" in err


def test_onnx_means_a_directory_for_detect_and_generate(tiny_export, tmp_path, capsys):
    photo = _face(tmp_path, "me.png", 200)
    detect = ["detect", photo, "--largest-face", "--out-dir", str(tmp_path / "c"), "--onnx"]
    assert main([*detect, str(tiny_export)]) == 0  # an export holds its detector graph
    assert (tmp_path / "c" / "me_face.png").is_file()
    graph = next(tiny_export.glob("detector-*.onnx"))
    assert main([*detect, str(graph)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "does not exist" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in (detect, ["generate", "--prompt", "x", "--onnx"]):
        assert main([*command, str(empty)]) == 2
        err = capsys.readouterr().err
        assert str(empty) in err and "does not exist" not in err


# ---------------------------------------------------------------- items 5, 6, 9, 10, 11


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--provider", "cuda"], "--provider cuda has no effect here"),
        (["--cropped"], "--cropped has no effect here"),
        (["--largest-face"], "--largest-face has no effect here"),
        (["--face", "{face}", "--cropped", "--largest-face"], "--cropped skips detection"),
        (["--max-pixels", "100"], "--max-pixels 100 has no effect here"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys, no_loading, extra, message):
    extra = [a.format(face=_face(tmp_path)) for a in extra]
    assert main([*TINY, "--out", str(tmp_path / "o.png"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_export_precision_reaches_the_models_and_the_graphs(tmp_path, monkeypatch):
    """`export --precision fp16` builds float16 models and fp16 settings (it once wrote fp32 graphs)."""
    import torch

    import flashface_trt.export.exporter as exporter

    seen = []
    for precision, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        monkeypatch.setattr(
            exporter, "export_models", lambda m, o, s, *a: seen.append((m, s)) or {"networks": {}}
        )
        assert (
            main(["export", "--preset", "tiny", "--precision", precision, "--out", str(tmp_path / "e")]) == 0
        )
        models, settings = seen.pop()
        assert settings.precision == precision and models.dtype == dtype
        assert next(models.unet.parameters()).dtype == dtype


def test_long_prompts_warn_what_clip_drops(tmp_path, caplog):
    prompt = "a man in a red coat " * 40
    with caplog.at_level(logging.WARNING, logger="flashface_trt"):
        args = [*TINY, "--prompt", prompt, "--negative-prompt", "glasses, beard, hat, scarf, gloves, boots"]
        assert main([*args, "--out", str(tmp_path / "o.png")]) == 0
    texts = [r.getMessage() for r in caplog.records if "CLIP's 75 tokens" in r.getMessage()]
    assert len(texts) == 2, texts
    positive, negative = texts
    assert positive.startswith("the prompt is longer") and "tokens dropped" in positive
    assert "official suffix" in positive and "photographic" in positive  # the suffix is the first to go
    assert "the model reads: 'a man in a red coat a man" in positive
    assert negative.startswith("the negative prompt") and "'glasses , beard" in negative
    assert "distorted face" in negative  # the end of the official default negative prompt is dropped


def test_failed_commands_leave_no_empty_directories(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a photo")
    out = tmp_path / "faces" / "sub"
    assert main(["detect", str(bad), "--preset", "tiny", "--out-dir", str(out)]) == 2
    assert not (tmp_path / "faces").exists()
    src = tmp_path / "src"
    src.mkdir()
    assert main(["convert-weights", str(src), str(tmp_path / "converted" / "fp16")]) == 2
    assert not (tmp_path / "converted").exists()


def test_without_torch_the_pytorch_backend_says_what_to_install(tmp_path):
    script = f"""
        from flashface_trt.cli import main
        commands = (
            ["generate", "--preset", "tiny", "--prompt", "x", "--out", {str(tmp_path / "o.png")!r}],
            ["detect", {_face(tmp_path)!r}, "--preset", "tiny"],
            ["export", "--preset", "tiny", "--out", {str(tmp_path / "e")!r}],
        )
        for command in commands:
            print(main(command))
        """
    out = run_without_torch(script)
    assert out.stdout.split() == ["2", "2", "2"], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("flashface-trt: error:")]
    assert len(errors) == 3 and all("pip install torch" in e for e in errors)
    assert "`generate --onnx DIR`" in errors[0] and "`detect --onnx DIR`" in errors[1]


def _options(parser: argparse.ArgumentParser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, p, action


def test_every_option_has_help_with_default_and_range():
    parser = build_parser()
    top = parser.format_help()
    assert "argparse" not in top and "personalised images" in top
    for name, p, action in _options(parser):
        where = f"{name} {action.dest}"
        assert action.help and "\n" not in action.help, where
        if action.type in (int, float):
            assert any(s in action.help for s in ("[", ">=", "> 0", "multiple of 8")), where
        if action.default not in (None, False, "", []) and action.option_strings:
            line = p.format_help().replace("\n", " ")
            assert f"(default: {action.default})" in " ".join(line.split()), where
