"""From user-level names (flags, app fields) to a ready `ImagePrompter`: base, adapters, encoder, defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ipadapter.checkpoint import load_adapter
from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError
from ipadapter.prompter import ImagePrompter, fuse_base_lora, load_pipeline
from ipadapter.sources import AdapterSource, default_image_encoder, miniature_adapter, miniature_base, split_hub_path
from ipadapter.validation import check_device, model_source

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MINIATURE_STEPS, MINIATURE_GUIDANCE = 25, 5.0
# --adapter keywords for the shipped miniature adapters (asset names)
MINIATURE_ADAPTERS = {"miniature": "base", "miniature-plus": "plus", "miniature-simple": "simple"}


@dataclass
class Loaded:
    prompter: ImagePrompter
    base: str
    miniature: bool
    default_steps: int | None
    default_guidance: float | None


def _aligned(values: list[str] | None, count: int, flag: str) -> list[str | None]:
    values = values or []
    if len(values) in (0, 1):
        return (values or [None]) * count
    if len(values) != count:
        raise IPAdapterError(f"give {flag} once, or once per --adapter ({count}), not {len(values)} times")
    return values


def adapter_sources(args: Any) -> list[AdapterSource]:
    if not args.adapter:
        return [miniature_adapter()] if not args.base else []
    names = _aligned(args.weight_name, len(args.adapter), "--weight-name")
    subs = _aligned(args.subfolder, len(args.adapter), "--subfolder")
    return [miniature_adapter(MINIATURE_ADAPTERS[a]) if a in MINIATURE_ADAPTERS else AdapterSource(a, s, w)
            for a, s, w in zip(args.adapter, subs, names)]


def controlnet_source(name: str) -> str:
    """"miniature" names the shipped mask ControlNet of the miniature model; anything else is a folder or Hub id."""
    if name == "miniature":
        from ipadapter.miniature.assets import controlnet_path

        return str(controlnet_path())
    return name


def base_lora_source(name: str) -> str:
    """"miniature-custom" names the shipped LoRA of the miniature custom model; anything else is a file or folder,
    checked here so a wrong path is reported before a base model is loaded."""
    if name == "miniature-custom":
        from ipadapter.miniature.assets import custom_lora_path

        return str(custom_lora_path())
    if not Path(name).exists():
        raise IPAdapterError(f"LoRA not found: {name}")
    return name


def check_model_args(args: Any) -> str:
    """The model flags checked without loading anything: the device exists, local paths exist. Returns the device."""
    device = check_device(args.device)
    if args.base:
        model_source(args.base, "--base")
    if args.image_encoder:
        model_source(args.image_encoder, "--image-encoder", subfolders=True)
    if getattr(args, "controlnet", None) and args.controlnet != "miniature":
        model_source(args.controlnet, "--controlnet", subfolders=True, label="ControlNet folder")
    for adapter in args.adapter or []:
        if adapter not in MINIATURE_ADAPTERS:
            model_source(adapter, "--adapter")
    return device


def base_geometry(base: str | None) -> tuple[int, tuple[int, int]]:
    """(size step, default (width, height)) of a base pipeline from its UNet and VAE configs, no weights read:
    sizes are multiples of the VAE's downscale, the default is the UNet's sample size times it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source = str(miniature_base()) if not base else base
    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae = AutoencoderKL.load_config(source, subfolder="vae")
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"cannot read the base model {source}: {str(err).splitlines()[0][:200]}") from None
    step = 2 ** (len(vae["block_out_channels"]) - 1)
    sample = unet["sample_size"]
    height, width = (sample, sample) if isinstance(sample, int) else sample
    return step, (width * step, height * step)


def load_prompter(args: Any) -> Loaded:
    """Build everything the flags name (any object with generate's model attributes works)."""
    device = check_model_args(args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    miniature = not args.base
    base = str(miniature_base()) if miniature else args.base
    sources = adapter_sources(args)
    if not sources:
        raise IPAdapterError("give --adapter (a file, folder or Hub repo id) to use an image prompt with --base")
    base_lora = base_lora_source(args.base_lora) if getattr(args, "base_lora", None) else None
    pipe = load_pipeline(base, device=device, dtype=dtype, scheduler=args.scheduler)
    if base_lora:
        pipe = fuse_base_lora(pipe, base_lora, args.base_lora_scale)
    if getattr(args, "controlnet", None):
        from ipadapter.prompter import add_controlnet

        pipe = add_controlnet(pipe, controlnet_source(args.controlnet))
    adapters = {str(i): load_adapter(s.source, pipe.unet, subfolder=s.subfolder, weight_name=s.weight_name)
                for i, s in enumerate(sources)}
    if args.image_encoder:
        encoder_source = split_hub_path(args.image_encoder)
    else:
        encoder_source = default_image_encoder(base, sources[0])
    needs_clip = any(a.variant.features != "faceid" for a in adapters.values())
    encoder = None
    if needs_clip:
        if encoder_source is None:
            raise IPAdapterError("cannot tell which image encoder this adapter needs; give --image-encoder")
        encoder = ImageEncoder.from_pretrained(encoder_source[0], subfolder=encoder_source[1], device=device, dtype=dtype)
    prompter = ImagePrompter(pipe, adapters, encoder)
    return Loaded(prompter, base, miniature, MINIATURE_STEPS if miniature else None,
                  MINIATURE_GUIDANCE if miniature else None)


def text_embeds_for(loaded: Loaded, text: str) -> torch.Tensor:
    """The CLIP text embedding paired with the image encoder, for InstantStyle content subtraction.

    Looks for a `CLIPTextModelWithProjection` beside the encoder (`text_encoder_clip/` in the miniature model,
    or the encoder folder's sibling `text_encoder/` with a projection); real ViT-H/bigG encoders ship without one.
    """
    from pathlib import Path

    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    encoder = loaded.prompter.encoder
    root = Path(encoder.name.split("#")[0])
    for folder in (root.parent / "clip_text", root / "clip_text", root.parent / "text_encoder"):
        if (folder / "config.json").is_file():
            try:
                model = CLIPTextModelWithProjection.from_pretrained(str(folder)).eval()
                tok_dir = folder if (folder / "vocab.json").is_file() else folder.parent / "tokenizer"
                tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
            except (OSError, ValueError):
                continue
            if model.config.projection_dim != encoder.global_dim:
                continue
            with torch.no_grad():
                ids = tokenizer([text], padding="max_length", truncation=True, return_tensors="pt").input_ids
                return model(input_ids=ids).text_embeds.to(encoder.device, encoder.dtype)
    raise IPAdapterError(
        "content subtraction needs the CLIP text model paired with the image encoder (CLIPTextModelWithProjection, "
        f"{encoder.global_dim}-d), and none was found beside {encoder.name}"
    )
