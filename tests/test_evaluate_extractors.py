"""The measuring networks' front ends (Inception, DINOv2, LPIPS, ArcFace, the CLIP judge's batching) against their
definitions: the pixels each network is given, computed independently, and stand-ins for the optional packages."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter.errors import IPAdapterError
from ipadapter.evaluate import extractors
from ipadapter.evaluate.judges import ClipJudge, pooled
from tests import factories


def _images() -> list[Image.Image]:
    """Three references of two sizes, one of them greyscale (each network is given RGB)."""
    return [factories.reference_image(0), factories.reference_image(1, size=40).convert("L"),
            factories.reference_image(2)]


def _pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The RGB pixels, bicubic-resized, as float32 in [0, 255]."""
    return np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), np.float32)


class _MeanInception(torch.nn.Module):
    """Stands in for the TorchScript FID Inception: its pool features here are the per-channel means."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if return_features else x.sum(dim=(1, 2, 3))


@pytest.mark.parametrize("batch", [1, 2, 32])
def test_inception_features_are_computed_from_299px_bicubic_rgb_in_0_255_whatever_the_batch(tmp_path, batch) -> None:
    path = tmp_path / extractors.INCEPTION_FILE
    torch.jit.script(_MeanInception()).save(str(path))
    images = _images()
    expected = np.stack([_pixels(im, (299, 299)).mean(axis=(0, 1)) for im in images])
    got = extractors.inception_features(path, batch=batch)(images)
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_the_inception_file_is_looked_for_in_the_two_caches_and_named_when_missing(tmp_path, monkeypatch) -> None:
    """Without a path: ~/.cache/ipadapter first, then torch hub's checkpoints folder (where StyleGAN's metrics keep
    it); the refusal names the first."""
    monkeypatch.setenv("HOME", str(tmp_path))
    ours = tmp_path / ".cache" / "ipadapter" / extractors.INCEPTION_FILE
    hub = tmp_path / ".cache" / "torch" / "hub" / "checkpoints" / extractors.INCEPTION_FILE
    assert extractors.inception_candidates(None) == [ours, hub]
    assert extractors.inception_candidates(str(tmp_path / "x.pt")) == [tmp_path / "x.pt"]
    with pytest.raises(extractors.MetricUnavailable) as missing:
        extractors.inception_features()
    assert str(missing.value) == (f"FID needs the Inception-v3 TorchScript file {extractors.INCEPTION_FILE} (StyleGAN2-ADA "
                                  f"metrics); put it at {ours} or give inception=FILE")
    hub.parent.mkdir(parents=True)
    torch.jit.script(_MeanInception()).save(str(hub))
    image = factories.reference_image(0)
    np.testing.assert_allclose(extractors.inception_features()([image])[0], _pixels(image, (299, 299)).mean(axis=(0, 1)),
                               rtol=1e-5)


def test_a_file_that_is_not_torchscript_is_named(tmp_path) -> None:
    path = tmp_path / extractors.INCEPTION_FILE
    path.write_bytes(b"not a model")
    with pytest.raises(IPAdapterError, match=f"^{path} is not a TorchScript Inception model: "):
        extractors.inception_features(path)


def test_dino_features_are_the_cls_token_of_its_own_processors_pixels(tmp_path) -> None:
    """With a saved image processor, DINOv2 reads what that processor makes (resize and crop as saved), not the
    fallback's plain resize."""
    from transformers import BitImageProcessor, Dinov2Model

    path = factories.save_dino(tmp_path / "dino")
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor.save_pretrained(path)
    images = _images()
    model = Dinov2Model.from_pretrained(path).eval()
    with torch.no_grad():
        pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        expected = model(pixel_values=pixels).last_hidden_state[:, 0]
    got = extractors.dino_embedder(path)(images)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-6)


def test_dino_without_a_processor_resizes_to_its_image_size_with_imagenet_statistics(tmp_path) -> None:
    from transformers import Dinov2Model

    path = factories.save_dino(tmp_path / "dino")
    images = _images()
    x = torch.from_numpy(np.stack([_pixels(im, (28, 28)) / 255.0 for im in images])).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = Dinov2Model.from_pretrained(path).eval()(
            pixel_values=(x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).last_hidden_state[:, 0]
    assert torch.allclose(extractors.dino_embedder(path)(images), expected, atol=1e-6)


def test_a_missing_dino_is_named_with_how_to_get_it(tmp_path) -> None:
    with pytest.raises(extractors.MetricUnavailable) as missing:
        extractors.dino_embedder(tmp_path / "none")
    assert str(missing.value) == (f"DINO-I needs the DINOv2 model {tmp_path / 'none'} (Dinov2Model) in a local folder "
                                  "or the Hugging Face cache; download it once (hf download facebook/dinov2-base) or "
                                  "give dino=FOLDER")


class _RecordingLPIPS(torch.nn.Module):
    """Stands in for `lpips.LPIPS`: records how it was built, where it was moved and what it was given."""

    built: list[dict] = []
    moved: list[str] = []
    given: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __init__(self, **kwargs) -> None:
        super().__init__()
        _RecordingLPIPS.built.append(kwargs)

    def to(self, device: str) -> "_RecordingLPIPS":
        _RecordingLPIPS.moved.append(device)
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _RecordingLPIPS.given.append((a, b))
        return torch.full((1, 1, 1, 1), 0.25)


def test_lpips_is_alexnet_on_both_images_at_the_first_ones_size_in_minus_1_to_1(monkeypatch) -> None:
    for record in (_RecordingLPIPS.built, _RecordingLPIPS.moved, _RecordingLPIPS.given):
        record.clear()
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=_RecordingLPIPS))
    distance = extractors.lpips_distance(device="meta")
    a, b = factories.reference_image(0, size=48), factories.reference_image(1, size=40).convert("L")
    assert distance(a, b) == 0.25
    assert _RecordingLPIPS.built == [{"net": "alex", "verbose": False}] and _RecordingLPIPS.moved == ["meta"]
    [(x, y)] = _RecordingLPIPS.given
    for got in (x, y):
        assert got.device.type == "meta" and got.dtype == torch.float32 and got.shape == (1, 3, 48, 48)
    extractors.lpips_distance()(a, b)
    x, y = _RecordingLPIPS.given[-1]
    for got, image in ((x, a), (y, b)):
        expected = torch.from_numpy(_pixels(image, a.size) / 127.5 - 1).permute(2, 0, 1)[None]
        assert got.dtype == torch.float32 and torch.allclose(got, expected)


def test_lpips_that_cannot_load_its_weights_or_is_not_installed_is_unavailable(monkeypatch) -> None:
    def offline(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=offline))
    with pytest.raises(extractors.MetricUnavailable) as failed:
        extractors.lpips_distance()
    assert str(failed.value) == ("LPIPS could not load its AlexNet weights (RuntimeError); run it once online to cache "
                                 "them")
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(extractors.MetricUnavailable) as absent:
        extractors.lpips_distance()
    assert str(absent.value) == ("LPIPS diversity needs the lpips package (pip install lpips) and its AlexNet weights")


def test_arcface_rows_are_the_analysers_embeddings_and_nan_where_no_face_is_found(monkeypatch) -> None:
    from ipadapter import encoders

    class Analyzer:
        def analyze(self, image: Image.Image) -> tuple[torch.Tensor, None]:
            if image.size == (40, 40):
                raise IPAdapterError("no face found")
            return torch.full((1, 512), float(image.size[0])), None

    monkeypatch.setattr(encoders, "FaceAnalyzer", Analyzer)
    rows = extractors.arcface_embedder()([factories.reference_image(0, size=32), factories.reference_image(1, size=40)])
    assert rows.shape == (2, 512)
    assert torch.equal(rows[0], torch.full((512,), 32.0)) and torch.isnan(rows[1]).all()


def test_arcface_without_insightface_is_unavailable_with_the_reason(monkeypatch) -> None:
    from ipadapter import encoders

    def missing():
        raise IPAdapterError("face embeddings need insightface")

    monkeypatch.setattr(encoders, "FaceAnalyzer", missing)
    with pytest.raises(extractors.MetricUnavailable) as raised:
        extractors.arcface_embedder()
    assert str(raised.value) == "face-ID cosine: face embeddings need insightface"


def test_feature_distance_is_the_mean_squared_difference_of_unit_feature_vectors() -> None:
    """With the identity as the network: per pixel, the RGB vectors in [-1, 1] made unit length, their squared
    difference summed over channels, averaged over pixels."""
    a, b = factories.reference_image(0, size=20), factories.reference_image(1, size=24).convert("L")
    unit = [F.normalize(torch.from_numpy(_pixels(im, (16, 16)) / 127.5 - 1), dim=-1) for im in (a, b)]
    expected = float(((unit[0] - unit[1]) ** 2).sum(dim=-1).mean())
    assert extractors.feature_distance(torch.nn.Identity(), size=16)(a, b) == pytest.approx(expected, rel=1e-5)


def test_the_judge_reads_in_batches_and_truncates_long_captions(tmp_path) -> None:
    """Embeddings do not depend on the batch size; a caption longer than the text tower's 16 positions is cut to
    them (as CLIPScore does) instead of failing."""
    from transformers import AutoTokenizer, CLIPModel

    folder = factories.save_judge(tmp_path / "judge")
    judge = ClipJudge.load(folder)
    images = _images()
    assert torch.allclose(judge.image_embeds(images, batch=1), judge.image_embeds(images), atol=1e-6)
    texts = ["a red circle", "a " + "very " * 30 + "long caption"]
    assert torch.allclose(judge.text_embeds(texts, batch=1), judge.text_embeds(texts), atol=1e-6)
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(texts[1:], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(pooled(model.get_text_features(**ids)), dim=-1)
    assert ids.input_ids.shape[1] == 16
    assert torch.allclose(judge.text_embeds(texts[1:]), expected, atol=1e-6)
    assert torch.allclose(judge.text_embeds(texts).norm(dim=-1), torch.ones(2))


def test_a_judge_saved_without_an_image_processor_gets_clips_at_its_image_size(tmp_path) -> None:
    """CLIP's preprocessing at the vision tower's size: the shortest side resized to it, then a centre crop."""
    from transformers import CLIPImageProcessor

    folder = factories.save_judge(tmp_path / "judge", image_size=32)
    (tmp_path / "judge" / "preprocessor_config.json").unlink()
    judge = ClipJudge.load(folder)
    images = _images()
    expected = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    assert judge.processor.size == expected.size and judge.processor.crop_size == expected.crop_size
    assert torch.equal(judge.processor(images=images, return_tensors="pt").pixel_values,
                       expected(images=images, return_tensors="pt").pixel_values)


def test_a_judge_that_is_not_a_clip_or_has_no_weights_is_one_sentence(tmp_path) -> None:
    vision, _ = factories.tiny_image_encoder()
    vision.save_pretrained(tmp_path / "vision")
    with pytest.raises(IPAdapterError) as other:
        ClipJudge.load(tmp_path / "vision")
    assert str(other.value) == ("the judge must be a CLIP with image and text towers (CLIPModel), but "
                                f"{tmp_path / 'vision'} is a CLIPVision model")
    folder = factories.save_judge(tmp_path / "judge")
    (tmp_path / "judge" / "model.safetensors").unlink()
    with pytest.raises(IPAdapterError, match=f"^could not load the judge {folder}: .*model.safetensors"):
        ClipJudge.load(folder)


def test_dino_is_read_from_disk_only_and_moved_to_the_device(monkeypatch) -> None:
    """Nothing here downloads: the model and its processor are read with local_files_only, then run on `device`."""
    import transformers

    calls, moved = [], []

    class Model(torch.nn.Module):
        def to(self, device: str) -> "Model":
            moved.append(device)
            return self

    def reader(kind: str, result):
        return lambda source, **kwargs: calls.append((kind, source, kwargs)) or result

    monkeypatch.setattr(transformers.Dinov2Model, "from_pretrained", reader("model", Model()))
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", reader("processor", None))
    extractors.dino_embedder("facebook/dinov2-base", device="cuda:1")
    assert calls == [("model", "facebook/dinov2-base", {"local_files_only": True}),
                     ("processor", "facebook/dinov2-base", {"local_files_only": True})]
    assert moved == ["cuda:1"]


def test_inception_is_loaded_onto_the_device_and_a_bad_file_gets_torchs_reason(tmp_path, monkeypatch) -> None:
    from ipadapter.errors import first_clause

    path = tmp_path / extractors.INCEPTION_FILE
    path.write_bytes(b"not a model")
    with pytest.raises(RuntimeError) as torch_says:
        torch.jit.load(str(path))
    with pytest.raises(IPAdapterError) as raised:
        extractors.inception_features(path)
    assert str(raised.value) == f"{path} is not a TorchScript Inception model: {first_clause(str(torch_says.value))}"
    seen = []
    monkeypatch.setattr(torch.jit, "load", lambda name, **kwargs: seen.append((name, kwargs)) or _MeanInception())
    extractors.inception_features(path, device="cuda:1")
    assert seen == [(str(path), {"map_location": "cuda:1"})]


def test_the_judge_is_frozen_float32_on_its_device_with_the_processor_given_or_saved(tmp_path) -> None:
    """A judge saved in half precision measures in float32; it is never trained; `processor=` replaces the saved
    one, and the saved one (not CLIP's defaults) is used otherwise."""
    from transformers import CLIPImageProcessor, CLIPModel

    folder = factories.save_judge(tmp_path / "judge")
    CLIPModel.from_pretrained(folder).half().save_pretrained(folder)
    saved = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                               image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    saved.save_pretrained(folder)
    judge = ClipJudge.load(folder)
    assert judge.model.dtype == torch.float32
    assert not any(p.requires_grad for p in judge.model.parameters())
    assert (judge.processor.size, judge.processor.image_mean) == (saved.size, saved.image_mean)
    given = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    assert ClipJudge.load(folder, processor=given).processor is given
    assert ClipJudge.load(folder, device="meta").device.type == "meta"


def test_pooled_takes_a_tensor_as_is_or_an_outputs_pooler_output() -> None:
    """transformers 4's `get_*_features` return the tensor, 5's an output holding it as `pooler_output`."""
    features = torch.randn(2, 8)
    assert pooled(features) is features
    assert pooled(types.SimpleNamespace(pooler_output=features)) is features
