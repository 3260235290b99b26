"""Validation every N steps through the generation code users run: `ImagePrompter` on a diffusers pipeline built
around the UNet being trained (DDIM, classifier-free guidance), for a fixed set of references × prompts.

Each validation writes a grid PNG (row r: reference r, then one sample per prompt) and, when a judge CLIP is given,
CLIP-I (sample vs. its first reference) and CLIP-T (sample vs. its prompt, non-empty prompts only) from the
evaluation stack, logged to TensorBoard with the grid.

The prompts and references never change, so the first validation encodes them (`Encoded`) and the later ones draw
from those tensors: a run from the feature cache loads its text and image encoders (ChatGLM: 12 GB in fp16, FLUX's
T5: 9.5 GB) once, not at every validation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
from PIL import Image

from ipadapter.errors import IPAdapterError

logger = logging.getLogger("ipadapter.train")


Features = tuple[torch.Tensor, ...]


@dataclass
class Encoded:
    """What every validation of a run shares, encoded by the first: each prompt as the pipeline takes it back, and
    each reference's image features with the unconditional ones."""

    prompts: list[dict[str, torch.Tensor]]
    references: list[tuple[Features, Features]]


@dataclass
class ValidationReference:
    images: list[Image.Image]  # the condition: one image per reference
    face_embeds: torch.Tensor | None = None  # (K, D) ID embeddings for FaceID variants


def validation_references(run: Any, count: int = 4) -> list[ValidationReference]:
    """`validation_images` (in groups of `references`), else the condition images of the data's first samples."""
    from ipadapter.train.data import SkipSample, load_id_embed, open_image
    from ipadapter.train.feed import open_stream

    config = run.config
    k = config.references
    found: list[ValidationReference] = []
    if config.validation_images and not config.needs_id_embeds:
        paths = [Path(p) for p in config.validation_images]
        for i in range(0, len(paths) - k + 1, k):
            try:
                found.append(ValidationReference([open_image(p, "validation image") for p in paths[i : i + k]]))
            except SkipSample as skip:
                logger.warning("validation reference %s not used: %s", paths[i], skip)
    else:
        stream = open_stream(config, 0, 1, single_pass=True, shuffle=False)
        for _ in range(4 * count):
            record = stream.next_record()
            if record is None or len(found) == count:
                break
            try:
                images = [open_image(r, "reference image") for r in record.refs] or [open_image(record.image)]
                ids = torch.stack([load_id_embed(e, config.id_dim) for e in record.id_embeds]) \
                    if config.needs_id_embeds else None
            except SkipSample:  # a bad reference is skipped here as in training
                continue
            if len(images) == k:
                found.append(ValidationReference(images, ids))
    if not found:
        raise IPAdapterError("no usable validation reference (check --validation-images or the data)")
    return found[:count]


def build_pipeline(unet: Any, vae: Any, tokenizers: list[Any], text_encoders: list[Any],
                   scheduler_config: dict[str, Any]) -> Any:
    """The diffusers text-to-image pipeline of the base (SD, SDXL or Kolors, told by the UNet's config) around the
    given parts, DDIM scheduler; no tokenizers and text encoders: one that takes its prompts encoded."""
    from diffusers import DDIMScheduler, KolorsPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from ipadapter.train.chatglm import is_kolors

    scheduler = DDIMScheduler.from_config(scheduler_config)
    tok, enc = (list(tokenizers) or [None, None]), (list(text_encoders) or [None, None])
    if is_kolors(unet.config):
        pipe = KolorsPipeline(vae=vae, text_encoder=enc[0], tokenizer=tok[0], unet=unet, scheduler=scheduler)
    elif unet.config.addition_embed_type == "text_time":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc[0], text_encoder_2=enc[1], tokenizer=tok[0],
                                         tokenizer_2=tok[1], unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=enc[0], tokenizer=tok[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_grid(references: list[Image.Image], rows: list[list[Image.Image]], size: int) -> Image.Image:
    """One row per reference: the reference (centre crop of its shortest side), then its sample for each prompt;
    no header, so cell (c, r) is at (c·size, r·size)."""
    from PIL import ImageOps

    from ipadapter.evaluate.grid import image_grid

    crops = [ImageOps.fit(ref.convert("RGB"), (size, size)) for ref in references]
    columns = [("", crops), *(("", [row[k] for row in rows]) for k in range(len(rows[0]) if rows else 0))]
    return image_grid(columns, cell=size, title_lines=0)


class Validator:
    """The fixed references, prompts and judge of a run; `run(step, adapter)` makes one validation."""

    def __init__(self, run: Any, references: list[ValidationReference], judge: Any = None) -> None:
        self.run_state, self.references, self.judge = run, references, judge
        self.encoded: Encoded | None = None
        self.vae: Any = None  # a cached run's VAE, once loaded: on the CPU between validations

    @property
    def needs_encoders(self) -> bool:
        """Whether the next validation encodes the prompts and references (the first), so needs the encoders."""
        return self.encoded is None

    @classmethod
    def prepare(cls, run: Any) -> "Validator":
        from ipadapter.evaluate.judges import ClipJudge

        config = run.config
        judge = ClipJudge.load(config.validation_judge) if config.validation_judge else None
        return cls(run, validation_references(run), judge)

    def _parts(self) -> tuple[Any, list[Any], list[Any], Any]:
        """VAE, and for the first validation the text models and image encoder: the run's own, or loaded for this
        validation when it trains from the feature cache (the encoders leave memory again afterwards, the VAE stays
        on the CPU)."""
        from ipadapter.train.models import freeze, load_text_encoders, load_vae, place_frozen
        from ipadapter.train.feed import load_image_encoder

        run = self.run_state
        config, m = run.config, run.models
        if m.vae is None and self.vae is None:
            self.vae = load_vae(config.base)
        vae = m.vae if m.vae is not None else self.vae
        tokenizers, encoders, encoder = [], [], None
        if self.needs_encoders:
            tokenizers, encoders = (m.tokenizers, m.text_encoders) if m.text_encoders else \
                load_text_encoders(config.base, m.unet.config)
            encoder = load_image_encoder(config) if run.encoder is None and run.features else run.encoder
        # in the run's precision, as the UNet is (a base stored in fp16 loads as fp16); the run's own are there already
        place_frozen(run.accelerator.device, run.weight_dtype, vae, [*encoders, encoder.model if encoder else None])
        freeze(vae, *encoders, encoder.model if encoder is not None else None)
        return vae, tokenizers, encoders, encoder

    @torch.no_grad()
    def run(self, step: int, adapter: Any) -> dict[str, float]:
        """A UNet run's validation: a pipeline around the UNet being trained, in the run's autocast."""
        run = self.run_state
        vae, tokenizers, encoders, encoder = self._parts()
        pipe = build_pipeline(run.models.unet, vae, tokenizers, encoders, run.scheduler_config)
        was_training = run.models.unet.training
        run.models.unet.eval()
        try:
            return self.sample(step, pipe, adapter, encoder, precision=run.accelerator.autocast)
        finally:
            run.models.unet.train(was_training)
            if self.vae is not None:  # training holds no more on the device than before
                self.vae.to("cpu")

    @torch.no_grad()
    def sample(self, step: int, pipe: Any, adapter: Any, encoder: Any,
               precision: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, float]:
        """The grid (and metrics) of `adapter` on `pipe`, any pipeline `ImagePrompter` takes (a FLUX or SD 3 run's
        own), written to validation/step-<step>.png; the images generated inside `precision()` (a run's autocast),
        the metrics outside it. The first call encodes with `pipe`'s text encoders and `encoder`; later calls need
        neither (a pipeline without text encoders, encoder None)."""
        from ipadapter.prompter import ImagePrompter

        config = self.run_state.config
        prompter = ImagePrompter(pipe, {"0": adapter}, encoder)
        rows, samples, shown = [], [], []
        try:
            with precision():
                encoded = self.encoded = self.encoded or self._encode(prompter, adapter)
                for ref, (cond, uncond) in zip(self.references, encoded.references):
                    refs = prompter.references(features=cond, negative=uncond)
                    row = [prompter.generate({"0": refs}, steps=config.validation_steps,
                                             guidance=config.validation_guidance, seed=config.seed,
                                             width=config.resolution, height=config.resolution, **prompt)[0]
                           for prompt in encoded.prompts]
                    rows.append(row)
                    samples += row
                    shown.append(ref.images[0])
        finally:
            prompter.detach()
        grid = validation_grid(shown, rows, config.resolution)
        path = Path(config.output) / "validation" / f"step-{step:08d}.png"
        from ipadapter.atomic import save_png

        save_png(grid, path)
        metrics = self._metrics(samples, shown)
        self._log(step, np.asarray(grid), metrics)
        return metrics

    def _encode(self, prompter: Any, adapter: Any) -> Encoded:
        from ipadapter.prompt_embeds import encode_prompt

        prompts = [encode_prompt(prompter.pipe, prompt) for prompt in self.run_state.config.validation_prompts]
        references = [(prompter.features(adapter, ref.images, ref.face_embeds), prompter.uncond_features(adapter, 1))
                      for ref in self.references]
        return Encoded(prompts, references)

    def _metrics(self, samples: list[Image.Image], references: list[Image.Image]) -> dict[str, float]:
        from ipadapter.evaluate.metrics import clip_i, clip_t

        if self.judge is None:
            return {}
        prompts = list(self.run_state.config.validation_prompts)
        per = len(prompts)
        out = {"clip_i": float(clip_i(self.judge, samples, references, per_reference=per).mean())}
        texted = [(s, prompts[i % per]) for i, s in enumerate(samples) if prompts[i % per]]
        if texted:
            out["clip_t"] = float(clip_t(self.judge, [s for s, _ in texted], [t for _, t in texted]).mean())
        return out

    def _log(self, step: int, grid: np.ndarray, metrics: dict[str, float]) -> None:
        acc = self.run_state.accelerator
        if metrics:
            logger.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if not acc.log_with:
            return
        acc.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
        try:
            acc.get_tracker("tensorboard").log_images({"validation": grid}, step=step, dataformats="HWC")
        except (ValueError, AttributeError):  # another tracker than TensorBoard: the grid PNG is on disk
            pass
