"""How a prompt's references meet a layer: grouped for attention, and scaled by ComfyUI's embeds scaling modes.

Shared by the UNet's processor and the transformers' (FLUX, SD 3).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ipadapter.runtime import AdapterPrompt


class Group(NamedTuple):
    """References attended together: `id` 0 holds the unmasked ones (one attention over their concatenated tokens),
    `1 + i` the masked reference i alone (its mask weights the output)."""

    id: int
    refs: tuple[int, ...]
    mask: torch.Tensor | None


def reference_groups(prompt: AdapterPrompt, layer: str, *, every_reference: bool) -> tuple[Group, ...]:
    """The groups of a prompt's references at a layer: the unmasked ones together, each masked one alone.

    A reference whose own weight is 0 here is left out (unless `every_reference`: the unconditional-layer feature
    reads them all), on the compiled path too: its V' would be zero, but its K' would still take a share of the
    softmax it shares with the others. Its weight is baked into V' when K'/V' are made, so only a weight that crosses
    0 changes a compiled structure."""
    refs = prompt.references
    here = [i for i, r in enumerate(refs) if every_reference or r.weight_at(layer) != 0.0]
    plain = tuple(i for i in here if refs[i].mask is None)
    return ((Group(0, plain, None),) if plain else ()) + tuple(
        Group(1 + i, (i,), refs[i].mask) for i in here if refs[i].mask is not None
    )


def scale_embeds(
    k: torch.Tensor, v: torch.Tensor, w: float | torch.Tensor, mode: str, width: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ComfyUI's embeds scaling modes; returns (k, v, factor still to apply to the output)."""
    if mode == "kv":
        return k * w, v * w, 1.0
    penalty = w * width / 1280.0
    if mode == "kv_penalty":
        return k * penalty, v * penalty, 1.0
    mean = v.mean(dim=-2, keepdim=True)  # k_mean_v: only the token-mean part of V is scaled
    return k * penalty, (v - mean) + mean * penalty, 1.0
