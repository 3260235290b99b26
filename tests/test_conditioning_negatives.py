"""Noise negatives (seeded, strength-monotone) and content subtraction (global variants only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.conditioning.negatives import NOISE_TYPES, noise_negative, parse_noise, subtract_content
from ipadapter.errors import IPAdapterError
from ipadapter.variants import VARIANTS


def reference() -> Image.Image:
    """A structured picture: gradients plus a bright square, so moving pixels around changes it."""
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    rgb[10:30, 20:40] = 250
    return Image.fromarray(rgb)


def change(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.mark.parametrize("kind", list(NOISE_TYPES))
def test_strength_zero_is_the_reference(kind: str) -> None:
    image = reference()
    assert np.array_equal(np.asarray(noise_negative(image, kind, 0.0, seed=3)), np.asarray(image))


@pytest.mark.parametrize("kind", list(NOISE_TYPES))
def test_same_seed_same_image_other_seed_other_image(kind: str) -> None:
    image = reference()
    a, b = noise_negative(image, kind, 0.6, seed=1), noise_negative(image, kind, 0.6, seed=1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(noise_negative(image, kind, 0.6, seed=2)))
    assert a.size == image.size and a.mode == "RGB"


@pytest.mark.parametrize("kind", list(NOISE_TYPES))
def test_the_change_grows_with_strength(kind: str) -> None:
    image = reference()
    changes = [change(image, noise_negative(image, kind, s, seed=5)) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert changes[0] == 0.0
    assert all(b > a for a, b in zip(changes, changes[1:])), changes


def test_fade_and_dissolve_follow_their_definitions() -> None:
    image = reference()
    x = np.asarray(image, dtype=np.float64) / 255
    noise = np.random.default_rng(9).random(x.shape)
    faded = np.asarray(noise_negative(image, "fade", 0.3, seed=9), dtype=np.float64) / 255
    np.testing.assert_allclose(faded, 0.7 * x + 0.3 * noise, atol=0.5 / 255 + 1e-9)
    dissolved = np.asarray(noise_negative(image, "dissolve", 0.4, seed=9), dtype=np.float64) / 255
    kept = np.all(np.abs(dissolved - x) < 1e-9, axis=-1).mean()
    assert 0.5 < kept < 0.7  # about 60% of the pixels survive


def test_blur_smooths() -> None:
    image = reference()
    sharp, soft = noise_negative(image, "gaussian", 0.5, seed=0), noise_negative(image, "gaussian", 0.5, seed=0, blur=2)
    spread = lambda im: np.asarray(im, dtype=np.float64).std(axis=(0, 1)).sum()  # noqa: E731
    assert spread(soft) < spread(sharp)


@pytest.mark.parametrize("args,message", [
    (("snow", 0.5), "unknown noise type 'snow'; valid: fade, dissolve, gaussian, shuffle"),
    (("fade", 1.5), "between 0 and 1"),
])
def test_bad_noise(args, message: str) -> None:
    with pytest.raises(IPAdapterError, match=message):
        noise_negative(reference(), *args)


def test_parse_noise() -> None:
    assert parse_noise("dissolve:0.4") == ("dissolve", 0.4)
    assert parse_noise("fade") == ("fade", 0.5)
    for bad in ("fade:lots", "snow:0.2", "fade:2"):
        with pytest.raises(IPAdapterError):
            parse_noise(bad)
    with pytest.raises(IPAdapterError) as err:
        parse_noise("fade:lots")
    assert str(err.value) == "noise= takes TYPE:STRENGTH such as dissolve:0.4, got 'fade:lots'"


def test_content_subtraction_on_global_embeddings() -> None:
    image, text = torch.randn(2, 16), torch.randn(16)
    torch.testing.assert_close(subtract_content(image, text, 0.5, "base"), image - 0.5 * text)
    torch.testing.assert_close(subtract_content(image, text[None], 1.0, VARIANTS["base"]), image - text)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANTS[v].features != "global"])
def test_content_subtraction_refuses_other_features(variant: str) -> None:
    with pytest.raises(IPAdapterError, match="content subtraction works only on global-embedding adapters"):
        subtract_content(torch.randn(1, 5, 16), torch.randn(16), 0.5, variant)


def test_content_subtraction_needs_the_paired_text_model() -> None:
    with pytest.raises(IPAdapterError, match="12-wide but the image embedding 16-wide"):
        subtract_content(torch.randn(1, 16), torch.randn(12), 0.5, "base")
