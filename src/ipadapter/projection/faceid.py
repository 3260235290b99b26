"""FaceID heads: an ArcFace identity embedding → tokens; Plus variants refine them with CLIP patches of the face."""

from __future__ import annotations

import torch
from torch import nn

from ipadapter.projection.resampler import PerceiverLayers


def id_mlp(id_dim: int, hidden_dim: int, cross_dim: int, tokens: int) -> nn.Sequential:
    """Linear(512 → hidden) → GELU → Linear(hidden → N·C); keys `proj.0`, `proj.2`."""
    return nn.Sequential(nn.Linear(id_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, tokens * cross_dim))


class FaceIDProjection(nn.Module):
    """FaceID and FaceID-Portrait: ID MLP → N tokens → LayerNorm."""

    def __init__(self, *, id_dim: int, hidden_dim: int, cross_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = id_mlp(id_dim, hidden_dim, cross_dim, tokens)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(id_embeds.to(self.norm.weight.dtype))
        return self.norm(x.reshape(-1, self.tokens, self.cross_dim))  # (B, N, C)


class FaceIDPlusProjection(nn.Module):
    """FaceID-Plus(V2): ID tokens are the perceiver's latents over CLIP patches of the aligned face.

    V2 adds a shortcut, `out = id_tokens + s_scale · perceiver(id_tokens, patches)`; `shortcut` is not in the
    checkpoint's keys, so it is a property of the variant (faceid-plusv2), and `s_scale` a generation setting.
    """

    def __init__(
        self, *, id_dim: int, hidden_dim: int, cross_dim: int, tokens: int, clip_dim: int, depth: int, heads: int,
        dim_head: int, ff_mult: int, shortcut: bool,
    ) -> None:
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.shortcut = shortcut
        self.s_scale = 1.0
        self.proj = id_mlp(id_dim, hidden_dim, cross_dim, tokens)
        self.norm = nn.LayerNorm(cross_dim)
        self.perceiver_resampler = PerceiverLayers(
            in_dim=clip_dim, dim=cross_dim, out_dim=cross_dim, depth=depth, heads=heads,
            dim_head=dim_head, ff_mult=ff_mult,
        )

    def forward(self, id_embeds: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        x = self.proj(id_embeds.to(self.norm.weight.dtype))
        id_tokens = self.norm(x.reshape(-1, self.tokens, self.cross_dim))  # (B, N, C)
        out = self.perceiver_resampler.run(patches, id_tokens)
        return id_tokens + self.s_scale * out if self.shortcut else out
