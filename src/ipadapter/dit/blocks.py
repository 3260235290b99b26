"""The attention blocks of a diffusion transformer that an IP-Adapter acts on.

FLUX: the double-stream blocks `transformer_blocks.{i}.attn` (the single-stream blocks carry no image branch).
SD 3 / 3.5: every joint block `transformer_blocks.{i}.attn`. A block's `index` is its position, which the published
files key by; inside the package a block is addressed by its module name, as layers.py does for UNets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ipadapter.errors import IPAdapterError

# diffusers class → the kind of attention its blocks run ("unet" for every UNet2DConditionModel).
KINDS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3", "UNet2DConditionModel": "unet"}
DESCRIPTIONS = {"flux": "a FLUX transformer", "sd3": "an SD 3 / 3.5 transformer",
                "unet": "a UNet (SD 1.5 / 2.x / SDXL / Kolors)"}
# Each kind's timestep as its pipeline passes it, times this, is on the scheduler's own scale (FLUX divides by 1000).
TIMESTEP_SCALE = {"flux": 1000.0, "sd3": 1.0}


@dataclass(frozen=True)
class Block:
    """One adapted attention block: module path, position, inner width = heads × head_dim."""

    name: str
    index: int
    width: int
    head_dim: int


def dit_kind(model: nn.Module) -> str | None:
    """"flux", "sd3", "unet", or None for a model no IP-Adapter here fits (subclasses count as their base)."""
    for cls in type(model).__mro__:
        if cls.__name__ in KINDS:
            return KINDS[cls.__name__]
    return None


def is_dit(model: nn.Module) -> bool:
    """Whether adapters attach to `model` through this package (FLUX, SD 3) rather than the UNet path."""
    return dit_kind(model) in TIMESTEP_SCALE


def denoiser_of(pipe: Any) -> nn.Module:
    """The model adapters attach to: the pipeline's UNet, else its transformer."""
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise IPAdapterError(f"{type(pipe).__name__} has neither a UNet nor a transformer to attach an IP-Adapter to")
    return model


def dit_blocks(model: nn.Module) -> list[Block]:
    """The adapted blocks of a FLUX or SD 3 transformer, in file order."""
    if not is_dit(model):
        raise IPAdapterError(f"{type(model).__name__} is not a FLUX or SD 3 transformer")
    found = []
    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn
        width = attn.to_q.out_features
        found.append(Block(f"transformer_blocks.{i}.attn", i, width, width // attn.heads))
    return found
