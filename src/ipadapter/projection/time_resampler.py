"""The SD 3.5 IP-Adapter's head: a perceiver resampler whose every layer is modulated by the denoising timestep.

Learned queries read the SigLIP patch features as in the Plus resampler, but the features get the timestep embedding
added, and each layer's two LayerNorms on the queries are shifted and scaled from it (adaLN). It returns the tokens
and the timestep embedding, which every joint block's `norm_ip` reads too. Module names copy the published
(InstantX) keys: `layers.{l}.0` attention, `.1` feed-forward (its LayerNorm is the modulated one), `.2.1` the adaLN
projection; `time_embedding.linear_{1,2}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ipadapter.projection.resampler import PerceiverAttention, feed_forward


class TimeEmbedding(nn.Module):
    """Sinusoidal timestep features (cos first) → Linear → SiLU → Linear (keys `linear_1`, `linear_2`)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        sinusoid = get_timestep_embedding(timestep, self.in_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.linear_2(F.silu(self.linear_1(sinusoid.to(dtype))))  # (B, dim)


class ModulatedAttention(PerceiverAttention):
    """The Plus resampler's attention with the queries' LayerNorm shifted and scaled by the timestep."""

    def forward(self, x: torch.Tensor, latents: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents) * (1 + scale[:, None]) + shift[:, None]
        return self.attend(x, latents)


class TimeResampler(nn.Module):
    """(B, P, in_dim) features and (B,) timesteps → ((B, queries, out_dim) tokens, (B, dim) timestep embedding)."""

    def __init__(self, *, in_dim: int, dim: int, out_dim: int, depth: int, heads: int, dim_head: int, queries: int,
                 ff_mult: int, timestep_dim: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.time_embedding = TimeEmbedding(timestep_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([ModulatedAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult),
                           nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))])
            for _ in range(depth)
        )

    def forward(self, features: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj_in(features.to(self.proj_in.weight.dtype))
        temb = self.time_embedding(timestep, x.dtype)
        x = x + temb[:, None]
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff, ada in self.layers:
            shift_msa, scale_msa, shift_mlp, scale_mlp = ada(temb).chunk(4, dim=1)
            latents = attn(x, latents, shift_msa, scale_msa) + latents
            norm, rest = ff[0], ff[1:]
            latents = rest(norm(latents) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]) + latents
        return self.norm_out(self.proj_out(latents)), temb
