"""Request validation, recipes, prompts, the face mask, reference padding, noise, image conversion."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.faces.images import pad_to_square, reference_array, to_uint8
from flashface_trt.runtime.sampling.request import (
    DEFAULT_NEGATIVE,
    DEFAULT_POSITIVE_SUFFIX,
    RECIPES,
    GenerationRequest,
    face_mask,
    full_prompts,
    initial_noise,
    pad_references,
)
from flashface_trt.runtime.sampling.sampler import GuidanceParams


@pytest.mark.oracle
def test_face_mask_matches_demo(oracle_dir, oracle_config):
    d = np.load(oracle_dir / "unet_cases.npz")
    size = oracle_config["image_size"]
    np.testing.assert_array_equal(face_mask(oracle_config["face_bbox"], size, size), d["mask"])


def test_face_mask_rule():
    m = face_mask((0.25, 0.5, 0.5, 0.625), 64, 128)  # pixel box x 32..64, y 32..40 -> square of side 32
    expected = np.zeros((64, 128), np.float32)
    expected[32:64, 32:64] = 1
    np.testing.assert_array_equal(m, expected[::8, ::8])
    assert face_mask((0, 0, 0, 0), 64, 64).sum() == 0
    clipped = face_mask((0.5, 0.5, 1.0, 0.6), 64, 64)  # square runs off the bottom edge: clipped
    assert clipped.shape == (8, 8) and clipped[4:, 4:].all() and clipped.sum() == 16


@pytest.mark.parametrize(
    "bbox",
    [(0.6, 0.2, 0.3, 0.5), (0.3, 0.2, 1.5, 0.5), (-0.1, 0, 0.5, 0.5), (0.1, 0.2, 0.3), (0.1, "a", 0.3, 0.4)],
)
def test_bad_bbox_is_named(bbox):
    with pytest.raises(InputError, match="face_bbox"):
        replace(GenerationRequest(prompt="x"), face_bbox=bbox).validated()


@pytest.mark.parametrize(
    "change, name",
    [
        ({"steps": 0}, "steps=0"),
        ({"steps": 1001}, "steps=1001"),
        ({"height": 100}, "height=100"),
        ({"width": 0}, "width=0"),
        ({"num_samples": 0}, "num_samples=0"),
        ({"seed": -1}, "seed=-1"),
        ({"guidance": GuidanceParams(guide_rescale=1.5)}, "guide_rescale=1.5"),
        ({"guidance": GuidanceParams(face_guidance=-1.0)}, "face_guidance=-1.0"),
        ({"guidance": GuidanceParams(text_guidance=float("nan"))}, "text_guidance=nan"),
        ({"guidance": GuidanceParams(step_to_launch=2000)}, "step_to_launch=2000"),
    ],
)
def test_validation_names_the_value(change, name):
    with pytest.raises(InputError, match=name.replace("(", r"\(")):
        replace(GenerationRequest(prompt="x"), **change).validated()


def test_recipes_and_prompts():
    req = RECIPES["age"].apply(GenerationRequest(prompt="a very old woman"))
    assert (
        req.guidance.text_guidance == 8.5
        and req.guidance.ref_strength == 0.9
        and req.guidance.face_guidance == 2.5
    )
    assert GenerationRequest(prompt="x").guidance == RECIPES["identity"].guidance
    pos, neg = full_prompts("a man", "")
    assert pos == "a man, " + DEFAULT_POSITIVE_SUFFIX and neg == DEFAULT_NEGATIVE
    assert full_prompts("a man", "glasses")[1] == "glasses, " + DEFAULT_NEGATIVE


def test_reference_padding_is_deterministic():
    assert pad_references(["a"]) == ["a"] * 4
    assert pad_references(["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert pad_references(list("abcde")) == list("abcde")
    with pytest.raises(InputError):
        pad_references([])


def test_initial_noise_is_seeded():
    a = initial_noise(7, 2, 64, 32)
    assert a.shape == (2, 4, 8, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, initial_noise(7, 2, 64, 32))
    assert not np.array_equal(a, initial_noise(8, 2, 64, 32))


def test_pad_to_square_and_reference_tensor():
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    sq = pad_to_square(img, 224)
    assert sq.size == (224, 224)
    arr = np.asarray(sq)
    assert (arr[:56] == 0).all() and (arr[168:] == 0).all() and (arr[60:160, :, 0] == 255).all()
    x = reference_array(img, 224)
    assert x.shape == (3, 224, 224) and x.min() == -1.0 and x.max() == 1.0


def test_to_uint8_truncates_like_official():
    x = np.array([-1.5, -1.0, 0.0, 0.004, 1.0, 2.0], np.float32).reshape(1, 1, 1, 6).repeat(3, axis=1)
    np.testing.assert_array_equal(to_uint8(x)[0, 0, :, 0], [0, 0, 127, 128, 255, 255])
