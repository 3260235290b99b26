"""Condition ≠ target: the adapter's input comes from the sample's reference image(s), never from the target the
UNet denoises; several references give concatenated tokens, as generation attends to them."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from ipadapter import IPAdapterError
from ipadapter.train import TrainConfig, train, trainer
from ipadapter.train.cache import CacheReader
from ipadapter.train.data import Decoder, ShardStream, read_manifest
from ipadapter.train.step import project_references
from tests import factories


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@torch.no_grad()
def clip_global(images: list[Image.Image], processor) -> torch.Tensor:
    """transformers alone, on a fresh copy of the factories' encoder: CLIP `image_embeds` of these images."""
    pixels = processor(images=images, return_tensors="pt").pixel_values
    return factories.tiny_image_encoder(4)[0](pixel_values=pixels).image_embeds


def _solid(path, colour, size=(24, 20)) -> str:
    Image.new("RGB", size, colour).save(path)
    return path.name


def _data(tmp_path, refs_per_sample: int, n: int = 4):
    """Targets of one colour each; references of other colours, distinct from every target."""
    folder = tmp_path / "data"
    factories.write_images(folder, n)  # targets img0..img{n-1}
    ref_colours = [(250, 250, 250), (10, 10, 10), (128, 0, 255)]
    refs = [_solid(folder / f"ref{k}.png", ref_colours[k]) for k in range(refs_per_sample)]
    lines = [{"image_file": f"img{i}.png", "text": "x", "ref_image_file": refs if refs_per_sample > 1 else refs[0]}
             for i in range(n)]
    manifest = folder / "refs.jsonl"
    manifest.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    return manifest, [Image.open(folder / r).convert("RGB") for r in refs], Image.open(folder / "img0.png").convert("RGB")


def _config(tmp_path, manifest, **kw) -> TrainConfig:
    values = dict(data=str(manifest), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=2,
                  max_steps=2, num_workers=0, save_every=1000, drop_image=0.0, drop_text=0.0, drop_both=0.0)
    values.update(kw)
    return TrainConfig(**values)


def _record_features(monkeypatch) -> list[tuple]:
    seen = []
    forward = trainer.TrainModule.forward

    def recording(self, noisy, timesteps, text, feats, added=None):
        with torch.no_grad():
            tokens = project_references(self.adapter, feats, self.references)
            # generation with K references of one adapter: each projected alone, tokens side by side
            alone = tokens if self.references == 1 else torch.cat(
                [self.adapter.project(*(f[:, k] for f in feats)) for k in range(self.references)], dim=1)
        seen.append((feats, tokens, alone))
        return forward(self, noisy, timesteps, text, feats, added)

    monkeypatch.setattr(trainer.TrainModule, "forward", recording)
    return seen


def test_condition_comes_from_the_reference_not_the_target(tmp_path, monkeypatch) -> None:
    manifest, (ref,), target = _data(tmp_path, 1)
    seen = _record_features(monkeypatch)
    models, encoder = factories.in_memory()
    train(_config(tmp_path, manifest), models=models, image_encoder=encoder, log_with=None)
    expected = clip_global([ref], encoder.processor)[0]
    wrong = clip_global([target], encoder.processor)[0]
    assert not torch.allclose(expected, wrong, atol=1e-3)  # the test can tell them apart
    assert len(seen) == 2
    for (features,), _, _ in seen:
        assert features.shape == (2, expected.shape[0])
        for row in features:
            torch.testing.assert_close(row, expected)


@pytest.mark.parametrize("variant, tokens_per_reference", [("base", 4), ("plus", 16)])
def test_several_references_give_concatenated_tokens(tmp_path, monkeypatch, variant, tokens_per_reference) -> None:
    """Batches of 3 samples with 2 references each (3 ≠ 2, so rows and references cannot be mistaken for each
    other); Plus's resampler mixes its input tokens, so a reference projected with another's tokens would show."""
    manifest, refs, _ = _data(tmp_path, 2, n=6)
    seen = _record_features(monkeypatch)
    models, encoder = factories.in_memory()
    train(_config(tmp_path, manifest, references=2, batch_size=3, variant=variant), models=models,
          image_encoder=encoder, log_with=None)
    assert len(seen) == 2
    for features, tokens, alone in seen:
        assert tokens.shape == (3, 2 * tokens_per_reference, factories.CROSS)
        torch.testing.assert_close(tokens, alone)
        if variant == "base":
            expected = clip_global(refs, encoder.processor)  # (2, D): reference 0, reference 1
            assert features[0].shape == (3, 2, expected.shape[1])
            for sample in features[0]:
                torch.testing.assert_close(sample, expected)


def test_cache_stores_the_reference_features(tmp_path) -> None:
    manifest, refs, target = _data(tmp_path, 2)
    models, encoder = factories.in_memory()
    config = _config(tmp_path, manifest, references=2, cache=str(tmp_path / "cache"), cache_dtype="float32",
                     max_steps=1)
    train(config, models=models, image_encoder=encoder, log_with=None)
    reader = CacheReader(config.cache)
    rows = [reader(r) for r in reader.records()]
    expected = clip_global(refs, encoder.processor)
    for row in rows:
        assert row["image"].shape == expected.shape
        torch.testing.assert_close(row["image"], expected)


def test_webdataset_reference_members(tmp_path) -> None:
    """`{key}.jpg` is the target, `{key}.ref.png` (or `.ref0.png`, `.ref1.png`, ...) the condition."""
    target, ref = Image.new("RGB", (20, 18), (200, 30, 30)), Image.new("RGB", (20, 18), (30, 30, 200))

    def png(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    members = {"000.png": png(target), "000.txt": b"a", "000.ref.png": png(ref),
               "001.png": png(target), "001.txt": b"b", "001.ref0.png": png(ref), "001.ref1.png": png(target)}
    factories.write_tar(tmp_path / "s.tar", members)
    stream = ShardStream([str(tmp_path / "s.tar")], single_pass=True)
    one, two = stream.next_record(), stream.next_record()
    assert (len(one.refs), len(two.refs)) == (1, 2)
    _, encoder = factories.in_memory()
    example = Decoder(factories.RES, encoder.processor)(one)
    torch.testing.assert_close(example["clip"], encoder.processor(images=ref, return_tensors="pt").pixel_values[0])
    pair = Decoder(factories.RES, encoder.processor, references=2)(two)
    torch.testing.assert_close(pair["clip"], encoder.processor(images=[ref, target], return_tensors="pt").pixel_values)


def test_same_image_stays_the_default(tmp_path) -> None:
    manifest = factories.write_images(tmp_path / "data", 2)
    _, encoder = factories.in_memory()
    record = read_manifest(manifest)[0]
    assert record.refs == []
    example = Decoder(factories.RES, encoder.processor)(record)
    own = encoder.processor(images=Image.open(record.image).convert("RGB"), return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(example["clip"], own)


def test_reference_count_must_match(tmp_path) -> None:
    manifest, _, _ = _data(tmp_path, 2)
    with pytest.raises(IPAdapterError, match=r"entry 1 has 2 reference image\(s\).*conditions on 1"):
        read_manifest(manifest)
    plain = factories.write_images(tmp_path / "plain", 2)
    with pytest.raises(IPAdapterError, match=r"entry 1 has 1 reference image\(s\).*ref_image_file as a list of 2"):
        read_manifest(plain, references=2)


def test_faceid_reads_face_crops_and_one_id_per_reference(tmp_path) -> None:
    """FaceID: `face_image_file` (the aligned crop) is what CLIP sees, with one ID embedding per reference."""
    import numpy as np

    folder = tmp_path / "data"
    factories.write_images(folder, 1)
    crops = [_solid(folder / f"face{k}.png", c) for k, c in enumerate([(250, 200, 180), (90, 60, 40)])]
    ids = []
    for k in range(2):
        np.save(folder / f"id{k}.npy", np.full(8, k + 1, np.float32))
        ids.append(f"id{k}.npy")
    entry = {"image_file": "img0.png", "text": "x", "face_image_file": crops, "id_embed_file": ids,
             "ref_image_file": "img0.png"}  # the face crop wins for FaceID variants
    manifest = folder / "faces.jsonl"
    manifest.write_text(json.dumps(entry) + "\n")
    (record,) = read_manifest(manifest, need_id=True, references=2)
    _, encoder = factories.in_memory()
    example = Decoder(factories.RES, encoder.processor, id_dim=8, references=2)(record)
    faces = [Image.open(folder / c).convert("RGB") for c in crops]
    torch.testing.assert_close(example["clip"], encoder.processor(images=faces, return_tensors="pt").pixel_values)
    torch.testing.assert_close(example["id"], torch.tensor([[1.0] * 8, [2.0] * 8]))
