"""One training step: a batch's inputs with condition dropout, the diffusion loss, and a guarded optimizer step.

A step whose gradients are not all finite (a NaN or Inf in a batch, an fp16 overflow) changes nothing: no optimizer
or schedule step, no EMA update; it is counted. Under fp16 accelerate's gradient scaler makes that call (it also
lowers its scale); otherwise the gradients are checked here. The gradients are all-reduced before the check, so every
process takes the same decision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ipadapter.snr import min_snr_mse
from ipadapter.train import dropout
from ipadapter.train.data import sdxl_time_ids
from ipadapter.train.models import encode_text


def scale_latents(vae_config: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
    shift = vae_config.get("shift_factor") or 0.0
    return (latents - shift) * vae_config["scaling_factor"]


def encode_clip(encoder: Any, pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """CLIP features of (B, 3, H, W) pixels, or of (B, K, 3, H, W) for K references per sample → (B, K, ...)."""
    if pixels.ndim == 5:
        out = encoder.encode_pixels(pixels.flatten(0, 1), kind)
        return out.view(*pixels.shape[:2], *out.shape[1:])
    return encoder.encode_pixels(pixels, kind)


def project_references(adapter: Any, features: tuple[torch.Tensor, ...], references: int) -> torch.Tensor:
    """Tokens (B, K·T, C): each reference projected alone, then concatenated along the tokens, which is what
    generation attends to for K unmasked references of one adapter."""
    if references == 1:
        return adapter.project(*features)
    batch = features[0].shape[0]
    tokens = adapter.project(*(f.flatten(0, 1) for f in features))  # (B·K, T, C), sample-major
    return tokens.reshape(batch, -1, tokens.shape[-1])


@torch.no_grad()
def step_inputs(run: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple, dict | None]:
    """(latents, text embeddings, projection inputs, SDXL added conditioning) with condition dropout applied."""
    config, device, dtype = run.config, run.accelerator.device, run.weight_dtype
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    drops = dropout.draw(first.shape[0], config.drop_image, config.drop_text, config.drop_both)
    added = None
    image = None
    if run.cache is not None:
        c = run.constants
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        latents = scale_latents(run.vae_config, mean + std * torch.randn_like(mean))
        text = dropout.replace_rows(batch["text_embeds"].to(device), drops.text, c["uncond_text"].to(device))
        if run.sdxl:
            pooled = dropout.replace_rows(batch["pooled"].to(device), drops.text, c["uncond_pooled"].to(device))
            added = {"text_embeds": pooled.to(dtype), "time_ids": batch["time_ids"].to(device, dtype)}
        if run.features:
            image = dropout.replace_rows(batch["image"].to(device), drops.image, c["uncond_image"].to(device))
    else:
        m = run.models
        text, pooled = encode_text(m, dropout.drop_texts(batch["text"], drops.text), device)
        dist = m.vae.encode(batch["pixels"].to(device, m.vae.dtype)).latent_dist
        latents = scale_latents(run.vae_config, dist.sample().float())
        if run.sdxl:
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop"], batch["pixels"].shape[-2:])
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(device, dtype)}
        if run.features == "global":
            image = dropout.replace_rows(encode_clip(run.encoder, batch["clip"], "global").float(), drops.image, 0.0)
        elif run.features == "patch":  # a dropped image is zero pixel values through the encoder
            image = encode_clip(run.encoder, dropout.replace_rows(batch["clip"], drops.image, 0.0), "patch").float()
    features: tuple[torch.Tensor, ...] = ()
    if config.needs_id_embeds:
        features = (dropout.replace_rows(batch["id"].to(device).float(), drops.image, 0.0),)
    if image is not None:
        features = features + (image.to(device).float(),)
    return latents.float(), text.to(device, dtype), features, added


def diffusion_loss(run: Any, module: Any, noise_scheduler: Any, prediction: str, batch: dict[str, Any]) -> torch.Tensor:
    """MSE of the UNet's prediction against the noise (epsilon) or the velocity (v-prediction) on DDPM-noised latents;
    per sample weighted by min-SNR-gamma when `snr_gamma` is set."""
    config, device = run.config, run.accelerator.device
    latents, text, features, added = step_inputs(run, batch)
    noise = torch.randn_like(latents)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    with run.accelerator.autocast():
        pred = module(noisy.to(run.weight_dtype), timesteps, text, features, added)
    if not config.snr_gamma:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    return min_snr_mse(pred, target, noise_scheduler, timesteps, config.snr_gamma, prediction)


NONFINITE_LIMIT = 50  # consecutive skipped steps after which a run stops: its learning rate or data is broken


def gradients_finite(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def optimizer_step(accelerator: Any, optimizer: Any, lr_scheduler: Any, params: list, max_grad_norm: float) -> bool:
    """At a gradient sync: clip, step the optimizer and schedule, clear the gradients. False when the step was
    skipped for non-finite gradients (nothing changed)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None and not gradients_finite(params):
        optimizer.zero_grad(set_to_none=True)
        return False
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()  # under fp16 the scaler skips it when the unscaled gradients hold Inf/NaN
    skipped = bool(getattr(optimizer, "step_was_skipped", False))
    if not skipped:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return not skipped
