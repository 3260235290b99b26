"""Prompts encoded ahead (`prompt_embeds.encode_prompt`) and generation from them: a pipeline without its text
encoders, given them, makes the image the whole pipeline makes from the text (diffusers' own encoding is the truth);
`ImagePrompter.generate` passes them through with the image prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ipadapter
from ipadapter import IPAdapterError
from ipadapter.prompt_embeds import encode_prompt
from tests import dit_factories as df
from tests import factories


def _kolors(tmp_path):
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline

    from tests.test_kolors_cli import chatglm, chatglm_tokenizer, kolors_unet

    pipe = KolorsPipeline(vae=factories.tiny_vae(2), text_encoder=chatglm(), unet=kolors_unet(),
                          tokenizer=chatglm_tokenizer(tmp_path / "t"),
                          scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


CLIP_TEXT = ("text_encoder", "tokenizer")
PIPELINES = {  # family: (pipeline with tiny random weights, its text parts, image side)
    "sd15": (factories.tiny_sd15_pipeline, CLIP_TEXT, 32),
    "sdxl": (factories.tiny_sdxl_pipeline, (*CLIP_TEXT, "text_encoder_2", "tokenizer_2"), 32),
    "kolors": (_kolors, CLIP_TEXT, 16),
    "flux": (df.flux_pipeline, (*CLIP_TEXT, "text_encoder_2", "tokenizer_2"), 16),
    "sd3": (df.sd3_pipeline, (*CLIP_TEXT, "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"), 16),
}


@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_a_pipeline_without_text_encoders_draws_from_encoded_prompts_what_the_text_draws(family, guidance,
                                                                                        tmp_path) -> None:
    make, text_parts, side = PIPELINES[family]
    pipe = make(tmp_path)
    settings = dict(num_inference_steps=2, guidance_scale=guidance, height=side, width=side, output_type="np")

    def draw(p, **prompt):
        return p(generator=torch.Generator().manual_seed(0), **prompt, **settings).images

    expected = draw(pipe, prompt="a red cat")
    bare = type(pipe)(**{**pipe.components, **dict.fromkeys(text_parts)})
    bare.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(draw(bare, **encode_prompt(pipe, "a red cat")), expected)
    assert not np.array_equal(draw(pipe, prompt="a blue dog"), expected), "the check tells prompts apart"


def test_a_pipeline_without_a_table_entry_is_named() -> None:
    class Other:
        pass

    with pytest.raises(IPAdapterError) as caught:
        encode_prompt(Other(), "a cat")
    assert str(caught.value).startswith("Other takes no prompts encoded ahead here; known: StableDiffusionPipeline, ")


@pytest.fixture(scope="module")
def prompter(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd15")
    pipe = StableDiffusionPipeline.from_pretrained(str(factories.save_tiny_sd15_pipeline(root)))
    pipe.set_progress_bar_config(disable=True)
    with ipadapter.load(pipe, str(root / "base.bin")) as loaded:
        yield loaded


def test_generation_from_encoded_prompts_is_generation_from_their_text(prompter) -> None:
    """Two prompts encoded and stacked make two rows, each the image its text makes, with the image prompt."""
    reference = factories.reference_image()
    settings = dict(steps=2, guidance=5.0, seed=1, width=32, height=32)
    expected = prompter.generate(reference, prompt=["a red cat", "a blue dog"], **settings)
    encoded = [encode_prompt(prompter.pipe, text) for text in ("a red cat", "a blue dog")]
    stacked = {name: torch.cat([e[name] for e in encoded]) for name in encoded[0]}
    got = prompter.generate(reference, **stacked, **settings)
    assert len(got) == 2
    for image, want in zip(got, expected):
        assert np.array_equal(np.asarray(image), np.asarray(want))
    plain = prompter.generate(reference, **encoded[0], scale=0.0, **settings)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(expected[0])), "the image prompt acts"


@pytest.mark.parametrize("given, says", [
    ({"prompt": "a cat", "prompt_embeds": True}, "give prompt or prompt_embeds, not both"),
    ({"prompt": ["", "a cat"], "prompt_embeds": True}, "give prompt or prompt_embeds, not both"),
    ({"negative_prompt": "blurry", "prompt_embeds": True, "negative_prompt_embeds": True},
     "give negative_prompt or negative_prompt_embeds, not both"),
])
def test_text_and_its_encoding_together_are_refused(prompter, given, says) -> None:
    encoded = encode_prompt(prompter.pipe, "a cat")
    given = {k: encoded[k] if v is True else v for k, v in given.items()}
    with pytest.raises(IPAdapterError) as caught:
        prompter.generate(factories.reference_image(), steps=2, **given)
    assert str(caught.value) == says


def test_encoded_prompts_alone_are_a_prompt(prompter) -> None:
    """No reference: the text's encoding is enough to generate, as its text is."""
    settings = dict(steps=2, guidance=5.0, seed=1, width=32, height=32)
    got = prompter.generate(**encode_prompt(prompter.pipe, "a cat"), **settings)[0]
    assert np.array_equal(np.asarray(got), np.asarray(prompter.generate(prompt="a cat", **settings)[0]))


def test_flux_true_cfg_takes_an_encoded_negative(tmp_path) -> None:
    """FLUX's true CFG from encoded prompts: the negative's encoding (renamed to the negative keywords) makes the
    image the negative's text makes, with the image prompt; `encode_prompt` passes the call's own options on (T5's
    length here, which changes the image)."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    save_file(df.xlabs_state(), str(tmp_path / "ip_adapter.safetensors"))
    pipe = FluxPipeline.from_pretrained(str(df.save_flux_base(tmp_path)))
    pipe.set_progress_bar_config(disable=True)
    reference = factories.reference_image()
    settings = dict(steps=2, guidance=3.5, seed=1, width=16, height=16, true_cfg_scale=3.0)
    with ipadapter.load(pipe, str(tmp_path / "ip_adapter.safetensors")) as prompter:
        expected = prompter.generate(reference, prompt="a cat", negative_prompt="blurry", max_sequence_length=8,
                                     **settings)[0]
        negative = {f"negative_{k}": v for k, v in encode_prompt(pipe, "blurry", max_sequence_length=8).items()}
        got = prompter.generate(reference, **encode_prompt(pipe, "a cat", max_sequence_length=8), **negative,
                                **settings)[0]
        unguided = prompter.generate(reference, prompt="a cat", **{**settings, "true_cfg_scale": 1.0})[0]
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert not np.array_equal(np.asarray(unguided), np.asarray(expected)), "the negative acts"

