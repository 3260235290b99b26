"""CLIP vision encoders kept as one `.safetensors` file, as ComfyUI keeps them (`models/clip_vision/`).

Such a file is h94's `image_encoder/model.safetensors` renamed (`CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors`,
`CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors`): transformers' `CLIPVisionModelWithProjection` keys, no config.
The shapes give every size but two facts, which follow from the width: the published towers of width 1280 (OpenCLIP
ViT-H/14) and 1664 (OpenCLIP ViT-bigG/14) have 16 heads and GELU (the config.json beside them in h94/IP-Adapter).
Other widths are refused: OpenAI's towers use another activation, which a wrong guess would not show.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ipadapter.errors import IPAdapterError
from ipadapter.validation import tensor_shapes

PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding.weight"
# Width → what the shapes cannot tell (the published OpenCLIP towers' configs).
TOWERS: dict[int, dict[str, Any]] = {
    1280: {"num_attention_heads": 16, "hidden_act": "gelu"},  # ViT-H/14
    1664: {"num_attention_heads": 16, "hidden_act": "gelu"},  # ViT-bigG/14
}


def shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the file's header alone (no weight is read)."""
    return tensor_shapes(path, "give the image encoder's folder (with its config.json) or its .safetensors file")


def tower_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """`shapes` of a file that holds a CLIP vision tower with its projection, in transformers' layout."""
    found = shapes(path)
    if PATCH_EMBEDDING not in found or "visual_projection.weight" not in found:
        raise IPAdapterError(f"{path} is not a CLIP vision encoder in transformers' layout (no {PATCH_EMBEDDING} or "
                             "visual_projection.weight); give the image encoder's folder with its config.json")
    return found


def vision_config(path: str | os.PathLike) -> Any:
    """The `CLIPVisionConfig` of a single-file CLIP vision tower, from its shapes and `TOWERS`."""
    from transformers import CLIPVisionConfig

    found = tower_shapes(path)
    hidden, _, patch, _ = found[PATCH_EMBEDDING]
    if hidden not in TOWERS:
        raise IPAdapterError(f"{path} is a {hidden}-wide CLIP vision tower; one file is read only for ViT-H (1280) and "
                             "ViT-bigG (1664): give the encoder's folder with its config.json")
    grid = found["vision_model.embeddings.position_embedding.weight"][0] - 1  # positions: the class token, a grid
    side = math.isqrt(grid)
    if side * side != grid:
        raise IPAdapterError(f"{path} has no square grid of patch positions: not a CLIP vision tower")
    layers = {key.split(".")[3] for key in found if key.startswith("vision_model.encoder.layers.")}
    return CLIPVisionConfig(
        hidden_size=hidden, patch_size=patch, image_size=side * patch,
        num_hidden_layers=len(layers), projection_dim=found["visual_projection.weight"][0],
        intermediate_size=found["vision_model.encoder.layers.0.mlp.fc1.weight"][0], **TOWERS[hidden],
    )


def feature_widths(path: str | os.PathLike) -> set[tuple[str, int]]:
    """(features, width) the file's encoder gives, for matching adapters; empty for any other file."""
    try:
        found = tower_shapes(path)
    except IPAdapterError:
        return set()
    return {("global", found["visual_projection.weight"][0]), ("patch", found[PATCH_EMBEDDING][0])}


def load_model(path: str | os.PathLike, dtype: torch.dtype | str) -> Any:
    """The `CLIPVisionModelWithProjection` of a single file; every weight must be there."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    config = vision_config(path)
    model, info = CLIPVisionModelWithProjection.from_pretrained(
        None, config=config, state_dict=load_file(str(path)), dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise IPAdapterError(f"{path} is not a whole CLIP vision encoder: {len(missing)} of its weights are missing "
                             f"(e.g. {missing[0]})")
    return model


def comfy_encoder(adapter: str | os.PathLike, needs: set[tuple[str, int]]) -> str | None:
    """ComfyUI's layout: for an adapter file in `models/ipadapter/`, the first file (by name) in `models/clip_vision/`
    that gives every (features, width) the adapters need."""
    if not Path(adapter).is_file():
        return None
    folder = Path(adapter).parent.parent / "clip_vision"
    return next((str(f) for f in sorted(folder.glob("*.safetensors")) if needs <= feature_widths(f)), None)
