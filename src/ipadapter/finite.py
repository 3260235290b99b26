"""Refuse NaN and Inf at the file boundary: one non-finite weight turns every generated image black."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ipadapter.errors import IPAdapterError


def non_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf, or None."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def require_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    name = non_finite(tensors)
    if name is not None:
        raise IPAdapterError(f"{where}: tensor {name} holds NaN or Inf values (a damaged file, or a diverged training)")
