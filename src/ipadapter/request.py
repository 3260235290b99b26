"""A generation request as data, and how its control options become the processors' `AdapterPrompt`s.

The CLI, the app and the evaluation all build a `GenerationRequest`; `build_prompt` turns reference images and
options (crop, tiles, masks, combine mode, negatives, content subtraction, presets, window, scaling) into tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ipadapter.conditioning.combine import combine
from ipadapter.conditioning.images import load_image, prepare_image, tile_image
from ipadapter.conditioning.masks import load_masks
from ipadapter.conditioning.negatives import noise_negative, parse_noise, subtract_content
from ipadapter.conditioning.presets import preset
from ipadapter.conditioning.schedules import check_window
from ipadapter.errors import IPAdapterError
from ipadapter.prompter import Features, ImagePrompter
from ipadapter.runtime import AdapterPrompt

# The options that act on the image prompt alone (`ipadapter generate`'s flag, its name there and in a manifest, its
# default): with no reference image (or saved embeddings of one) there is no image prompt, so a value other than the
# default would be silently dropped and is refused instead (the CLI by flag, a manifest job by key). A face embedding
# is a reference of its own for the FaceID variant that reads nothing else (`build_prompt`).
IMAGE_OPTIONS: tuple[tuple[str, str, Any], ...] = (
    ("--scale", "scale", 1.0), ("--negative-image", "negative_image", None), ("--noise", "noise", None),
    ("--start", "start", 0.0), ("--end", "end", 1.0), ("--preset", "preset", None),
    ("--embeds-scaling", "embeds_scaling", "v"), ("--crop", "crop", "center"), ("--tiles", "tiles", False),
    ("--mask", "mask", []), ("--image-weight", "image_weight", None), ("--combine", "combine", "concat"),
    ("--content-subtract", "content_subtract", None),
)
# The options that only change what another option does (the flag, its name, its default, then the flag and name of
# the option it needs): without that option a value other than the default would be silently ignored, so it is
# refused (the CLI by flag, a manifest job by key).
MODIFIERS: tuple[tuple[str, str, Any, str, str], ...] = (
    ("--content-strength", "content_strength", 1.0, "--content-subtract", "content_subtract"),
)


@dataclass
class GenerationRequest:
    """Everything a user can ask of one image prompt (CLI flags map one to one); the text prompt, seed for the
    pipeline and image count go to `ImagePrompter.generate` directly."""

    images: list[Image.Image] = field(default_factory=list)
    scale: float = 1.0
    masks: list[torch.Tensor] = field(default_factory=list)
    start: float = 0.0
    end: float = 1.0
    preset: str | None = None
    combine: str = "concat"
    image_weights: list[float] | None = None
    negative_image: Image.Image | None = None
    noise: tuple[str, float] | None = None
    content_text_embeds: torch.Tensor | None = None
    content_strength: float = 1.0
    embeds_scaling: str = "v"
    crop: str = "center"
    tiles: bool = False
    features: tuple[torch.Tensor, ...] | None = None
    lora_scale: float = 1.0
    face_embeds: torch.Tensor | None = None
    seed: int = 0

    def validate(self) -> None:
        if not math.isfinite(self.scale):
            raise IPAdapterError(f"scale= must be a finite number, got {self.scale}")
        check_window(self.start, self.end)
        if self.masks and len(self.masks) != len(self.images):
            raise IPAdapterError(f"got {len(self.masks)} mask(s) for {len(self.images)} reference image(s); give one per image")
        if self.tiles and self.masks:
            raise IPAdapterError("tiles= makes its own per-tile masks; do not combine it with masks=")


def load_request(options: Mapping[str, Any]) -> GenerationRequest:
    """A request from `ipadapter generate`'s options by name (its flags, or a manifest job): files are read here."""
    images = [load_image(p) for p in options["image"]]
    request = GenerationRequest(
        images=images, scale=options["scale"],
        masks=load_masks(options["mask"], len(images)) if options["mask"] else [], start=options["start"],
        end=options["end"], preset=options["preset"], combine=options["combine"], image_weights=options["image_weight"],
        negative_image=load_image(options["negative_image"]) if options["negative_image"] else None,
        noise=parse_noise(options["noise"]) if options["noise"] else None,
        content_strength=options["content_strength"], embeds_scaling=options["embeds_scaling"],
        crop=options["crop"], tiles=options["tiles"], lora_scale=options["lora_scale"], seed=options["seed"],
    )
    request.validate()
    return request


def _prepared(prompter: ImagePrompter, images: list[Image.Image], crop: str) -> list[Image.Image]:
    """Crop position is applied before the encoder's own resize + centre crop (which then changes nothing)."""
    if crop == "center" or prompter.encoder is None:
        return images
    size = prompter.encoder.model.config.image_size
    return [prepare_image(img, size, crop=crop) for img in images]


def _combined(features: Features, mode: str, weights: list[float] | None) -> Features:
    """The references' features merged into one by `mode` (see `conditioning.combine`), each feature tensor alike."""
    count = features[0].shape[0]
    return tuple(combine([f[i : i + 1] for i in range(count)], mode, weights) for f in features)


def build_prompt(prompter: ImagePrompter, request: GenerationRequest, adapter: str | None = None) -> dict[str, AdapterPrompt]:
    """The adapter prompt(s) for one request: tokens computed here, once per generation."""
    request.validate()
    name = prompter.adapter_name(adapter)
    ip = prompter.adapters[name]
    if request.lora_scale != 1.0 and not ip.variant.lora:
        raise IPAdapterError(f"lora_scale= scales a FaceID adapter's LoRA; this adapter ({ip.variant.name}) has none")
    images, masks = list(request.images), list(request.masks) or [None] * len(request.images)
    if request.tiles and images:
        tiled = [t for img in images for t in tile_image(img)]
        images, masks = [t.image for t in tiled], [t.mask() for t in tiled]
    images = _prepared(prompter, images, request.crop)
    features = request.features
    if features is None:
        if not images and request.face_embeds is None:
            return {}
        if not images and (not ip.variant.face_id or ip.variant.clip):  # FaceID without CLIP needs only the ID
            raise IPAdapterError(f"face_embeds= alone prompts the FaceID adapter that reads only the ID embedding; "
                                 f"{ip.variant.name} also needs the face image (image=)")
        features = prompter.features(ip, images, request.face_embeds)
    if request.content_text_embeds is not None:
        features = (subtract_content(features[0], request.content_text_embeds, request.content_strength, ip.variant),
                    *features[1:])
    if not any(m is not None for m in masks):
        masks = [None] * features[0].shape[0]
    negative: list[Image.Image] | Features | None = None
    if request.negative_image is not None:
        negative = [request.negative_image]
    elif request.noise is not None and images:
        kind, strength = request.noise
        negative = [noise_negative(img, kind, strength, seed=request.seed) for img in images]
    weights = request.image_weights
    if request.combine != "concat" and features[0].shape[0] > 1:
        if any(m is not None for m in masks):
            raise IPAdapterError("masked references cannot be combined into one; use combine=concat with masks=")
        features = _combined(features, request.combine, weights)
        if request.noise is not None and negative is not None:  # one noise negative per image: combined alike
            negative = _combined(prompter.features(ip, negative), request.combine, weights)
        masks, weights = [None], None
    refs = prompter.references(adapter=name, features=features, negative=negative, masks=masks, weights=weights)
    layer_weights, uncond_layers = None, frozenset()
    if request.preset:
        if getattr(prompter.pipe, "unet", None) is None:
            raise IPAdapterError("preset= names UNet layers; on FLUX and SD 3 give per-block weights instead "
                                 "(AdapterPrompt.layer_weights keyed by block names such as transformer_blocks.0.attn)")
        chosen = preset(request.preset, prompter.pipe.unet, references=len(refs))
        uncond_layers = chosen.uncond_layers
        if chosen.references == 1:
            layer_weights = chosen.layer_weights[0]
        elif len(refs) > chosen.references:
            raise IPAdapterError(f"preset {request.preset!r} takes {chosen.references} reference images, one per "
                                 f"role, got {len(refs)}")
        else:
            for ref, per_ref in zip(refs, chosen.layer_weights):
                ref.layer_weights = per_ref
    return {name: AdapterPrompt(refs, scale=request.scale, layer_weights=layer_weights, uncond_layers=uncond_layers,
                                start=request.start, end=request.end, scaling=request.embeds_scaling,
                                lora_scale=request.lora_scale)}
