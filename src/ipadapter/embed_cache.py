"""A bounded LRU of reference embeddings keyed by image content, so a repeated reference never re-runs the encoder.

Keys include the encoder's identity and the features kind: a changed encoder never serves stale entries.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from PIL import Image


def image_key(image: Image.Image) -> str:
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


class EmbeddingCache:
    """LRU by bytes: `max_bytes` = 0 disables caching entirely."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, encoder: str, kind: str, image: Image.Image) -> torch.Tensor | None:
        if not self.max_bytes:
            return None
        key = (encoder, kind, image_key(image))
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found

    def put(self, encoder: str, kind: str, image: Image.Image, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if not self.max_bytes or size > self.max_bytes:
            return
        key = (encoder, kind, image_key(image))
        if key in self._items:
            self.bytes -= self._items.pop(key).numel() * value.element_size()
        self._items[key] = value.detach()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)
