"""The base adapter's head: one global image embedding → N tokens."""

from __future__ import annotations

import torch
from torch import nn


class LinearProjection(nn.Module):
    """Linear(D → N·C), reshape to N tokens, LayerNorm(C) (keys `proj.*`, `norm.*`)."""

    def __init__(self, *, in_dim: int, cross_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Linear(in_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(embeds.to(self.proj.weight.dtype))  # (B, N*C)
        return self.norm(x.reshape(embeds.shape[0], -1, self.cross_dim))  # (B, N, C); (B, I, D) → (B, I·N, C)
