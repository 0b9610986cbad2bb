"""The command line end to end on the tiny preset, and its error reporting."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flashface_trt.cli import main
from flashface_trt.runtime.images import synthetic_face


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
