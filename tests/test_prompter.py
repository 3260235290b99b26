"""Whole generations: ImagePrompter against diffusers' own `load_ip_adapter` pipelines on the same weights."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ipadapter import AdapterPrompt, IPAdapterError, load_adapter, save_published
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


@contextmanager
def _faceid_prompter(tmp_path, variant: str):
    """A prompter of one FaceID adapter of `variant` on a tiny SD 1.5 UNet (no pipeline: it projects only)."""
    unet = factories.sd15_unet()
    path = tmp_path / f"{variant}.bin"
    torch.save(factories.published(unet, variant, factories.SD15_CROSS, lora_rank=4), path)
    adapter = load_adapter(path, unet, variant=variant)
    prompter = ImagePrompter(SimpleNamespace(unet=unet, scheduler=None), adapter)
    try:
        yield adapter, prompter
    finally:
        prompter.detach()


def test_changed_s_scale_gives_new_faceid_plusv2_tokens(tmp_path) -> None:
    """The projected-token cache must not serve tokens made with another `s_scale` (V2's shortcut weight)."""
    with _faceid_prompter(tmp_path, "faceid-plusv2") as (adapter, prompter):
        g = torch.Generator().manual_seed(0)
        features = (torch.randn(1, 16, generator=g), torch.randn(1, 5, 40, generator=g))
        first = prompter.project(adapter, features)
        prompter.set_s_scale(0.25)
        assert adapter.image_proj.s_scale == 0.25
        second = prompter.project(adapter, features)
        with torch.no_grad():
            expected = adapter.project(*features)
        torch.testing.assert_close(second, expected, rtol=0, atol=0)
        assert not torch.equal(first, second)


def test_s_scale_without_a_shortcut_is_refused_naming_the_attached_variants(tmp_path) -> None:
    with _faceid_prompter(tmp_path, "faceid") as (_, prompter):
        prompter.set_s_scale(1.0)  # the default: nothing to refuse
        with pytest.raises(IPAdapterError) as caught:
            prompter.set_s_scale(0.5)
        assert str(caught.value) == ("s_scale= scales a FaceID adapter's shortcut (FaceID-PlusV2); no attached adapter "
                                     "(faceid) has one")


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


def test_more_steps_than_the_scheduler_has_timesteps_is_one_sentence(tmp_path) -> None:
    """The scheduler refuses more inference steps than its training timesteps with a ValueError deep in the pipeline;
    the prompter says so in one sentence before the pipeline runs, and the next generation runs as usual."""
    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    limit = pipe.scheduler.config.num_train_timesteps
    with pytest.raises(ValueError):
        pipe.scheduler.set_timesteps(limit + 1)
    prompter = ImagePrompter(pipe, load_adapter(_adapter_file(pipe, "base", tmp_path), pipe.unet),
                             ImageEncoder(encoder, processor))
    try:
        with pytest.raises(IPAdapterError) as caught:
            prompter.generate(factories.reference_image(0), prompt="a red", steps=limit + 1)
        assert str(caught.value) == f"steps={limit + 1} is more than the scheduler's {limit} training timesteps"
        assert len(prompter.generate(factories.reference_image(0), steps=1, height=32, width=32)) == 1
    finally:
        prompter.detach()


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_as_many_steps_as_training_timesteps_run_where_the_scheduler_takes_them(spacing: str, tmp_path) -> None:
    """SD 1.5's schedulers space their timesteps "leading", from `steps_offset` (1) up: at as many steps as training
    timesteps the first is one past the last, and diffusers' own scheduler fails at its first step with an
    IndexError. There the prompter says so in one sentence; one step fewer runs, and "trailing" spacing takes them."""
    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    limit = 4
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, num_train_timesteps=limit,
                                                      timestep_spacing=spacing)
    assert pipe.scheduler.config.steps_offset == 1
    truth = copy.deepcopy(pipe.scheduler)
    truth.set_timesteps(limit)
    sample = torch.zeros(1, 4, 2, 2)
    fails = spacing == "leading"
    if fails:
        with pytest.raises(IndexError):
            truth.step(sample, truth.timesteps[0], sample)
    else:
        truth.step(sample, truth.timesteps[0], sample)
    prompter = ImagePrompter(pipe, load_adapter(_adapter_file(pipe, "base", tmp_path), pipe.unet),
                             ImageEncoder(encoder, processor))
    try:
        if fails:
            with pytest.raises(IPAdapterError) as caught:
                prompter.generate(factories.reference_image(0), steps=limit, height=32, width=32)
            assert str(caught.value) == (f"steps={limit} is more than the scheduler's 'leading' spacing fits in its "
                                         f"{limit} training timesteps from its steps_offset of 1: at most {limit - 1}")
        steps = limit - 1 if fails else limit
        assert len(prompter.generate(factories.reference_image(0), steps=steps, height=32, width=32)) == 1
    finally:
        prompter.detach()


def test_a_scheduler_without_training_timesteps_takes_any_step_count(sd15_unet, tmp_path) -> None:
    """Some of diffusers' schedulers (AmusedScheduler, KarrasVeScheduler) keep no `num_train_timesteps`: there is
    nothing to check the steps against, so the pipeline is called with them as given."""
    from diffusers import AmusedScheduler

    scheduler = AmusedScheduler(mask_token_id=0)
    assert not hasattr(scheduler.config, "num_train_timesteps")
    calls = []
    pipe = type("Pipe", (), {"unet": sd15_unet, "scheduler": scheduler,
                             "__call__": lambda self, **kw: calls.append(kw) or SimpleNamespace(images=["made"])})()
    prompter = ImagePrompter(pipe, load_adapter(_adapter_file(pipe, "base", tmp_path), sd15_unet),
                             ImageEncoder(*factories.tiny_image_encoder()))
    try:
        assert prompter.generate(prompt="a red", steps=5000) == ["made"]
    finally:
        prompter.detach()
    assert calls[0]["num_inference_steps"] == 5000


# ---- references, names and sentences (no pipeline: the prompter only needs the UNet) -------------------------------


def _clip_embeds(model, processor, images) -> torch.Tensor:
    """transformers' own CLIP image embeddings, the truth the prompter's encoder must give."""
    with torch.no_grad():
        return model(pixel_values=processor(images=images, return_tensors="pt").pixel_values).image_embeds


def _base_prompter(unet, tmp_path, adapters=("0",), encoder=True):
    torch.save(factories.published(unet, "base", factories.SD15_CROSS), tmp_path / "base.bin")
    loaded = {name: load_adapter(tmp_path / "base.bin", unet) for name in adapters}
    parts = factories.tiny_image_encoder() if encoder else None
    prompter = ImagePrompter(SimpleNamespace(unet=unet, scheduler=None), loaded,
                             ImageEncoder(*parts) if parts else None)
    return prompter, loaded, parts


def test_without_an_image_encoder_images_are_refused_and_precomputed_features_taken(sd15_unet, tmp_path) -> None:
    """As diffusers takes `ip_adapter_image_embeds` with no image encoder loaded: the features (and the negative's,
    which for patch features only an encoder makes) are the adapter's projections of what was given."""
    prompter, loaded, _ = _base_prompter(sd15_unet, tmp_path, encoder=False)
    adapter = loaded["0"]
    embeds = torch.randn(3, adapter.clip_width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapter.project(embeds)
    try:
        for call, says in ((lambda: prompter.references([factories.reference_image()]), "reference images (give "
                            "image_encoder, or precomputed features)"),
                           (lambda: prompter.references(features=(embeds[:2],)), "its unconditional image (give "
                            "image_encoder, or negative features)")):
            with pytest.raises(IPAdapterError) as caught:
                call()
            assert str(caught.value) == f"base needs a CLIP image encoder for {says}"
        refs = prompter.references(features=(embeds[:2],), negative=(embeds[2:],))
        for i, ref in enumerate(refs):
            torch.testing.assert_close(ref.cond, expected[i : i + 1], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ref.uncond, expected[2:], atol=1e-6, rtol=1e-6)
    finally:
        prompter.detach()


def test_one_negative_serves_every_reference_in_any_form(sd15_unet, tmp_path) -> None:
    """One negative image (a list, a tuple of images, or its precomputed embedding) is the unconditional image of
    every reference: each reference's uncond tokens are the adapter's projection of the negative's CLIP embedding."""
    prompter, loaded, (model, processor) = _base_prompter(sd15_unet, tmp_path)
    adapter = loaded["0"]
    a, b, n = (factories.reference_image(seed=s) for s in (0, 1, 2))
    embeds = _clip_embeds(model, processor, [a, b, n])
    with torch.no_grad():
        cond, neg = adapter.project(embeds[:2]), adapter.project(embeds[2:])
    try:
        for negative in ([n], (n,), (embeds[2:],)):
            refs = prompter.references([a, b], negative=negative)
            assert len(refs) == 2
            for i, ref in enumerate(refs):
                torch.testing.assert_close(ref.cond, cond[i : i + 1], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(ref.uncond, neg, atol=1e-5, rtol=1e-5)
    finally:
        prompter.detach()


def test_reference_mistakes_are_one_sentence(sd15_unet, tmp_path) -> None:
    prompter, _, _ = _base_prompter(sd15_unet, tmp_path)
    a, b, c = (factories.reference_image(seed=s) for s in (0, 1, 2))
    try:
        cases = [
            (dict(images=[]), "give at least one reference image (or precomputed embeddings)"),
            (dict(images=[a, b, c], negative=[a, b]), "give one negative image, or one per reference (3), not 2"),
            (dict(images=[a, b], masks=[None]), "1 masks / 2 weights for 2 reference images"),
            (dict(images=[a, b], weights=[1.0]), "2 masks / 1 weights for 2 reference images"),
        ]
        for kwargs, sentence in cases:
            with pytest.raises(IPAdapterError) as caught:
                prompter.references(**kwargs)
            assert str(caught.value) == sentence
        with pytest.raises(IPAdapterError) as caught:
            prompter.generate(steps=1, height=32, width=32)
        assert str(caught.value) == "give a reference image, a text prompt, or both"
    finally:
        prompter.detach()


def test_adapter_names_and_encoder_mismatches_are_one_sentence(sd15_unet, tmp_path) -> None:
    prompter, _, _ = _base_prompter(copy.deepcopy(sd15_unet), tmp_path, adapters=("a", "b"))
    try:
        with pytest.raises(IPAdapterError) as caught:
            prompter.adapter_name(None)
        assert str(caught.value) == "several adapters are attached (a, b): name one"
        with pytest.raises(IPAdapterError) as caught:
            prompter.adapter_name("c")
        assert str(caught.value) == "no adapter named 'c'; attached: a, b"
    finally:
        prompter.detach()
    adapter = load_adapter(tmp_path / "base.bin", sd15_unet)
    narrow = ImageEncoder(*factories.tiny_image_encoder(projection_dim=16))
    with pytest.raises(IPAdapterError) as caught:
        ImagePrompter(SimpleNamespace(unet=sd15_unet, scheduler=None), {"style": adapter}, narrow)
    assert str(caught.value).startswith("adapter 'style' expects 24-d global image features but the image encoder ")


# ---- generation: negative prompts, step windows, the K'/V' cache ---------------------------------------------------

FEW = dict(guidance_scale=6.0, height=32, width=32, output_type="np")


def _plain(pipe, steps: int = 2, **extra):
    return pipe(prompt="a red", generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **FEW,
                **extra).images


def test_generation_follows_the_pipeline_scheduler_and_negative_prompt(tmp_path) -> None:
    """Against the plain pipeline: a negative prompt reaches it as given; a step window that covers none of the
    scheduler's steps (progress 0, 1/2 of 2 steps) leaves its image bitwise unchanged, also when the attachment is
    driven directly before any `generate`; and by default every layer projects K'/V' at each UNet call, as diffusers
    does (2 steps: twice), holding none of them between calls."""
    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    adapter = load_adapter(_adapter_file(pipe, "base", tmp_path), pipe.unet)
    prompter = ImagePrompter(pipe, adapter, ImageEncoder(encoder, processor))
    name = prompter.adapter_name(None)
    plain = _plain(pipe)
    try:
        refs = prompter.references([factories.reference_image()])
        late = {name: AdapterPrompt(refs, start=0.9)}
        prompter.attachment.set_prompts(late, rows=1)
        direct = _plain(pipe)
        prompter.attachment.clear()
        np.testing.assert_array_equal(direct, plain)
        common = dict(prompt="a red", seed=0, steps=2, guidance=6.0, height=32, width=32, output_type="np")
        np.testing.assert_array_equal(np.stack(prompter.generate(late, **common)), plain)
        calls, k_ip = [], [n for n, _ in adapter.named_modules() if n.endswith("to_k_ip")]
        hooks = [adapter.get_submodule(n).register_forward_hook(lambda *_, n=n: calls.append(n)) for n in k_ip]
        applied = np.stack(prompter.generate({name: AdapterPrompt(refs)}, **common))
        for hook in hooks:
            hook.remove()
        assert np.abs(applied - plain).max() > 1e-3
        assert k_ip and sorted(calls) == sorted(k_ip * 2)
        negative = np.stack(prompter.generate(negative_prompt="dark", **common))
    finally:
        prompter.detach()
    expected = _plain(pipe, negative_prompt="dark")
    assert np.abs(expected - plain).max() > 1e-3
    np.testing.assert_allclose(negative, expected, atol=1e-6)


def test_flux_true_cfg_with_an_empty_negative_prompt(tmp_path) -> None:
    """FLUX runs true CFG only when given a negative prompt: with true_cfg_scale > 1 and the default empty negative
    prompt, the image is FluxPipeline's with negative_prompt="" (not its image without true CFG)."""
    from ipadapter.dit.checkpoint import dit_adapter_from_state_dict
    from tests import dit_factories as df

    pipe = df.flux_pipeline(tmp_path)
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), pipe.transformer, metadata={"format": "pt"})
    prompter = ImagePrompter(pipe, adapter, ImageEncoder(*factories.tiny_image_encoder()))
    common = dict(prompt="a cat", true_cfg_scale=1.5, max_sequence_length=8, width=16, height=16, output_type="np")
    try:
        ours = prompter.generate(seed=1, steps=2, guidance=3.5, **common)
    finally:
        prompter.detach()
    run = dict(num_inference_steps=2, guidance_scale=3.5, **common)
    expected = pipe(negative_prompt="", generator=torch.Generator().manual_seed(1), **run).images
    without = pipe(generator=torch.Generator().manual_seed(1), **run).images
    assert np.abs(expected - without).max() > 1e-3
    np.testing.assert_allclose(np.asarray(ours[0]), expected[0], atol=1e-5, rtol=0)


def test_two_adapters_given_the_same_image_each_project_it_with_their_own_weights(sd15_unet, tmp_path) -> None:
    """Projected tokens are cached per adapter (a repeated reference skips the projection head): two adapters of the
    same kind, from two files, given the same image each give their own projection of its CLIP embedding."""
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save(factories.published(sd15_unet, "base", factories.SD15_CROSS, seed=seed), tmp_path / f"{seed}.bin")
        files.append(tmp_path / f"{seed}.bin")
    loaded = {name: load_adapter(path, sd15_unet) for name, path in zip("ab", files)}
    model, processor = factories.tiny_image_encoder()
    prompter = ImagePrompter(SimpleNamespace(unet=sd15_unet, scheduler=None), loaded, ImageEncoder(model, processor))
    image = factories.reference_image(seed=0)
    embeds = _clip_embeds(model, processor, [image])
    try:
        for name in "abab":
            with torch.no_grad():
                want = loaded[name].project(embeds)
            got = prompter.references([image], adapter=name)[0].cond
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (loaded["a"].project(embeds) - loaded["b"].project(embeds)).abs().max() > 1e-3
    finally:
        prompter.detach()
