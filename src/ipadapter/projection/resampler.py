"""Perceiver resampler of the Plus adapters: learned queries attend over the image's patch features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm → Linear(dim → mult·dim) → GELU → Linear(mult·dim → dim); keys `0`, `1`, `3` as published."""
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend over [features; latents]; no biases."""

    def __init__(self, *, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.attend(self.norm1(x), self.norm2(latents))

    def attend(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The attention of normalised features and latents (the SD 3 head modulates the latents' norm first)."""
        b, q_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        # The reference scales q and k by d^-1/4 each and takes the softmax in fp32; SDPA's 1/sqrt(d) is the same product.
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, self.heads * self.dim_head))


class PerceiverLayers(nn.Module):
    """The stack shared by the Plus resampler and FaceID-Plus: depth × [attention + residual, feed-forward + residual]."""

    def __init__(self, *, in_dim: int, dim: int, out_dim: int, depth: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def run(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x.to(self.proj_in.weight.dtype))
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverLayers):
    """Plus head: `queries` learned latents read the patch features (B, P, H) → (B, queries, C)."""

    def __init__(
        self, *, in_dim: int, dim: int, out_dim: int, depth: int, heads: int, dim_head: int, queries: int, ff_mult: int,
    ) -> None:
        super().__init__(in_dim=in_dim, dim=dim, out_dim=out_dim, depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult)
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(patches.shape[0], -1, -1)
        return self.run(patches, latents)
