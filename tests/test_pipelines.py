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

    with pytest.raises(IPAdapterError, match="insightface"):
        FaceAnalyzer()
