"""A reference's mask on a layer's token grid: which grid a layer's tokens lie on, and the mask resized to it.

Shared by the UNet's processor and the transformers' (FLUX, SD 3): a mask is given once, at any size and aspect, and
each layer reads it on its own grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_grid(seq_len: int, latent_hw: tuple[int, int] | None, mask_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer's tokens: exact from the latent size when known, else diffusers' estimate."""
    if latent_hw is not None:
        h, w = latent_hw
        for _ in range(8):
            if h * w == seq_len:
                return h, w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    aspect = mask_hw[1] / mask_hw[0]
    gh = int(math.sqrt(seq_len / aspect))
    gh += int(seq_len % gh != 0)
    return gh, seq_len // gh


def grid_sizes(latent_hw: tuple[int, int] | None) -> tuple[int, ...]:
    """The token counts a layer can have on this latent (each down-sampling halves it, rounding up): the
    candidates `token_grid` matches, so masks can be resized for each before a compiled call."""
    if latent_hw is None:
        return ()
    h, w = latent_hw
    sizes = []
    for _ in range(8):
        if h * w not in sizes:
            sizes.append(h * w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return tuple(sizes)


def resize_mask(mask: torch.Tensor, seq_len: int, latent_hw: tuple[int, int] | None) -> torch.Tensor:
    """(H, W) mask → (seq_len, 1) weights on the layer's token grid (bicubic, as diffusers), padded or cropped."""
    gh, gw = token_grid(seq_len, latent_hw, tuple(mask.shape[-2:]))
    lo, hi = mask.min(), mask.max()
    if lo == hi:
        flat = mask.new_full((gh * gw,), float(lo))
    else:
        # Bicubic as diffusers, clamped: its overshoot near an edge would otherwise subtract the reference there.
        flat = F.interpolate(mask[None, None].float(), size=(gh, gw), mode="bicubic").clamp(0, 1).flatten()
    if flat.numel() < seq_len:
        flat = torch.cat([flat, flat.new_zeros(seq_len - flat.numel())])
    return flat[:seq_len, None]


def on_grid(
    mask: torch.Tensor, seq_len: int, latent_hw: tuple[int, int] | None, dtype: torch.dtype, device: torch.device,
) -> torch.Tensor | None:
    """A mask as (1, 1, L, 1) weights on a layer's token grid; None when it is all ones there. Resized where the mask
    is (the CPU, as masks are given) and moved after: its values are read, which on a GPU would wait for it."""
    m = resize_mask(mask, seq_len, latent_hw)
    return None if bool((m == 1).all()) else m.to(device, dtype)[None, None]
