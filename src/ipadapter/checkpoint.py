"""Adapter files: the published layouts (nested `.bin`, flat `.safetensors`) and the project's own format.

Published files key K'/V' by a layer's position in `unet.attn_processors` ("{index}.to_k_ip.weight"); inside the
package everything is keyed by layer name. The conversion between the two happens here and nowhere else.
Pickles are never trusted: `.bin` files go through `torch.load(weights_only=True)`, which refuses code.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.atomic import save_safetensors
from ipadapter.attach import check_compatible, check_cross_dim
from ipadapter.errors import IPAdapterError
from ipadapter.finite import require_finite
from ipadapter.layers import AttentionLayer, attention_layers
from ipadapter.projection.detect import detect_projection

_INDEX_KEY = re.compile(r"^(\d+)\.(.+)$")
_LORA_RANK_KEY = "to_q_lora.down.weight"


def resolve(source: str | os.PathLike, *, subfolder: str | None = None, weight_name: str | None = None) -> Path:
    """A local file, a file in a local folder, or a file of a Hub repo (offline: from the local cache)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path.joinpath(*(p for p in (subfolder, weight_name) if p))
        if candidate.is_file():
            return candidate
        raise IPAdapterError(f"no adapter file {candidate} (give --weight-name and --subfolder inside {path})")
    if path.suffix in {".bin", ".safetensors", ".pt", ".pth"} or str(source).startswith((".", "/")):
        raise IPAdapterError(f"adapter file not found: {source}")
    if not weight_name:
        raise IPAdapterError(f"{source} looks like a Hub repo id: also give the weight name (e.g. ip-adapter_sd15.bin)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(source), filename=weight_name, subfolder=subfolder or None))
    except LocalEntryNotFoundError:
        raise IPAdapterError(
            f"{source}/{subfolder + '/' if subfolder else ''}{weight_name} is not in the local Hugging Face cache and "
            "the Hub cannot be reached; download it once with network access or pass a local path"
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as err:
        raise IPAdapterError(f"could not fetch {weight_name} from {source}: {str(err).splitlines()[0]}") from None


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat tensors and metadata of any supported file, without unpickling code; NaN or Inf is refused by name."""
    flat, meta = _read_tensors(path)
    require_finite(flat, str(path))
    return flat, meta


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise IPAdapterError(f"adapter file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError, RuntimeError) as err:
            raise IPAdapterError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise IPAdapterError(
            f"refusing to load {path}: its pickle carries code or objects other than tensors "
            f"({str(err).splitlines()[0][:120]}); use a .safetensors file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise IPAdapterError(f"{path} is not a readable checkpoint (truncated or corrupt?): {str(err)[:160]}") from None
    if not isinstance(data, dict):
        raise IPAdapterError(f"{path} holds a {type(data).__name__}, not an IP-Adapter state dict")
    flat: dict[str, torch.Tensor] = {}
    for group, tensors in data.items():
        if isinstance(tensors, dict):
            flat.update({f"{group}.{k}": v for k, v in tensors.items()})
        elif isinstance(tensors, torch.Tensor):
            flat[group] = tensors
    return flat, {}


def split(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + ".")}


def detect_variant(image_proj: dict[str, torch.Tensor], ip: dict[str, torch.Tensor], hint: str = "") -> AdapterConfig:
    """Variant, tokens and widths from keys and shapes; `hint` (the file name) only tells FaceID-Plus v1 from v2."""
    projection = detect_projection(image_proj)
    if projection.head == "token_mlp":
        projection = type(projection)(**{**projection.to_dict(), "tokens": 257})
    lora_rank = next((v.shape[0] for k, v in ip.items() if k.endswith(_LORA_RANK_KEY)), 0)
    head_to_variant = {"linear": "base", "resampler": "plus", "token_mlp": "full"}
    if projection.head in head_to_variant:
        variant = head_to_variant[projection.head]
    elif projection.head == "faceid":
        variant = "faceid" if lora_rank or projection.tokens != 16 else "faceid-portrait"
    else:
        variant = "faceid-plusv2" if "v2" in hint.lower() else "faceid-plus"
    return AdapterConfig(variant=variant, projection=projection, lora_rank=lora_rank)


def _by_index_to_by_name(ip: dict[str, torch.Tensor], layers: list[AttentionLayer], path: Path) -> dict[str, torch.Tensor]:
    by_index = {l.index: l.name for l in layers}
    converted = {}
    for key, value in ip.items():
        m = _INDEX_KEY.match(key)
        if not m:
            raise IPAdapterError(f"{path}: unexpected key {key!r} in ip_adapter weights")
        index = int(m.group(1))
        if index not in by_index:
            raise IPAdapterError(
                f"{path} has weights for attention layer {index} but this UNet has {len(layers)} attention layers; "
                "the adapter was made for another base model"
            )
        converted[f"{by_index[index]}.{m.group(2)}"] = value
    return converted


def load_adapter(
    source: str | os.PathLike, unet: nn.Module, *, subfolder: str | None = None, weight_name: str | None = None,
    variant: str | None = None,
) -> IPAdapter:
    """Load any published or own adapter file for `unet`: variant and sizes read from the file itself."""
    path = resolve(source, subfolder=subfolder, weight_name=weight_name)
    flat, meta = read_file(path)
    if not any(k.startswith(("image_proj.", "ip_adapter.", "layers.")) for k in flat):
        raise IPAdapterError(f"{path} is not an IP-Adapter file (no image_proj / ip_adapter weights)")
    layers = attention_layers(unet)
    image_proj = split(flat, "image_proj")
    if meta.get("format", "").startswith("ipadapter/"):
        config = AdapterConfig.from_metadata(meta)
        by_name = split(flat, "layers")
    else:
        ip = split(flat, "ip_adapter")
        config = detect_variant(image_proj, ip, hint=path.name)
        check_cross_dim(unet, config.cross_dim, path.name)
        by_name = _by_index_to_by_name(ip, layers, path)
    if variant:
        config = AdapterConfig(**{**config.__dict__, "variant": variant})
    check_cross_dim(unet, config.cross_dim, path.name)

    adapter = IPAdapter(config, layers)
    _load_into(adapter, image_proj, by_name, path)
    check_compatible(unet, adapter, path.name)
    return adapter.to(dtype=next(iter(flat.values())).dtype) if flat else adapter


def _load_into(adapter: IPAdapter, image_proj: dict[str, torch.Tensor], by_name: dict[str, torch.Tensor], path: Path) -> None:
    """Shapes are compared before anything is copied, so a wrong file fails with a sentence, not a half-load."""
    expected_proj = adapter.image_proj.state_dict()
    expected_layers = adapter.layer_state_dict()
    for got, want, what in ((image_proj, expected_proj, "image projection"), (by_name, expected_layers, "layer")):
        missing = sorted(set(want) - set(got))
        unexpected = sorted(set(got) - set(want))
        if missing or unexpected:
            detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise IPAdapterError(f"{path}: {what} weights do not fit this UNet ({detail}); wrong base model or file?")
        for k, v in got.items():
            if v.shape != want[k].shape:
                raise IPAdapterError(
                    f"{path}: {what} weight {k} has shape {tuple(v.shape)}, expected {tuple(want[k].shape)}"
                )
    adapter.image_proj.load_state_dict(image_proj)
    for name, layer in adapter.named_layers():
        prefix = name + "."
        layer.load_state_dict({k[len(prefix):]: v for k, v in by_name.items() if k.startswith(prefix)})


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """safetensors written to a temporary file and renamed: a crash never leaves a half-written file."""
    return save_safetensors(tensors, path, metadata)


def published_state_dict(adapter: IPAdapter, unet: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": {"{index}.to_k_ip.weight": ...}} in checkpoint order for `unet`."""
    index_of = {l.name: l.index for l in attention_layers(unet)}
    ip = {f"{index_of[name]}.{k}": v for name, layer in adapter.named_layers() for k, v in layer.state_dict().items()}
    return {"image_proj": dict(adapter.image_proj.state_dict()), "ip_adapter": ip}


def save_published(adapter: IPAdapter, unet: nn.Module, path: str | os.PathLike) -> Path:
    """The published flat safetensors layout (`image_proj.*`, `ip_adapter.{index}.*`), loadable by diffusers."""
    if adapter.config.attention != "decoupled":
        raise IPAdapterError(f"a {adapter.config.attention!r} adapter has no published layout; save it with save_adapter")
    nested = published_state_dict(adapter, unet)
    flat = {f"{group}.{k}": v for group, tensors in nested.items() for k, v in tensors.items()}
    return atomic_save(flat, path)


def save_adapter(adapter: IPAdapter, path: str | os.PathLike) -> Path:
    """The project's own format: name-keyed tensors plus metadata (variant, tokens, encoder, base family)."""
    flat = {f"image_proj.{k}": v for k, v in adapter.image_proj.state_dict().items()}
    flat.update({f"layers.{k}": v for k, v in adapter.layer_state_dict().items()})
    return atomic_save(flat, path, metadata=adapter.config.to_metadata())
