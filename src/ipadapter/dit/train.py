"""Training a FLUX or SD 3 adapter: each family's parts by the kind of its transformer, and training on image-caption
pairs held in memory (a notebook's way; `ipadapter train` runs the same loop from a config, train/transformer.py).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ipadapter.dit import train_flux, train_sd3
from ipadapter.dit.adapter import DiTAdapter
from ipadapter.dit.blocks import dit_kind
from ipadapter.dit.flow import Batch, TransformerFamily, fit
from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError
from ipadapter.variants import get_variant

FAMILIES = {"flux": train_flux.FAMILY, "sd3": train_sd3.FAMILY}  # by `dit.blocks.dit_kind`


def family(kind: str) -> TransformerFamily:
    """The training parts of "flux" or "sd3"."""
    return FAMILIES[kind]


@torch.no_grad()
def encode(pipe: Any, encoder: ImageEncoder, images: list[Image.Image], captions: list[str], size: int,
           max_sequence_length: int | None = None) -> Batch:
    """A batch of PIL images (resized to `size` square by the pipeline's image processor) and their captions; text
    tokens up to `max_sequence_length`, else the family's pipeline's default."""
    pixels = pipe.image_processor.preprocess(images, height=size, width=size)
    parts = family(dit_kind(pipe.transformer))
    length = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
    rows = parts.features(pipe, encoder, pixels, encoder.pixel_values(images), captions, **length)
    return parts.assemble(rows, parts.empty_prompt(pipe, **length))


def train_dit_adapter(
    pipe: Any, encoder: ImageEncoder, images: list[Image.Image], captions: list[str], *, steps: int, size: int,
    adapter: DiTAdapter | None = None, batch_size: int = 4, lr: float = 1e-4, weight_decay: float = 0.01,
    seed: int = 0, max_sequence_length: int | None = None,
) -> tuple[DiTAdapter, list[float]]:
    """Train (or continue) a FLUX or SD 3 adapter on image-caption pairs held in memory, with the paper's AdamW by
    default; returns it and the loss per step."""
    if len(images) != len(captions) or not images:
        raise IPAdapterError(f"give one caption per image, got {len(images)} images and {len(captions)} captions")
    transformer = pipe.transformer.requires_grad_(False)
    parts = family(dit_kind(transformer))
    adapter = adapter or parts.new_adapter(transformer, encoder.dim(parts.image_features),
                                           get_variant(parts.variant).tokens)
    adapter = adapter.to(transformer.device).train().requires_grad_(True)
    data = encode(pipe, encoder, images, captions, size, max_sequence_length)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
    losses = fit(transformer, adapter, lambda g: data.rows(torch.randperm(len(images), generator=g)[:batch_size]),
                 steps=steps, optimizer=optimizer, sigmas=parts.sigmas(pipe), seed=seed)
    return adapter.eval().requires_grad_(False), losses
