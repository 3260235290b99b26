"""Generation: a diffusers pipeline with adapters attached. Encode references once, generate, detach.

Works with any pipeline of the SD 1.5 / 2.x / SDXL families (text-to-image, img2img, inpainting, ControlNet,
T2I-Adapter, LCM): only the UNet's cross-attention processors change, so a ControlNet never sees image tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from ipadapter.adapter import IPAdapter
from ipadapter.attach import Attachment, attach
from ipadapter.dit.attach import DiTAttachment, attach_dit
from ipadapter.dit.blocks import denoiser_of, is_dit
from ipadapter.embed_cache import EmbeddingCache, tensor_key
from ipadapter.encoders import FaceAnalyzer, ImageEncoder
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt, Reference

Features = tuple[torch.Tensor, ...]


class ImagePrompter:
    """Adapters (by name) attached to `pipe.unet` (or `pipe.transformer` for FLUX and SD 3), with the encoders they need.

    Attached from construction until `detach()`, or for the duration of a `with` block: on exit every attention
    processor of the UNet is the original object again and the pipeline's outputs are bitwise its own.
    """

    def __init__(
        self, pipe: Any, adapters: IPAdapter | Sequence[IPAdapter] | Mapping[str, IPAdapter],
        image_encoder: ImageEncoder | None = None, face_analyzer: FaceAnalyzer | None = None, *,
        cache_kv: bool = False,
    ) -> None:
        """`cache_kv=True` keeps each layer's K'/V' for the whole generation (and the next one while the references
        and weights are unchanged): two small projections fewer per layer and step, which counts where Python and
        dispatch decide (small models, fast GPUs), for memory held through the denoising loop (2 CFG rows · tokens ·
        Σ 2 × layer width numbers per reference: 5 MiB for SDXL's base adapter at fp32). The default projects them at
        every call, as diffusers does, so the peak memory is never above diffusers'. A compiled UNet makes them once
        per generation either way (its graph reads them as prepared tensors)."""
        self.pipe = pipe
        self.encoder = image_encoder
        # Shared with the encoder: one size bound for its features and the adapters' projected tokens.
        self.cache = image_encoder.cache if image_encoder is not None else EmbeddingCache()
        self.face_analyzer = face_analyzer
        denoiser = denoiser_of(pipe)
        attach_to = attach_dit if is_dit(denoiser) else attach
        self.attachment: Attachment | DiTAttachment = attach_to(denoiser, adapters, scheduler=pipe.scheduler)
        self.attachment.runtime.cache_kv = cache_kv
        self.attachment.pipeline = pipe  # FLUX: its loop says which step each call is (no wait for the GPU)
        self.adapters = self.attachment.adapters
        for name, adapter in self.adapters.items():
            self._check_encoder(name, adapter)

    def _check_encoder(self, name: str, adapter: IPAdapter) -> None:
        variant = adapter.variant
        if not variant.clip:
            return
        if self.encoder is None:  # features may come precomputed; images are refused where they are encoded
            return
        self.encoder.check_fits(adapter.clip_width, variant.clip, f"adapter {name!r}")

    def adapter_name(self, name: str | None) -> str:
        """`name` checked against the attached adapters; None names the only one."""
        if name is None:
            if len(self.adapters) != 1:
                raise IPAdapterError(f"several adapters are attached ({', '.join(self.adapters)}): name one")
            name = next(iter(self.adapters))
        if name not in self.adapters:
            raise IPAdapterError(f"no adapter named {name!r}; attached: {', '.join(self.adapters)}")
        return name

    def adapter(self, name: str | None = None) -> IPAdapter:
        """The attached adapter called `name` (None: the only one)."""
        return self.adapters[self.adapter_name(name)]

    def set_s_scale(self, value: float) -> None:
        """The weight of FaceID-PlusV2's shortcut (`id_tokens + s_scale · perceiver(...)`) on every attached adapter
        that has one; a value that no attached adapter would use is refused rather than dropped."""
        shortcuts = [adapter for adapter in self.adapters.values() if adapter.variant.shortcut]
        if value != 1.0 and not shortcuts:
            names = ", ".join(adapter.variant.name for adapter in self.adapters.values())
            raise IPAdapterError(f"s_scale= scales a FaceID adapter's shortcut (FaceID-PlusV2); no attached adapter "
                                 f"({names}) has one")
        for adapter in shortcuts:
            adapter.image_proj.s_scale = value

    def features(self, adapter: IPAdapter, images: Sequence[Image.Image], face_embeds: torch.Tensor | None = None) -> Features:
        """Encoder features for a list of images, shaped as the adapter's head takes them: (ID embeddings, CLIP
        features of the face crops) for FaceID variants, CLIP features alone otherwise."""
        variant = adapter.variant
        if not variant.face_id:
            if self.encoder is None:
                raise IPAdapterError(f"{variant.name} needs a CLIP image encoder for reference images (give "
                                     "image_encoder, or precomputed features)")
            return (self.encoder.encode(list(images), variant.clip),)
        ids = face_embeds
        crops = list(images)
        if ids is None:
            analyzer = self.face_analyzer or FaceAnalyzer()
            self.face_analyzer = analyzer
            pairs = [analyzer.analyze(img, f"reference {i}") for i, img in enumerate(images)]
            ids, crops = torch.cat([p[0] for p in pairs]), [p[1] for p in pairs]
        ids = ids.to(adapter.device, adapter.dtype)
        if not variant.clip:
            return (ids,)
        if self.encoder is None:
            raise IPAdapterError(f"{variant.name} needs a CLIP image encoder for the face crop")
        return ids, self.encoder.encode(crops, variant.clip)

    def uncond_features(self, adapter: IPAdapter, count: int) -> Features:
        """The variant's unconditional input: a zero embedding for global and ID features, the encoder's output on
        zero pixels for patch features (not kept by the encoder: the prompter keeps their tokens instead)."""
        variant = adapter.variant
        if variant.clip and self.encoder is None:
            raise IPAdapterError(f"{variant.name} needs a CLIP image encoder for its unconditional image (give "
                                 "image_encoder, or negative features)")
        clip = self.encoder.uncond(variant.clip, keep=False) if variant.clip else None
        if not variant.face_id:
            return (clip.expand(count, *clip.shape[1:]),)
        zeros = torch.zeros(count, adapter.config.projection.in_dim, device=adapter.device, dtype=adapter.dtype)
        return (zeros,) if clip is None else (zeros, clip.expand(count, *clip.shape[1:]))

    @torch.no_grad()
    def project(self, adapter: IPAdapter, features: Features) -> torch.Tensor:
        """Tokens (N, T, C) of N feature rows. A row this adapter projected before (same values, same weights) comes
        from the cache: a repeated reference, and the unconditional image, skip the projection head (a Plus
        resampler costs about as much as a denoising step)."""
        device, dtype = adapter.placement()
        features = tuple(f.to(device, dtype) for f in features)
        version = adapter.projection_key()
        keys = [("tokens", version, tensor_key(*(f[i] for f in features))) for i in range(features[0].shape[0])]
        found: dict[tuple, torch.Tensor | None] = {}
        for key in keys:
            if key not in found:
                found[key] = self.cache.get(key)
        todo = [keys.index(k) for k, v in found.items() if v is None]
        rows = features if len(todo) == len(keys) else tuple(f[todo] for f in features)
        projected = adapter.project(*rows) if todo else None
        for i, tokens in zip(todo, projected if projected is not None else ()):
            found[keys[i]] = tokens
            self.cache.put(keys[i], tokens)
        # The cache's own storage where it can be (every row new and distinct, or a single row): a stacked copy would
        # hold the tokens twice through the generation.
        if projected is not None and len(todo) == len(keys):
            return projected
        if len(keys) == 1:
            return found[keys[0]][None]
        return torch.stack([found[k] for k in keys])

    @torch.no_grad()
    def uncond_tokens(self, adapter: IPAdapter) -> torch.Tensor:
        """The unconditional image's tokens (1, T, C), cached under the adapter's weights and the encoder's identity.
        The features they come from are made again on a miss and not kept: for patch features they are as large as a
        reference's (1.3 MiB for ViT-H), and would be held through every generation for this lookup alone."""
        enc = self.encoder
        encoder = None if enc is None else (enc.identity(), enc.dtype, enc.device)
        key = ("uncond", adapter.projection_key(), encoder, adapter.variant.name)
        found = self.cache.get(key)
        if found is None:
            features = self.uncond_features(adapter, 1)
            found = adapter.project(*(f.to(adapter.device, adapter.dtype) for f in features))[0]
            self.cache.put(key, found)
        return found[None]

    def references(
        self, images: Sequence[Image.Image] | None = None, *, adapter: str | None = None,
        features: Features | None = None, negative: Sequence[Image.Image] | Features | None = None,
        face_embeds: torch.Tensor | None = None, masks: Sequence[torch.Tensor | None] | None = None,
        weights: Sequence[float] | None = None,
    ) -> list[Reference]:
        """One `Reference` per image (tokens computed here, once), for the named adapter (or the only one)."""
        ip = self.adapter(adapter)
        if features is None:
            if not images:
                raise IPAdapterError("give at least one reference image (or precomputed embeddings)")
            features = self.features(ip, images, face_embeds)
        count = features[0].shape[0]
        if negative is None:
            uncond = self.uncond_tokens(ip)
        else:
            if isinstance(negative, tuple) and all(isinstance(t, torch.Tensor) for t in negative):
                neg_features = negative
            else:
                neg_features = self.features(ip, list(negative))
            if neg_features[0].shape[0] not in (1, count):
                raise IPAdapterError(
                    f"give one negative image, or one per reference ({count}), not {neg_features[0].shape[0]}")
            uncond = self.project(ip, neg_features)
        cond = self.project(ip, features)
        uncond = uncond.expand(count, -1, -1) if uncond.shape[0] == 1 else uncond
        masks = list(masks) if masks is not None else [None] * count
        weights = list(weights) if weights is not None else [1.0] * count
        if len(masks) != count or len(weights) != count:
            raise IPAdapterError(f"{len(masks)} masks / {len(weights)} weights for {count} reference images")
        return [
            Reference(cond=cond[i : i + 1], uncond=uncond[i : i + 1], mask=masks[i], weight=weights[i])
            for i in range(count)
        ]

    def generate(
        self, references: Image.Image | Sequence[Image.Image] | Mapping[str, Any] | None = None, *,
        prompt: str | list[str] | None = "", negative_prompt: str | list[str] | None = "", scale: float = 1.0,
        num_images: int = 1,
        steps: int | None = None, guidance: float | None = None, seed: int | None = None,
        width: int | None = None, height: int | None = None, **pipe_kwargs: Any,
    ) -> list[Image.Image]:
        """Images from the pipeline with the image prompts applied. `references`: a PIL image or a list of them for
        the only adapter, or a mapping adapter name → image(s), `Reference`s, or a full `AdapterPrompt` (per-layer
        weights, window, masks, ...). `scale` applies to all but the `AdapterPrompt`s, which carry their own.
        The text may come encoded instead, as the pipeline takes it (`prompt_embeds`, `negative_prompt_embeds`,
        pooled ones: a prompt-weighting library's output, or a training run's validation prompts)."""
        if references is None:
            references = {}
        elif not isinstance(references, Mapping):
            references = {self.adapter_name(None): references}
        prompts = {name: self._prompt(name, given, scale) for name, given in references.items()}
        embeds = pipe_kwargs.get("prompt_embeds")
        for text, given in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if _has_text(given) and pipe_kwargs.get(f"{text}_embeds") is not None:
                raise IPAdapterError(f"give {text} or {text}_embeds, not both")
        if not prompts and not _has_text(prompt) and embeds is None:
            raise IPAdapterError("give a reference image, a text prompt, or both")
        if steps is not None:
            self._check_steps(steps)
        self.attachment.check_intact()
        batch = embeds.shape[0] if embeds is not None else len(prompt) if isinstance(prompt, list) else 1
        self.attachment.scheduler = self.pipe.scheduler
        self.attachment.set_prompts(prompts, rows=batch * num_images)
        kwargs = {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance), ("width", width),
                                    ("height", height)) if v is not None}
        if seed is not None:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
        try:
            # An empty negative prompt is passed as None so SDXL keeps its zeroed negative embeddings; FLUX's true CFG
            # runs only with a negative prompt, so there an empty one is passed as such.
            true_cfg = pipe_kwargs.get("true_cfg_scale", 1.0) > 1.0
            negative = negative_prompt or ("" if true_cfg and pipe_kwargs.get("negative_prompt_embeds") is None
                                           else None)
            out = self.pipe(prompt=None if embeds is not None else prompt, negative_prompt=negative,
                            num_images_per_prompt=num_images,
                            **kwargs, **pipe_kwargs)
        finally:
            self.attachment.clear()
        return list(out.images)

    def _check_steps(self, steps: int) -> None:
        """One sentence where the scheduler would fail deep in the pipeline (a ValueError, or an IndexError at its
        first step): more steps than training timesteps, or, with "leading" spacing, more than those less its
        `steps_offset` (SD 1.5's schedulers at 1000 steps start at timestep 1000, one past the last; the ones that
        interpolate sigmas, as Euler, would run it, but a schedule past the training range is refused for all)."""
        config = self.pipe.scheduler.config
        limit = getattr(config, "num_train_timesteps", None)
        if not limit:
            return
        if steps > limit:
            raise IPAdapterError(f"steps={steps} is more than the scheduler's {limit} training timesteps")
        offset = getattr(config, "steps_offset", 0) if getattr(config, "timestep_spacing", None) == "leading" else 0
        if steps > limit - offset:
            raise IPAdapterError(f"steps={steps} is more than the scheduler's 'leading' spacing fits in its {limit} "
                                 f"training timesteps from its steps_offset of {offset}: at most {limit - offset}")

    def _prompt(self, name: str, given: Any, scale: float) -> AdapterPrompt:
        if isinstance(given, AdapterPrompt):
            return given
        given = [given] if isinstance(given, Image.Image) else list(given)
        if not given or all(isinstance(g, Image.Image) for g in given):
            given = self.references(given, adapter=name)
        return AdapterPrompt(given, scale=scale)

    def detach(self) -> None:
        self.attachment.detach()

    def __enter__(self) -> ImagePrompter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _has_text(prompt: str | list[str] | None) -> bool:
    return any(prompt) if isinstance(prompt, list) else bool(prompt)
