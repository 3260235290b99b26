"""Whole generations: ImagePrompter against diffusers' own `load_ip_adapter` pipelines on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ipadapter import load_adapter, save_published
from ipadapter.encoders import ImageEncoder
from ipadapter.prompter import ImagePrompter
from tests import factories

GEN = dict(num_inference_steps=3, guidance_scale=6.0, height=32, width=32)


def _adapter_file(pipe, family: str, folder, cross: int = factories.SD15_CROSS, seed: int = 1):
    state = factories.published(pipe.unet, family, cross, seed=seed)
    torch.save(state, folder / f"{family}.bin")
    return folder / f"{family}.bin"


def _diffusers_images(make, tmp_path, weight: str, encoder, processor, prompt="", scale=1.0, **extra):
    ref = make(tmp_path)
    ref.load_ip_adapter(str(weight.parent), subfolder="", weight_name=weight.name, image_encoder_folder=None)
    ref.image_encoder, ref.feature_extractor = encoder, processor
    ref.set_ip_adapter_scale(scale)
    image = factories.reference_image()
    out = ref(prompt=prompt, ip_adapter_image=image, generator=torch.Generator().manual_seed(0), output_type="np",
              **GEN, **extra)
    return out.images


def _ours(pipe, weight, encoder, processor, prompt="", scale=1.0, **extra):
    adapter = load_adapter(weight, pipe.unet)
    prompter = ImagePrompter(pipe, adapter, ImageEncoder(encoder, processor))
    images = prompter.generate([factories.reference_image()], prompt=prompt, scale=scale, seed=0, steps=3,
                               guidance=6.0, height=32, width=32, output_type="np", **extra)
    return prompter, np.stack(images)


@pytest.mark.parametrize("family", ["base", "plus"])
def test_sd15_generation_equals_diffusers(family: str, tmp_path) -> None:
    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    weight = _adapter_file(pipe, family, tmp_path)
    expected = _diffusers_images(factories.tiny_sd15_pipeline, tmp_path, weight, encoder, processor, prompt="a red")
    plain = pipe(prompt="a red", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    prompter, got = _ours(pipe, weight, encoder, processor, prompt="a red")
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-3
    zero = np.stack(prompter.generate([factories.reference_image()], prompt="a red", scale=0.0, seed=0, steps=3,
                                      guidance=6.0, height=32, width=32, output_type="np"))
    np.testing.assert_array_equal(zero, plain)
    prompter.detach()
    after = pipe(prompt="a red", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    np.testing.assert_array_equal(after, plain)


def test_sdxl_generation_equals_diffusers(tmp_path) -> None:
    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sdxl_pipeline(tmp_path)
    weight = _adapter_file(pipe, "base", tmp_path, cross=factories.SDXL_CROSS)
    expected = _diffusers_images(factories.tiny_sdxl_pipeline, tmp_path, weight, encoder, processor, prompt="a cat")
    _, got = _ours(pipe, weight, encoder, processor, prompt="a cat")
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_controlnet_generation_equals_diffusers(tmp_path) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    def make(path):
        base = factories.tiny_sd15_pipeline(path)
        torch.manual_seed(5)
        controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32)).eval()
        pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    encoder, processor = factories.tiny_image_encoder()
    control = factories.reference_image(seed=9, size=32)
    pipe = make(tmp_path)
    weight = _adapter_file(pipe, "base", tmp_path)
    expected = _diffusers_images(make, tmp_path, weight, encoder, processor, image=control)
    _, got = _ours(pipe, weight, encoder, processor, image=control)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not any("IPAttn" in type(p).__name__ for p in pipe.controlnet.attn_processors.values())


def test_saved_published_file_loads_in_diffusers(tmp_path) -> None:
    """Our published-layout writer is read by diffusers' loader and gives the same images as ours."""
    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    adapter = load_adapter(_adapter_file(pipe, "plus", tmp_path), pipe.unet)
    out = save_published(adapter, pipe.unet, tmp_path / "saved" / "ip.safetensors")
    expected = _diffusers_images(factories.tiny_sd15_pipeline, tmp_path, out, encoder, processor)
    _, got = _ours(pipe, out, encoder, processor)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_changed_s_scale_gives_new_faceid_plusv2_tokens(tmp_path) -> None:
    """The projected-token cache must not serve tokens made with another `s_scale` (V2's shortcut weight)."""
    from types import SimpleNamespace

    unet = factories.sd15_unet()
    torch.save(factories.published(unet, "faceid-plusv2", factories.SD15_CROSS, lora_rank=4), tmp_path / "v2.bin")
    adapter = load_adapter(tmp_path / "v2.bin", unet, variant="faceid-plusv2")
    prompter = ImagePrompter(SimpleNamespace(unet=unet, scheduler=None), adapter)
    try:
        g = torch.Generator().manual_seed(0)
        features = (torch.randn(1, 16, generator=g), torch.randn(1, 5, 40, generator=g))
        first = prompter.project(adapter, features)
        adapter.image_proj.s_scale = 0.25
        second = prompter.project(adapter, features)
        with torch.no_grad():
            expected = adapter.project(*features)
        torch.testing.assert_close(second, expected, rtol=0, atol=0)
        assert not torch.equal(first, second)
    finally:
        prompter.detach()


def test_two_prompts_two_images_each_equal_diffusers(tmp_path) -> None:
    """Several prompts and several images per prompt: the reference lies under every row, as diffusers lays it."""
    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    weight = _adapter_file(pipe, "base", tmp_path)
    expected = _diffusers_images(factories.tiny_sd15_pipeline, tmp_path, weight, encoder, processor,
                                 prompt=["a red", "a blue"], num_images_per_prompt=2)
    prompter, got = _ours(pipe, weight, encoder, processor, prompt=["a red", "a blue"], num_images=2)
    prompter.detach()
    assert got.shape[0] == 4
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("prompt", ["", [""], ["", ""]])
def test_nothing_to_generate_from_is_one_sentence(prompt, tmp_path) -> None:
    from ipadapter import IPAdapterError

    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    prompter = ImagePrompter(pipe, load_adapter(_adapter_file(pipe, "base", tmp_path), pipe.unet),
                             ImageEncoder(encoder, processor))
    try:
        with pytest.raises(IPAdapterError) as caught:
            prompter.generate(prompt=prompt, steps=1)
        assert str(caught.value) == "give a reference image, a text prompt, or both"
        assert len(prompter.generate(prompt=["", "a red"], steps=1, height=32, width=32)) == 2  # one text is enough
    finally:
        prompter.detach()
