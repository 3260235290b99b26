"""Request handling for the app: the model loaded once, one generation at a time, every refusal one sentence.

The page queues users (Gradio's queue, one worker); the lock here keeps the shared pipeline safe for any other
caller too. The prompter, and with it the encoder's embedding cache, lives as long as the service, so a reference
used again is not encoded again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ipadapter.app.command import generate_command, model_flags
from ipadapter.app.form import Form
from ipadapter.app.limits import UploadLimits, open_upload
from ipadapter.app.masks import fit_mask, full_mask
from ipadapter.conditioning.masks import load_mask
from ipadapter.conditioning.presets import available_presets
from ipadapter.loading import Loaded
from ipadapter.paired_text import PairedText
from ipadapter.request import GenerationRequest, build_prompt

Progress = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass
class Result:
    images: list[Image.Image]
    command: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Masks:
    """The masks of one request: tensors for the request, their files for the command, what was changed."""

    tensors: list[torch.Tensor] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class GenerationService:
    """Turns page forms into images with one loaded prompter; writes the masks it used under `workdir`."""

    def __init__(self, loaded: Loaded, model: Sequence[str], *, limits: UploadLimits, workdir: str | Path) -> None:
        self.loaded = loaded
        self.model = list(model)
        self.limits = limits
        self.workdir = Path(workdir)
        self.default_steps = loaded.default_steps or 30
        unet = getattr(loaded.prompter.pipe, "unet", None)  # FLUX and SD 3 take per-block weights, not presets
        self.presets = available_presets(unet) if unet is not None else ()
        self._lock = threading.Lock()
        self._content_text = PairedText(loaded.prompter.pipe, loaded.prompter.encoder)

    @classmethod
    def from_args(cls, args: Any, *, limits: UploadLimits, workdir: str | Path) -> GenerationService:
        """Load the model the flags name (as `ipadapter generate` does), once."""
        from ipadapter.cli.generate import load_from_flags

        return cls(load_from_flags(args), model_flags(args), limits=limits, workdir=workdir)

    def _masks(self, form: Form, references: list[Image.Image]) -> Masks:
        """One mask file per reference when any is given (the others act everywhere), each the reference's size."""
        out = Masks()
        if not any(m is not None for m in form.masks):
            return out
        folder = self.workdir / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        for i, reference in enumerate(references):
            given = form.masks[i] if i < len(form.masks) else None
            if given is None:
                mask = full_mask(reference.size)
            else:
                self.limits.check_size(*given.size, f"mask {i + 1}")
                mask = fit_mask(given, reference.size)
                if given.size != reference.size:
                    out.notes.append(f"mask {i + 1} ({given.width}x{given.height}) was stretched to its reference's "
                                     f"{reference.width}x{reference.height}")
            path = folder / f"mask-{i + 1}.png"
            mask.save(path)
            out.paths.append(str(path))
            out.tensors.append(load_mask(path))  # read back as the CLI reads it: the same tensor
        return out

    def generate(self, form: Form, progress: Progress | None = None) -> Result:
        """Check the form and its files, then generate; any refusal is an `IPAdapterError` saying what to change."""
        form.check()
        references = [open_upload(p, self.limits, f"reference {i + 1}") for i, p in enumerate(form.references)]
        negative = open_upload(form.negative_image, self.limits, "the negative image") if form.negative_image else None
        masks = self._masks(form, references)
        request = GenerationRequest(
            images=references, scale=form.scale,
            masks=masks.tensors, start=form.start, end=form.end, preset=form.preset or None, combine=form.combine,
            negative_image=negative, content_strength=form.content_strength, seed=form.seed,
        )
        request.validate()
        extra = {"callback_on_step_end": _reporter(progress, form.steps)} if progress else {}
        prompter = self.loaded.prompter
        with self._lock:
            if form.content_subtract.strip():
                request.content_text_embeds = self._content_text(form.content_subtract)
            prompts = build_prompt(prompter, request)
            images = prompter.generate(
                prompts, prompt=form.prompt, negative_prompt=form.negative_prompt, num_images=form.num_images,
                steps=form.steps, guidance=self.loaded.default_guidance, seed=form.seed, **extra,
            )
        return Result(images, generate_command(self.model, form, masks.paths), masks.notes)


def _reporter(progress: Progress, steps: int) -> Callable[..., dict]:
    """A diffusers `callback_on_step_end` that reports each finished step and changes nothing."""

    def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        progress(step + 1, steps)
        return kwargs

    return on_step_end
