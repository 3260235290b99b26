"""Building the diffusers pipeline an adapter attaches to: load one, fuse a custom model's LoRA, add a ControlNet.

Each returns a pipeline whose UNet is the object adapters attach to; none touches attention processors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ipadapter import single_file
from ipadapter.checkpoint import is_weights_file
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.sources import from_cache_or_hub, plain_or_fp16, read_config, require_vocabulary, split_hub_path
from ipadapter.text_encoder_files import load_text_encoder_files
from ipadapter.validation import model_source


def load_pipeline(
    base: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32, scheduler: str | None = None,
    vae: str | os.PathLike | None = None, text_encoders: Sequence[str | os.PathLike] = (),
) -> Any:
    """Any diffusers pipeline folder or Hub id (`from_cache_or_hub`), or a whole checkpoint in one file
    (`single_file`); its own saved scheduler unless `scheduler` names another class, its own VAE unless `vae` names
    another (`load_vae`), its own text encoders but those `text_encoders` files replace (`text_encoder_files`). SD
    1.5's safety checker is dropped, as ComfyUI and the web UIs run: it would black out the images it flags. Each
    generation's step bar is cleared when it ends (`leave=False`): a batch leaves one line, not a bar each."""
    new_scheduler = _scheduler_class(scheduler) if scheduler else None  # a misspelt name fails before the load
    parts = {"vae": load_vae(vae, base=str(base), dtype=dtype)} if vae else {}
    if text_encoders:
        parts |= load_text_encoder_files(list(text_encoders), base=str(base), dtype=dtype)
    pipe = single_file.load_pipeline(base, dtype, **parts) if single_file.is_single_file(base) else \
        _from_folder(base, dtype, **parts)
    if new_scheduler is not None:
        try:
            pipe.scheduler = new_scheduler.from_config(pipe.scheduler.config)
        except ImportError as err:  # diffusers' stand-in for a scheduler whose library is missing names it
            raise IPAdapterError(f"the scheduler {scheduler} cannot be used here: {first_clause(err)}") from None
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device)


def _from_folder(base: str | os.PathLike, dtype: torch.dtype, **parts: Any) -> Any:
    import diffusers

    index = _model_index(base)
    if "safety_checker" in index:  # never read (nor downloaded): SD 1.5's checker is dropped, as the web UIs run
        parts = {"safety_checker": None, "requires_safety_checker": False, **parts}
    _check_parts(Path(base), index, parts)
    tokenizer = index.get("tokenizer")
    if isinstance(tokenizer, list) and "tokenizer" not in parts:
        require_vocabulary(str(tokenizer[-1]), str(base), "the diffusers pipeline")
    try:
        return from_cache_or_hub(lambda local: plain_or_fp16(
            lambda variant: diffusers.DiffusionPipeline.from_pretrained(
                str(base), dtype=dtype, local_files_only=local, **parts, **variant)), str(base),
            "the diffusers pipeline")
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"could not load a diffusers pipeline from {base}: {first_clause(err)}") from None
    except ImportError as err:  # a part whose library is not installed, e.g. Kolors' ChatGLM tokenizer: sentencepiece
        hint = "; for Kolors: pip install 'ipadapter[kolors]'" if "sentencepiece" in str(err) else ""
        raise IPAdapterError(f"could not load a diffusers pipeline from {base}: {first_clause(err)}{hint}") from None


def _model_index(base: str | os.PathLike) -> dict[str, Any]:
    """The pipeline's `model_index.json` (its class and parts), from disk when it is there; none: empty."""
    import diffusers

    try:
        return dict(from_cache_or_hub(lambda local: diffusers.DiffusionPipeline.load_config(
            str(base), local_files_only=local), str(base), "the diffusers pipeline"))
    except (OSError, ValueError):  # the pipeline's own load says what is wrong, in its words
        return {}


def _check_parts(folder: Path, index: dict[str, Any], given: dict[str, Any]) -> None:
    """Every part a local pipeline folder's `model_index.json` names is there, named in one line (diffusers' own
    errors say "no file named ..." of the folder, or worse: Kolors' ChatGLM tokenizer fails with a TypeError)."""
    if not folder.is_dir():
        return
    for name, entry in index.items():
        if isinstance(entry, list) and None not in entry and name not in given and not (folder / name).is_dir():
            raise IPAdapterError(f"{folder} is missing its {name} folder (its model_index.json names a {entry[1]})")


def load_vae(source: str | os.PathLike, *, base: str, dtype: torch.dtype) -> Any:
    """A VAE to use instead of the base's own, as web UIs let one pick (a fine-tuned decoder, SDXL's fp16-safe one):
    an `AutoencoderKL` folder or Hub id ("owner/repo/subfolder" allowed), or one `.safetensors` file in the original
    or diffusers names, laid out as the base's VAE. One whose latents differ from the base's is refused."""
    from diffusers import AutoencoderKL

    layout = single_file.configs_of(base)
    expected = read_config(AutoencoderKL, layout, "vae")
    if single_file.is_single_file(source):
        mine = _vae_from_file(AutoencoderKL, Path(source), layout, dtype)
    else:
        repo, subfolder = split_hub_path(model_source(str(source), "VAE", subfolders=True))
        try:
            mine = from_cache_or_hub(lambda local: plain_or_fp16(lambda variant: AutoencoderKL.from_pretrained(
                repo, subfolder=subfolder, torch_dtype=dtype, local_files_only=local, **variant)), repo, "the VAE",
                subfolder=subfolder)
        except (OSError, ValueError) as err:
            raise IPAdapterError(f"could not load a VAE from {source}: {first_clause(err)}") from None
    channels, base_channels = mine.config.latent_channels, expected["latent_channels"]
    if channels != base_channels:
        raise IPAdapterError(f"the VAE {source} was made for another base model ({channels} latent channels; this "
                             f"base's VAE has {base_channels})")
    return mine


def _vae_from_file(cls: Any, path: Path, layout: str, dtype: torch.dtype) -> Any:
    """A VAE kept as one file, in the base's VAE layout. Every weight must be in the file: diffusers leaves the
    missing ones on the meta device, which torch then cannot copy (a NotImplementedError)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:  # the layout's VAE config is on disk by now (`load_vae` read it)
        return cls.from_single_file(str(path), config=layout, subfolder="vae", torch_dtype=dtype,
                                    local_files_only=True)
    except NotImplementedError:
        raise IPAdapterError(f"the VAE {path} lacks weights of the base's VAE; it was made for another base "
                             "model") from None
    except (SingleFileComponentError, OSError, ValueError, RuntimeError, KeyError) as err:
        raise IPAdapterError(f"could not load the VAE {path}: {first_clause(str(err))}") from None


def _scheduler_class(name: str) -> Any:
    """The diffusers scheduler class `name`. Only names of schedulers count: diffusers' other classes have
    `from_config` too, and one built as the scheduler failed only mid-generation."""
    import diffusers

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None:
        raise IPAdapterError(f"unknown scheduler {name!r} (use a diffusers class name such as DDIMScheduler)")
    return cls


def _lora_error(err: Exception) -> str:
    """diffusers' or peft's reason a LoRA did not load, as one short clause (theirs list every layer)."""
    text = str(err).strip()
    if "size mismatch" in text:
        last = first_clause(text.splitlines()[-1], 160)
        return f"its shapes differ from this model's, it was made for another base model ({last})"
    if "not found in the base model" in text:
        return "none of its layers exist in this model, it was made for another base model"
    return first_clause(text)


def check_lora_file(path: Path) -> None:
    """A LoRA path exists, and a file is one of weights (diffusers' own error for an image names no reason)."""
    if not path.exists():
        raise IPAdapterError(f"LoRA not found: {path}")
    if path.is_file() and not is_weights_file(path):
        raise IPAdapterError(f"{path} is not a LoRA weights file (not a .safetensors or .bin file, or truncated)")


def fuse_base_lora(pipe: Any, source: str | os.PathLike, scale: float = 1.0) -> Any:
    """Turn `pipe` into the custom model a LoRA file (or a folder holding one) describes: load it with diffusers,
    fuse it at `scale`, then drop the LoRA layers. Only weight values change, no module or attention processor, so
    adapters attach to the result as to any base model, and fusing before or after attaching gives the same images.
    A pipeline that already holds LoRA layers is refused: dropping the layers would drop those too."""
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging

    path = Path(source)
    check_lora_file(path)
    if not hasattr(pipe, "load_lora_weights"):
        raise IPAdapterError(f"{type(pipe).__name__} cannot load a LoRA (use a Stable Diffusion 1.5 / 2.x / SDXL base)")
    held = sorted({name for names in pipe.get_list_adapters().values() for name in names})
    if held:
        raise IPAdapterError(f"this pipeline already holds the LoRA adapters {', '.join(held)}; fuse the base LoRA "
                             "first, then load them")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)  # its own log lines repeat what the error below says
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(path), adapter_name="base_lora")
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise IPAdapterError(f"could not load the LoRA {source}: {_lora_error(err)}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not any(pipe.get_list_adapters().values()):
        raise IPAdapterError(f"no layer of this base model matches the LoRA {source}; it was made for another model")
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe


def add_controlnet(pipe: Any, source: str | os.PathLike) -> Any:
    """The ControlNet pipeline of `pipe`'s family (SD 1.5 / 2.x or SDXL) on `pipe`'s own components, so the UNet an
    adapter attaches to is the same object; the ControlNet (folder, Hub id, or "owner/repo/subfolder") gets the
    UNet's device and dtype. A ControlNet made for another base model is refused here, not mid-generation."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        cls = diffusers.StableDiffusionXLControlNetPipeline
    elif isinstance(pipe, diffusers.StableDiffusionPipeline):
        cls = diffusers.StableDiffusionControlNetPipeline
    else:
        raise IPAdapterError(
            f"a ControlNet needs a Stable Diffusion 1.5 / 2.x or SDXL text-to-image base, not {type(pipe).__name__}"
        )
    repo, subfolder = split_hub_path(model_source(str(source), "ControlNet folder", subfolders=True))
    try:
        controlnet = from_cache_or_hub(lambda local: plain_or_fp16(
            lambda variant: diffusers.ControlNetModel.from_pretrained(
                repo, subfolder=subfolder, dtype=pipe.unet.dtype, local_files_only=local, **variant)), repo,
            "the ControlNet", subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"could not load a ControlNet from {source}: {first_clause(err)}") from None
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
