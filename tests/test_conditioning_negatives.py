"""Noise negatives (seeded, strength-monotone) and content subtraction (global variants only)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ipadapter.conditioning.negatives import NOISE_TYPES, _shuffle, _warp, noise_negative, parse_noise, subtract_content
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


def coordinate_image(h: int, w: int) -> np.ndarray:
    """Float pixels that encode their own position: x/(w − 1), y/(h − 1), and a constant third channel."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([xs / (w - 1), ys / (h - 1), np.full((h, w), 0.5)], axis=-1)


def documented_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """The documented field: 4×4 uniform(−1, 1) draws per axis, bicubically upsampled with aligned corners."""
    coarse = torch.from_numpy(rng.uniform(-1, 1, (1, 2, 4, 4)))
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0].numpy()


def reflect(c: np.ndarray, span: int) -> np.ndarray:
    """A coordinate folded back into [0, span] by mirroring at both edges."""
    c = np.abs(c) % (2 * span)
    return np.where(c > span, 2 * span - c, c)


def warped_coordinates(h: int, w: int, amplitude: float, field: np.ndarray) -> np.ndarray:
    """coordinate_image after the move: bilinear sampling reproduces a ramp exactly, so it holds the sampled points."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    x = reflect(xs + amplitude * field[0], w - 1) / (w - 1)
    y = reflect(ys + amplitude * field[1], h - 1) / (h - 1)
    return np.stack([x, y, np.full((h, w), 0.5)], axis=-1)


def coordinate_picture(h: int, w: int) -> Image.Image:
    """coordinate_image as 8-bit RGB; 255 is a multiple of w − 1 and h − 1, so the ramps survive the quantisation."""
    assert 255 % (w - 1) == 0 and 255 % (h - 1) == 0
    return Image.fromarray(np.round(coordinate_image(h, w) * 255).astype(np.uint8))


def as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255


def to_pixels(y: np.ndarray) -> np.ndarray:
    """The documented output: clipped to [0, 1], then rounded to 8 bits."""
    return np.round(np.clip(y, 0.0, 1.0) * 255).astype(np.uint8)


def test_warp_with_zero_amplitude_is_the_identity() -> None:
    """No displacement means every pixel samples itself exactly."""
    x = coordinate_image(18, 16)
    np.testing.assert_allclose(_warp(x, 0.0, np.random.default_rng(4)), x, atol=1e-12)


@pytest.mark.parametrize("h,w,amplitude", [(18, 16, 5.0), (16, 18, 2.5), (2, 5, 3.0), (5, 2, 3.0)])
def test_warp_samples_along_the_documented_field(h: int, w: int, amplitude: float) -> None:
    """x moves by amplitude·field[0], y by amplitude·field[1], in pixels, mirrored at the edges; the field is the
    bicubic upsampling of the first 32 draws. Non-square and 2-pixel-wide images catch swapped or off-by-one sizes."""
    field = documented_field(np.random.default_rng(7), h, w)
    assert np.abs(amplitude * field).max() > 1  # far enough that some samples fall outside and get reflected
    moved = _warp(coordinate_image(h, w), amplitude, np.random.default_rng(7))
    np.testing.assert_allclose(moved, warped_coordinates(h, w, amplitude, field), atol=1e-9)


@pytest.mark.parametrize("s", [0.3, 1.0])
def test_shuffle_follows_its_definition(s: float) -> None:
    """(1 − s)·moved + s·(moved flipped both ways) + 0.25·s·n, with amplitude s·min(h, w)/4 and n drawn after the
    field, before clipping."""
    h, w = 18, 16
    rng = np.random.default_rng(11)
    moved = warped_coordinates(h, w, s * min(h, w) / 4, documented_field(rng, h, w))
    expected = (1 - s) * moved + s * moved[::-1, ::-1] + 0.25 * s * rng.standard_normal((h, w, 3))
    got = _shuffle(coordinate_image(h, w), s, np.random.default_rng(11))
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_shuffle_negative_is_the_clipped_rounded_shuffle() -> None:
    """Through noise_negative the shuffle is clipped to [0, 1] and rounded to 8 bits (±1 for float ties)."""
    h, w, s = 18, 16, 0.6
    rng = np.random.default_rng(2)
    moved = warped_coordinates(h, w, s * min(h, w) / 4, documented_field(rng, h, w))
    expected = to_pixels((1 - s) * moved + s * moved[::-1, ::-1] + 0.25 * s * rng.standard_normal((h, w, 3)))
    got = np.asarray(noise_negative(coordinate_picture(h, w), "shuffle", s, seed=2))
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_shuffle_runs_without_warnings() -> None:
    """Indexing and corner alignment are spelled out, so torch has no default to warn about (or to change later).
    torch shows some warnings once per process, so they are switched to always for the check."""
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            noise_negative(reference(), "shuffle", 0.5, seed=1)
    finally:
        torch.set_warn_always(warn_always)


def test_gaussian_and_dissolve_are_exactly_their_definitions() -> None:
    """gaussian: x + s·n; dissolve: U where a per-pixel draw (after U) is below s; then clip and round."""
    image = reference()
    x = as_float(image)
    rng = np.random.default_rng(6)
    n = rng.standard_normal(x.shape)
    assert np.array_equal(np.asarray(noise_negative(image, "gaussian", 0.5, seed=6)), to_pixels(x + 0.5 * n))
    rng = np.random.default_rng(6)
    u, replace = rng.random(x.shape), rng.random(x.shape[:2])[..., None] < 0.4
    dissolved = noise_negative(image, "dissolve", 0.4, seed=6)
    assert np.array_equal(np.asarray(dissolved), to_pixels(np.where(replace, u, x)))


def test_the_seed_defaults_to_zero() -> None:
    """Leaving the seed out is seed 0."""
    image = reference()
    x = as_float(image)
    n = np.random.default_rng(0).standard_normal(x.shape)
    assert np.array_equal(np.asarray(noise_negative(image, "gaussian", 0.2)), to_pixels(x + 0.2 * n))


def test_strength_zero_returns_the_reference_as_rgb_with_its_metadata() -> None:
    """Strength 0 is the reference unchanged, only made RGB: a grey image becomes three equal channels, info kept."""
    grey = Image.fromarray(np.asarray(reference())[..., 0])
    grey.info["comment"] = "kept"
    out = noise_negative(grey, "fade", 0.0)
    assert out.mode == "RGB" and out.info == {"comment": "kept"}
    assert np.array_equal(np.asarray(out), np.repeat(np.asarray(grey)[..., None], 3, axis=-1))


@pytest.mark.parametrize("blur", [0.5, 2.0])
def test_blur_is_pil_gaussian_blur_applied_last(blur: float) -> None:
    """The blur is PIL's GaussianBlur of the finished negative, for radii below 1 too."""
    image = reference()
    sharp = noise_negative(image, "gaussian", 0.5, seed=3)
    soft = noise_negative(image, "gaussian", 0.5, seed=3, blur=blur)
    assert np.array_equal(np.asarray(soft), np.asarray(sharp.filter(ImageFilter.GaussianBlur(blur))))
    assert not np.array_equal(np.asarray(soft), np.asarray(sharp))


def test_negative_blur_is_refused() -> None:
    with pytest.raises(IPAdapterError) as err:
        noise_negative(reference(), "fade", 0.5, blur=-1.0)
    assert str(err.value) == "the blur radius must not be negative, got -1.0"


@pytest.mark.parametrize("text_shape", [(16,), (1, 16), (3, 16)])
def test_content_subtraction_is_image_minus_k_text_in_the_image_dtype(text_shape: tuple[int, ...]) -> None:
    """image − k·text for every documented text shape; a float64 text vector is cast to the image's float32."""
    image, text = torch.randn(3, 16), torch.randn(text_shape, dtype=torch.float64)
    out = subtract_content(image, text, 0.7, "base")
    assert out.dtype == torch.float32 and out.shape == (3, 16)
    expected = image.double().numpy() - 0.7 * np.broadcast_to(text.numpy(), (3, 16))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_content_subtraction_works_on_the_last_axis() -> None:
    """Widths are compared on the last axis, so a (B, 1, D) image embedding works like (B, D)."""
    image, text = torch.randn(2, 1, 16), torch.randn(16)
    torch.testing.assert_close(subtract_content(image, text, 0.5, "base"), image - 0.5 * text)
    with pytest.raises(IPAdapterError) as err:
        subtract_content(image, torch.randn(12), 0.5, "base")
    assert str(err.value) == ("the text embedding is 12-wide but the image embedding 16-wide; "
                              "use the CLIP text model that pairs with the image encoder")


def test_content_subtraction_refusal_message() -> None:
    variant = next(v for v in VARIANTS if VARIANTS[v].features != "global")
    with pytest.raises(IPAdapterError) as err:
        subtract_content(torch.randn(1, 5, 16), torch.randn(16), 0.5, variant)
    assert str(err.value) == ("content subtraction works only on global-embedding adapters; "
                              f"{variant!r} uses {VARIANTS[variant].features} features")
