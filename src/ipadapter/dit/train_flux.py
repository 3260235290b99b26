"""Training a FLUX IP-Adapter: the paper's recipe on the flow-matching loss FLUX itself is trained with.

Frozen transformer, VAE, text and image encoders; trainable projection head and per-block K'/V'. Per sample one
uniform draw drops the image (zero CLIP embedding, the unconditional input), the text (empty prompt) or both, 5 %
each; AdamW (lr 1e-4, weight decay 0.01). Loss: x_σ = (1 − σ)·x₀ + σ·ε with σ ~ U(0, 1), the transformer (given
σ as its timestep, as the pipeline passes t / 1000) predicts ε − x₀, MSE. The result is written in XLabs' layout
(`save_xlabs`), which diffusers' FLUX loader reads. `train_flux_adapter` trains on images in memory;
`ipadapter train --variant flux` (train/flux.py) runs the same loop, `fit`, on a manifest or shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter.adapter import AdapterConfig
from ipadapter.atomic import save_safetensors
from ipadapter.dit.adapter import DiTAdapter
from ipadapter.dit.attach import attach_dit
from ipadapter.dit.blocks import dit_blocks
from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError
from ipadapter.projection.detect import new_projection
from ipadapter.runtime import AdapterPrompt, Reference

PAPER_DROPS = (0.05, 0.05, 0.05)  # image only, text only, both


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
    clip: torch.Tensor  # (B, D)

    def rows(self, idx: torch.Tensor) -> "Encoded":
        """The samples `idx` (the position ids are shared by all)."""
        pick = {f: getattr(self, f)[idx] for f in ("latents", "text", "pooled", "empty_text", "empty_pooled", "clip")}
        return Encoded(image_ids=self.image_ids, text_ids=self.text_ids, **pick)


@torch.no_grad()
def encode(pipe: Any, encoder: ImageEncoder, images: list[Image.Image], captions: list[str], size: int,
           max_sequence_length: int = 512) -> Encoded:
    """`encode_pixels` on PIL images: resized to `size` square by the pipeline's image processor."""
    pixels = pipe.image_processor.preprocess(images, height=size, width=size)
    return encode_pixels(pipe, encoder, pixels, encoder.pixel_values(images), captions, max_sequence_length)


@torch.no_grad()
def empty_prompt(pipe: Any, max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's (text states, pooled embedding), one row: a dropped caption's input, a constant of the run."""
    text, pooled, _ = pipe.encode_prompt([""], prompt_2=None, max_sequence_length=max_sequence_length)
    return text, pooled


@torch.no_grad()
def encode_pixels(pipe: Any, encoder: ImageEncoder, pixels: torch.Tensor, clip_pixels: torch.Tensor,
                  captions: list[str], max_sequence_length: int = 512,
                  empty: tuple[torch.Tensor, torch.Tensor] | None = None) -> Encoded:
    """VAE latents of `pixels` in [-1, 1] (packed 2 × 2 as the pipeline does), text and empty-text embeddings, the
    CLIP embeddings of `clip_pixels` (the encoder's processor's output). `empty`: `empty_prompt`'s result, when the
    caller encodes many batches (otherwise encoded here)."""
    latents = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mode()
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    b, c, h, w = latents.shape
    packed = pipe._pack_latents(latents, b, c, h, w)
    ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    text, pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, max_sequence_length=max_sequence_length)
    empty_text, empty_pooled = empty if empty is not None else empty_prompt(pipe, max_sequence_length)
    return Encoded(packed, ids, text, pooled, text_ids, empty_text.expand(b, -1, -1), empty_pooled.expand(b, -1),
                   encoder.encode_pixels(clip_pixels, "global"))


def flow_matching_loss(attachment: Any, adapter: DiTAdapter, batch: Encoded, *, sigma: torch.Tensor,
                       noise: torch.Tensor, drops: Any) -> torch.Tensor:
    """MSE between the transformer's prediction with the adapter and ε − x₀ at x_σ, with the rows `drops` (the UNet
    trainer's `train.dropout.Drops`) names given a zero CLIP embedding and/or the empty prompt's embeddings."""
    x0 = batch.latents
    x_sigma = ((1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise).to(x0.dtype)
    no_image, no_text = drops.image.to(x0.device), drops.text.to(x0.device)
    clip = torch.where(no_image[:, None], torch.zeros_like(batch.clip), batch.clip)
    text = torch.where(no_text[:, None, None], batch.empty_text, batch.text)
    pooled = torch.where(no_text[:, None], batch.empty_pooled, batch.pooled)
    tokens = adapter.project(clip.to(adapter.dtype))
    attachment.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)])}, rows=x0.shape[0])
    transformer = attachment.model
    guidance = (torch.ones_like(sigma) if transformer.config.guidance_embeds else None)
    pred = transformer(hidden_states=x_sigma, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=text, txt_ids=batch.text_ids, img_ids=batch.image_ids).sample
    return F.mse_loss(pred.float(), (noise - x0).float())


def fit(
    transformer: torch.nn.Module, adapter: DiTAdapter, batches: Callable[[torch.Generator], Encoded], *, steps: int,
    optimizer: torch.optim.Optimizer, seed: int = 0, drop_rates: tuple[float, float, float] = PAPER_DROPS,
    max_grad_norm: float = 0.0, on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """`steps` optimizer steps on `batches(generator)`; σ, ε and the dropout drawn from one seeded generator, so a run
    is reproducible. The transformer is left as it was (the adapter detached) however the loop ends."""
    from ipadapter.train.dropout import draw  # the train extra's place; the dropout itself needs only torch

    g = torch.Generator().manual_seed(seed)
    attachment = attach_dit(transformer, adapter)
    losses: list[float] = []
    try:
        for step in range(1, steps + 1):
            batch = batches(g)
            rows = batch.latents.shape[0]
            sigma = torch.rand(rows, generator=g).to(transformer.device)
            noise = torch.randn(batch.latents.shape, generator=g).to(transformer.device, batch.latents.dtype)
            loss = flow_matching_loss(attachment, adapter, batch, sigma=sigma, noise=noise,
                                      drops=draw(rows, *drop_rates, generator=g))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), max_grad_norm)
            optimizer.step()
            adapter.weights_changed()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        attachment.detach()
    return losses


def train_flux_adapter(
    pipe: Any, encoder: ImageEncoder, images: list[Image.Image], captions: list[str], *, steps: int, size: int,
    adapter: DiTAdapter | None = None, batch_size: int = 4, lr: float = 1e-4, seed: int = 0,
    max_sequence_length: int = 512,
) -> tuple[DiTAdapter, list[float]]:
    """Train (or continue) a FLUX adapter on image-caption pairs held in memory; returns it and the loss per step."""
    if len(images) != len(captions) or not images:
        raise IPAdapterError(f"give one caption per image, got {len(images)} images and {len(captions)} captions")
    transformer = pipe.transformer.requires_grad_(False)
    adapter = adapter or new_flux_adapter(transformer, clip_dim=encoder.global_dim)
    adapter = adapter.to(transformer.device).train().requires_grad_(True)
    data = encode(pipe, encoder, images, captions, size, max_sequence_length)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.01)
    losses = fit(transformer, adapter, lambda g: data.rows(torch.randperm(len(images), generator=g)[:batch_size]),
                 steps=steps, optimizer=optimizer, seed=seed)
    return adapter.eval().requires_grad_(False), losses
