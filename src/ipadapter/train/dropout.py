"""Condition dropout as the paper trains it: one uniform draw per sample decides image-only, text-only or both.

u < p_image → drop the image; p_image ≤ u < p_image + p_text → drop the text; then up to + p_both → drop both.
What "dropped" means is the variant's own unconditional input (docs/checkpoints.md §4): a zero embedding for global features,
the encoder's output on zero pixels for patch features, a zero ID embedding for FaceID.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Drops:
    image: torch.Tensor  # (B,) bool
    text: torch.Tensor  # (B,) bool


def draw(batch: int, p_image: float, p_text: float, p_both: float, *, generator: torch.Generator | None = None) -> Drops:
    """One uniform draw per sample (from torch's global CPU RNG unless a generator is given, so resume restores it)."""
    u = torch.rand(batch, generator=generator)
    image_only = u < p_image
    text_only = (u >= p_image) & (u < p_image + p_text)
    both = (u >= p_image + p_text) & (u < p_image + p_text + p_both)
    return Drops(image=image_only | both, text=text_only | both)


def replace_rows(values: torch.Tensor, mask: torch.Tensor, dropped: torch.Tensor | float) -> torch.Tensor:
    """`values` with the rows where `mask` is set replaced by `dropped` (a tensor broadcastable to one row, or 0)."""
    if not bool(mask.any()):
        return values
    m = mask.to(values.device).view(-1, *([1] * (values.ndim - 1)))
    dropped = torch.as_tensor(dropped, dtype=values.dtype, device=values.device)
    return torch.where(m, dropped.expand_as(values) if dropped.ndim else dropped, values)


def drop_texts(texts: list[str], mask: torch.Tensor) -> list[str]:
    """A dropped caption is the empty prompt, as in the reference scripts."""
    return ["" if bool(d) else t for t, d in zip(texts, mask.tolist())]
