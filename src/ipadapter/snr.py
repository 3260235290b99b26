"""Min-SNR-gamma loss weights, shared by the adapter trainer and the miniature UNet recipe (a core module, so the
miniature's code needs no training extra to import it)."""

from __future__ import annotations

from typing import Any

import torch


def min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for
    v-prediction. The many low-noise steps, whose loss is mostly irreducible, stop dominating the gradient; the
    high-noise steps, where layout, shape and colour are decided, keep their full weight."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / (snr if prediction == "epsilon" else snr + 1)
