"""A prompt encoded once by the pipeline's own `encode_prompt`, named as its `__call__` takes it back: what a caller
that generates from the same prompts again and again keeps instead of the text encoders (a run's validation)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ipadapter.errors import IPAdapterError

_GUIDED = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

# encode_prompt's outputs in order, by the `__call__` keyword each goes back in as (None: one it does not take)
OUTPUTS: dict[str, tuple[str | None, ...]] = {
    "StableDiffusionPipeline": ("prompt_embeds", "negative_prompt_embeds"),
    "StableDiffusionXLPipeline": _GUIDED,
    "KolorsPipeline": _GUIDED,
    "StableDiffusion3Pipeline": _GUIDED,
    "FluxPipeline": ("prompt_embeds", "pooled_prompt_embeds", None),  # text ids: the pipeline makes them again
}


def encode_prompt(pipe: Any, prompt: str, **options: Any) -> dict[str, torch.Tensor]:
    """`prompt` for one image, with the negative the pipeline makes when none is given (encoded whether or not a call
    guides: one that does not leaves it unread), exactly as the pipeline's call would encode them. `options` go to
    `encode_prompt` as the call would pass them (`max_sequence_length=`, `clip_skip=`)."""
    names = OUTPUTS.get(type(pipe).__name__)
    if names is None:
        raise IPAdapterError(f"{type(pipe).__name__} takes no prompts encoded ahead here; known: {', '.join(OUTPUTS)}")
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs: dict[str, Any] = {"prompt": prompt, "device": pipe._execution_device, "num_images_per_prompt": 1}
    kwargs.update({name: None for name in ("prompt_2", "prompt_3") if name in params})
    if "do_classifier_free_guidance" in params:
        kwargs["do_classifier_free_guidance"] = True
    kwargs.update(options)
    with torch.no_grad():  # as in the pipeline's call: tensors that need no gradient take the same attention kernels
        outputs = pipe.encode_prompt(**kwargs)
    return {name: out for name, out in zip(names, outputs) if name is not None and out is not None}
