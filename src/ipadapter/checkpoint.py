"""Adapter files: the published layouts (nested `.bin`, flat `.safetensors`) and the project's own format.

Published files key K'/V' by a layer's position in `unet.attn_processors` ("{index}.to_k_ip.weight"); inside the
package everything is keyed by layer name. The conversion between the two happens here and nowhere else.
Pickles are never trusted: torch files (told from safetensors by their bytes, not their names) go through
`torch.load(weights_only=True)`, which refuses code.
"""

from __future__ import annotations

import builtins
import importlib.util
import itertools
import os
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.atomic import save_safetensors
from ipadapter.attach import check_cross_dim
from ipadapter.dit.blocks import DESCRIPTIONS
from ipadapter.dit.layouts import published_layout
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.finite import require_finite
from ipadapter.layers import AttentionLayer, attention_layers
from ipadapter.projection.detect import detect_projection
from ipadapter.sources import from_cache_or_hub
from ipadapter.validation import model_source
from ipadapter.variants import detect_variant_name, get_variant

_INDEX_KEY = re.compile(r"^(\d+)\.(.+)$")
_ALIGN_BYTES = 64  # where each weight starts in `_copies`'s block: the alignment torch gives an allocation of its own
VIT_H_TOKENS = 257  # ViT-H/14 at 224 px: 16 x 16 patches and the class token
_LORA_RANK_KEY = "to_q_lora.down.weight"
_ZIP_MAGIC = b"PK\x03\x04"
_SAFETENSORS_HEAD = 9  # the header length (8 bytes) and its JSON's first byte
_SAFETENSORS_MAX_HEADER = 100_000_000  # the longest header safetensors' reader takes ("header too large" above)
# torch's sentence naming a refused global, in either of its wordings ("Unsupported global: GLOBAL getattr was not an
# allowed global by default.", "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.")
_REFUSED_GLOBAL = re.compile(r"[^\n:]*\bGLOBAL\b[^\n]*?\.(?=\s|$)")


def resolve(source: str | os.PathLike, *, subfolder: str | None = None, weight_name: str | None = None) -> Path:
    """A local file, a file in a local folder, or a file of a Hub repo (`from_cache_or_hub`)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path.joinpath(*(p for p in (subfolder, weight_name) if p))
        if candidate.is_file():
            return candidate
        raise IPAdapterError(f"no adapter file {candidate} (give weight_name= and subfolder= inside {path})")
    if path.suffix in {".bin", ".safetensors", ".pt", ".pth"} or str(source).startswith((".", "/")):
        raise IPAdapterError(f"adapter file not found: {source}")
    model_source(str(source), "adapter")  # "nothere" is a missing path, not a repo id short of a weight name
    if not weight_name:
        raise IPAdapterError(f"{source} looks like a Hub repo id: also give the weight name (e.g. ip-adapter_sd15.bin)")
    from huggingface_hub import hf_hub_download

    subfolder = subfolder or None
    try:
        return Path(from_cache_or_hub(lambda local: hf_hub_download(
            str(source), filename=weight_name, subfolder=subfolder, local_files_only=local), str(source), "the adapter",
            subfolder=subfolder, filename=weight_name))
    except (ValueError, OSError) as err:
        raise IPAdapterError(f"could not fetch {weight_name} from {source}: {first_clause(str(err))}") from None


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat tensors and metadata of any supported file, without unpickling code; NaN or Inf is refused by name."""
    flat, meta = _read_tensors(path)
    require_finite(flat, str(path))
    return flat, meta


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat tensors and metadata of a file `resolve` found, read by what its bytes are, not by its name (a safetensors
    file saved as `.bin` loads): safetensors as stored, torch files tensors only."""
    try:
        head = file_head(path)
    except OSError as err:
        raise IPAdapterError(f"cannot read {path} ({err.strerror or err})") from None
    if is_safetensors_file(head) or (path.suffix == ".safetensors" and not is_torch_file(head)):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError, RuntimeError) as err:
            raise IPAdapterError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if not is_torch_file(head):
        raise IPAdapterError(f"{path} is not a readable checkpoint (not a .safetensors, .bin or .pt file, or truncated)")
    try:
        data = _torch_load(path, mapped=head.startswith(_ZIP_MAGIC))
    except Exception as err:  # noqa: BLE001 - torn bytes make the weights-only unpickler raise anything (KeyError, ...)
        refused = refused_global(err)
        if refused is None:
            raise IPAdapterError(f"{path} is not a readable checkpoint (truncated or corrupt)") from None
        raise IPAdapterError(
            f"refusing to load {path}: its pickle carries code or objects other than tensors ({refused}); "
            "use a .safetensors file"
        ) from None
    if not isinstance(data, dict):
        raise IPAdapterError(f"{path} holds a {type(data).__name__}, not an IP-Adapter state dict")
    return flatten(data), {}


def _torch_load(path: Path, *, mapped: bool) -> Any:
    """A torch file's objects, tensors only. A zip file is mapped, not read: each tensor is backed by the file until
    used (the adapter takes them as they are; diffusers reads these files the same way). Where mapping fails (a file
    system without mmap, a damaged file) the file is read, and that read's error is the one reported."""
    if mapped and path.suffix != ".safetensors":
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)  # torch<2.3: a str
        except Exception:  # noqa: BLE001 - judged by the plain read below
            pass
    with path.open("rb") as f:  # a file object: torch 2.13 reads a path named .safetensors as safetensors
        return torch.load(f, map_location="cpu", weights_only=True)


def is_safetensors_file(head: bytes) -> bool:
    """Whether a file's first bytes are a safetensors header: an 8-byte little-endian length that safetensors' reader
    takes (from `{}`'s 2 bytes to its limit), then its JSON's `{`."""
    length = int.from_bytes(head[:8], "little")
    return len(head) >= _SAFETENSORS_HEAD and head[8:9] == b"{" and 2 <= length <= _SAFETENSORS_MAX_HEADER


def is_torch_file(head: bytes) -> bool:
    """Whether a file's first bytes are those of a `torch.save` file, a zip archive or (the legacy format) a pickle of
    protocol 2 or later; text, an image or an empty file is not one, whatever torch's unpickler would say of it."""
    return head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def is_weights_file(path: str | os.PathLike) -> bool:
    """Whether the file's first bytes are those of a safetensors or a torch file, whatever its name says (an image
    or text given where weights belong is neither); a file that cannot be read is neither."""
    try:
        head = file_head(path)
    except OSError:
        return False
    return is_safetensors_file(head) or is_torch_file(head)


def file_head(path: str | os.PathLike) -> bytes:
    """The first bytes of a file, as many as telling safetensors from torch files takes."""
    with open(path, "rb") as f:
        return f.read(_SAFETENSORS_HEAD)


def refused_global(err: BaseException) -> str | None:
    """The sentence in which torch's weights-only unpickler names the global (code, or an object other than tensors)
    a pickle asked for; None when `err` is any other failure (a torn or garbage file)."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    found = _REFUSED_GLOBAL.search(str(err))
    if found is None or not names_a_global(next(iter(found.group(0).split("GLOBAL", 1)[1].split()), "")):
        return None
    return found.group(0).strip().rstrip(".")


def names_a_global(name: str) -> bool:
    """Whether the name a refused GLOBAL quotes can be a real one: a pickle cut inside a name ("torch._utils._reb",
    "collections") asks for nothing that exists, so the file is torn, not carrying code. Only modules already
    imported are looked into (nothing the file names is imported); an installed top-level package counts as real."""
    parts = name.split(".")
    if not all(parts):
        return False
    if len(parts) == 1:  # torch quotes builtins (getattr, eval) without their module
        return hasattr(builtins, name)
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is not None:
            found: Any = module
            for attr in parts[cut:]:
                if not hasattr(found, attr):
                    return False
                found = getattr(found, attr)
            return True
    return importlib.util.find_spec(parts[0]) is not None


def flatten(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The published `.bin` nesting ({"image_proj": {...}, "ip_adapter": {...}}) as flat "group.key" tensors."""
    flat: dict[str, torch.Tensor] = {}
    for group, tensors in state.items():
        if isinstance(tensors, Mapping):
            flat.update({f"{group}.{k}": v for k, v in tensors.items()})
        elif isinstance(tensors, torch.Tensor):
            flat[group] = tensors
    return flat


def split(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + ".")}


def detect_variant(image_proj: dict[str, torch.Tensor], ip: dict[str, torch.Tensor], hint: str) -> AdapterConfig:
    """Variant, tokens and widths from keys and shapes, the variant from the table's detection rules; `hint` (the
    file name) only tells FaceID-Plus v1 from v2."""
    projection = detect_projection(image_proj)
    lora_rank = next((v.shape[0] for k, v in ip.items() if k.endswith(_LORA_RANK_KEY)), 0)
    variant = get_variant(detect_variant_name(projection.head, tokens=projection.tokens, lora_rank=lora_rank,
                                              file_name=hint))
    if not variant.tokens:  # one token per encoder token: the published files are all for ViT-H/14
        projection = replace(projection, tokens=VIT_H_TOKENS)
    return AdapterConfig(variant=variant.name, projection=projection, lora_rank=lora_rank)


def published_to_own(
    flat: Mapping[str, torch.Tensor], layers: list[AttentionLayer], name: str
) -> dict[str, torch.Tensor]:
    """The one conversion from the published layout: "ip_adapter.{index}.{rest}" → "layers.{layer name}.{rest}",
    the index being the layer's position in the UNet's `attn_processors` (`layers`: its `attention_layers`;
    docs/checkpoints.md)."""
    by_index = {l.index: l.name for l in layers}
    own = {k: v for k, v in flat.items() if k.startswith("image_proj.")}
    for key, value in split(flat, "ip_adapter").items():
        m = _INDEX_KEY.match(key)
        if not m:
            raise IPAdapterError(f"{name}: unexpected key {key!r} in ip_adapter weights")
        index = int(m.group(1))
        if index not in by_index:
            raise IPAdapterError(
                f"{name} has weights for attention layer {index} but this UNet has {len(layers)} attention layers; "
                "the adapter was made for another base model"
            )
        own[f"layers.{by_index[index]}.{m.group(2)}"] = value
    return own


def adapter_from_state_dict(
    state: Mapping[str, Any], unet: nn.Module, *, metadata: Mapping[str, str] | None = None, variant: str | None = None,
    name: str = "the state dict", device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> IPAdapter:
    """An adapter for `unet` from tensors in memory: the published layout (nested as in the `.bin` files, or flat
    "image_proj.*" / "ip_adapter.{index}.*" as in `.safetensors`; variant and sizes detected, `name` — the file
    name — tells FaceID-PlusV2) or the project's own (`adapter.state_dict()` keys with `metadata`).

    Placed on the UNet's device and in its dtype unless `device` / `dtype` say otherwise; everything is checked
    before any weight is copied, so a wrong file fails with a sentence, not a half-load. The adapter never shares
    memory with the tensors given (`fill`).
    """
    flat = flatten(state)
    layers = attention_layers(unet)
    own_format = bool(metadata) and metadata.get("format", "").startswith("ipadapter/")
    layout = (metadata.get("base") or "unet") if own_format else published_layout(flat)
    if layout in DESCRIPTIONS and layout != "unet":
        raise IPAdapterError(f"{name} is an IP-Adapter for {DESCRIPTIONS[layout]}, not for this UNet; give --base a "
                             "pipeline of that model")
    if not any(k.startswith(("image_proj.", "ip_adapter.", "layers.")) for k in flat):
        raise IPAdapterError(f"{name} is not an IP-Adapter file (no image_proj / ip_adapter weights)")
    if own_format:
        config = AdapterConfig.from_metadata(dict(metadata))
    else:
        config = detect_variant(split(flat, "image_proj"), split(flat, "ip_adapter"), hint=Path(name).name)
    check_cross_dim(layers, config.cross_dim, name)  # the family named before any layer count is compared
    own = flat if own_format else published_to_own(flat, layers, name)
    if variant:
        config = replace(config, variant=variant)
    with torch.device("meta"):
        adapter = IPAdapter(config, layers)
    _check_fits(adapter, own, name)  # built from the UNet's layers and checked key for key: it fits
    return fill(adapter, own, device=device or unet.device, dtype=dtype or unet.dtype)


M = TypeVar("M", bound=nn.Module)


def fill(module: M, own: Mapping[str, torch.Tensor], *, device: torch.device | str, dtype: torch.dtype) -> M:
    """A module built on the meta device (shapes only), given its checked weights, copied, moved and cast (floating
    point to `dtype`) by `_copies`. The module never shares memory with the tensors given (a caller's dict, or a
    mapped file: saving over it would pull the pages from under the weights), and two weights the file stored as one
    tensor load as two. Random weights drawn to be overwritten, then a copy over them, were most of an SDXL Plus load
    (5.5 s and 8.3 s on this project's 2-core machine, beside 6.9 s of reading the file)."""
    module.load_state_dict(own, assign=True)
    slots = [(held, name) for m in module.modules() for held in (m._parameters, m._buffers)
             for name, tensor in held.items() if tensor is not None]
    old = [held[name] for held, name in slots]
    with torch.no_grad():  # weights require grad: each copy would record an autograd node
        new = _copies(old, torch.device(device), dtype)
    for (held, name), was, tensor in zip(slots, old, new):
        held[name] = nn.Parameter(tensor, was.requires_grad) if isinstance(was, nn.Parameter) else tensor
    return module


def _copies(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each tensor copied to `device`, floating point cast to `dtype`, each with a storage of its own (savers such as
    accelerate's drop all but one of the tensors that share one). On the CPU the storages are carved from one
    allocation, 64-byte aligned as torch aligns its own: separate copies left the allocator's slack between them,
    0.35 MiB above the 1,340 MiB of SDXL's base adapter in the memory benchmark's process (`benchmarks/inference.py`;
    diffusers' weights are views into the mapped file), the block none. Its price: freed, it goes back to the OS, so a
    second load in the process takes fresh pages (docs/benchmarks.md, "Loading an adapter file")."""
    dtypes = [dtype if t.is_floating_point() else t.dtype for t in tensors]
    if device.type != "cpu":  # accelerators' caching allocators pay no page per allocation
        return [t.to(device, d, copy=True) for t, d in zip(tensors, dtypes)]
    sizes = [t.numel() * d.itemsize for t, d in zip(tensors, dtypes)]
    starts = list(itertools.accumulate((-(-n // _ALIGN_BYTES) * _ALIGN_BYTES for n in sizes), initial=0))
    block = torch.UntypedStorage(starts[-1])
    return [torch.empty(0, dtype=d).set_(block[start : start + n], 0, t.shape).copy_(t)
            for t, d, n, start in zip(tensors, dtypes, sizes, starts)]


def load_adapter(
    source: str | os.PathLike, unet: nn.Module, *, subfolder: str | None = None, weight_name: str | None = None,
    variant: str | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> IPAdapter:
    """Load any published or own adapter file for `unet` (`adapter_from_state_dict` on its tensors): variant and
    sizes read from the file itself; placed on the UNet's device and in its dtype unless `device` / `dtype` say
    otherwise (training loads fp32 weights for a low-precision UNet)."""
    path = resolve(source, subfolder=subfolder, weight_name=weight_name)
    flat, meta = read_file(path)
    return adapter_from_state_dict(flat, unet, metadata=meta, variant=variant, name=str(path), device=device,
                                   dtype=dtype)


def _check_fits(adapter: IPAdapter, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Keys and shapes compared before anything is copied."""
    want = adapter.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        what = "image projection" if key.startswith("image_proj.") else "layer"
        detail = f"missing {key}" if missing else f"unexpected {key}"
        raise IPAdapterError(f"{name}: {what} weights do not fit this UNet ({detail}); wrong base model or file?")
    for key, value in state.items():
        if value.shape != want[key].shape:
            raise IPAdapterError(f"{name}: weight {key} has shape {tuple(value.shape)}, expected {tuple(want[key].shape)}")


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
    return save_safetensors(flat, path)


def save_adapter(adapter: IPAdapter, path: str | os.PathLike) -> Path:
    """The project's own format: `adapter.state_dict()` (keys are layer names) plus metadata (variant, tokens,
    encoder, base family)."""
    return save_safetensors(dict(adapter.state_dict()), path, metadata=adapter.config.to_metadata())
