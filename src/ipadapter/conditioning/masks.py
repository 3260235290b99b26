"""Regional masks: one image file per reference, white = the reference acts, black = it does not.

Masks keep their soft values (grey = partial) in [0, 1]; the attention processor resizes each to every layer's
token grid, so any size and aspect ratio works. Transparent pixels count as black: a mask painted on an empty
layer means "here", not "everywhere".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ipadapter.conditioning.images import load_image
from ipadapter.errors import IPAdapterError

BLACK = (0, 0, 0)


def load_mask(source: str | os.PathLike | Image.Image, *, threshold: float | None = None) -> torch.Tensor:
    """(H, W) float mask in [0, 1] from luminance; with `threshold`, binarised (value >= threshold → 1)."""
    gray = load_image(source, background=BLACK).convert("L")
    mask = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise IPAdapterError(f"the mask threshold must be between 0 and 1, got {threshold}")
        mask = (mask >= threshold).float()
    return mask


def check_mask_count(masks: Sequence[object], references: int) -> None:
    """One mask per reference image, or none at all."""
    if masks and len(masks) != references:
        raise IPAdapterError(
            f"got {len(masks)} mask(s) for {references} reference image(s); give one mask per image, or none"
        )


def load_masks(sources: Sequence[str | os.PathLike | Image.Image], references: int) -> list[torch.Tensor]:
    """All masks of a generation, the count checked before any file is read."""
    check_mask_count(sources, references)
    return [load_mask(s) for s in sources]
