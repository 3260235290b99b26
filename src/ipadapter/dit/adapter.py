"""A transformer IP-Adapter: its projection head and, per adapted block (by module name), the image branch's weights.

Key names copy the diffusers processors' (`to_k_ip`, `norm_ip.linear`, ...), so a published file converts key for
key (checkpoint.py) and the state dict is the project's own file format, as for UNet adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from ipadapter.adapter import AdapterConfig, IPAdapter, _nested
from ipadapter.dit.blocks import Block


class FluxBlockWeights(nn.Module):
    """K'/V' of one FLUX double-stream block: biased linear maps, tokens (C) → block width."""

    def __init__(self, block: Block, cross_dim: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, block.width)
        self.to_v_ip = nn.Linear(cross_dim, block.width)


class AdaNorm(nn.Module):
    """LayerNorm without affine, shifted and scaled from the timestep embedding: `norm(x)·(1 + scale) + shift`, with
    (shift, scale) = linear(silu(temb)) in that order (key `linear`)."""

    def __init__(self, temb_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(temb_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(nn.functional.silu(temb)).chunk(2, dim=1)  # (B, C) each
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class JointBlockWeights(nn.Module):
    """The image branch of one SD 3 joint block: IP tokens AdaNorm'd by the timestep, K'/V' without bias, and RMS
    norms of the image query, image keys and IP keys (per head)."""

    def __init__(self, block: Block, cross_dim: int, temb_dim: int) -> None:
        super().__init__()
        self.norm_ip = AdaNorm(temb_dim, cross_dim)
        self.to_k_ip = nn.Linear(cross_dim, block.width, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, block.width, bias=False)
        self.norm_q = nn.RMSNorm(block.head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(block.head_dim, eps=1e-6)
        self.norm_ip_k = nn.RMSNorm(block.head_dim, eps=1e-6)


BlockWeights = FluxBlockWeights | JointBlockWeights


class DiTAdapter(IPAdapter):
    """An `IPAdapter` whose per-layer weights sit at a transformer's blocks: `config.base` is "flux" or "sd3".

    Everything the prompter and the caches read (projection, weights token, device, dtype) is the UNet adapter's.
    """

    def __init__(self, config: AdapterConfig, blocks: list[Block]) -> None:
        super().__init__(config, [])
        cross = config.cross_dim
        if config.base == "flux":
            weights = {b.name: FluxBlockWeights(b, cross) for b in blocks}
        else:
            temb = config.projection.dim
            weights = {b.name: JointBlockWeights(b, cross, temb) for b in blocks}
        self.layers = _nested(weights)
        for module in self.layers.modules():
            module.register_load_state_dict_post_hook(self._weights_loaded)

    def project(self, *features: torch.Tensor) -> torch.Tensor:
        """FLUX: tokens. SD 3: the features themselves, since its head needs the timestep; the attachment runs the
        head once per transformer call (dit/attach.py)."""
        if self.config.base == "sd3":
            return features[0]
        return super().project(*features)

    def named_layers(self) -> list[tuple[str, BlockWeights]]:
        """(block name, its weights), in block order."""
        return [(n, m) for n, m in self.layers.named_modules() if isinstance(m, (FluxBlockWeights, JointBlockWeights))]

    def layer(self, name: str) -> BlockWeights | None:
        return dict(self.named_layers()).get(name)
