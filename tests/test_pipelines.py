"""The same adapter on every pipeline family users run: img2img, inpainting, LCM scheduler, T2I-Adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter import IPAdapterError, load_adapter
from ipadapter.encoders import ImageEncoder
from ipadapter.prompter import ImagePrompter
from tests import factories


def _img2img(path):
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**factories.tiny_sd15_pipeline(path).components)


def _inpaint(path):
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(**factories.tiny_sd15_pipeline(path).components)


def _lcm(path):
    from diffusers import LCMScheduler

    pipe = factories.tiny_sd15_pipeline(path)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _t2i(path):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    base = factories.tiny_sd15_pipeline(path)
    torch.manual_seed(3)
    adapter = T2IAdapter(in_channels=3, channels=(32, 64, 64, 64), num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter")
    return StableDiffusionAdapterPipeline(**{k: v for k, v in base.components.items() if k != "image_encoder"},
                                          adapter=adapter)


CONTROL = factories.reference_image(seed=9, size=32)
MASK = np.zeros((32, 32), np.float32)
MASK[8:24, 8:24] = 1
CASES = {
    "img2img": (_img2img, {"image": CONTROL, "strength": 0.8}),
    "inpaint": (_inpaint, {"image": CONTROL, "mask_image": Image.fromarray((MASK * 255).astype(np.uint8)), "strength": 1.0}),
    "lcm": (_lcm, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_family_equals_diffusers(case: str, tmp_path) -> None:
    make, extra = CASES[case]
    encoder, processor = factories.tiny_image_encoder()
    pipe = make(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    torch.save(factories.published(pipe.unet, "base", factories.SD15_CROSS), tmp_path / "a.bin")
    gen = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np")
    ref = make(tmp_path)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name="a.bin", image_encoder_folder=None)
    ref.image_encoder, ref.feature_extractor = encoder, processor
    expected = ref(prompt="a red", ip_adapter_image=factories.reference_image(), generator=torch.Generator().manual_seed(0),
                   **gen, **extra).images
    prompter = ImagePrompter(pipe, load_adapter(tmp_path / "a.bin", pipe.unet), ImageEncoder(encoder, processor))
    got = np.stack(prompter.generate([factories.reference_image()], prompt="a red", seed=0, steps=4, guidance=5.0,
                                     height=32, width=32, output_type="np", **extra))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_t2i_adapter_pipeline(tmp_path) -> None:
    """diffusers offers no IP-Adapter on T2I-Adapter pipelines; ours works there, and scale 0 is the plain pipeline."""
    encoder, processor = factories.tiny_image_encoder()
    pipe = _t2i(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    torch.save(factories.published(pipe.unet, "base", factories.SD15_CROSS), tmp_path / "a.bin")
    gen = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np", image=CONTROL)
    plain = pipe(prompt="a red", generator=torch.Generator().manual_seed(0), **gen).images
    prompter = ImagePrompter(pipe, load_adapter(tmp_path / "a.bin", pipe.unet), ImageEncoder(encoder, processor))
    run = lambda scale: np.stack(prompter.generate([factories.reference_image()], prompt="a red", scale=scale, seed=0,
                                                   steps=3, guidance=5.0, height=32, width=32, output_type="np",
                                                   image=CONTROL))
    assert np.abs(run(1.0) - plain).max() > 1e-3
    np.testing.assert_array_equal(run(0.0), plain)


def test_changed_processors_after_attach_are_reported(tmp_path) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    torch.save(factories.published(pipe.unet, "base", factories.SD15_CROSS), tmp_path / "a.bin")
    prompter = ImagePrompter(pipe, load_adapter(tmp_path / "a.bin", pipe.unet), ImageEncoder(encoder, processor))
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(IPAdapterError, match="replaced after the adapter was attached"):
        prompter.generate([factories.reference_image()], steps=1, height=32, width=32)


def test_face_analysis_without_insightface_says_how_to_fix() -> None:
    pytest.importorskip("numpy")
    try:
        import insightface  # noqa: F401

        pytest.skip("insightface is installed here")
    except ImportError:
        pass
    from ipadapter.encoders import FaceAnalyzer

    with pytest.raises(IPAdapterError) as err:
        FaceAnalyzer()
    assert str(err.value) == (
        "computing face embeddings needs insightface (pip install 'ipadapter[face]'); or pass a precomputed "
        "512-d ArcFace embedding (.npy/.pt) instead"
    )


def _fake_insightface(monkeypatch, faces: list) -> dict:
    """insightface's FaceAnalysis and face_align.norm_crop as stand-ins that record how they are called."""
    import sys
    import types

    calls: dict = {}

    class FaceAnalysis:
        def __init__(self, name: str, providers: list[str]) -> None:
            calls["init"] = (name, providers)

        def prepare(self, ctx_id: int, det_size: tuple[int, int]) -> None:
            calls["prepare"] = (ctx_id, det_size)

        def get(self, bgr):
            calls["bgr"] = bgr.copy()
            return faces

    def norm_crop(bgr, landmark, image_size: int):
        calls["crop"] = (landmark, image_size)
        return np.ascontiguousarray(bgr[:image_size, :image_size])

    modules = {"insightface": types.ModuleType("insightface"), "insightface.app": types.ModuleType("insightface.app"),
               "insightface.utils": types.ModuleType("insightface.utils"),
               "insightface.utils.face_align": types.ModuleType("insightface.utils.face_align")}
    modules["insightface.app"].FaceAnalysis = FaceAnalysis
    modules["insightface.utils.face_align"].norm_crop = norm_crop
    modules["insightface"].app, modules["insightface"].utils = modules["insightface.app"], modules["insightface.utils"]
    modules["insightface.utils"].face_align = modules["insightface.utils.face_align"]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_face_analysis_drives_insightface_as_the_faceid_recipe_does(monkeypatch) -> None:
    """buffalo_l on the CPU, detection at 640 px; the largest face's `normed_embedding` and its 224-px `norm_crop`
    (docs/checkpoints.md), with insightface's BGR order on the way in and RGB on the way out."""
    import types

    from ipadapter.encoders import FaceAnalyzer

    def face(box, value):
        return types.SimpleNamespace(bbox=np.array(box, dtype=np.float32), kps=np.full((5, 2), value),
                                     normed_embedding=np.full(512, value, dtype=np.float32))

    # areas 1600 (the largest), 900, 1000, 1500; boxes placed so that a wrong corner in the area picks another one
    faces = [face((200, 200, 230, 230), 1.0), face((0, 0, 40, 40), 2.0), face((0, 0, 10, 100), 3.0),
             face((0, -50, 30, 0), 4.0)]
    calls = _fake_insightface(monkeypatch, faces)
    analyzer = FaceAnalyzer()
    assert calls["init"] == ("buffalo_l", ["CPUExecutionProvider"]) and calls["prepare"] == (-1, (640, 640))
    rgb = np.random.default_rng(0).integers(0, 256, (240, 250, 3), dtype=np.uint8)
    embedding, crop = analyzer.analyze(Image.fromarray(rgb))
    np.testing.assert_array_equal(calls["bgr"], rgb[:, :, ::-1])
    assert embedding.dtype == torch.float32 and embedding.shape == (1, 512) and embedding.eq(2.0).all()
    assert calls["crop"][1] == 224 and (calls["crop"][0] == 2.0).all()
    np.testing.assert_array_equal(np.asarray(crop), rgb[:224, :224])
    grey = rgb[:, :, 0]
    analyzer.analyze(Image.fromarray(grey))  # any mode is read as RGB
    np.testing.assert_array_equal(calls["bgr"], np.repeat(grey[:, :, None], 3, axis=2))
    FaceAnalyzer("antelopev2", det_size=320)
    assert calls["init"] == ("antelopev2", ["CPUExecutionProvider"]) and calls["prepare"] == (-1, (320, 320))


def test_no_face_found_is_one_sentence_naming_the_image(monkeypatch) -> None:
    from ipadapter.encoders import FaceAnalyzer

    _fake_insightface(monkeypatch, [])
    with pytest.raises(IPAdapterError) as err:
        FaceAnalyzer().analyze(Image.new("RGB", (8, 8)), source="me.png")
    assert str(err.value) == "no face found in me.png; use a clearer frontal photo or a precomputed embedding"
    with pytest.raises(IPAdapterError, match="^no face found in the image; "):
        FaceAnalyzer().analyze(Image.new("RGB", (8, 8)))


def test_a_hub_pipeline_missing_from_the_cache_offline_is_one_complete_sentence() -> None:
    """The tests run offline (conftest sets HF_HUB_OFFLINE): diffusers' own paragraph was cut at 200 characters
    mid-sentence; the sentence says offline mode, not an unreachable Hub, is why nothing was fetched."""
    from ipadapter.pipelines import load_pipeline

    with pytest.raises(IPAdapterError) as caught:
        load_pipeline("ipadapter-tests/no-such-cached-pipeline")
    assert str(caught.value) == ("the diffusers pipeline ipadapter-tests/no-such-cached-pipeline is not in the local "
                                 "Hugging Face cache and offline mode is on (HF_HUB_OFFLINE is set); download it once "
                                 "with network access and offline mode off (hf download "
                                 "ipadapter-tests/no-such-cached-pipeline) or give a local folder")


def test_a_long_loading_error_is_cut_at_a_word_and_closes_its_parenthesis(monkeypatch, tmp_path) -> None:
    import json

    import diffusers

    from ipadapter.pipelines import load_pipeline

    words = [f"word{i}" for i in range(80)]
    text = "the model failed (" + " ".join(words) + ") and more\nsecond line"

    def from_pretrained(*_: object, **__: object) -> None:
        raise ValueError(text)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    folder = tmp_path / "pipe"  # a pipeline folder (its index read first), which diffusers then fails to load
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(folder)
    prefix = f"could not load a diffusers pipeline from {folder}: "
    message = str(caught.value)
    assert message.startswith(prefix) and message.endswith("...)")
    reason = message[len(prefix):-len("...)")]
    assert len(reason) <= 200 and text.startswith(reason + " ")  # whole words of the first line, none cut
    assert reason.split(" ")[-1] in words
