"""Generation: a diffusers pipeline with adapters attached. Encode references once, generate, detach.

Works with any pipeline of the SD 1.5 / 2.x / SDXL families (text-to-image, img2img, inpainting, ControlNet,
T2I-Adapter, LCM): only the UNet's cross-attention processors change, so a ControlNet never sees image tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from ipadapter.adapter import IPAdapter
from ipadapter.attach import Attachment, attach
from ipadapter.embed_cache import EmbeddingCache, tensor_key
from ipadapter.encoders import FaceAnalyzer, ImageEncoder
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt, Reference

Features = tuple[torch.Tensor, ...]


class ImagePrompter:
    """Adapters (by name) attached to `pipe.unet`, with the encoders they need."""

    def __init__(
        self, pipe: Any, adapters: IPAdapter | Sequence[IPAdapter] | Mapping[str, IPAdapter],
        image_encoder: ImageEncoder | None = None, face_analyzer: FaceAnalyzer | None = None,
    ) -> None:
        self.pipe = pipe
        self.encoder = image_encoder
        # Shared with the encoder: one size bound for its features and the adapters' projected tokens.
        self.cache = image_encoder.cache if image_encoder is not None else EmbeddingCache()
        self.face_analyzer = face_analyzer
        self.attachment: Attachment = attach(pipe.unet, adapters, scheduler=pipe.scheduler)
        self.adapters = self.attachment.adapters
        for name, adapter in self.adapters.items():
            self._check_encoder(name, adapter)

    def _check_encoder(self, name: str, adapter: IPAdapter) -> None:
        features = adapter.variant.features
        if features in ("global", "patch"):
            if self.encoder is None:
                raise IPAdapterError(f"adapter {name!r} ({adapter.config.variant}) needs a CLIP image encoder")
            self.encoder.check_fits(adapter.config.projection.in_dim, features, f"adapter {name!r}")
        elif features == "faceid+patch" and self.encoder is not None:
            self.encoder.check_fits(adapter.config.projection.clip_dim, "patch", f"adapter {name!r}")

    def adapter(self, name: str | None) -> tuple[str, IPAdapter]:
        if name is None:
            if len(self.adapters) != 1:
                raise IPAdapterError(f"several adapters are attached ({', '.join(self.adapters)}): name one")
            name = next(iter(self.adapters))
        if name not in self.adapters:
            raise IPAdapterError(f"no adapter named {name!r}; attached: {', '.join(self.adapters)}")
        return name, self.adapters[name]

    def features(self, adapter: IPAdapter, images: Sequence[Image.Image], face_embeds: torch.Tensor | None = None) -> Features:
        """Encoder features for a list of images, shaped as the adapter's head takes them."""
        kind = adapter.variant.features
        if kind in ("global", "patch"):
            return (self.encoder.encode(list(images), kind),)
        ids = face_embeds
        crops = list(images)
        if ids is None:
            analyzer = self.face_analyzer or FaceAnalyzer()
            self.face_analyzer = analyzer
            pairs = [analyzer.analyze(img, f"reference {i}") for i, img in enumerate(images)]
            ids, crops = torch.cat([p[0] for p in pairs]), [p[1] for p in pairs]
        ids = ids.to(adapter.device, adapter.dtype)
        if kind == "faceid":
            return (ids,)
        if self.encoder is None:
            raise IPAdapterError(f"{adapter.config.variant} needs a CLIP image encoder for the face crop")
        return ids, self.encoder.encode(crops, "patch")

    def uncond_features(self, adapter: IPAdapter, count: int) -> Features:
        kind = adapter.variant.features
        if kind in ("global", "patch"):
            uncond = self.encoder.uncond(kind)
            return (uncond.expand(count, *uncond.shape[1:]),)
        zeros = torch.zeros(count, adapter.config.projection.in_dim, device=adapter.device, dtype=adapter.dtype)
        if kind == "faceid":
            return (zeros,)
        return zeros, self.encoder.uncond("patch").expand(count, -1, -1)

    @torch.no_grad()
    def project(self, adapter: IPAdapter, features: Features) -> torch.Tensor:
        """Tokens (N, T, C) of N feature rows. A row this adapter projected before (same values, same weights) comes
        from the cache: a repeated reference, and the unconditional image, skip the projection head (a Plus
        resampler costs about as much as a denoising step)."""
        features = tuple(f.to(adapter.device, adapter.dtype) for f in features)
        version = adapter.projection_key()
        keys = [("tokens", version, tensor_key(*(f[i] for f in features))) for i in range(features[0].shape[0])]
        found: dict[tuple, torch.Tensor | None] = {}
        for key in keys:
            if key not in found:
                found[key] = self.cache.get(key)
        todo = [keys.index(k) for k, v in found.items() if v is None]
        if todo:
            for i, tokens in zip(todo, adapter.project(*(f[todo] for f in features))):
                found[keys[i]] = tokens
                self.cache.put(keys[i], tokens)
        return torch.stack([found[k] for k in keys])

    def references(
        self, images: Sequence[Image.Image] | None = None, *, adapter: str | None = None,
        features: Features | None = None, negative: Sequence[Image.Image] | Features | None = None,
        face_embeds: torch.Tensor | None = None, masks: Sequence[torch.Tensor | None] | None = None,
        weights: Sequence[float] | None = None,
    ) -> tuple[str, list[Reference]]:
        """One `Reference` per image (tokens computed here, once), for the named adapter."""
        name, ip = self.adapter(adapter)
        if features is None:
            if not images:
                raise IPAdapterError("give at least one reference image (or precomputed embeddings)")
            features = self.features(ip, images, face_embeds)
        count = features[0].shape[0]
        if negative is None:
            neg_features = self.uncond_features(ip, count)
        elif isinstance(negative, tuple) and all(isinstance(t, torch.Tensor) for t in negative):
            neg_features = negative
        else:
            neg_features = self.features(ip, list(negative))
        if neg_features[0].shape[0] not in (1, count):
            raise IPAdapterError(f"give one negative image, or one per reference ({count}), not {neg_features[0].shape[0]}")
        cond, uncond = self.project(ip, features), self.project(ip, neg_features)
        uncond = uncond.expand(count, -1, -1) if uncond.shape[0] == 1 else uncond
        masks = list(masks) if masks is not None else [None] * count
        weights = list(weights) if weights is not None else [1.0] * count
        if len(masks) != count or len(weights) != count:
            raise IPAdapterError(f"{len(masks)} masks / {len(weights)} weights for {count} reference images")
        return name, [
            Reference(cond=cond[i : i + 1], uncond=uncond[i : i + 1], mask=masks[i], weight=weights[i])
            for i in range(count)
        ]

    def generate(
        self, references: Sequence[Image.Image] | Mapping[str, list[Reference] | AdapterPrompt] | None = None, *,
        prompt: str | list[str] = "", negative_prompt: str | list[str] = "", scale: float = 1.0, num_images: int = 1,
        steps: int | None = None, guidance: float | None = None, seed: int | None = None,
        width: int | None = None, height: int | None = None, **pipe_kwargs: Any,
    ) -> list[Image.Image]:
        """Images from the pipeline with the image prompts applied. `references`: PIL images for the only adapter,
        or a mapping adapter name → references / full `AdapterPrompt` (per-layer weights, window, masks, ...)."""
        if references is None or isinstance(references, Mapping) and not references:
            prompts: dict[str, AdapterPrompt] = {}
        elif isinstance(references, Mapping):
            prompts = {k: v if isinstance(v, AdapterPrompt) else AdapterPrompt(list(v), scale=scale)
                       for k, v in references.items()}
        else:
            name, refs = self.references(list(references))
            prompts = {name: AdapterPrompt(refs, scale=scale)}
        if not prompts and not (prompt if isinstance(prompt, str) else any(prompt)):
            raise IPAdapterError("give a reference image, a text prompt, or both")
        self.attachment.check_intact()
        batch = len(prompt) if isinstance(prompt, list) else 1
        self.attachment.scheduler = self.pipe.scheduler
        self.attachment.set_prompts(prompts, rows=batch * num_images)
        kwargs = {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance), ("width", width),
                                    ("height", height)) if v is not None}
        if seed is not None:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
        try:
            # An empty negative prompt is passed as None so SDXL keeps its zeroed negative embeddings.
            out = self.pipe(prompt=prompt, negative_prompt=negative_prompt or None, num_images_per_prompt=num_images,
                            **kwargs, **pipe_kwargs)
        finally:
            self.attachment.clear()
        return list(out.images)

    def detach(self) -> None:
        self.attachment.detach()


def load_pipeline(
    base: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32, scheduler: str | None = None,
) -> Any:
    """Any diffusers pipeline folder or Hub id; its own saved scheduler unless `scheduler` names another class."""
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(base), dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as err:
        raise IPAdapterError(f"could not load a diffusers pipeline from {base}: {str(err).splitlines()[0][:200]}") from None
    if scheduler:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise IPAdapterError(f"unknown scheduler {scheduler!r} (use a diffusers class name such as DDIMScheduler)")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device)


def _lora_error(err: Exception) -> str:
    """diffusers' or peft's reason a LoRA did not load, as one short clause (theirs list every layer)."""
    text = str(err).strip()
    if "size mismatch" in text:
        last = text.splitlines()[-1].strip()[:160]
        return f"its shapes differ from this model's, it was made for another base model ({last})"
    if "not found in the base model" in text:
        return "none of its layers exist in this model, it was made for another base model"
    return text.splitlines()[0][:200]


def fuse_base_lora(pipe: Any, source: str | os.PathLike, scale: float = 1.0) -> Any:
    """Turn `pipe` into the custom model a LoRA file (or a folder holding one) describes: load it with diffusers,
    fuse it at `scale`, then drop the LoRA layers. Only weight values change, no module or attention processor, so
    adapters attach to the result as to any base model, and fusing before or after attaching gives the same images."""
    import logging
    import warnings
    from pathlib import Path

    from diffusers.utils import logging as diffusers_logging

    path = Path(source)
    if not path.exists():
        raise IPAdapterError(f"LoRA not found: {source}")
    if not hasattr(pipe, "load_lora_weights"):
        raise IPAdapterError(f"{type(pipe).__name__} cannot load a LoRA (use a Stable Diffusion 1.5 / 2.x / SDXL base)")
    folder, weight_name = (path.parent, path.name) if path.is_file() else (path, None)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)  # its own log lines repeat what the error below says
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="base_lora")
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise IPAdapterError(f"could not load the LoRA {source}: {_lora_error(err)}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not any("base_lora" in names for names in pipe.get_list_adapters().values()):
        raise IPAdapterError(f"no layer of this base model matches the LoRA {source}; it was made for another model")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["base_lora"])
    pipe.unload_lora_weights()
    return pipe


def add_controlnet(pipe: Any, source: str | os.PathLike) -> Any:
    """The ControlNet pipeline of `pipe`'s family (SD 1.5 / 2.x or SDXL) on `pipe`'s own components, so the UNet an
    adapter attaches to is the same object; the ControlNet (folder, Hub id, or "owner/repo/subfolder") gets the
    UNet's device and dtype. A ControlNet made for another base model is refused here, not mid-generation."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from ipadapter.sources import split_hub_path

    if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        cls = diffusers.StableDiffusionXLControlNetPipeline
    elif isinstance(pipe, diffusers.StableDiffusionPipeline):
        cls = diffusers.StableDiffusionControlNetPipeline
    else:
        raise IPAdapterError(
            f"a ControlNet needs a Stable Diffusion 1.5 / 2.x or SDXL text-to-image base, not {type(pipe).__name__}"
        )
    repo, subfolder = split_hub_path(str(source))
    if str(repo).startswith((".", os.sep)) and not os.path.exists(repo):
        raise IPAdapterError(f"ControlNet folder not found: {source}")
    try:
        controlnet = diffusers.ControlNetModel.from_pretrained(repo, subfolder=subfolder, dtype=pipe.unet.dtype)
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"could not load a ControlNet from {source}: {str(err).splitlines()[0][:200]}") from None
    mine, base = controlnet.config, pipe.unet.config
    widths, base_widths = tuple(mine.block_out_channels), tuple(base.block_out_channels)
    if mine.cross_attention_dim != base.cross_attention_dim or widths != base_widths:
        raise IPAdapterError(
            f"the ControlNet {source} was made for another base model (widths {widths}, text width "
            f"{mine.cross_attention_dim}; this UNet: {base_widths}, {base.cross_attention_dim})"
        )
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # from_pipe's dtype cast warns once per model though nothing changes
    try:
        out = cls.from_pipe(pipe, controlnet=controlnet.to(pipe.unet.device), dtype=pipe.unet.dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return out
