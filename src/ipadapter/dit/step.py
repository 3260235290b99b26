"""What one transformer call tells the block processors beyond the per-generation `Runtime`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepState:
    """Set by the attachment's pre-hook before every transformer call.

    negative: this call is the negative prompt's (FLUX true CFG calls the transformer twice per step, prompt first,
    so a second call at the same timestep is the negative one); its image tokens are the unconditional ones.
    tokens / temb (SD 3): per adapter, each reference's time-conditioned tokens laid out on the batch (B, T, C), and
    the resampler's timestep embedding (B, D), made once per call for all blocks.
    """

    negative: bool = False
    last: tuple = ()
    tokens: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    temb: dict[str, torch.Tensor] = field(default_factory=dict)
