"""Training a FLUX IP-Adapter in XLabs' layout: FLUX's parts of the flow-matching recipe (dit/flow.py).

Trainable: the linear projection of the global CLIP embedding and, per double-stream block, K'/V' (newly initialised:
the tokens are T5-wide, while the blocks' own text projections read the context embedder's output). A dropped image
is a zero CLIP embedding. σ ~ U(0, 1); the transformer gets σ itself as its timestep, as the pipeline passes t / 1000
(and guidance 1 on a guidance-distilled base). Latents are packed 2 × 2 as the pipeline packs them. The result is
written in XLabs' layout (`save_xlabs`), which diffusers' FLUX loader reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ipadapter.adapter import AdapterConfig
from ipadapter.atomic import save_safetensors
from ipadapter.dit.adapter import DiTAdapter
from ipadapter.dit.blocks import dit_blocks
from ipadapter.dit.flow import SigmaDraw, TransformerFamily, vae_latents
from ipadapter.encoders import ImageEncoder
from ipadapter.projection.detect import new_projection
from ipadapter.validation import vae_downscale

TEXT_TOKENS = 512  # T5's states per caption, padded to the pipeline's default max_sequence_length


def new_flux_adapter(transformer: torch.nn.Module, *, clip_dim: int, tokens: int = 4) -> DiTAdapter:
    """An untrained adapter shaped for `transformer` (tokens as wide as its text tokens, as XLabs' files)."""
    cross = transformer.config.joint_attention_dim
    projection = new_projection("linear", cross_dim=cross, tokens=tokens, embed_dim=clip_dim)
    variant = "flux-v2" if tokens == 16 else "flux"
    return DiTAdapter(AdapterConfig(variant=variant, projection=projection, base="flux"), dit_blocks(transformer))


def save_xlabs(adapter: DiTAdapter, path: str | os.PathLike) -> Path:
    """The XLabs flat layout: `ip_adapter_proj_model.{proj,norm}.*`, `double_blocks.{i}.processor.
    ip_adapter_double_stream_{k,v}_proj.*`, written atomically."""
    flat = {f"ip_adapter_proj_model.{k}": v for k, v in adapter.image_proj.state_dict().items()}
    for i, (_, weights) in enumerate(adapter.named_layers()):
        for kv in "kv":
            for kind, tensor in getattr(weights, f"to_{kv}_ip").state_dict().items():
                flat[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.{kind}"] = tensor
    return save_safetensors({k: v.detach().contiguous() for k, v in flat.items()}, path)


@dataclass
class Encoded:
    """One batch with every frozen encoder already applied."""

    latents: torch.Tensor  # (B, L, C) packed
    image_ids: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    empty_text: torch.Tensor
    empty_pooled: torch.Tensor
    image: torch.Tensor  # (B, D): the global CLIP embedding

    def rows(self, idx: torch.Tensor) -> "Encoded":
        """The samples `idx` (the position ids are shared by all)."""
        pick = {f: getattr(self, f)[idx] for f in ("latents", "text", "pooled", "empty_text", "empty_pooled", "image")}
        return Encoded(image_ids=self.image_ids, text_ids=self.text_ids, **pick)

    def call(self, model: torch.nn.Module, x_sigma: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
             pooled: torch.Tensor) -> dict[str, Any]:
        guidance = torch.ones_like(sigma) if model.config.guidance_embeds else None
        return {"hidden_states": x_sigma, "timestep": sigma, "guidance": guidance, "pooled_projections": pooled,
                "encoder_hidden_states": text, "txt_ids": self.text_ids, "img_ids": self.image_ids}


@torch.no_grad()
def empty_prompt(pipe: Any, max_sequence_length: int = TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's (text states, pooled embedding), one row: a dropped caption's input, a constant of the run."""
    text, pooled, _ = pipe.encode_prompt([""], prompt_2=None, max_sequence_length=max_sequence_length)
    return text, pooled


@torch.no_grad()
def features(pipe: Any, encoder: ImageEncoder, pixels: torch.Tensor, image_pixels: torch.Tensor,
             captions: list[str], max_sequence_length: int = TEXT_TOKENS) -> dict[str, torch.Tensor]:
    """Per sample: the VAE latents of `pixels` in [-1, 1], the T5 states and pooled CLIP embedding of the caption,
    the CLIP embedding of `image_pixels` (the encoder's processor's output)."""
    text, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, max_sequence_length=max_sequence_length)
    return {"latents": vae_latents(pipe.vae, pixels), "text": text, "pooled": pooled,
            "image": encoder.encode_pixels(image_pixels, "global")}


def assemble(rows: dict[str, torch.Tensor], empty: tuple[torch.Tensor, torch.Tensor]) -> Encoded:
    """The batch of `features` rows: latents packed 2 × 2 and their position ids as the pipeline makes them, the text
    tokens' ids (zeros, as its `encode_prompt`), the empty prompt once per sample."""
    from diffusers import FluxPipeline

    latents, text = rows["latents"], rows["text"]
    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    text_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)
    empty_text, empty_pooled = empty
    return Encoded(packed, ids, text, rows["pooled"], text_ids, empty_text.expand(b, -1, -1),
                   empty_pooled.expand(b, -1), rows["image"])


def uniform_sigmas(_: Any) -> SigmaDraw:
    """σ ~ U(0, 1)."""
    return lambda rows, g: torch.rand(rows, generator=g)


FAMILY = TransformerFamily(
    name="FLUX", variant="flux", pipeline="FluxPipeline", transformer="FluxTransformer2DModel",
    readers="XLabs' FLUX layout (diffusers' `FluxPipeline.load_ip_adapter`)", image_features="global",
    new_adapter=lambda transformer, width, tokens: new_flux_adapter(transformer, clip_dim=width, tokens=tokens),
    features=features, assemble=assemble, empty_prompt=empty_prompt, sigmas=uniform_sigmas, save=save_xlabs,
    size_step=lambda vae, _: vae_downscale(vae) * 2, size_rule="VAE downscale × 2, latents packed 2 × 2",
    max_size=lambda vae, transformer: None, text_tokens=lambda base: TEXT_TOKENS,
)
