"""The frozen base a run trains against, from a diffusers pipeline folder (or Hub id), or a whole checkpoint in one
file (`ipadapter.single_file`: its parts laid out as its family's published configs, which are read for them).

A base is a folder with `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler` (+ `text_encoder_2`, `tokenizer_2`
for SDXL; Kolors' text encoder is ChatGLM: `train/chatglm.py`). The image encoder is `ipadapter.encoders.ImageEncoder`, the one inference uses. Loaders raise
`IPAdapterError` sentences, never tracebacks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ipadapter import single_file
from ipadapter.errors import FieldError, IPAdapterError, first_clause
from ipadapter.sources import base_part, from_cache_or_hub, read_config
from ipadapter.train import chatglm
from ipadapter.validation import vae_downscale


@dataclass
class BaseModels:
    """The base pipeline's parts. Encoders may be None when training from a feature cache."""

    unet: nn.Module
    scheduler_config: dict[str, Any]
    vae: nn.Module | None = None
    tokenizers: list[Any] = field(default_factory=list)
    text_encoders: list[nn.Module] = field(default_factory=list)
    name: str = ""

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def is_kolors(self) -> bool:
        return chatglm.is_kolors(self.unet.config)

    @property
    def cross_dim(self) -> int:
        return cross_dim(self.unet.config)


def cross_dim(unet_config: Any) -> int:
    """The text tokens' width an adapter's K'/V' read: a UNet config may give one per block, the first is taken."""
    dim = unet_config.cross_attention_dim
    return dim if isinstance(dim, int) else dim[0]


def _has(source: str, subfolder: str) -> bool:
    path = Path(source)
    return (path / subfolder).is_dir() if path.is_dir() else True


def base_configs(source: str, models: BaseModels | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The UNet's and VAE's configs (no weights read): enough to check a resolution before loading anything. Given
    `models` (already in memory), theirs."""
    if models is not None:
        return dict(models.unet.config), dict(models.vae.config) if models.vae else {}
    from diffusers import AutoencoderKL, UNet2DConditionModel

    family = single_file.TRANSFORMER_FAMILIES.get(single_file.family(source)[0]) \
        if single_file.is_single_file(source) else None
    if family is not None:
        raise IPAdapterError(f"{source} is a transformer of {family.label}, which UNet variants do not train: give "
                             f"--variant {family.variants}")
    layout = single_file.configs_of(source)
    return read_config(UNet2DConditionModel, layout, "unet"), read_config(AutoencoderKL, layout, "vae")


def resolution_step(unet_config: dict[str, Any], vae_config: dict[str, Any]) -> int:
    """Pixel sizes must be multiples of the VAE's downscale × the UNet's."""
    unet_scale = 2 ** (len(unet_config["down_block_types"]) - 1)
    return vae_downscale(vae_config) * unet_scale


def check_resolution(resolution: int, unet_config: dict[str, Any], vae_config: dict[str, Any]) -> None:
    """A `FieldError` on `resolution` when the base cannot take it, so the CLI names the flag when one was typed."""
    step = resolution_step(unet_config, vae_config)
    if resolution % step:
        lower, upper = max(step, resolution - resolution % step), resolution - resolution % step + step
        raise FieldError("resolution", f"{resolution} does not fit this base model: it must be a multiple of {step} "
                                       f"(VAE downscale × UNet downscale); try {lower} or {upper}")


def check_stage_resolutions(stages: list[tuple[int, int]], unet_config: dict[str, Any],
                            vae_config: dict[str, Any]) -> None:
    """Every stage's (resolution, steps) against the base's configs, before the first stage trains: an unfit later
    stage would otherwise stop the run after the earlier stages' hours."""
    for resolution, steps in stages:
        try:
            check_resolution(resolution, unet_config, vae_config)
        except FieldError as err:  # a stage's resolution is an entry of `stages`, not the run's `resolution`
            raise FieldError("stages", f"entry {resolution}:{steps}: resolution {err.problem}") from None


def tokenizer_length(base: str) -> int:
    """The tokens every caption is padded to in training: the base tokenizer's `model_max_length` (77 for SD 1.5 and
    SDXL), read from its config file alone."""
    from transformers.utils import cached_file

    base = single_file.configs_of(base)
    try:
        path = from_cache_or_hub(lambda local: cached_file(base, "tokenizer_config.json", subfolder="tokenizer",
                                                           local_files_only=local), base, "the base model")
    except OSError as err:
        raise IPAdapterError(f"cannot read {base}/tokenizer: {first_clause(str(err))}") from None
    return int(json.loads(Path(path).read_text(encoding="utf-8"))["model_max_length"])


def load_base(source: str, *, encoders: bool = True, vae: bool = True) -> BaseModels:
    """UNet and scheduler config always; VAE and text encoder(s) unless a feature cache replaces them."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if single_file.is_single_file(source):
        return _single_file_base(source, encoders=encoders, vae=vae)
    unet = base_part(UNet2DConditionModel, source, "UNet", "unet")
    scheduler = read_config(DDPMScheduler, source, "scheduler") if Path(source, "scheduler").is_dir() or \
        not Path(source).is_dir() else None
    if scheduler is None:
        raise IPAdapterError(f"{source} has no scheduler folder; a diffusers pipeline folder has unet, vae, scheduler, ...")
    models = BaseModels(unet=unet, scheduler_config=scheduler, name=str(source))
    if vae:
        models.vae = load_vae(source)
    if encoders:
        models.tokenizers, models.text_encoders = load_text_encoders(source, models.unet.config)
    return models


def vae_dtype(vae: nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
    """fp16 overflows in VAEs that say `force_upcast` (SDXL's): those stay fp32; bf16 has the range."""
    return torch.float32 if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else weight_dtype


def place_frozen(device: Any, weight_dtype: torch.dtype, vae: nn.Module | None, modules: Any = ()) -> None:
    """The frozen parts on the run's device in its precision (the VAE as `vae_dtype` says), whatever precision
    their files were stored in."""
    for module in modules:
        if module is not None:
            module.to(device, weight_dtype)
    if vae is not None:
        vae.to(device, vae_dtype(vae, weight_dtype))


def _single_file_base(source: str, *, encoders: bool, vae: bool) -> BaseModels:
    """Every part of a single-file checkpoint at once (diffusers reads the file whole); the scheduler's config is its
    family's, as a folder's is its own."""
    from diffusers import DDPMScheduler

    pipe = single_file.load_pipeline(source, torch.float32)
    scheduler = read_config(DDPMScheduler, str(single_file.config_folder(source)), "scheduler")
    models = BaseModels(unet=pipe.unet, scheduler_config=scheduler, vae=pipe.vae if vae else None, name=str(source))
    if encoders:
        models.tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        models.text_encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        freeze(*models.text_encoders)
    return models


def load_vae(source: str) -> nn.Module:
    from diffusers import AutoencoderKL

    if single_file.is_single_file(source):
        return _single_file_base(source, encoders=False, vae=True).vae
    return base_part(AutoencoderKL, source, "VAE", "vae")


def load_text_encoders(source: str, unet_config: Any) -> tuple[list[Any], list[nn.Module]]:
    """The tokenizers and text encoders the UNet reads (by its config), frozen: CLIP's (two for SDXL), or Kolors'
    ChatGLM."""
    if single_file.is_single_file(source):
        models = _single_file_base(source, encoders=True, vae=False)
        return models.tokenizers, models.text_encoders
    if chatglm.is_kolors(unet_config):
        tokenizer, encoder = chatglm.load(source)
        tokenizers, encoders = [tokenizer], [encoder]
    else:
        tokenizers, encoders = _clip_text(source, sdxl=unet_config.get("addition_embed_type") == "text_time")
    for e in encoders:
        freeze(e)
    return tokenizers, encoders


def _clip_text(source: str, *, sdxl: bool) -> tuple[list[Any], list[nn.Module]]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [base_part(CLIPTokenizer, source, "tokenizer", "tokenizer")]
    encoders = [base_part(CLIPTextModel, source, "text encoder", "text_encoder")]
    if sdxl:
        if not _has(source, "text_encoder_2"):
            raise IPAdapterError(f"{source} is an SDXL base but has no text_encoder_2 folder")
        tokenizers.append(base_part(CLIPTokenizer, source, "tokenizer 2", "tokenizer_2"))
        encoders.append(base_part(CLIPTextModelWithProjection, source, "text encoder 2", "text_encoder_2"))
    return tokenizers, encoders


def freeze(*modules: nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.requires_grad_(False)
            m.eval()


# ---- running the frozen encoders (the parts the feature cache replaces) ------------------------------------------
@torch.no_grad()
def encode_text(models: BaseModels, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L, C) prompt embeddings (+ (B, P) pooled for SDXL and Kolors), as the base's own pipeline computes them."""
    if models.is_kolors:
        return chatglm.encode(models.tokenizers[0], models.text_encoders[0], texts, device)
    if models.is_sdxl:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
            ids = _tokenize(tokenizer, texts).to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if getattr(out, "text_embeds", None) is not None:  # the second encoder's projected pooled output
                pooled = out.text_embeds
        return torch.cat(hidden, dim=-1), pooled  # (B, L, C1+C2), (B, P)
    ids = _tokenize(models.tokenizers[0], texts).to(device)
    return models.text_encoders[0](ids)[0], None


def _tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_latents(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std (B, 4, h, w); a latent is `mean + std · ε`, scaled by the caller."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


# ---- identity of models, for the cache's fingerprint ---------------------------------------------------------------
def module_fingerprint(module: nn.Module | None, samples: int = 256) -> str:
    """A hash of the config (without where it was saved from, the library's version or the precision) and of a strided
    sample of every tensor (every (numel // samples)-th value, at most `samples`) with its name and shape: different
    weights give a different hash. No module: ""."""
    if module is None:
        return ""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().flatten()
        step = max(1, flat.numel() // samples)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
