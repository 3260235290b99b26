"""The full-face head: every CLIP patch token mapped on its own (257 tokens in, 257 out)."""

from __future__ import annotations

import torch
from torch import nn


class TokenMLPProjection(nn.Module):
    """Linear(H → H) → GELU → Linear(H → C) → LayerNorm(C), keys `proj.0`, `proj.2`, `proj.3`."""

    def __init__(self, *, in_dim: int, cross_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, cross_dim), nn.LayerNorm(cross_dim)
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.to(self.proj[0].weight.dtype))  # (B, T, C)
