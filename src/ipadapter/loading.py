"""From names to a ready `ImagePrompter`: `load` for a pipeline in hand, `load_prompter` for the whole model by name."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ipadapter import clip_file, single_file
from ipadapter.adapter import IPAdapter
from ipadapter.checkpoint import load_adapter
from ipadapter.dit.blocks import denoiser_of, is_dit
from ipadapter.dit.checkpoint import load_dit_adapter
from ipadapter.encoders import FaceAnalyzer, ImageEncoder
from ipadapter.errors import IPAdapterError
from ipadapter.pipelines import add_controlnet, check_lora_file, fuse_base_lora, load_pipeline
from ipadapter.prompter import ImagePrompter
from ipadapter.siglip import encoder_class
from ipadapter.sources import (
    AdapterSource, default_image_encoder, encoder_by_width, is_published_name, miniature_adapter, miniature_base,
    published_adapter, published_files, read_config, split_hub_path,
)
from ipadapter.validation import check_device, model_source, regular_file, vae_downscale

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The paper's inference guidance (7.5); on the miniature 5.0 and 7.5 measure the same within noise (v2's base adapter,
# 96 held-out references: CLIP-I 0.888 vs 0.891, object colour 93% at both; text-only generation likewise).
MINIATURE_STEPS, MINIATURE_GUIDANCE = 25, 7.5
# --adapter keywords for the shipped miniature adapters (asset names)
MINIATURE_ADAPTERS = {"miniature": "base", "miniature-plus": "plus", "miniature-simple": "simple"}


@dataclass
class Loaded:
    prompter: ImagePrompter
    base: str
    default_steps: int | None
    default_guidance: float | None


PathLike = str | os.PathLike


def _per_adapter(value: str | Sequence[str | None] | None, count: int, parameter: str) -> list[str | None]:
    """One value for every adapter, or one per adapter (as diffusers' `load_ip_adapter` takes them)."""
    values = [value] if value is None or isinstance(value, str) else list(value)
    if len(values) in (0, 1):
        return (values or [None]) * count
    if len(values) != count:
        raise IPAdapterError(f"give {parameter}= once, or once per adapter ({count}), not {len(values)} times")
    return values


def _encoder_for(
    pipe: Any, sources: list[AdapterSource], adapters: Mapping[str, IPAdapter], image_encoder: PathLike | ImageEncoder | None,
) -> ImageEncoder | None:
    """The CLIP image encoder the adapters need (None when all take face embeddings only)."""
    if isinstance(image_encoder, ImageEncoder):
        return image_encoder
    if not any(a.variant.clip for a in adapters.values()):
        return None
    needs = {(a.variant.clip, a.clip_width) for a in adapters.values() if a.variant.clip}
    if image_encoder is not None:
        found = split_hub_path(str(image_encoder))
    else:
        found = default_image_encoder(pipe.name_or_path, sources[0], needs)
        if found is None:
            comfy = clip_file.comfy_encoder(sources[0].path, needs)
            found = (comfy, None) if comfy else encoder_by_width(needs)
    if found is None:
        widths = " and ".join(sorted(f"{width}-wide {features}" for features, width in needs))
        raise IPAdapterError(f"cannot tell which image encoder the adapters need ({widths} features, which no "
                             "published encoder alone gives); give image_encoder=")
    denoiser = denoiser_of(pipe)
    cls = encoder_class(found[0], found[1])
    return cls.from_pretrained(found[0], subfolder=found[1], device=denoiser.device, dtype=denoiser.dtype)


def load(
    pipe: Any, adapter: PathLike | Sequence[PathLike], *, subfolder: str | Sequence[str | None] | None = None,
    weight_name: str | Sequence[str | None] | None = None, adapter_name: str | Sequence[str] | None = None,
    image_encoder: PathLike | ImageEncoder | None = None, face_analyzer: FaceAnalyzer | None = None,
    cache_kv: bool = False,
) -> ImagePrompter:
    """Adapters attached to a diffusers pipeline, ready to `generate`: the one call a diffusers user expects.

    `adapter`: a file, a folder or a Hub repo id, or a list of them; `subfolder` and `weight_name` locate the file
    inside it (one value, or one per adapter). `adapter_name` names them (default "0", "1", ...). `image_encoder`: a
    CLIP vision folder or Hub id ("owner/repo/subfolder" allowed), or left out to use the one beside the adapter or in
    the pipeline's folder. `cache_kv=True` keeps K'/V' for the generation: faster per step, a few MiB more
    (`ImagePrompter`). Detach with `prompter.detach()` or use the result as a context manager. Model offload
    (`pipe.enable_model_cpu_offload()`) may be turned on before or after; sequential offload only after.
    """
    paths = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
    if not paths:
        raise IPAdapterError("give at least one adapter")
    names = _per_adapter(adapter_name, len(paths), "adapter_name") if adapter_name is not None else None
    if names is not None and len(set(names)) != len(names):
        raise IPAdapterError(f"adapter names must differ, got {', '.join(map(str, names))}")
    denoiser = denoiser_of(pipe)
    named = [_named(AdapterSource(str(p), s, w)) for p, s, w in zip(
        paths, _per_adapter(subfolder, len(paths), "subfolder"), _per_adapter(weight_name, len(paths), "weight_name"))]
    sources = [published_adapter(s.source, unet_family(denoiser)) if is_published_name(s.source) else s for s in named]
    keys = names or [str(i) for i in range(len(sources))]
    if hasattr(denoiser, "_hf_hook") and next(denoiser.parameters()).is_meta:  # accelerate's hook, weights away
        raise IPAdapterError("the pipeline's weights are offloaded module by module (enable_sequential_cpu_offload): "
                             "load the adapters first, then turn offloading on")
    loader = load_dit_adapter if is_dit(denoiser) else load_adapter
    adapters = {str(k): loader(s.source, denoiser, subfolder=s.subfolder, weight_name=s.weight_name)
                for k, s in zip(keys, sources)}
    encoder = _encoder_for(pipe, sources, adapters, image_encoder)
    return ImagePrompter(pipe, adapters, encoder, face_analyzer, cache_kv=cache_kv)


def keyword_kind(adapter: str) -> str | None:
    """What an adapter keyword names, for messages; None for a path or Hub id."""
    return "a bundled adapter" if adapter in MINIATURE_ADAPTERS else \
        "a published adapter" if is_published_name(adapter) else None


def unet_family(denoiser: Any) -> str | None:
    """Which of h94's files an `h94:` name means on this denoiser: "sdxl" for SDXL's UNet (size and pooled-text
    conditioning, CLIP text), "sd15" for SD 1.x's (2.x's too: its width then refuses the file); None for FLUX, SD 3
    and Kolors (whose UNet projects ChatGLM's text: `encoder_hid_dim_type`)."""
    if is_dit(denoiser) or denoiser.config.encoder_hid_dim_type is not None:
        return None
    return "sdxl" if denoiser.config.addition_embed_type == "text_time" else "sd15"


def _named(source: AdapterSource) -> AdapterSource:
    """The file a bundled adapter's keyword names ("miniature", "miniature-plus", ...); an h94 name ("h94:plus") is
    checked here and its file chosen by `load`, where the base is known; any other source as given."""
    kind = keyword_kind(source.source)
    if kind and (source.subfolder or source.weight_name):  # one file: a name inside it would be silently ignored
        raise IPAdapterError(f"{source.source} is {kind}, one file: give no subfolder= or weight_name=")
    if source.source in MINIATURE_ADAPTERS:
        return miniature_adapter(MINIATURE_ADAPTERS[source.source])
    if is_published_name(source.source):
        published_files(source.source)  # an unknown name fails before a model loads
    return source


def adapter_sources(
    adapters: Sequence[str], *, base: str | None, subfolders: Sequence[str] = (), weight_names: Sequence[str] = (),
) -> list[AdapterSource]:
    """The adapters to load; with neither adapters nor a base, the bundled miniature adapter."""
    if not adapters:
        return [miniature_adapter()] if not base else []
    names = _per_adapter(list(weight_names), len(adapters), "weight_name")
    subs = _per_adapter(list(subfolders), len(adapters), "subfolder")
    return [_named(AdapterSource(a, s, w)) for a, s, w in zip(adapters, subs, names)]


def controlnet_source(name: str) -> str:
    """"miniature" names the shipped mask ControlNet of the miniature model; anything else is a folder or Hub id."""
    if name == "miniature":
        from ipadapter.bundled import controlnet_path

        return str(controlnet_path())
    return name


def base_lora_source(name: str) -> str:
    """"miniature-custom" names the shipped LoRA of the miniature custom model; anything else is a file or folder,
    checked here so a wrong path is reported before a base model is loaded."""
    if name == "miniature-custom":
        from ipadapter.bundled import custom_lora_path

        return str(custom_lora_path())
    check_lora_file(Path(name))
    return name


def check_model_args(args: Any) -> str:
    """The model flags checked without loading anything: the device exists, local paths exist. Returns the device."""
    device = check_device(args.device)
    if args.base:
        model_source(args.base, "--base")
    if args.image_encoder:
        model_source(args.image_encoder, "--image-encoder", subfolders=True)
    if args.vae:
        model_source(args.vae, "--vae", subfolders=True)
    for path in getattr(args, "text_encoder", None) or []:
        regular_file(path, "--text-encoder")
    if getattr(args, "controlnet", None) and args.controlnet != "miniature":
        model_source(args.controlnet, "ControlNet folder", subfolders=True)
    for adapter in args.adapter or []:
        if is_published_name(adapter):
            published_files(adapter)
        elif adapter not in MINIATURE_ADAPTERS:
            model_source(adapter, "--adapter")
    adapters = args.adapter or ["miniature"]
    for flag, values in (("--weight-name", args.weight_name), ("--subfolder", args.subfolder)):
        for adapter, value in zip(adapters, values or []):
            if value and keyword_kind(adapter):  # one file: a name inside it would be silently ignored
                raise IPAdapterError(f"{flag} {value} names a file inside --adapter, but {adapter} is "
                                     f"{keyword_kind(adapter)}")
    return device


UNET_PIPELINE_STEP = 8  # StableDiffusion(XL)Pipeline.check_inputs: height and width divisible by 8


def base_geometry(base: str | None) -> tuple[int, tuple[int, int]]:
    """(size step, default (width, height)) of a base pipeline from its denoiser and VAE configs, no weights read.
    UNet: multiples of the VAE's downscale and of 8 (diffusers' UNet pipelines refuse other sizes, whatever the
    VAE: the miniature's downscales by 4), default the UNet's sample size times the downscale. FLUX: its 2 × 2
    latent packing doubles the step, default 128 latents a side (the pipeline's own). SD 3: the step times the patch
    size, default the transformer's sample size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source = single_file.configs_of(base) if base else str(miniature_base())
    step = vae_downscale(read_config(AutoencoderKL, source, "vae"))
    if (Path(source) / "transformer" / "config.json").is_file():
        return _transformer_geometry(source, step)
    sample = read_config(UNet2DConditionModel, source, "unet")["sample_size"]
    height, width = (sample, sample) if isinstance(sample, int) else sample
    return max(step, UNET_PIPELINE_STEP), (width * step, height * step)


def _transformer_geometry(source: str, vae_step: int) -> tuple[int, tuple[int, int]]:
    import json

    config = json.loads((Path(source) / "transformer" / "config.json").read_text())
    if config.get("_class_name") == "FluxTransformer2DModel":
        return vae_step * 2, (128 * vae_step, 128 * vae_step)
    size = config.get("sample_size", 128) * vae_step  # SD3Transformer2DModel's defaults where a config has none
    return vae_step * config.get("patch_size", 2), (size, size)


def default_dtype(device: str) -> torch.dtype:
    """float16 on CUDA, as diffusers users run there; float32 elsewhere, where half precision is slow or unsupported."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_prompter(
    *, base: str | None = None, adapters: Sequence[str] = (), subfolders: Sequence[str] = (),
    weight_names: Sequence[str] = (), image_encoder: str | None = None, device: str | None = None,
    dtype: str | None = None, scheduler: str | None = None, base_lora: str | None = None, base_lora_scale: float = 1.0,
    controlnet: str | None = None, cache_kv: bool = False, vae: str | None = None, text_encoders: Sequence[str] = (),
) -> Loaded:
    """Everything from names: the base pipeline (the bundled miniature model when `base` is None), a fused custom
    LoRA, a ControlNet, the adapters (file, folder, Hub id, or a keyword) and their image encoder; `vae` replaces the
    base's VAE (`pipelines.load_vae`), `text_encoders` files its text encoders (`text_encoder_files`).
    `dtype`: "float32", "float16" or "bfloat16" (default float16 on CUDA, else float32); `cache_kv` as in `load`."""
    device = device or check_device(None)
    if dtype is not None and dtype not in DTYPES:
        raise IPAdapterError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if dtype else default_dtype(device)
    miniature = not base
    base = str(miniature_base()) if miniature else base
    sources = adapter_sources(adapters, base=None if miniature else base, subfolders=subfolders,
                              weight_names=weight_names)
    if not sources:
        raise IPAdapterError("give adapters= (a file, folder or Hub repo id) to use an image prompt with base=")
    lora = base_lora_source(base_lora) if base_lora else None
    pipe = load_pipeline(base, device=device, dtype=torch_dtype, scheduler=scheduler, vae=vae,
                         text_encoders=text_encoders)
    if lora:
        pipe = fuse_base_lora(pipe, lora, base_lora_scale)
    if controlnet:
        pipe = add_controlnet(pipe, controlnet_source(controlnet))
    prompter = load(pipe, [s.source for s in sources], subfolder=[s.subfolder for s in sources],
                    weight_name=[s.weight_name for s in sources], image_encoder=image_encoder, cache_kv=cache_kv)
    return Loaded(prompter, base, MINIATURE_STEPS if miniature else None,
                  MINIATURE_GUIDANCE if miniature else None)
