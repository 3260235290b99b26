"""Training a transformer IP-Adapter on the flow-matching loss its base was trained with: the loop shared by FLUX and
SD 3, and what a family must supply to it (`TransformerFamily`; the families by kind: dit/train.py).

The paper's recipe, unchanged but for the loss: frozen transformer, VAE, text and image encoders; per sample one
uniform draw drops the image (the family's unconditional image input), the text (the empty prompt) or both, 5 % each;
AdamW. Loss: x_σ = (1 − σ)·x₀ + σ·ε, the transformer predicts ε − x₀, MSE; how σ is drawn is the family's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ipadapter.dit.adapter import DiTAdapter
from ipadapter.dit.attach import attach_dit
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt, Reference

logger = logging.getLogger("ipadapter.train")
PAPER_DROPS = (0.05, 0.05, 0.05)  # image only, text only, both

SigmaDraw = Callable[[int, torch.Generator], torch.Tensor]


class Batch(Protocol):
    """One batch with every frozen encoder applied: what `flow_matching_loss` reads of a family's batch."""

    latents: torch.Tensor
    image: torch.Tensor  # the image encoder's features, one row per sample; zeros are the unconditional input
    text: torch.Tensor
    pooled: torch.Tensor
    empty_text: torch.Tensor
    empty_pooled: torch.Tensor

    def rows(self, idx: torch.Tensor) -> "Batch": ...

    def call(self, model: torch.nn.Module, x_sigma: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
             pooled: torch.Tensor) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TransformerFamily:
    """What differs between transformer families when training: their pipeline, encoders, σ draw and file layout.

    name: as messages say it. variant: the one trained when none is named; new_adapter(transformer, width, tokens)
    makes an untrained one reading `width`-wide image features of kind `image_features` ("global" or "patch").
    pipeline, transformer: the diffusers classes of `--base` and of its transformer. readers: who reads the published
    file (the model card). size_step(vae_config, transformer_config): pixel sizes must be multiples of it, for the
    reason `size_rule`; max_size(...): the largest it takes, if any (configs alone: a run refuses a size before any
    weights load). sigmas(pipe): the σ draw. text_tokens(base): the tokens of a caption's text states as the
    family's `features` pads them (the `--dry-run` estimate's shapes).
    The frozen encoders in two halves, so that a feature cache can sit between them: features(pipe, encoder, pixels,
    image_pixels, captions, max_sequence_length) → a row per sample ("latents", "text", "pooled", "image");
    assemble(rows, empty) → the batch the loss reads, `empty` being empty_prompt(pipe, max_sequence_length): the empty
    prompt's (text, pooled), one row.
    """

    name: str
    variant: str
    pipeline: str
    transformer: str
    readers: str
    image_features: str
    new_adapter: Callable[[torch.nn.Module, int, int], DiTAdapter]
    features: Callable[..., dict[str, torch.Tensor]]
    assemble: Callable[[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], Batch]
    empty_prompt: Callable[[Any, int], tuple[torch.Tensor, torch.Tensor]]
    sigmas: Callable[[Any], SigmaDraw]
    save: Callable[[DiTAdapter, str | os.PathLike], Path]
    size_step: Callable[[dict[str, Any], dict[str, Any]], int]
    size_rule: str
    max_size: Callable[[dict[str, Any], dict[str, Any]], int | None]
    text_tokens: Callable[[str], int]


def vae_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The latents both families train on: the posterior's mode of `pixels` in [-1, 1], shifted and scaled as their
    pipelines decode them."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def rows_where(rows: torch.Tensor, then: torch.Tensor, otherwise: torch.Tensor) -> torch.Tensor:
    """Per sample (the first dimension), `then` where `rows` holds, else `otherwise`."""
    mask = rows.to(otherwise.device).view(-1, *([1] * (otherwise.dim() - 1)))
    return torch.where(mask, then, otherwise)


def flow_matching_loss(attachment: Any, adapter: DiTAdapter, batch: Batch, *, sigma: torch.Tensor,
                       noise: torch.Tensor, drops: Any) -> torch.Tensor:
    """MSE between the transformer's prediction with the adapter and ε − x₀ at x_σ, with the rows `drops` (the UNet
    trainer's `train.dropout.Drops`) names given zero image features and/or the empty prompt's embeddings."""
    x0 = batch.latents
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x_sigma = ((1 - s) * x0 + s * noise).to(x0.dtype)
    image = rows_where(drops.image, torch.zeros_like(batch.image), batch.image)
    text = rows_where(drops.text, batch.empty_text, batch.text)
    pooled = rows_where(drops.text, batch.empty_pooled, batch.pooled)
    tokens = adapter.project(image.to(adapter.dtype))
    attachment.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)])})  # no CFG in training
    model = attachment.model
    pred = model(**batch.call(model, x_sigma, sigma, text, pooled)).sample
    return F.mse_loss(pred.float(), (noise - x0).float())


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of one step's draws (σ, ε, the dropout) in process `rank`, from the run's seed, the step and the
    rank alone: a run resumed at any step draws what the uninterrupted run drew, and each process draws its own."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def fit(
    transformer: torch.nn.Module, adapter: DiTAdapter, batches: Callable[[torch.Generator], Batch], *, steps: int,
    optimizer: torch.optim.Optimizer, sigmas: SigmaDraw, seed: int = 0, start: int = 0, accumulate: int = 1,
    schedule: Any = None, drop_rates: tuple[float, float, float] = PAPER_DROPS, max_grad_norm: float = 0.0,
    on_step: Callable[[int, float], None] | None = None, rank: int = 0,
    average: Callable[[torch.Tensor], torch.Tensor] | None = None, validate_every: int = 0,
    validate: Callable[[int], None] | None = None, on_update: Callable[[], None] | None = None,
) -> list[float]:
    """Optimizer steps `start` + 1 … `steps`, each on `accumulate` batches of `batches(generator)` (their gradients
    and losses averaged), each step's draws from `step_generator`, so a run is reproducible and resumable; `schedule`
    (a learning-rate scheduler) steps after the optimizer. A step whose gradients are not finite is skipped (the
    weights unchanged), and `NONFINITE_LIMIT` in a row end the run. Under several processes `average` (accelerate's
    mean over them) is applied to the gradients before the step, which keeps the replicas equal, and to the loss
    reported. `on_update()` follows each step that changed the weights (an EMA's update). Every `validate_every`
    steps `validate(step)` runs with the adapter detached (it generates through the user's path, which attaches it
    itself). The transformer is left as it was (the adapter detached) however the loop ends."""
    from ipadapter.train.dropout import draw  # the train extra's place; the dropout itself needs only torch
    from ipadapter.train.step import NONFINITE_LIMIT, gradients_finite

    attachment = attach_dit(transformer, adapter)
    params = list(adapter.parameters())
    losses: list[float] = []
    consecutive = 0  # steps skipped in a row for non-finite gradients
    try:
        for step in range(start + 1, steps + 1):
            g = step_generator(seed, step, rank)
            optimizer.zero_grad(set_to_none=True)
            loss: torch.Tensor | None = None
            for _ in range(accumulate):
                batch = batches(g)
                rows = batch.latents.shape[0]
                sigma = sigmas(rows, g).to(transformer.device)
                noise = torch.randn(batch.latents.shape, generator=g).to(transformer.device, batch.latents.dtype)
                part = flow_matching_loss(attachment, adapter, batch, sigma=sigma, noise=noise,
                                          drops=draw(rows, *drop_rates, generator=g)) / accumulate
                part.backward()
                loss = part.detach() if loss is None else loss + part.detach()
            if average is not None:
                for p in params:
                    if p.grad is not None:
                        p.grad.copy_(average(p.grad))
                loss = average(loss)
            if gradients_finite(params):
                consecutive = 0
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                adapter.weights_changed()
                if on_update is not None:
                    on_update()
            else:  # the weights stay as they were: one bad batch or overflow does not end a long run
                consecutive += 1
                logger.warning("step %d skipped: non-finite gradients (%d in a row)", step, consecutive)
                if consecutive >= NONFINITE_LIMIT:
                    raise IPAdapterError(f"{consecutive} consecutive steps had non-finite gradients (last at step "
                                         f"{step}); lower the learning rate or check the data")
            losses.append(float(loss))
            if on_step is not None:
                on_step(step, losses[-1])
            if validate is not None and validate_every and step % validate_every == 0:
                attachment.detach()
                try:
                    validate(step)
                finally:
                    attachment = attach_dit(transformer, adapter)
    finally:
        attachment.detach()
    return losses
