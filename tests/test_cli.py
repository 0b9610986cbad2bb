"""The command line end to end on the tiny preset, and its error reporting."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flashface_trt.cli import main
from flashface_trt.runtime.faces.images import synthetic_face


def _run(tmp_path, *extra) -> np.ndarray:
    out = tmp_path / "out.png"
    code = main(
        [
            "generate",
            "--preset",
            "tiny",
            "--prompt",
            "a handsome young man",
            "--steps",
            "3",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    return np.asarray(Image.open(out))


def test_generate_tiny_is_reproducible(tmp_path):
    a = _run(tmp_path, "--seed", "1")
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, _run(tmp_path, "--seed", "1"))
    assert not np.array_equal(a, _run(tmp_path, "--seed", "2"))


def test_generate_torch_presets_give_the_same_image(tmp_path):
    """`--torch-preset` picks how the PyTorch backend runs, not what it computes."""
    a = _run(tmp_path, "--seed", "1")
    for preset in ("static", "channels-last"):
        b = _run(tmp_path, "--seed", "1", "--torch-preset", preset)
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1, preset


def test_generate_with_faces_and_samples(tmp_path):
    faces = []
    for i in range(2):
        p = tmp_path / f"face{i}.png"
        synthetic_face(160, seed=i).save(p)
        faces += ["--face", str(p)]
    main_out = tmp_path / "s.png"
    code = main(
        [
            "generate",
            "--preset",
            "tiny",
            "--prompt",
            "a woman",
            "--steps",
            "2",
            "--num-samples",
            "2",
            "--height",
            "64",
            "--width",
            "48",
            "--recipe",
            "age",
            "--out",
            str(main_out),
            "--cropped",
            *faces,
        ]
    )
    assert code == 0
    imgs = [Image.open(tmp_path / f"s_{i}.png") for i in range(2)]
    assert all(im.size == (48, 64) for im in imgs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "steps=0"),
        (["--height", "100"], "height=100"),
        (["--face-bbox", "0.6,0.2,0.3,0.5"], "face_bbox"),
        (["--guide-rescale", "2"], "guide_rescale=2.0"),
    ],
)
def test_bad_parameters_are_reported(tmp_path, capsys, args, message):
    code = main(["generate", "--preset", "tiny", "--prompt", "x", "--out", str(tmp_path / "o.png"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_face_file_is_reported(tmp_path, capsys):
    bad = tmp_path / "face.png"
    bad.write_bytes(b"not an image")
    code = main(
        [
            "generate",
            "--preset",
            "tiny",
            "--prompt",
            "x",
            "--face",
            str(bad),
            "--out",
            str(tmp_path / "o.png"),
        ]
    )
    assert code == 2
    assert "face.png" in capsys.readouterr().err


@pytest.mark.oracle
def test_generate_and_convert_with_weights_directories(oracle_dir, tmp_path):
    """`generate --weights` on official-named files and on their `convert-weights` output agree."""
    official = tmp_path / "official"
    official.mkdir()
    names = {
        "flashface_unet.ckpt": "flashface.ckpt",
        "clip_text.pth": "openai-clip-vit-large-14.pth",
        "vae.pth": "sd-v1-vae.pth",
        "config.json": "config.json",
    }
    for src, dst in names.items():
        (official / dst).symlink_to(oracle_dir / src)
    assert main(["convert-weights", str(official), str(tmp_path / "fp16")]) == 0
    face = tmp_path / "face.png"
    synthetic_face(200).save(face)
    outs = []
    for weights in (official, tmp_path / "fp16"):
        out = tmp_path / f"{weights.name}.png"
        args = [
            "generate",
            "--weights",
            str(weights),
            "--face",
            str(face),
            "--prompt",
            "a young woman",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            str(out),
            "--no-detect",
        ]
        assert main(args) == 0
        outs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_oversized_face_photo_is_refused(tmp_path, capsys):
    photo = tmp_path / "big.png"
    synthetic_face(120).save(photo)
    args = ["generate", "--preset", "tiny", "--prompt", "x", "--face", str(photo), "--max-pixels", "10000"]
    assert main([*args, "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "big.png" in err and "14400" in err


def _photos(tmp_path, n=2):
    paths = []
    for i in range(n):
        p = tmp_path / f"person{i}.jpg"
        synthetic_face(220, seed=i).resize((220, 260)).save(p, quality=95)
        paths.append(str(p))
    return paths


def test_detect_writes_the_crops_generate_would_use(tmp_path, capsys):
    photos = _photos(tmp_path)
    out = tmp_path / "crops"
    assert main(["detect", *photos, "--preset", "tiny", "--largest-face", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("face(s)") == 2 and "box (" in text and "score" in text
    crops = sorted(out.glob("*_face.png"))
    assert [c.name for c in crops] == ["person0_face.png", "person1_face.png"]
    # the same crops as the library path that `generate` uses
    from flashface_trt.models.loading import tiny_detector
    from flashface_trt.models.retinaface import detector_runner
    from flashface_trt.runtime.faces.references import load_references

    refs = load_references(photos, detector_runner(tiny_detector()), largest=True)
    for ref, crop in zip(refs, crops):
        np.testing.assert_array_equal(np.asarray(ref.crop), np.asarray(Image.open(crop)))


def test_detect_refuses_photos_with_several_faces(tmp_path, capsys):
    photos = _photos(tmp_path, 1)
    bad = tmp_path / "notes.txt.jpg"
    bad.write_text("not a photo")
    code = main(["detect", *photos, str(bad), "--preset", "tiny", "--out-dir", str(tmp_path / "c")])
    assert code == 2
    text = capsys.readouterr().out
    assert "faces found in 'person0.jpg'" in text and "--largest-face" in text
    assert "notes.txt.jpg" in text
    assert not list((tmp_path / "c").glob("*.png"))


def test_generate_detects_faces_in_photos_by_default(tmp_path, capsys):
    photos = _photos(tmp_path, 1)
    args = ["generate", "--preset", "tiny", "--prompt", "x", "--steps", "1", "--height", "64"]
    args += ["--width", "64", "--face", photos[0], "--out", str(tmp_path / "o.png")]
    assert main(args) == 2
    assert "faces found in 'person0.jpg'" in capsys.readouterr().err
    assert main([*args, "--largest-face"]) == 0
    assert Image.open(tmp_path / "o.png").size == (64, 64)


def test_export_detector_and_detect_with_onnx_runtime(tiny_export, tmp_path, capsys):
    """`export-detector` over a directory holding the current graph reuses it; `detect --onnx` runs it."""
    import shutil

    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for f in tiny_export.glob("detector-*"):
        shutil.copy2(f, onnx_dir / f.name)
    stamp = {f.name: f.stat().st_mtime_ns for f in onnx_dir.iterdir()}
    assert main(["export-detector", "--preset", "tiny", "--out-dir", str(onnx_dir)]) == 0
    graph = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        graph.endswith(".onnx")
        and {f.name: f.stat().st_mtime_ns for f in onnx_dir.glob("detector-*")} == stamp
    )
    photos = _photos(tmp_path, 1)
    code = main(
        ["detect", *photos, "--onnx", str(onnx_dir), "--largest-face", "--out-dir", str(tmp_path / "c")]
    )
    assert code == 0
    assert (tmp_path / "c" / "person0_face.png").is_file()
