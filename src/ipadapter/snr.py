"""Min-SNR-gamma loss weighting, shared by the adapter trainer and the miniature UNet recipe (a core module, so the
miniature's code needs no training extra to import it)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for
    v-prediction. The many low-noise steps, whose loss is mostly irreducible, stop dominating the gradient; the
    high-noise steps, where layout, shape and colour are decided, keep their full weight."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / (snr if prediction == "epsilon" else snr + 1)


def min_snr_mse(pred: torch.Tensor, target: torch.Tensor, noise_scheduler: Any, timesteps: torch.Tensor, gamma: float,
                prediction: str) -> torch.Tensor:
    """Each sample's MSE (in fp32) weighted by its `min_snr_weights`, averaged over the batch."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    return (min_snr_weights(noise_scheduler, timesteps, gamma, prediction) * per_sample).mean()
