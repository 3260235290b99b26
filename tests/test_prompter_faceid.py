"""ImagePrompter's FaceID path: the face analyzer's ID embeddings and crops reach the adapter's projection as the
variants define them (insightface replaced by a fake analyzer: fixed embeddings and crops per photo)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ipadapter import IPAdapterError, load_adapter
from ipadapter.encoders import ImageEncoder
from ipadapter.prompter import ImagePrompter
from tests import factories

ID_DIM = 16  # factories.image_proj_state's id_dim


class FakeAnalyzer:
    """Stands in for `FaceAnalyzer`: `analyze(image, source)` gives the (1, 16) ID embedding and the crop set for that
    photo (the same object), and records the source names it was given."""

    def __init__(self, faces) -> None:
        self.faces = faces  # [(photo, ids, crop)]
        self.sources: list[str] = []

    def analyze(self, image, source):
        self.sources.append(source)
        for photo, ids, crop in self.faces:
            if photo is image:
                return ids, crop
        raise AssertionError(f"analyze got an image that is not one of the photos: {image!r}")


def _faceid(unet, tmp_path, variant: str):
    torch.save(factories.published(unet, variant, factories.SD15_CROSS, lora_rank=4), tmp_path / f"{variant}.bin")
    return load_adapter(tmp_path / f"{variant}.bin", unet, variant=variant)


def _patches(model, processor, crops) -> torch.Tensor:
    """transformers' CLIP penultimate hidden states of the crops: the patch features FaceID-Plus reads."""
    with torch.no_grad():
        pixels = processor(images=crops, return_tensors="pt").pixel_values
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def _faces(n: int):
    g = torch.Generator().manual_seed(3)
    return [(factories.reference_image(seed=i), torch.randn(1, ID_DIM, generator=g),
             factories.reference_image(seed=10 + i, size=40)) for i in range(n)]


def test_analyzer_ids_and_crops_reach_the_faceid_plus_head(sd15_unet, tmp_path) -> None:
    """Each photo is analyzed once under its name ("reference i"); its tokens are the head applied to the analyzer's
    ID embedding and the CLIP patches of the analyzer's crop; the analyzer given is kept for the next call."""
    model, processor = factories.tiny_image_encoder()
    adapter = _faceid(sd15_unet, tmp_path, "faceid-plus")
    faces = _faces(2)
    analyzer = FakeAnalyzer(faces)
    prompter = ImagePrompter(SimpleNamespace(unet=sd15_unet, scheduler=None), adapter, ImageEncoder(model, processor),
                             face_analyzer=analyzer)
    with torch.no_grad():
        expected = adapter.project(torch.cat([f[1] for f in faces]), _patches(model, processor, [f[2] for f in faces]))
    try:
        refs = prompter.references([f[0] for f in faces])
        assert analyzer.sources == ["reference 0", "reference 1"]
        for i, ref in enumerate(refs):
            torch.testing.assert_close(ref.cond, expected[i : i + 1], atol=1e-5, rtol=1e-5)
        again = prompter.references([faces[1][0]])
        torch.testing.assert_close(again[0].cond, expected[1:2], atol=1e-5, rtol=1e-5)
        assert analyzer.sources[2:] == ["reference 0"]
    finally:
        prompter.detach()


def test_precomputed_ids_take_the_images_as_crops(sd15_unet, tmp_path) -> None:
    """With `face_embeds` given, the images are the face crops and no face is analyzed: the tokens are the head on
    those IDs and the crops' CLIP patches, which the encoder keeps as patch features (encoding the crop again for
    patch features needs no second forward)."""
    model, processor = factories.tiny_image_encoder()
    adapter = _faceid(sd15_unet, tmp_path, "faceid-plus")
    (photo, ids, crop), = _faces(1)
    analyzer = FakeAnalyzer([])
    encoder = ImageEncoder(model, processor)
    prompter = ImagePrompter(SimpleNamespace(unet=sd15_unet, scheduler=None), adapter, encoder, face_analyzer=analyzer)
    with torch.no_grad():
        expected = adapter.project(ids, _patches(model, processor, [crop]))
    try:
        ref, = prompter.references([crop], face_embeds=ids)
        assert analyzer.sources == []
        torch.testing.assert_close(ref.cond, expected, atol=1e-5, rtol=1e-5)
        forwards = []
        hook = model.register_forward_hook(lambda *_: forwards.append(1))
        encoder.encode([crop], "patch")
        hook.remove()
        assert forwards == []
    finally:
        prompter.detach()


def test_faceid_plus_without_a_clip_encoder_is_one_sentence(sd15_unet, tmp_path) -> None:
    adapter = _faceid(sd15_unet, tmp_path, "faceid-plus")
    (_, ids, crop), = _faces(1)
    prompter = ImagePrompter(SimpleNamespace(unet=sd15_unet, scheduler=None), adapter)
    try:
        with pytest.raises(IPAdapterError) as caught:
            prompter.references([crop], face_embeds=ids)
        assert str(caught.value) == "faceid-plus needs a CLIP image encoder for the face crop"
    finally:
        prompter.detach()


def test_id_features_and_their_zero_embedding_follow_the_adapter(sd15_unet, tmp_path) -> None:
    """FaceID's features are the given IDs and its unconditional input a zero ID, both in the adapter's dtype and on
    its device (the meta device stands in for an accelerator)."""
    adapter = _faceid(sd15_unet, tmp_path, "faceid")
    prompter = ImagePrompter(SimpleNamespace(unet=sd15_unet, scheduler=None), adapter)
    ids = torch.randn(2, ID_DIM, generator=torch.Generator().manual_seed(0))
    try:
        adapter.to(torch.float64)
        (got,) = prompter.features(adapter, [], face_embeds=ids)
        (zeros,) = prompter.uncond_features(adapter, 2)
        torch.testing.assert_close(got, ids.double(), rtol=0, atol=0)
        torch.testing.assert_close(zeros, torch.zeros(2, ID_DIM, dtype=torch.float64), rtol=0, atol=0)
        adapter.to("meta")
        (got,) = prompter.features(adapter, [], face_embeds=ids)
        (zeros,) = prompter.uncond_features(adapter, 2)
        assert got.device.type == zeros.device.type == "meta"
        assert got.dtype == zeros.dtype == torch.float64
    finally:
        prompter.detach()
