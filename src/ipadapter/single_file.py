"""Base models kept as one file in the original Stable Diffusion layout, as web UIs, ComfyUI (`models/checkpoints/`)
and model sites share fine-tuned models; and transformers kept alone, FLUX.1's in Black Forest Labs' layout and SD 3 /
3.5's in Stability's, as ComfyUI (`models/unet/`) and model sites share them.

diffusers' `from_single_file` reads the weights. The layout they fill (block counts, widths, the tokenizer, the
scheduler) is that of the published diffusers repository of the file's family, which diffusers tells from the file's
key names and shapes (`infer_diffusers_model_type`; the header is enough, no weight is read for it). For a whole
Stable Diffusion checkpoint only that repository's config and tokenizer files are read: from the Hugging Face cache
when they are there, else downloaded once (a few hundred kB), never its weights. A transformer file holds the
transformer alone, so the other parts (text encoders, VAE) are that repository's own, from the cache or downloaded
once, and its transformer's weights are never read; a file that also holds text encoders and a VAE (ComfyUI's
checkpoints) gives those itself, and only what it lacks comes from the repository. ComfyUI's scaled fp8 transformers
are dequantized first (`scaled_fp8.py`). Anything else is refused by name before a weight is read.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ipadapter import scaled_fp8
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.sources import from_cache_or_hub, plain_or_fp16
from ipadapter.validation import tensor_shapes

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # the first convolution, in every SD checkpoint
# diffusers' names of the families a base file can be (`infer_diffusers_model_type`) → how messages call them.
FAMILIES = {"v1": "Stable Diffusion 1.x", "v2": "Stable Diffusion 2.x", "xl_base": "SDXL",
            "playground-v2-5": "Playground v2.5"}


class TransformerFile(NamedTuple):
    """What a transformer-only file of a family needs around it."""

    label: str  # as messages call it
    pipeline: str  # the diffusers pipeline around it
    variants: str  # the `--variant`s that train adapters for it


# Families whose file is a transformer alone, by diffusers' names: the rest of the pipeline comes from the family's
# repository.
TRANSFORMER_FAMILIES = {
    "flux-dev": TransformerFile("FLUX.1 [dev]", "FluxPipeline", "flux or flux-v2"),
    "flux-schnell": TransformerFile("FLUX.1 [schnell]", "FluxPipeline", "flux or flux-v2"),
    "sd35_large": TransformerFile("SD 3.5 Large", "StableDiffusion3Pipeline", "sd3"),
    "sd35_medium": TransformerFile("SD 3.5 Medium", "StableDiffusion3Pipeline", "sd3"),
    "sd3": TransformerFile("SD 3 Medium", "StableDiffusion3Pipeline", "sd3"),
}
_LABELS = {**FAMILIES, **{name: family.label for name, family in TRANSFORMER_FAMILIES.items()}}
# Where a file that holds more than the transformer (ComfyUI's `models/checkpoints/` files, Stability's
# `sd3_medium_incl_clips_t5xxlfp16`) keeps each other part with weights, by pipeline: the parts' key prefixes, as
# diffusers' single-file loaders read them.
HELD_PREFIXES = {
    "FluxPipeline": {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.t5xxl.",
                     "vae": "first_stage_model."},
    "StableDiffusion3Pipeline": {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
                                 "text_encoder_3": "text_encoders.t5xxl.", "vae": "first_stage_model."},
}
# A diffusers repository's files that describe it without weights, at any depth (huggingface_hub matches with
# fnmatch, whose `*` crosses folders): configs, tokenizer vocabularies and merges, sentencepiece models.
CONFIG_FILES = ("*.json", "*.txt", "*.model")
EXPECTED = ("--base takes a whole Stable Diffusion 1.x, 2.x or SDXL checkpoint, or a FLUX.1 or SD 3 / 3.5 transformer, "
            "in one .safetensors file, or a diffusers pipeline folder or Hub id")


def is_single_file(base: str | os.PathLike) -> bool:
    """Whether `base` names one file (a diffusers pipeline is a folder or a Hub id)."""
    return Path(base).expanduser().is_file()


def family(path: str | os.PathLike) -> tuple[str, str]:
    """(diffusers' family name, its published repository) of a single-file checkpoint, from its header alone."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    from ipadapter.checkpoint import file_head, is_torch_file

    if is_torch_file(file_head(path)):
        raise IPAdapterError(f"{path} is a pickle (.ckpt); ipadapter does not open pickled base models, which can "
                             "carry code: use the model's .safetensors file")
    shapes = tensor_shapes(path, EXPECTED)
    name = infer_diffusers_model_type({key: torch.empty(shape, device="meta") for key, shape in shapes.items()})
    if name not in FAMILIES and name not in TRANSFORMER_FAMILIES:  # an inpainting model, FLUX Fill, ...
        raise IPAdapterError(f"{path} is of the family {name!r} (as diffusers names it), not SD 1.x, 2.x, SDXL, "
                             f"FLUX.1 or SD 3 / 3.5; {EXPECTED}")
    # diffusers' rules end at SD 1.x: a LoRA or any other file reads as one
    if name in FAMILIES and UNET_KEY not in shapes:
        raise IPAdapterError(f"{path} holds no Stable Diffusion UNet in the original layout (no {UNET_KEY}); "
                             f"{EXPECTED}")
    return name, DIFFUSERS_DEFAULT_PIPELINE_PATHS[name]["pretrained_model_name_or_path"]


def config_folder(path: str | os.PathLike) -> Path:
    """The local folder of the configs that describe the file's layout (its family's published repository, configs
    and tokenizers only)."""
    from huggingface_hub import snapshot_download

    name, repo = family(path)

    def fetch(local: bool) -> Path:
        folder = Path(snapshot_download(repo, allow_patterns=list(CONFIG_FILES), local_files_only=local))
        if not (folder / "model_index.json").is_file():  # a cache entry holding other files of the repository
            raise FileNotFoundError(f"no model_index.json in {folder}")
        return folder

    try:
        return from_cache_or_hub(fetch, repo, f"the {_LABELS[name]} layout", include=_needed(name, held_parts(path)),
                                 instead="give --base the model as a diffusers pipeline folder")
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"could not fetch the configs of {repo}: {first_clause(str(err))}") from None


def _needed(name: str, held: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The repository files a family's single file needs, as download patterns (one command fetches them all): the
    configs, and for a transformer file every part its pipeline requires but the transformer and those it `held`."""
    import diffusers

    if name not in TRANSFORMER_FAMILIES:
        return CONFIG_FILES
    params = inspect.signature(getattr(diffusers, TRANSFORMER_FAMILIES[name].pipeline)).parameters
    return (*CONFIG_FILES, *(f"{part}/*" for part, param in params.items()
                             if param.default is inspect.Parameter.empty and part not in {"transformer", *held}))


def held_parts(path: str | os.PathLike) -> frozenset[str]:
    """The parts besides the transformer that a transformer family's file holds in a form diffusers reads (one stored
    as scaled fp8 is not: diffusers would leave its scales unread), from the header alone."""
    name, _ = family(path)
    if name not in TRANSFORMER_FAMILIES:
        return frozenset()
    keys = tensor_shapes(path, EXPECTED)
    prefixes = HELD_PREFIXES[TRANSFORMER_FAMILIES[name].pipeline]
    return frozenset(part for part, prefix in prefixes.items()
                     if (mine := [key for key in keys if key.startswith(prefix)]) and not scaled_fp8.is_scaled(mine))


def configs_of(base: str) -> str:
    """Where a base's configs are read: a single file's family layout (`config_folder`), else the base itself."""
    return str(config_folder(base)) if is_single_file(base) else base


def pipeline_name(path: str | os.PathLike) -> str:
    """The diffusers pipeline class a single file loads as (its family repository's)."""
    return json.loads((config_folder(path) / "model_index.json").read_bytes())["_class_name"]


def parts_source(base: str) -> str:
    """Where a base's text encoders and VAE are read: a transformer file's family repository when the file holds none
    of them, else the base."""
    if is_single_file(base) and (layout := family(base))[0] in TRANSFORMER_FAMILIES and not held_parts(base):
        return layout[1]
    return base


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype, **parts: Any) -> Any:
    """The text-to-image pipeline of a single-file checkpoint, its parts laid out as its family's repository; `parts`
    (a `vae=`; None: not loaded) replace the file's own or, for a transformer file, the repository's."""
    import diffusers

    folder = config_folder(path)
    index = json.loads((folder / "model_index.json").read_bytes())
    cls = getattr(diffusers, index["_class_name"])
    name, repo = family(path)
    if name in TRANSFORMER_FAMILIES:
        transformer = getattr(diffusers, index["transformer"][1])
        return _around_transformer(path, (name, repo), cls, transformer, folder, dtype, parts)
    if scaled_fp8.is_scaled(tensor_shapes(path, EXPECTED)):
        raise IPAdapterError(f"{path} stores its weights as scaled fp8, which ipadapter reads for FLUX.1 and SD 3 / "
                             "3.5 transformer files only; use the checkpoint's fp16 or bf16 file")
    return _whole_file(path, cls, folder, dtype, parts)


def _around_transformer(path: str | os.PathLike, layout: tuple[str, str], cls: Any, transformer_cls: Any,
                        folder: Path, dtype: torch.dtype, parts: dict[str, Any]) -> Any:
    """The transformer from the file (unless `parts` gives one, or None), and so every other part the file holds
    (`held_parts`); the rest from its family's repository (`layout`: its name and repository)."""
    name, repo = layout
    held = held_parts(path) - set(parts)
    scaled = scaled_fp8.is_scaled(tensor_shapes(path, EXPECTED))
    if "transformer" not in parts and (not held or scaled):
        weights = scaled_fp8.dequantized(path, dtype) if scaled else str(path)
        parts = {**parts, "transformer": _from_file(path, transformer_cls, lambda: transformer_cls.from_single_file(
            weights, config=str(folder), subfolder="transformer", torch_dtype=dtype))}
    weighted = set(HELD_PREFIXES[cls.__name__])
    missing = sorted(weighted - held - set(parts))
    what = "text encoders and VAE" if set(missing) == weighted else " and ".join(missing) or "configs and tokenizers"
    if not held:  # the transformer alone, and what `parts` gives
        return _from_repo(layout, cls, dtype, parts, what, frozenset(parts))
    if missing:
        source = _from_repo(layout, cls, dtype, {**parts, "transformer": None, **dict.fromkeys(held)}, what,
                            held | frozenset(parts))
        parts = {**parts, **{part: getattr(source, part) for part in missing}}
    return _whole_file(path, cls, folder, dtype, parts)


def _whole_file(path: str | os.PathLike, cls: Any, folder: Path, dtype: torch.dtype, parts: dict[str, Any]) -> Any:
    """diffusers' `from_single_file` of the pipeline `cls`, every file it reads local (the checkpoint and the config
    folder), each model in eval mode: its loader leaves T5 in training mode (dropout on, so a prompt's embedding
    changed from call to call)."""
    pipe = _from_file(path, cls, lambda: cls.from_single_file(str(path), config=str(folder), torch_dtype=dtype,
                                                              **parts))
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    return pipe


def _from_repo(layout: tuple[str, str], cls: Any, dtype: torch.dtype, parts: dict[str, Any], what: str,
               held: frozenset[str]) -> Any:
    """The family repository's pipeline, `parts` given (None: not loaded): the Hugging Face cache first, else
    downloaded once; offline, one line naming the download of `what` it reads (the parts `held` elsewhere left
    out)."""
    name, repo = layout
    what = f"the {_LABELS[name]} {what}"
    try:
        return from_cache_or_hub(lambda local: plain_or_fp16(lambda variant: cls.from_pretrained(
            repo, torch_dtype=dtype, local_files_only=local, **parts, **variant)), repo, what,
            include=_needed(name, held), instead="give --base the model as a diffusers pipeline folder")
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"could not load {what} from {repo}: {first_clause(str(err))}") from None


def _from_file(path: str | os.PathLike, cls: Any, load: Callable[[], Any]) -> Any:
    """`load()`, its failure on weights that are missing or do not fit one line naming the file and the class."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        return load()
    except NotImplementedError:  # diffusers leaves a part's missing weights on the meta device, which cannot be copied
        raise IPAdapterError(f"could not load {path} as a {cls.__name__}: a part it holds lacks some of its weights; "
                             "it was cut short or made for another model") from None
    except (SingleFileComponentError, OSError, ValueError, RuntimeError, KeyError) as err:
        reason = f"it has no weight {err.args[0]}" if isinstance(err, KeyError) else first_clause(str(err))
        raise IPAdapterError(f"could not load {path} as a {cls.__name__}: {reason}") from None
