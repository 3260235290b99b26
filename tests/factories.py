"""Builders of tiny UNets, encoders and published-layout adapter state dicts for the tests."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ipadapter.layers import attention_layers

SD15_CROSS = 32
SDXL_CROSS = 64


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.5's block layout (3 cross-attention down blocks, 2 layers each; mid; 3 cross-attention up blocks)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=SD15_CROSS, attention_head_dim=8, norm_num_groups=16,
    ).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's layout: no attention in the first block, several transformer blocks per attention, text_time cond."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
        cross_attention_dim=SDXL_CROSS, norm_num_groups=16,
    ).eval()


def sdxl_added_cond(batch: int) -> dict[str, torch.Tensor]:
    return {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)}


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.05


def _perceiver(prefix: str, in_dim: int, dim: int, out_dim: int, depth: int, heads: int, latents: int | None) -> dict:
    sd = {}
    if latents:
        sd[f"{prefix}latents"] = torch.randn(1, latents, dim) / dim**0.5
    sd[f"{prefix}proj_in.weight"], sd[f"{prefix}proj_in.bias"] = _rand(dim, in_dim), _rand(dim)
    sd[f"{prefix}proj_out.weight"], sd[f"{prefix}proj_out.bias"] = _rand(out_dim, dim), _rand(out_dim)
    sd[f"{prefix}norm_out.weight"], sd[f"{prefix}norm_out.bias"] = 1 + _rand(out_dim), _rand(out_dim)
    inner = heads * 64
    for l in range(depth):
        p = f"{prefix}layers.{l}."
        for n in ("norm1", "norm2"):
            sd[p + f"0.{n}.weight"], sd[p + f"0.{n}.bias"] = 1 + _rand(dim), _rand(dim)
        sd[p + "0.to_q.weight"], sd[p + "0.to_kv.weight"] = _rand(inner, dim) * 4, _rand(2 * inner, dim) * 4
        sd[p + "0.to_out.weight"] = _rand(dim, inner) * 4
        sd[p + "1.0.weight"], sd[p + "1.0.bias"] = 1 + _rand(dim), _rand(dim)
        sd[p + "1.1.weight"], sd[p + "1.3.weight"] = _rand(4 * dim, dim) * 4, _rand(dim, 4 * dim) * 4
    return sd


def image_proj_state(family: str, cross: int, *, embed_dim: int = 24, patch_dim: int = 40, id_dim: int = 16) -> dict:
    """A published-layout `image_proj` state dict of the given family, random weights."""
    if family == "base":
        return {"proj.weight": _rand(4 * cross, embed_dim) * 8, "proj.bias": _rand(4 * cross),
                "norm.weight": 1 + _rand(cross), "norm.bias": _rand(cross)}
    if family == "full":
        return {"proj.0.weight": _rand(patch_dim, patch_dim) * 4, "proj.0.bias": _rand(patch_dim),
                "proj.2.weight": _rand(cross, patch_dim) * 4, "proj.2.bias": _rand(cross),
                "proj.3.weight": 1 + _rand(cross), "proj.3.bias": _rand(cross)}
    if family == "plus":
        return _perceiver("", patch_dim, 64, cross, depth=4, heads=1, latents=16)
    if family in ("faceid", "faceid-portrait"):
        tokens = 16 if family == "faceid-portrait" else 4
        return {"proj.0.weight": _rand(2 * id_dim, id_dim) * 4, "proj.0.bias": _rand(2 * id_dim),
                "proj.2.weight": _rand(tokens * cross, 2 * id_dim) * 4, "proj.2.bias": _rand(tokens * cross),
                "norm.weight": 1 + _rand(cross), "norm.bias": _rand(cross)}
    if family in ("faceid-plus", "faceid-plusv2"):
        sd = {"proj.0.weight": _rand(2 * id_dim, id_dim) * 4, "proj.0.bias": _rand(2 * id_dim),
              "proj.2.weight": _rand(4 * cross, 2 * id_dim) * 4, "proj.2.bias": _rand(4 * cross),
              "norm.weight": 1 + _rand(cross), "norm.bias": _rand(cross)}
        sd.update(_perceiver("perceiver_resampler.", patch_dim, cross, cross, depth=4, heads=max(1, cross // 64), latents=None))
        return sd
    raise ValueError(family)


def ip_adapter_state(unet: UNet2DConditionModel, *, lora_rank: int = 0, seed: int = 1) -> dict:
    """Published-layout `ip_adapter` weights ("{index}.to_k_ip.weight", optional "{index}.to_q_lora...")."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer in attention_layers(unet):
        if layer.cross:
            for k in ("to_k_ip", "to_v_ip"):
                sd[f"{layer.index}.{k}.weight"] = torch.randn(layer.width, layer.cross_dim, generator=g) * 0.2
        if lora_rank:
            kv_in = layer.cross_dim if layer.cross else layer.width
            for k, (i, o) in {"to_q": (layer.width, layer.width), "to_k": (kv_in, layer.width),
                              "to_v": (kv_in, layer.width), "to_out": (layer.width, layer.width)}.items():
                sd[f"{layer.index}.{k}_lora.down.weight"] = torch.randn(lora_rank, i, generator=g) * 0.1
                sd[f"{layer.index}.{k}_lora.up.weight"] = torch.randn(o, lora_rank, generator=g) * 0.1
    return sd


def published(unet: UNet2DConditionModel, family: str, cross: int, lora_rank: int = 0, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    return {"image_proj": image_proj_state(family, cross), "ip_adapter": ip_adapter_state(unet, lora_rank=lora_rank, seed=seed)}
