"""Validation grids: fixed references × fixed prompts, sampled with DDIM and CFG every N steps, saved as PNG.

Row r: the reference (as the VAE sees it) followed by one sample per prompt. Everything that does not change
during training (reference features, their unconditional counterpart, prompt embeddings, starting noise) is
computed once, so successive grids differ only by the adapter's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipadapter.runtime import AdapterPrompt, Reference


@dataclass
class ValidationSet:
    features: tuple[torch.Tensor, ...]  # per reference (R, ...), as the projection takes them
    uncond_features: tuple[torch.Tensor, ...]  # (1, ...): the variant's dropped input
    reference_pixels: torch.Tensor | None  # (R, 3, H, W) in [-1, 1] (None: decode from latents)
    reference_latents: torch.Tensor | None  # (R, 4, h, w) scaled latents, when pixels are not at hand
    prompt_embeds: torch.Tensor  # (P, L, C)
    negative_embeds: torch.Tensor  # (1, L, C): the empty prompt
    prompt_pooled: torch.Tensor | None = None  # SDXL (P, D)
    negative_pooled: torch.Tensor | None = None


@torch.no_grad()
def sample_grid(
    vset: ValidationSet, *, unet: Any, adapter: Any, attachment: Any, vae: Any, scheduler_config: dict[str, Any],
    resolution: int, steps: int, guidance: float, seed: int,
) -> np.ndarray:
    """An (R·H, (P+1)·W, 3) uint8 grid."""
    from diffusers import DDIMScheduler

    device, dtype = unet.device, unet.dtype
    r = vset.features[0].shape[0]
    p = vset.prompt_embeds.shape[0]
    n = r * p
    feats = tuple(f.to(device).repeat_interleave(p, dim=0) for f in vset.features)  # (R·P, ...) ref-major
    tokens = adapter.project(*feats)
    uncond = adapter.project(*(f.to(device) for f in vset.uncond_features)).expand_as(tokens)
    text = vset.prompt_embeds.to(device, dtype).repeat(r, 1, 1)  # (R·P, L, C)
    negative = vset.negative_embeds.to(device, dtype).expand_as(text)
    added = None
    if vset.prompt_pooled is not None:
        pooled = vset.prompt_pooled.to(device, dtype).repeat(r, 1)
        neg_pooled = vset.negative_pooled.to(device, dtype).expand_as(pooled)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=dtype)
        added = {"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": time_ids.repeat(2 * n, 1)}

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(seed)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (n, unet.config.in_channels, resolution // factor, resolution // factor)
    latents = (torch.randn(shape, generator=g) * scheduler.init_noise_sigma).to(device, dtype)
    attachment.set_prompts({name: AdapterPrompt([Reference(cond=tokens, uncond=uncond)])
                            for name in attachment.adapters}, rows=n, cfg=True)
    try:
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            pred = unet(model_in, t, encoder_hidden_states=torch.cat([negative, text]), added_cond_kwargs=added).sample
            pred_uncond, pred_cond = pred.chunk(2)
            latents = scheduler.step(pred_uncond + guidance * (pred_cond - pred_uncond), t, latents).prev_sample
    finally:
        attachment.clear()
    images = decode(vae, latents)
    if vset.reference_pixels is not None:
        refs = vset.reference_pixels.to(images)
    else:
        refs = decode(vae, vset.reference_latents.to(device))
    cols = torch.cat([refs.unsqueeze(1), images.view(r, p, *images.shape[1:])], dim=1)  # (R, P+1, 3, H, W)
    grid = cols.permute(0, 3, 1, 4, 2).reshape(r * images.shape[-2], (p + 1) * images.shape[-1], 3)
    return ((grid.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z).sample.float()  # (N, 3, H, W) in about [-1, 1]


def save_png(grid: np.ndarray, path: Path) -> Path:
    from PIL import Image

    from ipadapter.atomic import save_png as save_image

    return save_image(Image.fromarray(grid), path)
