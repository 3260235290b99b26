"""Transformer adapter files: XLabs' FLUX layout, InstantX's SD 3 layout, diffusers' nested form of either, and the
project's own format (keys = `DiTAdapter.state_dict()`, config in the metadata).

Published files key a block by its position (`double_blocks.{i}`, `ip_adapter.{i}`); the conversion to block names
happens here and nowhere else. Files are read by checkpoint.py's safe readers (no pickled code).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ipadapter.adapter import AdapterConfig
from ipadapter.checkpoint import fill, flatten, read_file, resolve, split
from ipadapter.dit.adapter import DiTAdapter
from ipadapter.dit.blocks import DESCRIPTIONS, dit_blocks, dit_kind
from ipadapter.dit.layouts import published_layout
from ipadapter.errors import IPAdapterError
from ipadapter.projection.detect import detect_projection
from ipadapter.variants import detect_variant_name

_XLABS_BLOCK = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")
_INDEXED = re.compile(r"^(\d+)\.(.+)$")


def _published_parts(flat: Mapping[str, torch.Tensor], name: str) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """(image_proj tensors, per block index its tensors under the diffusers processor's names)."""
    image_proj = {**split(flat, "image_proj"), **split(flat, "ip_adapter_proj_model")}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if m := _XLABS_BLOCK.match(key):
            blocks.setdefault(int(m[1]), {})[f"to_{m[2]}_ip.{m[3]}"] = value
        elif key.startswith("ip_adapter."):
            m = _INDEXED.match(key[len("ip_adapter."):])
            if not m:
                raise IPAdapterError(f"{name}: unexpected key {key!r} in ip_adapter weights")
            blocks.setdefault(int(m[1]), {})[m[2]] = value
        elif not key.startswith(("image_proj.", "ip_adapter_proj_model.")):
            raise IPAdapterError(f"{name}: unexpected key {key!r} (not an IP-Adapter weight)")
    return image_proj, blocks


def _published_config(kind: str, image_proj: dict[str, torch.Tensor]) -> AdapterConfig:
    if kind == "flux":
        projection = detect_projection(image_proj)
    else:
        from ipadapter.projection.detect import detect_time_resampler

        projection = detect_time_resampler(image_proj)
    variant = detect_variant_name(projection.head, tokens=projection.tokens, lora_rank=0, denoiser=kind)
    return AdapterConfig(variant=variant, projection=projection, base=kind)


def dit_adapter_from_state_dict(
    state: Mapping[str, Any], model: nn.Module, *, metadata: Mapping[str, str] | None = None,
    name: str = "the state dict", device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> DiTAdapter:
    """An adapter for a FLUX or SD 3 transformer from tensors in memory, checked completely before any copy."""
    kind = dit_kind(model)
    flat = flatten(state)
    if metadata and metadata.get("format", "").startswith("ipadapter/"):
        config, own = AdapterConfig.from_metadata(dict(metadata)), flat
        layout = config.base if config.base in DESCRIPTIONS else "unet"
    else:
        layout = published_layout(flat)
        if layout is None:
            raise IPAdapterError(f"{name} is not an IP-Adapter file (no image projection or block weights)")
    if layout != kind:
        raise IPAdapterError(
            f"{name} is an IP-Adapter for {DESCRIPTIONS[layout]} but this base is {DESCRIPTIONS[kind]}; use an "
            "adapter made for this base model"
        )
    if not (metadata and metadata.get("format", "").startswith("ipadapter/")):
        image_proj, per_block = _published_parts(flat, name)
        config = _published_config(kind, image_proj)
        names = {b.index: b.name for b in dit_blocks(model)}
        if set(per_block) != set(names):
            raise IPAdapterError(
                f"{name} has weights for {len(per_block)} blocks but this transformer has {len(names)}; it was made "
                "for another model size"
            )
        own = {f"image_proj.{k}": v for k, v in image_proj.items()}
        own.update({f"layers.{names[i]}.{k}": v for i, tensors in per_block.items() for k, v in tensors.items()})
    with torch.device("meta"):
        adapter = DiTAdapter(config, dit_blocks(model))
    _check_shapes(adapter, own, name)  # built from the model's blocks and checked key for key: it fits
    return fill(adapter, own, device=device or model.device, dtype=dtype or model.dtype)


def _check_shapes(adapter: DiTAdapter, state: Mapping[str, torch.Tensor], name: str) -> None:
    want = adapter.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise IPAdapterError(f"{name}: its weights do not fit this transformer ({detail}); wrong base model or file?")
    for key, value in state.items():
        if value.shape != want[key].shape:
            raise IPAdapterError(
                f"{name}: weight {key} has shape {tuple(value.shape)}, this transformer needs {tuple(want[key].shape)}; "
                "it was made for another model size"
            )


def load_dit_adapter(
    source: str | os.PathLike, model: nn.Module, *, subfolder: str | None = None, weight_name: str | None = None,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> DiTAdapter:
    """Any published or own transformer adapter file for `model` (a FLUX or SD 3 transformer)."""
    path = resolve(source, subfolder=subfolder, weight_name=weight_name)
    flat, meta = read_file(path)
    return dit_adapter_from_state_dict(flat, model, metadata=meta, name=str(path), device=device, dtype=dtype)
