"""K'/V' of a reference group at one layer, kept for a generation and the next (`cache_kv`), keyed by what they
depend on."""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import torch


class KVKey(NamedTuple):
    """What K'/V' of a reference group depend on: the adapter and its weights (`IPAdapter.weights_token`), the
    UNet batch layout (size, CFG or not, uncond layer), the query's dtype and device, and each reference's tokens
    (by content digest) with its value factor."""

    adapter: str
    weights: Hashable
    batch: int
    cfg: bool
    uncond_layer: bool
    dtype: torch.dtype
    device: torch.device
    refs: tuple[tuple[str, float], ...]


class KVCache:
    """K'/V' per `KVKey`, for the current generation and the one before: a generation reuses what the previous one
    made under the same key (a UI re-running with the same reference), anything older is dropped."""

    def __init__(self) -> None:
        self.generation = -1
        self._now: dict[KVKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._before: dict[KVKey, tuple[torch.Tensor, torch.Tensor]] = {}

    def roll(self, generation: int) -> None:
        if generation != self.generation:
            self._before, self._now, self.generation = self._now, {}, generation

    def get(self, key: KVKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        found = self._now.get(key)
        if found is None:
            found = self._before.pop(key, None)
            if found is not None:
                self._now[key] = found
        return found

    def put(self, key: KVKey, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._now[key] = kv

    def settle(self) -> None:
        """The generation has taken what it reuses: drop the rest of the previous one's (they would otherwise
        stay alive through this generation, on top of its own K'/V')."""
        self._before = {}

    def clear(self) -> None:
        self._now, self._before = {}, {}
