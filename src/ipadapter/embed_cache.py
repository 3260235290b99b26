"""A bounded LRU keyed by content, so a repeated reference never re-runs the encoder nor the projection head.

It holds encoder features (keyed by encoder identity, features kind and image pixels) and projected tokens (keyed by
adapter identity and the features' bytes): a changed encoder or adapter never serves stale entries.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable

import torch
from PIL import Image


def image_key(image: Image.Image) -> str:
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


def tensor_key(*tensors: torch.Tensor | None) -> str:
    """A digest of the tensors' values, dtypes and shapes (equal content → equal key, wherever the tensors live)."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            digest.update(b"none")
            continue
        t = t.detach().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).cpu().numpy())  # the bytes in place, no copy on the CPU
    return digest.hexdigest()


class EmbeddingCache:
    """LRU by bytes: `max_bytes` = 0 disables caching entirely."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def resize(self, max_bytes: int) -> None:
        """A new bound, evicting least recently used entries down to it (0: empty and disabled)."""
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        while self._items and self.bytes > max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)

    def clear(self) -> None:
        """Drop every entry, keeping the bound (a shared app forgetting its users' references)."""
        self._items.clear()
        self.bytes = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        if not self.max_bytes:
            return None
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = _nbytes(value)
        if not self.max_bytes or size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= _nbytes(self._items.pop(key))
        self._items[key] = value.detach()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)

    def __len__(self) -> int:
        return len(self._items)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
