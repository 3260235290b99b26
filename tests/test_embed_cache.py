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
    assert len(calls) == 2  # one image at a time
    again = encoder.encode([b, a], "patch"), encoder.encode([b, a], "global")
    assert len(calls) == 4, "patch features are a different entry; the global pair comes from the cache"
    assert torch.equal(again[1], first.flip(0))


def test_one_images_features_are_the_cached_tensor_not_a_copy() -> None:
    """A single reference's features are the cache's own storage, new or repeated: a copy would be held beside the
    cached one while the unconditional image is encoded (the peak of a generation's encoding,
    benchmarks/held_tensors.py); several images are stacked, as a batch must be."""
    cache = EmbeddingCache()
    encoder, _ = _counting_encoder(cache)
    img = factories.reference_image(3)
    for _ in range(2):
        features = encoder.encode([img], "patch")
        cached = {t.untyped_storage().data_ptr() for t in cache._items.values()}
        assert features.untyped_storage().data_ptr() in cached
    together = encoder.encode([img, factories.reference_image(4)], "patch")
    assert together.untyped_storage().data_ptr() not in cached
    assert torch.equal(together[0], features[0])


def test_an_images_features_do_not_depend_on_the_images_encoded_with_it() -> None:
    """What the cache keeps for an image is what that image alone gives, so a later generation's pixels do not depend
    on which references an earlier one encoded together (a batched matmul rounds differently)."""
    images = [factories.reference_image(i) for i in range(5)]
    together, _ = _counting_encoder(EmbeddingCache())
    alone, _ = _counting_encoder(EmbeddingCache())
    for features in ("global", "patch"):
        batch = together.encode(images, features)
        for i, image in enumerate(images):
            assert torch.equal(batch[i], alone.encode([image], features)[0])


def test_size_zero_disables_and_lru_evicts_by_bytes() -> None:
    encoder, calls = _counting_encoder(EmbeddingCache(max_bytes=0))
    img = factories.reference_image(0)
    encoder.encode([img], "global")
    encoder.encode([img], "global")
    assert len(calls) == 2 and len(encoder.cache) == 0
    cache = EmbeddingCache(max_bytes=2 * 24 * 4)
    for i in range(3):
        cache.put(("e", i), torch.zeros(24))
    assert len(cache) == 2 and cache.get(("e", 0)) is None
    assert cache.get(("e", 2)) is not None
    cache.resize(24 * 4)  # room for one entry: the least recently used one goes
    assert len(cache) == 1 and cache.get(("e", 2)) is not None and cache.bytes == 24 * 4
    cache.resize(0)
    assert len(cache) == 0 and cache.bytes == 0


def test_clear_empties_the_cache_and_keeps_its_bound() -> None:
    encoder, calls = _counting_encoder(EmbeddingCache(max_bytes=2 * 24 * 4))
    img = factories.reference_image(0)
    encoder.encode([img], "global")
    encoder.cache.clear()
    assert len(encoder.cache) == 0 and encoder.cache.bytes == 0
    encoder.encode([img], "global")
    encoder.encode([img], "global")
    assert len(calls) == 2, "encoded again after the clear, then served from the cache"
    assert encoder.cache.max_bytes == 2 * 24 * 4 and len(encoder.cache) == 1


def test_other_encoder_does_not_reuse_entries() -> None:
    cache = EmbeddingCache()
    first, calls_a = _counting_encoder(cache, seed=0)
    model, calls_b = _counting_encoder(cache, seed=0)
    model.model.config.hidden_act = "gelu"  # a different encoder configuration → a different identity
    other = ImageEncoder(model.model, model.processor, name="tiny0", cache=cache)  # same name, other identity
    img = factories.reference_image(3)
    first.encode([img], "global")
    other.encode([img], "global")
    assert len(calls_a) == 1 and len(calls_b) == 1


def _prompter(cache: EmbeddingCache, folder):
    from ipadapter import load_adapter
    from ipadapter.prompter import ImagePrompter

    pipe = factories.tiny_sd15_pipeline(folder)
    torch.save(factories.published(pipe.unet, "plus", factories.SD15_CROSS), folder / "plus.bin")
    adapter = load_adapter(folder / "plus.bin", pipe.unet)
    encoder, _ = _counting_encoder(cache)
    projections: list[int] = []
    adapter.image_proj.register_forward_hook(lambda *a: projections.append(a[1][0].shape[0]))
    return ImagePrompter(pipe, adapter, encoder), adapter, projections


def test_repeated_reference_and_uncond_skip_the_projection_head(tmp_path) -> None:
    prompter, adapter, projections = _prompter(EmbeddingCache(), tmp_path)
    img = factories.reference_image(4)
    first = prompter.references([img, img])
    assert projections == [1, 1], "two equal images: one row projected; the unconditional row once"
    again = prompter.references([img])
    assert projections == [1, 1], "a repeated reference and the unconditional image come from the cache"
    with torch.no_grad():
        fresh = adapter.project(*prompter.features(adapter, [img]))
    torch.testing.assert_close(again[0].cond, fresh, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        next(adapter.image_proj.parameters()).mul_(1.5)  # the adapter's weights changed in place, and it is told
    adapter.weights_changed()
    del projections[:]
    changed = prompter.references([img])
    assert projections == [1, 1], "new weights: the reference and the unconditional image are projected again"
    assert (changed[0].cond - first[0].cond).abs().max() > 1e-4
    adapter.image_proj.load_state_dict(adapter.image_proj.state_dict())  # a load of any part counts by itself
    del projections[:]
    prompter.references([img])
    assert projections == [1, 1]


def test_the_unconditional_images_patch_features_are_not_kept_beside_its_tokens(tmp_path) -> None:
    """A Plus adapter's unconditional input is the encoder's patch features of a zero image, as large as a reference's.
    The prompter keeps their projected tokens; the encoder must not keep the features as well (they would be held
    through every generation for nothing), so once the tokens must be made again the zero image is encoded again."""
    prompter, adapter, _ = _prompter(EmbeddingCache(), tmp_path)
    encodes: list[int] = []
    prompter.encoder.model.register_forward_pre_hook(lambda m, a, k: encodes.append(1), with_kwargs=True)
    img = factories.reference_image(4)
    prompter.references([img])
    assert len(encodes) == 2, "the reference and the zero image"
    adapter.weights_changed()
    prompter.references([img])
    assert len(encodes) == 3, "the reference's features come from the cache; the zero image's were not kept"


def test_size_zero_projects_every_time(tmp_path) -> None:
    prompter, _, projections = _prompter(EmbeddingCache(max_bytes=0), tmp_path)
    img = factories.reference_image(5)
    prompter.references([img])
    prompter.references([img])
    assert projections == [1, 1, 1, 1]


def test_references_hold_the_cached_tokens_not_a_copy(tmp_path) -> None:
    """A reference's tokens are the cache's own tensors (new or repeated, one image or several distinct ones): a
    stacked copy would hold every reference's tokens twice through the generation."""
    cache = EmbeddingCache()
    prompter, _, _ = _prompter(cache, tmp_path)
    imgs = [factories.reference_image(6), factories.reference_image(7)]

    def storages(tensors) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in tensors}

    for refs in (prompter.references(imgs), prompter.references(imgs[:1])):
        held = storages(t for r in refs for t in (r.cond, r.uncond))
        assert held <= storages(cache._items.values())


def _mib(n: float) -> torch.Tensor:
    return torch.zeros(int(n * 2**18))  # float32: 4 bytes an element


def test_the_lru_by_bytes_closed_form() -> None:
    """An entry of exactly the bound is kept, a larger one refused without evicting anything; replacing a key counts
    its bytes once; hits and misses are counted one a lookup."""
    cache = EmbeddingCache(max_bytes=2**20)
    cache.put("a", _mib(0.25))
    cache.put("too big", _mib(1.5))
    assert cache.get("a") is not None and cache.get("too big") is None and cache.bytes == 2**18
    cache.put("a", _mib(0.5))
    assert cache.bytes == 2**19
    cache.put("b", _mib(1))  # exactly the bound: kept, "a" evicted
    assert cache.get("a") is None and cache.get("b") is not None and cache.bytes == 2**20
    assert (cache.hits, cache.misses) == (2, 2)
    cache.get("c")
    cache.get("c")
    assert cache.misses == 4


def test_a_negative_bound_is_refused_with_its_value() -> None:
    import pytest

    with pytest.raises(ValueError) as caught:
        EmbeddingCache(max_bytes=-1)
    assert str(caught.value) == "cache size must be >= 0 bytes, got -1"
    with pytest.raises(ValueError) as caught:
        EmbeddingCache().resize(-5)
    assert str(caught.value) == "cache size must be >= 0 bytes, got -5"


def test_a_tensor_key_reads_every_tensor_after_a_missing_one() -> None:
    from ipadapter.embed_cache import tensor_key

    a, b = torch.zeros(3), torch.ones(3)
    assert tensor_key(None, a) != tensor_key(None, b)
    assert tensor_key(None, a) == tensor_key(None, a.clone()) != tensor_key(a)
