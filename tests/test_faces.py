"""Face crops (official `crop_face` + `PadToSquare`), one-face selection, and hardened image loading."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flashface_trt.commands.checks import cli_message
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.faces.crop import box_problem, crop_face, eye_angle, select_face
from flashface_trt.runtime.faces.images import DEFAULT_MAX_PIXELS, load_image, reference_array
from flashface_trt.runtime.faces.references import references_from_images

from .conftest import rel_err
from .scripted import wild_detector

# ---------------------------------------------------------------- oracle parity


def _oracle_crops(face_dir: Path) -> tuple[list[Image.Image], list[Image.Image], np.ndarray]:
    """(our crops, official crops, official face tensors [N, 3, 224, 224]) for every fixture crop."""
    cases = np.load(face_dir / "face_cases.npz")
    boxes, landmarks = cases["crop_boxes"], cases["crop_landmarks"]  # [N, 5], [N, 5, 2]
    n = len(sorted(face_dir.glob("face_crop*.png")))
    assert n == len(boxes) == len(landmarks) == len(cases["face_tensors"]) and n > 0
    img = load_image(face_dir / "face_input.png")
    ours = [crop_face(img, box, lm) for box, lm in zip(boxes, landmarks)]
    refs = [Image.open(face_dir / f"face_crop{i}.png").convert("RGB") for i in range(n)]
    return ours, refs, cases["face_tensors"]


@pytest.mark.oracle
def test_crop_face_matches_official(face_dir: Path) -> None:
    """Pixel-exact: fixed boxes and landmarks, then Pillow's crop and nearest-neighbour rotate.

    Both copy pixels, so a difference is a wrong pixel, never a rounding by one level. The only
    float steps are the eye angle (float32 lengths, libm's acos) and Pillow's rotation matrix; a
    last-bit difference there between CPUs moves a source coordinate by ~1e-13 pixel.
    """
    ours, refs, _ = _oracle_crops(face_dir)
    for i, (crop, ref) in enumerate(zip(ours, refs)):
        assert crop.size == ref.size, (i, crop.size, ref.size)
        diff = np.abs(np.asarray(crop, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
        n_diff = int((diff > 0).sum())
        print(f"\ncrop {i}: size {crop.size}, max |diff| {int(diff.max())}/255, differing values {n_diff}")
        assert diff.max() == 0


@pytest.mark.oracle
def test_reference_array_matches_official(face_dir: Path) -> None:
    """Official `PadToSquare`, `ToTensor`, `Normalize` of the crops: within one uint8 level (2/255).

    No CPU changes a bit (measured: 0).
    Pillow's bicubic resize to 224 is fixed-point integer arithmetic, and x / 255, (x - 0.5) / 0.5
    are correctly rounded float32 operations; the one level allows for a Pillow release that
    rounds the resize differently.
    """
    ours, refs, tensors = _oracle_crops(face_dir)
    size = tensors.shape[-1]
    for i, (crop, ref) in enumerate(zip(ours, refs)):
        x = reference_array(crop, size)  # [3, S, S]
        assert x.shape == tensors[i].shape and x.dtype == np.float32
        err, abs_err = rel_err(x, tensors[i]), float(np.abs(x - tensors[i]).max())
        ref_err = float(np.abs(reference_array(ref, size) - tensors[i]).max())
        print(f"\nface tensor {i}: rel_err {err:.3e}, max |diff| {abs_err:.3e} (official crop {ref_err:.2e})")
        assert abs_err <= 2 / 255 + 1e-6  # one level, plus the float32 rounding of the two values


# ---------------------------------------------------------------- crop arithmetic


def test_eye_angle_cases() -> None:
    lm = np.zeros((5, 2), np.float32)

    def angle(leye: tuple[float, float], reye: tuple[float, float]) -> float | None:
        lm[0], lm[1] = leye, reye
        return eye_angle(lm)

    assert angle((30, 50), (70, 50)) == 0.0  # level eyes
    c = float(np.sqrt(np.float32(1625)))  # the official lengths are float32: a = 40, b = 5, c = |(40, -5)|
    official = -(90 - math.acos((5 * 5 + c * c - 40 * 40) / (2 * 5 * c)) * 180 / math.pi)
    assert angle((70, 100), (110, 95)) == official
    assert official == pytest.approx(-math.degrees(math.atan2(5, 40)), abs=1e-4)
    assert angle((70, 95), (110, 100)) == pytest.approx(math.degrees(math.atan2(5, 40)), abs=1e-4)
    assert angle((50, 50), (50, 50)) is None  # coincident eyes: c == 0, no rotation
    assert angle((50, 40), (50, 60)) is None  # left eye above, same x: b == 0, no rotation
    assert angle((50, 60), (50, 40)) == pytest.approx(-90.0)  # left eye below, same x: a == 0, 90 - 0
    with pytest.raises(InputError, match=r"\[5, 2\]"):
        eye_angle(np.zeros((4, 2)))


def test_crop_face_rounding_and_level_eyes() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    lm = np.array([[15, 30], [25, 30], [20, 35], [16, 40], [24, 40]], np.float32)
    crop = crop_face(img, [11.5, 20.5, 31.5, 40.5, 0.9], lm)  # half to even: (12, 20, 32, 40)
    assert crop.size == (20, 20)
    assert np.array_equal(np.asarray(crop), np.asarray(img.crop((12, 20, 32, 40))))
    out = crop_face(img, [70, 50, 90, 70], lm)  # past the border: black, as PIL's crop
    assert out.size == (20, 20) and np.asarray(out)[15:, 15:].max() == 0
    with pytest.raises(InputError, match="empty"):
        crop_face(img, [10, 10, 10.2, 30], lm)


def test_reference_array_pads_a_portrait_on_both_sides() -> None:
    x = reference_array(Image.new("RGB", (50, 100), (255, 0, 128)), 224)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.all(x[:, :, :56] == -1.0) and np.all(x[:, :, 168:] == -1.0)  # 56 black pixels each side
    assert np.all(x[0, :, 56:168] == 1.0)


# ---------------------------------------------------------------- one face per photo


def _faces(boxes: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    b = np.array(boxes, np.float32).reshape(-1, 5)
    return b, np.zeros((len(b), 5, 2), np.float32)


def test_crop_face_keeps_overhang_black_and_refuses_boxes_that_are_no_face_of_the_photo() -> None:
    """As the official: a box overhanging the photo is cropped with black outside it; a box that
    cannot be a face of the photo (outside it, absurdly large, not finite) is refused before cropping."""
    img = Image.new("RGB", (100, 80), (200, 100, 50))
    lm = np.zeros((5, 2), np.float32)
    crop = np.asarray(crop_face(img, [-10, -20, 50, 40], lm))
    assert crop.shape == (60, 60, 3) and not crop[:20].any() and not crop[:, :10].any()
    assert (crop[20:, 10:] == (200, 100, 50)).all()
    for box, why in (
        ([0, 0, 1e6, 1e6], "over 2 times the photo's longer side"),
        ([-3e5, -3e5, 1e5, 1e5], "over 2 times"),
        ([100, 10, 150, 60], "outside the photo"),
        ([-60, -60, -1, -1], "outside the photo"),
    ):
        with pytest.raises(InputError, match=why):
            crop_face(img, box, lm)
    with pytest.raises(InputError, match="finite"):
        crop_face(img, [0, 0, np.inf, 10], lm)
    with pytest.raises(InputError, match=r"3 numbers, not \[x1"):
        crop_face(img, [0, 0, 10], lm)
    assert box_problem([0, 0, 10, 10], np.full((5, 2), np.nan), img.size) == "not finite"


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("size", [(300, 300), (2000, 30), (30, 2000)])
@pytest.mark.parametrize("landmarks", [0.0, np.nan, 1e30])
def test_wild_detections_are_ignored_or_the_photo_refused(size, landmarks) -> None:
    """Huge, far-away, overflowing, inf and NaN boxes and scores: no exception but InputError, no warning."""
    photo = Image.new("RGB", size, (90, 60, 30))
    finite = np.isfinite(landmarks)
    (ref,) = references_from_images([photo], ["p.png"], wild_detector((200, 200, 400, 420), landmarks), True)
    assert ref.faces_found == 1 and box_problem(ref.box, ref.landmarks, size) is None
    assert max(ref.crop.size) <= 2 * max(size)
    with pytest.raises(
        InputError, match="no face found in 'p.png'" + (": its 5 detection" if finite else "$")
    ):
        references_from_images([photo], ["p.png"], wild_detector(None, landmarks), True)


def test_select_face_none() -> None:
    with pytest.raises(InputError) as e:
        select_face(*_faces([]), "x.jpg", largest=True)
    assert str(e.value) == "no face found in 'x.jpg'"


def test_select_face_one() -> None:
    boxes, lms = _faces([[1, 2, 30, 40, 0.7]])
    assert select_face(boxes, lms, "x.jpg", largest=False) == 0
    assert select_face(boxes, lms, "x.jpg", largest=True) == 0


def test_select_face_several() -> None:
    boxes, lms = _faces([[0, 0, 10, 10, 0.9], [0, 0, 20, 20, 0.7], [5, 5, 25, 25, 0.8]])
    with pytest.raises(InputError) as e:
        select_face(boxes, lms, "x.jpg", largest=False)
    assert str(e.value) == "3 faces found in 'x.jpg'; crop it or use largest_face"  # the API's field
    assert cli_message(e.value) == "3 faces found in 'x.jpg'; crop it or use --largest-face"  # the CLI's flag
    assert select_face(boxes, lms, "x.jpg", largest=True) == 2  # areas 100, 400, 400: tie -> score 0.8
    boxes[2, 4] = 0.6
    assert select_face(boxes, lms, "x.jpg", largest=True) == 1
    boxes[0, 2:4] = 30
    assert select_face(boxes, lms, "x.jpg", largest=True) == 0  # the largest area wins over the score
    with pytest.raises(InputError, match="'x.jpg'"):
        select_face(boxes, lms[:2], "x.jpg", largest=True)


# ---------------------------------------------------------------- bad input files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of any size, compressed row by row (a few KB, never the full raster)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    sig = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(sig + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    return path


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _refused(path: Path, match: str = "", **kw: int | None) -> str:
    """load_image must raise InputError naming the file; returns the message."""
    with pytest.raises(InputError) as e:
        load_image(path, **kw)
    msg = str(e.value)
    print(f"\n{path.name}: {msg}")
    assert path.name in msg and match in msg
    return msg


def test_missing_directory_empty_text(tmp_path: Path) -> None:
    _refused(tmp_path / "missing.png", "does not exist")
    (tmp_path / "folder.png").mkdir()
    _refused(tmp_path / "folder.png", "not a file")
    (tmp_path / "empty.png").write_bytes(b"")
    _refused(tmp_path / "empty.png", "not a readable image")
    (tmp_path / "notes.jpg").write_bytes(b"these are not the pixels you are looking for\n" * 20)
    _refused(tmp_path / "notes.jpg", "not a readable image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    full = tmp_path / f"full.{fmt.lower()}"
    _noise(96, 64).save(full, fmt)
    assert load_image(full).size == (96, 64)
    cut = tmp_path / f"cut.{fmt.lower()}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, "not a readable image")


def test_decompression_bombs(tmp_path: Path) -> None:
    huge = _bilevel_png(tmp_path / "bomb.png", 20000, 20000)  # 400 Mpx, over twice Pillow's limit
    assert huge.stat().st_size < 200_000
    _refused(huge, "400000000", max_pixels=None)
    big = _bilevel_png(tmp_path / "big.png", 10000, 10000)  # 100 Mpx: over Pillow's warning limit
    _refused(big, f"100000000 pixels, over the limit of {Image.MAX_IMAGE_PIXELS}", max_pixels=None)
    _refused(big, f"100000000 pixels, over the limit of {DEFAULT_MAX_PIXELS}")
    mid = _bilevel_png(tmp_path / "mid.png", 9000, 8000)  # 72 Mpx: only our default limit
    _refused(mid, f"9000x8000 = 72000000 pixels, over the limit of {DEFAULT_MAX_PIXELS}")


def test_max_pixels_limit(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    _noise(300, 200).save(path)
    _refused(path, "60000 pixels, over the limit of 59999 pixels", max_pixels=59_999)
    assert load_image(path, max_pixels=60_000).size == (300, 200)


# ---------------------------------------------------------------- modes and orientation


def _rgb(path: Path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)  # [H, W, 3]


def test_rgba_la_p_transparency_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # transparent red
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = _rgb(tmp_path / "rgba.png")
    assert x[0, 0].tolist() == [255, 255, 255] and x[0, 1].tolist() == [0, 0, 255]
    assert np.all(np.abs(x[0, 2] - 127) <= 1)

    la = Image.new("LA", (2, 1), (100, 0))
    la.putpixel((1, 0), (100, 255))
    la.save(tmp_path / "la.png")
    assert _rgb(tmp_path / "la.png")[0].tolist() == [[255, 255, 255], [100, 100, 100]]

    p = Image.new("P", (2, 1), 0)
    p.putpalette([255, 0, 0, 0, 200, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert _rgb(tmp_path / "p.png")[0].tolist() == [[255, 255, 255], [0, 200, 0]]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(_rgb(tmp_path / "cmyk.jpg") - [255, 0, 0]).max() <= 8


def test_16bit_int_float_gray(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 32768, 65535, 1000]], np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    x = _rgb(tmp_path / "g16.png")
    assert x[0, :, 0].tolist() == [0, 128, 255, 4] and np.all(x == x[..., :1])  # scaled, not clipped
    Image.fromarray(np.array([[0, 32768, 65535]], np.int32)).save(tmp_path / "g32.tif")
    assert Image.open(tmp_path / "g32.tif").mode == "I"
    assert _rgb(tmp_path / "g32.tif")[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert _rgb(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_bilevel_and_gray(tmp_path: Path) -> None:
    one = Image.new("1", (3, 1), 0)
    one.putpixel((1, 0), 1)
    one.save(tmp_path / "one.png")
    assert _rgb(tmp_path / "one.png")[0].tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 0]]
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert np.all(_rgb(tmp_path / "l.png") == 77)


def test_unsupported_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("LAB", (4, 4), (50, 0, 0)).save(tmp_path / "lab.tif")
    assert load_image(tmp_path / "lab.tif").mode == "RGB"
    convert = Image.Image.convert

    def no_lab(self: Image.Image, mode: str | None = None, *args, **kw) -> Image.Image:
        if self.mode == "LAB":
            raise ValueError("conversion from LAB to RGB not supported")
        return convert(self, mode, *args, **kw)

    monkeypatch.setattr(Image.Image, "convert", no_lab)
    _refused(tmp_path / "lab.tif", "unsupported image mode 'LAB'")


def test_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x = _rgb(tmp_path / "phone.jpg")
    assert x.shape == (40, 20, 3)  # width and height swapped
    assert np.abs(x[3, 16] - [255, 0, 0]).max() <= 8  # marker now at the top-right
    assert np.abs(x[3, 3] - [255, 255, 255]).max() <= 8
    assert np.abs(x[36, 16] - [255, 255, 255]).max() <= 8
