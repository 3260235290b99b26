"""The optimizer of a training run: AdamW, with 8-bit states when bitsandbytes is installed and asked for."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("ipadapter.train")


def make_optimizer(config: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with the config's settings; `adamw8bit` uses bitsandbytes' AdamW8bit when it is installed and says
    so (then falls back to torch's AdamW) when it is not."""
    kwargs = dict(lr=config.learning_rate, weight_decay=config.weight_decay,
                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            logger.warning("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes), which is not "
                           "installed: using torch's AdamW (32-bit states) instead")
        else:
            return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
