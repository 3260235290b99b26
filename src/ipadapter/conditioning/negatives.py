"""Negatives made from the reference itself, and InstantStyle's content subtraction.

A noise negative keeps the reference's colours and statistics but not its content, so classifier-free guidance
pushes away from "an image like this, degraded" rather than from nothing. Each kind takes a strength s in [0, 1]
(0 = the reference unchanged), a seed (same seed, same image) and an optional Gaussian blur radius applied last.
Pixels are floats x in [0, 1]; the noise U is uniform in [0, 1] per pixel and channel:
- fade:     (1 − s)·x + s·U.
- dissolve: each pixel (all channels together) replaced by U with probability s.
- gaussian: x + s·n, n ~ N(0, 1), clipped to [0, 1].
- shuffle:  pixels moved by a smooth random displacement field of amplitude s·(shorter side)/4 (edges reflected),
            blended by s towards its copy flipped both ways, plus 0.25·s·n noise, clipped.
The random draws depend only on the seed and image size, not on s, so for one seed the change grows with s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ipadapter.errors import IPAdapterError
from ipadapter.variants import Variant, get_variant


def _fade(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return (1 - s) * x + s * rng.random(x.shape)


def _dissolve(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.random(x.shape)
    replace = rng.random(x.shape[:2])[..., None] < s
    return np.where(replace, noise, x)


def _gaussian(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return x + s * rng.standard_normal(x.shape)


def _warp(x: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Move pixels along a smooth random field (a coarse 4×4 field, bicubically upsampled)."""
    h, w = x.shape[:2]
    coarse = torch.from_numpy(rng.uniform(-1, 1, (1, 2, 4, 4)))
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]  # (2, H, W), pixels
    ys, xs = torch.meshgrid(torch.arange(h, dtype=field.dtype), torch.arange(w, dtype=field.dtype), indexing="ij")
    gx = (xs + amplitude * field[0]) / max(w - 1, 1) * 2 - 1
    gy = (ys + amplitude * field[1]) / max(h - 1, 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[None]  # (1, H, W, 2)
    image = torch.from_numpy(x).permute(2, 0, 1)[None]  # (1, C, H, W)
    moved = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    return moved[0].permute(1, 2, 0).numpy()


def _shuffle(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    moved = _warp(x, s * min(x.shape[:2]) / 4, rng)
    flipped = moved[::-1, ::-1]
    return (1 - s) * moved + s * flipped + 0.25 * s * rng.standard_normal(x.shape)


NOISE_TYPES: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "fade": _fade, "dissolve": _dissolve, "gaussian": _gaussian, "shuffle": _shuffle,
}


def _check(kind: str, strength: float) -> None:
    if kind not in NOISE_TYPES:
        raise IPAdapterError(f"unknown noise type {kind!r}; valid: {', '.join(NOISE_TYPES)}")
    if not 0.0 <= strength <= 1.0:
        raise IPAdapterError(f"the noise strength must be between 0 and 1, got {strength}")


def noise_negative(image: Image.Image, kind: str, strength: float, *, seed: int = 0, blur: float = 0.0) -> Image.Image:
    """A noise negative of an RGB image, as defined in this module's docstring."""
    _check(kind, strength)
    if blur < 0:
        raise IPAdapterError(f"the blur radius must not be negative, got {blur}")
    rgb = image.convert("RGB")
    out = rgb.copy()
    if strength > 0:
        x = np.asarray(rgb, dtype=np.float64) / 255.0  # (H, W, 3)
        y = NOISE_TYPES[kind](x, float(strength), np.random.default_rng(seed))
        out = Image.fromarray(np.round(np.clip(y, 0.0, 1.0) * 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else out


def parse_noise(text: str) -> tuple[str, float]:
    """"TYPE:STRENGTH" (a request's `noise`, as text) → (type, strength); the strength defaults to 0.5 when left out."""
    kind, _, value = text.partition(":")
    try:
        strength = float(value) if value else 0.5
    except ValueError:
        raise IPAdapterError(f"noise= takes TYPE:STRENGTH such as dissolve:0.4, got {text!r}") from None
    _check(kind, strength)
    return kind, strength


def subtract_content(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, k: float, variant: str | Variant
) -> torch.Tensor:
    """InstantStyle: `image_embeds − k · text_embeds` of the content words, on global CLIP embeddings.

    Patch features carry the content spatially, token by token; one text vector cannot be taken out of them.
    `text_embeds` comes from the CLIP text model paired with the image encoder: (D,), (1, D) or (B, D).
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    if variant.features != "global":
        raise IPAdapterError(
            "content subtraction works only on global-embedding adapters; "
            f"{variant.name!r} uses {variant.features} features"
        )
    if text_embeds.shape[-1] != image_embeds.shape[-1]:
        raise IPAdapterError(
            f"the text embedding is {text_embeds.shape[-1]}-wide but the image embedding "
            f"{image_embeds.shape[-1]}-wide; "
            "use the CLIP text model that pairs with the image encoder"
        )
    return image_embeds - k * text_embeds.to(image_embeds.dtype)
