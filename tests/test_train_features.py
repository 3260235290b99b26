"""The image features the trainer feeds the adapter are CLIP's own: `image_embeds` ("global") and the penultimate
hidden states ("patch") of `CLIPVisionModelWithProjection`, computed here directly with transformers on the same
pixels; a dropped image of a patch variant is the encoder's output for zero pixel values."""

from __future__ import annotations

import pytest
import torch

from ipadapter.encoders import ImageEncoder
from ipadapter.train import TrainConfig, feed, train, trainer
from ipadapter.train.cache import CacheReader
from ipadapter.train.data import Decoder, read_manifest
from tests import factories


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@torch.no_grad()
def clip_features(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """transformers alone, on a fresh copy of the factories' encoder (same seed, same weights)."""
    model = factories.tiny_image_encoder(4)[0]
    if kind == "global":
        return model(pixel_values=pixels).image_embeds
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def _config(tmp_path, variant: str, **kw) -> TrainConfig:
    values = dict(data=str(factories.write_images(tmp_path / "data", 4)), output=str(tmp_path / "out"), resolution=factories.RES,
                  batch_size=2, max_steps=2, num_workers=0, save_every=1000, variant=variant, drop_text=0.0,
                  drop_both=0.0)
    values.update(kw)
    return TrainConfig(**values)


@pytest.mark.parametrize("variant, drop_image, kind", [
    ("base", 0.0, "global"),
    ("plus", 0.0, "patch"),
    ("plus", 1.0, "zeros"),  # every image dropped: zero pixels through the encoder
])
def test_training_batches_get_clip_features(tmp_path, monkeypatch, variant, drop_image, kind) -> None:
    batches, features = [], []
    collate, forward = trainer.collate, trainer.TrainModule.forward

    def recording_collate(examples):
        batches.append(collate(examples))
        return batches[-1]

    def recording_forward(self, noisy, timesteps, text, feats, added=None):
        features.append(feats)
        return forward(self, noisy, timesteps, text, feats, added)

    monkeypatch.setattr(trainer, "collate", recording_collate)
    monkeypatch.setattr(trainer.TrainModule, "forward", recording_forward)
    models, encoder = factories.in_memory()
    train(_config(tmp_path, variant, drop_image=drop_image), models=models, image_encoder=encoder, log_with=None)
    assert len(batches) == len(features) == 2
    for batch, (got,) in zip(batches, features):
        pixels = torch.zeros_like(batch["clip"]) if kind == "zeros" else batch["clip"]
        torch.testing.assert_close(got, clip_features(pixels, "patch" if kind == "zeros" else kind))


@pytest.mark.parametrize("variant, kind", [("base", "global"), ("plus", "patch")])
def test_cached_features_are_clip_features(tmp_path, variant, kind) -> None:
    config = _config(tmp_path, variant, cache=str(tmp_path / "cache"), cache_dtype="float32", max_steps=1)
    models, encoder = factories.in_memory()
    train(config, models=models, image_encoder=encoder, log_with=None)
    reader = CacheReader(config.cache)
    decode = Decoder(factories.RES, encoder.processor)
    pixels = torch.stack([decode(r)["clip"] for r in read_manifest(config.data)])  # cache rows: manifest order
    cached = torch.stack([reader(r)["image"] for r in reader.records()])
    torch.testing.assert_close(cached, clip_features(pixels, kind))
    expected_uncond = clip_features(torch.zeros(1, 3, 32, 32), "patch")[0] if kind == "patch" else torch.zeros(24)
    torch.testing.assert_close(reader.constants["uncond_image"], expected_uncond)


@pytest.mark.parametrize("saved_processor", [True, False])
def test_trainer_loads_the_inference_encoder_from_a_folder(tmp_path, saved_processor) -> None:
    """The saved processor, or CLIP's default sized to the encoder (the cache fingerprint hashes its settings)."""
    from transformers import CLIPImageProcessor

    folder = factories.write_image_encoder(tmp_path / "enc", processor=saved_processor)
    encoder = feed.load_image_encoder(TrainConfig(image_encoder=str(folder)))
    assert isinstance(encoder, ImageEncoder)
    assert (encoder.global_dim, encoder.patch_dim, encoder.patch_tokens) == (24, 40, 17)
    default = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    assert encoder.processor.to_dict() == default.to_dict()
    assert ImageEncoder.load_processor(folder).to_dict() == default.to_dict()  # configs only: the cache check's way
    pixels = torch.randn(2, 3, 32, 32)
    for kind in ("global", "patch"):
        torch.testing.assert_close(encoder.encode_pixels(pixels, kind), clip_features(pixels, kind))
