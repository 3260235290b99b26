"""Kolors IP-Adapter-Plus through KolorsPipeline against diffusers' own IP-Adapter on identical weights.

Kolors' UNet is SDXL-shaped but already has an `encoder_hid_proj` (the ChatGLM text projection, 4096 → 2048), which
diffusers moves aside when it loads an adapter; ours leaves the UNet's projections alone and acts only in the
cross-attention processors. The text encoder is replaced by precomputed embeddings (a ChatGLM tokenizer needs a
vocabulary file); the image side is the real path: a ViT-L/14-336-like CLIP's patches → the Plus resampler.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.checkpoint import adapter_from_state_dict
from ipadapter.encoders import ImageEncoder
from ipadapter.prompter import ImagePrompter
from tests import factories

CROSS, TEXT = 64, 48  # cross-attention width (2048 in Kolors), ChatGLM width (4096)
TOL = 1e-4


def kolors_unet(seed: int = 3):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + TEXT, use_linear_projection=True,
        encoder_hid_dim=TEXT,
    ).eval()


def vit_l_336_like(seed: int = 4):
    """CLIP vision with ViT-L/14-336's patch size and the class token (tiny: 28 px → 2 × 2 patches + 1)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14, projection_dim=24)
    proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return ImageEncoder(CLIPVisionModelWithProjection(cfg).eval(), proc, name="tiny-vit-l-336")


@pytest.fixture(scope="module")
def kolors():
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline  # the top-level name needs sentencepiece

    pipe = KolorsPipeline(vae=factories.tiny_vae(2), text_encoder=None, tokenizer=None, unet=kolors_unet(),
                          scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(9)
    text = {"prompt_embeds": torch.randn(1, 6, TEXT, generator=g), "pooled_prompt_embeds": torch.randn(1, TEXT, generator=g),
            "negative_prompt_embeds": torch.randn(1, 6, TEXT, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(1, TEXT, generator=g)}
    return pipe, text


def test_kolors_plus_images_equal_diffusers(kolors) -> None:
    pipe, text = kolors
    state = factories.published(pipe.unet, "plus", CROSS)
    adapter = adapter_from_state_dict(state, pipe.unet, name="ip_adapter_plus_general.bin")
    assert adapter.config.variant == "plus" and adapter.config.cross_dim == CROSS
    encoder = vit_l_336_like()
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    common = dict(num_inference_steps=2, width=16, height=16, guidance_scale=5.0, output_type="np", **text)
    plain = pipe(generator=torch.Generator().manual_seed(1), **common).images
    with ImagePrompter(pipe, adapter, encoder) as prompter:
        ours = prompter.generate(reference, prompt=None, scale=0.6, seed=1, steps=2, guidance=5.0, width=16,
                                 height=16, output_type="np", **text)
        patches = encoder.encode([reference], "patch")
        uncond = encoder.uncond("patch")
    assert np.array_equal(pipe(generator=torch.Generator().manual_seed(1), **common).images, plain)  # detached
    ref = copy.deepcopy(pipe)
    ref.unet._load_ip_adapter_weights([copy.deepcopy(state)], low_cpu_mem_usage=False)
    ref.set_ip_adapter_scale(0.6)
    expected = ref(ip_adapter_image_embeds=[torch.cat([uncond, patches])[:, None]],
                   generator=torch.Generator().manual_seed(1), **common).images
    assert hasattr(ref.unet, "text_encoder_hid_proj")  # diffusers moved Kolors' text projection aside
    assert np.abs(expected - plain).max() > 1e-3
    np.testing.assert_allclose(np.asarray(ours[0]), expected[0], atol=TOL, rtol=0)


def test_kolors_scale_zero_is_bitwise_the_pipeline(kolors) -> None:
    pipe, text = kolors
    adapter = adapter_from_state_dict(factories.published(pipe.unet, "plus", CROSS), pipe.unet)
    reference = Image.fromarray(np.full((32, 32, 3), 120, np.uint8))
    common = dict(num_inference_steps=2, width=16, height=16, guidance_scale=5.0, output_type="np", **text)
    plain = pipe(generator=torch.Generator().manual_seed(1), **common).images
    with ImagePrompter(pipe, adapter, vit_l_336_like()) as prompter:
        ours = prompter.generate(reference, prompt=None, scale=0.0, seed=1, steps=2, guidance=5.0, width=16,
                                 height=16, output_type="np", **text)
    assert np.array_equal(np.asarray(ours[0]), plain[0])
