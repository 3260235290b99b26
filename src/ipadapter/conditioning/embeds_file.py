"""Encoded reference features on disk: encode once, reuse across generations (safetensors + metadata).

Features are only meaningful to the encoder that made them, so the file records that encoder's identity — a name
(path or hub id, for the message) and a hash of its configuration (for the check; two copies of one encoder under
different paths agree) — and the features kind ("global", "patch", "faceid", "faceid+patch"). Loading with a
different encoder raises, naming the one that made the file. Writes are atomic: a temporary file in the same folder,
then `os.replace`, so a crash never leaves half a file under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ipadapter.atomic import save_safetensors
from ipadapter.errors import IPAdapterError
from ipadapter.finite import require_finite
from ipadapter.variants import VARIANTS

FORMAT = "ipadapter-embeds/1"
FEATURE_KINDS = tuple(dict.fromkeys(v.features for v in VARIANTS.values()))
# Config entries that say where, how or with which library version a model was loaded, not what it computes.
_VOLATILE = frozenset({
    "_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype", "_attn_implementation",
    "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
})


def _stable(config: Any) -> Any:
    if isinstance(config, Mapping):
        return {str(k): _stable(v) for k, v in config.items() if k not in _VOLATILE}
    if isinstance(config, (list, tuple)):
        return [_stable(v) for v in config]
    return config


@dataclass(frozen=True)
class EncoderIdentity:
    """Which encoder made some features: `name` for people, `config_hash` for the check."""

    name: str
    config_hash: str

    @classmethod
    def of(cls, encoder: Any, name: str | None = None) -> "EncoderIdentity":
        """From a model with a `.config` (transformers), a config object, a dict, or just a name (e.g. "buffalo_l").

        The hash covers the architecture, not the weights: two fine-tunes of one architecture hash alike.
        """
        config = {"name": encoder} if isinstance(encoder, str) else getattr(encoder, "config", encoder)
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        text = json.dumps(_stable(as_dict), sort_keys=True, default=str)
        name = name or next((as_dict[k] for k in ("_name_or_path", "model_type", "name") if as_dict.get(k)), "encoder")
        return cls(str(name), hashlib.sha256(text.encode()).hexdigest()[:16])


@dataclass(frozen=True)
class SavedEmbeds:
    tensors: dict[str, torch.Tensor]
    encoder: EncoderIdentity
    features: str
    extra: dict[str, str]


def save_embeds(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, encoder: EncoderIdentity, features: str,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Write named feature tensors (e.g. "cond", "uncond") with the encoder's identity, atomically."""
    if features not in FEATURE_KINDS:
        raise IPAdapterError(f"unknown features kind {features!r}; valid: {', '.join(FEATURE_KINDS)}")
    if not tensors:
        raise IPAdapterError("there are no embeddings to save")
    metadata = {"format": FORMAT, "encoder": encoder.name, "encoder_config_hash": encoder.config_hash,
                "features": features, "extra": json.dumps(dict(extra or {}))}
    save_safetensors(tensors, path, metadata)


def load_embeds(
    path: str | os.PathLike, *, encoder: EncoderIdentity | None = None, features: str | None = None
) -> SavedEmbeds:
    """Read saved features; with `encoder` / `features`, refuse a file made by another encoder or of another kind."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise IPAdapterError(f"embeddings file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise IPAdapterError(f"cannot read {path} as a safetensors embeddings file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise IPAdapterError(f"{path} is not an ipadapter embeddings file (written by `ipadapter encode`)")
    try:
        extra = json.loads(metadata.get("extra", "{}"))
        saved = SavedEmbeds(tensors, EncoderIdentity(metadata["encoder"], metadata["encoder_config_hash"]),
                            metadata["features"], extra if isinstance(extra, dict) else {})
    except (KeyError, json.JSONDecodeError) as err:
        raise IPAdapterError(f"{path} has damaged metadata ({type(err).__name__}: {err}); encode the images again") from None
    require_finite(tensors, str(path))
    if encoder is not None and encoder.config_hash != saved.encoder.config_hash:
        raise IPAdapterError(
            f"{path} was encoded with {saved.encoder.name!r} (config {saved.encoder.config_hash}) but this run uses "
            f"{encoder.name!r} (config {encoder.config_hash}); use that encoder or encode the images again"
        )
    if features is not None and features != saved.features:
        raise IPAdapterError(f"{path} holds {saved.features} features but this adapter needs {features} features")
    return saved


def check_features(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], tail: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The file's `cond.*` features in order, each (N, *tail) as the current encoder makes them."""
    keys = sorted(k for k in tensors if k.startswith("cond"))
    if not keys:
        raise IPAdapterError(f"{path} holds no image embeddings (no cond.* tensors); encode the images again")
    for key in keys:
        shape = tuple(tensors[key].shape)
        if len(shape) != len(tail) + 1 or shape[1:] != tail or shape[0] < 1:
            raise IPAdapterError(f"{path}: {key} has shape {shape}, but this encoder makes (N, {', '.join(map(str, tail))})")
    return tuple(tensors[k] for k in keys)
