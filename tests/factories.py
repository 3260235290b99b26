"""Builders of tiny UNets, encoders and published-layout adapter state dicts for the tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DConditionModel

from ipadapter.layers import attention_layers

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

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


def tiny_tokenizer(folder) -> "CLIPTokenizer":
    """A character-level CLIPTokenizer written to `folder` (no download)."""
    import json
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.!":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=16)


def tiny_text_encoder(hidden: int, seed: int = 0, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=80, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def tiny_image_encoder(seed: int = 0, projection_dim: int = 24, hidden: int = 40):
    """CLIPVisionModelWithProjection at 32 px, patch 8 → 17 tokens; global dim 24, patch width 40."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=projection_dim)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32).eval()


def tiny_sd15_pipeline(tmp_path):
    """A StableDiffusionPipeline with the SD-1.5 block layout at toy sizes (32 px images, 16x16 latents)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    pipe = StableDiffusionPipeline(
        unet=sd15_unet(), vae=tiny_vae(), text_encoder=tiny_text_encoder(SD15_CROSS), tokenizer=tiny_tokenizer(folder),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd15_pipeline(root: Path, adapters: tuple[str, ...] = ("base",)) -> Path:
    """`tiny_sd15_pipeline` saved as `root/pipe` with its image_encoder/ and feature_extractor/, as `from_pretrained`
    reads it, and a published-layout adapter `root/{family}.bin` per family (LoRA rank 4 for FaceID); returns the
    pipeline folder. Shared by the command-line, evaluation and app tests, which load models from disk."""
    pipe = tiny_sd15_pipeline(root)
    encoder, processor = tiny_image_encoder()
    folder = root / "pipe"
    pipe.save_pretrained(folder)
    encoder.save_pretrained(folder / "image_encoder")
    processor.save_pretrained(folder / "feature_extractor")
    for family in adapters:
        state = published(pipe.unet, family, SD15_CROSS, lora_rank=4 if "faceid" in family else 0)
        torch.save(state, root / f"{family}.bin")
    return folder


def tiny_sdxl_pipeline(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    tok = tiny_tokenizer(folder)
    pipe = StableDiffusionXLPipeline(
        unet=sdxl_unet(), vae=tiny_vae(), text_encoder=tiny_text_encoder(32), text_encoder_2=tiny_text_encoder(32, 1, 32),
        tokenizer=tok, tokenizer_2=tok, scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"),
        image_encoder=None, feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(seed: int = 0, size: int = 48):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
