"""The reference-embedding LRU: a repeated reference never re-runs the encoder; size 0 disables; encoders differ."""

from __future__ import annotations

import torch

from ipadapter.embed_cache import EmbeddingCache
from ipadapter.encoders import ImageEncoder
from tests import factories


def _counting_encoder(cache: EmbeddingCache, seed: int = 0) -> tuple[ImageEncoder, list[int]]:
    model, processor = factories.tiny_image_encoder(seed=seed)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    return ImageEncoder(model, processor, name=f"tiny{seed}", cache=cache), calls


def test_second_encoding_comes_from_cache() -> None:
    encoder, calls = _counting_encoder(EmbeddingCache())
    a, b = factories.reference_image(0), factories.reference_image(1)
    first = encoder.encode([a, b], "global")
    again = encoder.encode([b, a], "patch"), encoder.encode([b, a], "global")
    assert len(calls) == 2, "patch features are a different entry; the global pair comes from the cache"
    assert torch.equal(again[1], first.flip(0))


def test_size_zero_disables_and_lru_evicts_by_bytes() -> None:
    encoder, calls = _counting_encoder(EmbeddingCache(max_bytes=0))
    img = factories.reference_image(0)
    encoder.encode([img], "global")
    encoder.encode([img], "global")
    assert len(calls) == 2 and len(encoder.cache) == 0
    cache = EmbeddingCache(max_bytes=2 * 24 * 4)
    for i in range(3):
        cache.put("e", "global", factories.reference_image(i), torch.zeros(24))
    assert len(cache) == 2 and cache.get("e", "global", factories.reference_image(0)) is None
    assert cache.get("e", "global", factories.reference_image(2)) is not None


def test_other_encoder_does_not_reuse_entries() -> None:
    cache = EmbeddingCache()
    first, calls_a = _counting_encoder(cache, seed=0)
    other, calls_b = _counting_encoder(cache, seed=0)
    other.model.config.hidden_act = "gelu"  # a different encoder configuration → a different identity
    other._identity = other.identity()
    img = factories.reference_image(3)
    first.encode([img], "global")
    other.encode([img], "global")
    assert len(calls_a) == 1 and len(calls_b) == 1
