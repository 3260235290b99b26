"""FLUX's true classifier-free guidance (`--true-cfg`): a second transformer pass on the negative prompt, FLUX only.
Checked before loading where the base's model_index.json can be read, and from the loaded pipeline otherwise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ipadapter.errors import IPAdapterError

FLUX_TRANSFORMER = "FluxTransformer2DModel"
TRUE_CFG_NOT_FLUX = "--true-cfg is FLUX's option; other bases take --guidance"


def index_transformer(base: str | None) -> str | None:
    """The transformer class a base's model_index.json names ("" for a UNet base), read from a local folder or the
    local Hub cache; None where only loading would tell (a Hub id not in the cache, an unreadable index)."""
    from ipadapter.sources import miniature_base

    index = Path(base or miniature_base()) / "model_index.json"
    if base and not index.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base, "model_index.json")
        except ValueError:  # not shaped like a repo id: loading names the problem
            return None
        if not isinstance(cached, str):
            return None
        index = Path(cached)
    try:
        transformer = json.loads(index.read_text(encoding="utf-8")).get("transformer")
    except (OSError, ValueError, AttributeError):
        return None
    return str(transformer[-1]) if isinstance(transformer, list) and transformer else ""


def check_true_cfg(args: argparse.Namespace) -> None:
    """--true-cfg on a base that is not FLUX, refused before loading where the base's index can be read here (after
    loading, from the pipeline itself, otherwise)."""
    if args.true_cfg is not None and index_transformer(args.base) not in (None, FLUX_TRANSFORMER):
        raise IPAdapterError(TRUE_CFG_NOT_FLUX)


def true_cfg_kwargs(value: float | None, pipe: Any) -> dict[str, float]:
    """The pipeline keyword for `--true-cfg` on a loaded pipeline ({} when not given); a base that is no FLUX refused."""
    if value is None:
        return {}
    if type(getattr(pipe, "transformer", None)).__name__ != FLUX_TRANSFORMER:
        raise IPAdapterError(TRUE_CFG_NOT_FLUX)
    return {"true_cfg_scale": value}
