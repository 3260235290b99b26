"""Text encoders kept as single files, as ComfyUI keeps them in `models/clip/` (`clip_l.safetensors`,
`clip_g.safetensors`, `t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn_scaled.safetensors`) and Stability publishes them
in `text_encoders/`: each by transformers' names, no prefix (CLIP's under `text_model.` or not).

Such a file replaces one of the base's text encoders. Which one is told from the header by its kind and width, as a
ComfyUI loader is told by its type: a CLIP or T5 file takes the slot of the base whose encoder is of that kind and
width (SD 3's CLIP-L is 768 wide, its CLIP-G 1,280; FLUX's T5 4,096), so the order of the files does not matter. The
slot's config (from the base, or a single-file base's family repository) builds the model; the file fills it, every
weight present, and nothing else is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ipadapter import scaled_fp8, single_file
from ipadapter.errors import IPAdapterError
from ipadapter.validation import tensor_shapes

# A file's kind → the weight whose shape gives its width (transformers' names; CLIP's with or without `text_model.`).
WIDTH_KEYS = {"CLIP": ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
              "T5": ("shared.weight", "encoder.embed_tokens.weight")}
# The base's text encoder classes → their kind, and the config entry that is their width.
KINDS = {"CLIPTextModel": ("CLIP", "hidden_size"), "CLIPTextModelWithProjection": ("CLIP", "hidden_size"),
         "T5EncoderModel": ("T5", "d_model")}
# T5's input embedding is its shared one: a file may hold either name, which then stands for both.
TIED = {"shared.weight": "encoder.embed_tokens.weight", "encoder.embed_tokens.weight": "shared.weight"}
ADVICE = "give --text-encoder a CLIP or T5 text encoder in one .safetensors file"


def load_text_encoder_files(paths: list[str | os.PathLike], *, base: str, dtype: torch.dtype) -> dict[str, Any]:
    """The base's text encoder slots ("text_encoder", "text_encoder_2", ...) each file fills, its model loaded."""
    layout = Path(single_file.configs_of(base))
    slots = _slots(layout)
    taken: dict[str, Path] = {}
    for path in map(Path, paths):
        kind, width = _kind(path)
        matches = [slot for slot, (slot_kind, slot_width, _) in slots.items()
                   if (slot_kind, slot_width) == (kind, width)]
        if not matches:
            have = ", ".join(f"{slot} ({k}, {w} wide)" for slot, (k, w, _) in slots.items()) or "none of either kind"
            raise IPAdapterError(f"{path} is a {kind} text encoder {width} wide, which no text encoder of this base "
                                 f"is: it has {have}")
        slot = matches[0]
        if slot in taken:
            raise IPAdapterError(f"{taken[slot]} and {path} both take this base's {slot}; give one")
        taken[slot] = path
    return {slot: _load(path, slots[slot][2], layout / slot, dtype) for slot, path in taken.items()}


def _slots(layout: Path) -> dict[str, tuple[str, int, Any]]:
    """The base's text encoders a file can replace: slot → (kind, width, transformers class)."""
    import transformers

    index = json.loads((layout / "model_index.json").read_bytes())
    slots = {}
    for slot, entry in index.items():
        if not (slot.startswith("text_encoder") and isinstance(entry, list)):
            continue
        _, name = entry
        if name in KINDS:
            kind, width_key = KINDS[name]
            config = json.loads((layout / slot / "config.json").read_bytes())
            slots[slot] = (kind, int(config[width_key]), getattr(transformers, name))
    return slots


def _kind(path: Path) -> tuple[str, int]:
    """(kind, width) of a text encoder file, from its header."""
    shapes = tensor_shapes(path, ADVICE)
    for kind, keys in WIDTH_KEYS.items():
        if key := next((k for k in keys if k in shapes), None):
            return kind, shapes[key][1]
    raise IPAdapterError(f"{path} holds no CLIP or T5 text encoder by transformers' names (no {WIDTH_KEYS['CLIP'][0]} "
                         f"or {WIDTH_KEYS['T5'][0]}); {ADVICE}")


def _load(path: Path, cls: Any, config_dir: Path, dtype: torch.dtype) -> Any:
    """The slot's model with the file's weights: scaled fp8 ones multiplied back, names matched to the model's
    (with or without `text_model.`), an absent square CLIP projection the identity (SD 3's CLIP-L is published
    without one, which diffusers reads as the identity too), anything else absent refused."""
    config = cls.config_class.from_pretrained(str(config_dir))
    with torch.device("meta"):
        expected = {key: value.shape for key, value in cls(config).state_dict().items()}
    weights = {}
    for key, value in scaled_fp8.dequantized(path, dtype).items():  # a file without scales: as stored
        name = next((k for k in (key, key.removeprefix("text_model."), "text_model." + key) if k in expected), None)
        if name is not None:
            weights[name] = value
    for key, source in TIED.items():
        if key in expected and key not in weights and source in weights:
            weights[key] = weights[source]
    projection = "text_projection.weight"
    if projection in expected and projection not in weights and len(set(expected[projection])) == 1:
        weights[projection] = torch.eye(*expected[projection])
    missing = [key for key in expected if key not in weights]
    if missing:
        raise IPAdapterError(f"{path} lacks {len(missing)} weights of this base's {config_dir.name} "
                             f"({cls.__name__}), {missing[0]} first; it is another model's text encoder")
    wrong = next((key for key, value in weights.items() if tuple(value.shape) != tuple(expected[key])), None)
    if wrong is not None:
        raise IPAdapterError(f"{path}: {wrong} is {tuple(weights[wrong].shape)}, this base's {config_dir.name} "
                             f"takes {tuple(expected[wrong])}; it is another model's text encoder")
    return cls.from_pretrained(None, config=config, state_dict=weights, dtype=dtype).eval()
