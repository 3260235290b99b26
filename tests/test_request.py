"""`build_prompt`: a request's control options (tiles, crop, combine, noise negatives, content subtraction, presets)
become the references the CLI, the app and the batch runner generate with. Each expectation is built from the
option's definition (the tile grid, a weighted mean, `image − k·text`) and the prompter's own encode + project of the
images it should have used, never from `build_prompt`'s output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ipadapter import IPAdapterError, load_adapter
from ipadapter.conditioning.images import prepare_image, tile_image
from ipadapter.conditioning.negatives import noise_negative
from ipadapter.encoders import ImageEncoder
from ipadapter.prompter import ImagePrompter
from ipadapter.request import GenerationRequest, build_prompt, load_request
from tests import factories


@pytest.fixture(scope="module")
def prompter(tmp_path_factory) -> ImagePrompter:
    folder = tmp_path_factory.mktemp("request")
    pipe = factories.tiny_sd15_pipeline(folder)
    torch.save(factories.published(pipe.unet, "base", factories.SD15_CROSS), folder / "base.bin")
    return ImagePrompter(pipe, load_adapter(folder / "base.bin", pipe.unet), ImageEncoder(*factories.tiny_image_encoder()))


def _refs(prompter: ImagePrompter, **request):
    (prompt,) = build_prompt(prompter, GenerationRequest(**request)).values()
    return prompt, prompt.references


def _encode(prompter: ImagePrompter, images: list[Image.Image]) -> torch.Tensor:
    return prompter.features(prompter.adapter(), images)[0]


def _project(prompter: ImagePrompter, features: torch.Tensor) -> torch.Tensor:
    return prompter.project(prompter.adapter(), (features,))


def test_tiles_become_one_masked_reference_per_tile(prompter) -> None:
    wide = factories.reference_image(1, 96).resize((96, 40))
    tiles = tile_image(wide)
    assert len(tiles) > 1
    _, refs = _refs(prompter, images=[wide], tiles=True)
    assert len(refs) == len(tiles)
    expected = _project(prompter, _encode(prompter, [t.image for t in tiles]))
    for i, (ref, tile) in enumerate(zip(refs, tiles)):
        torch.testing.assert_close(ref.cond[0], expected[i])
        torch.testing.assert_close(ref.mask, tile.mask())


def test_a_crop_position_is_applied_before_the_encoder(prompter) -> None:
    tall = factories.reference_image(2, 64).resize((40, 96))
    _, (ref,) = _refs(prompter, images=[tall], crop="top")
    top = prepare_image(tall, prompter.encoder.model.config.image_size, crop="top")
    torch.testing.assert_close(ref.cond, _project(prompter, _encode(prompter, [top])))
    _, (centre,) = _refs(prompter, images=[tall])
    assert (centre.cond - ref.cond).abs().max() > 1e-4


def test_combined_references_are_the_weighted_mean_of_their_embeddings(prompter) -> None:
    images = [factories.reference_image(3), factories.reference_image(4)]
    each = _encode(prompter, images)
    _, (ref,) = _refs(prompter, images=images, combine="average", image_weights=[3.0, 1.0])
    torch.testing.assert_close(ref.cond, _project(prompter, (3 * each[0:1] + each[1:2]) / 4))
    assert ref.weight == 1.0  # the weights went into the mean, not on top of it


def test_noise_negatives_are_made_per_reference_and_combined_like_the_references(prompter) -> None:
    images = [factories.reference_image(5), factories.reference_image(6)]
    noisy = [noise_negative(img, "dissolve", 0.4, seed=9) for img in images]
    _, refs = _refs(prompter, images=images, noise=("dissolve", 0.4), seed=9)
    expected = _project(prompter, _encode(prompter, noisy))
    for i, ref in enumerate(refs):
        torch.testing.assert_close(ref.uncond[0], expected[i])
    _, (mixed,) = _refs(prompter, images=images, noise=("dissolve", 0.4), seed=9, combine="average",
                        image_weights=[1.0, 3.0])
    each = _encode(prompter, noisy)
    torch.testing.assert_close(mixed.uncond, _project(prompter, (each[0:1] + 3 * each[1:2]) / 4))


def test_a_negative_image_is_every_references_unconditional_input(prompter) -> None:
    images, negative = [factories.reference_image(14), factories.reference_image(15)], factories.reference_image(16)
    expected = _project(prompter, _encode(prompter, [negative]))
    _, refs = _refs(prompter, images=images, negative_image=negative)
    _, (mixed,) = _refs(prompter, images=images, negative_image=negative, combine="average", image_weights=[1.0, 2.0])
    for ref in (*refs, mixed):
        torch.testing.assert_close(ref.uncond, expected)


def test_one_reference_is_never_combined(prompter) -> None:
    image = factories.reference_image(17)
    _, (alone,) = _refs(prompter, images=[image])
    for mode in ("subtract", "norm average"):
        _, (ref,) = _refs(prompter, images=[image], combine=mode)
        torch.testing.assert_close(ref.cond, alone.cond)


def test_content_subtraction_takes_k_times_the_text_embedding_from_the_image_embedding(prompter) -> None:
    image = factories.reference_image(7)
    text = torch.randn(1, prompter.encoder.global_dim, generator=torch.Generator().manual_seed(0))
    _, (ref,) = _refs(prompter, images=[image], content_text_embeds=text, content_strength=0.6)
    torch.testing.assert_close(ref.cond, _project(prompter, _encode(prompter, [image]) - 0.6 * text))


def test_a_two_image_preset_weights_each_image_by_its_role_and_refuses_a_third(prompter) -> None:
    images = [factories.reference_image(8), factories.reference_image(9)]
    prompt, (style, layout) = _refs(prompter, images=images, preset="style and composition")
    assert prompt.layer_weights is None
    assert style.layer_weights and layout.layer_weights
    assert not set(style.layer_weights) & set(layout.layer_weights)  # SD 1.5: two different transformer models
    with pytest.raises(IPAdapterError, match="takes 2 reference images, one per role, got 3"):
        _refs(prompter, images=[*images, factories.reference_image(10)], preset="style and composition")


@pytest.mark.parametrize("count, request_args, message", [
    (1, {"scale": float("nan")}, "scale= must be a finite number, got nan"),
    (1, {"masks": [torch.ones(4, 4)] * 2}, "got 2 mask(s) for 1 reference image(s); give one per image"),
    (1, {"masks": [torch.ones(4, 4)], "tiles": True}, "tiles= makes its own per-tile masks; do not combine it with masks="),
    (2, {"combine": "average", "masks": [torch.ones(4, 4)] * 2},
     "masked references cannot be combined into one; use combine=concat with masks="),
])
def test_contradicting_options_are_refused(prompter, count, request_args, message) -> None:
    images = [factories.reference_image(11 + i) for i in range(count)]
    with pytest.raises(IPAdapterError) as err:
        build_prompt(prompter, GenerationRequest(images=images, **request_args))
    assert str(err.value) == message


def test_the_named_adapter_gets_the_prompt(tmp_path) -> None:
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    for seed in (1, 2):
        torch.save(factories.published(pipe.unet, "base", factories.SD15_CROSS, seed=seed), tmp_path / f"{seed}.bin")
    adapters = {name: load_adapter(tmp_path / f"{seed}.bin", pipe.unet) for name, seed in (("a", 1), ("b", 2))}
    prompter = ImagePrompter(pipe, adapters, ImageEncoder(*factories.tiny_image_encoder()))
    image = factories.reference_image(13)
    prompts = build_prompt(prompter, GenerationRequest(images=[image]), adapter="b")
    assert list(prompts) == ["b"]
    features = prompter.features(adapters["b"], [image])
    torch.testing.assert_close(prompts["b"].references[0].cond, prompter.project(adapters["b"], features))
    assert (prompter.project(adapters["a"], features) - prompts["b"].references[0].cond).abs().max() > 1e-4


def test_load_request_reads_every_option_by_its_flags_meaning(tmp_path) -> None:
    for name, seed in (("a.png", 1), ("b.png", 2), ("neg.png", 3)):
        factories.reference_image(seed).save(tmp_path / name)
    for name in ("m1.png", "m2.png"):
        Image.new("L", (8, 8), 255).save(tmp_path / name)
    options = dict(image=[str(tmp_path / "a.png"), str(tmp_path / "b.png")], scale=0.8,
                   mask=[str(tmp_path / "m1.png"), str(tmp_path / "m2.png")], start=0.1, end=0.9,
                   preset="style transfer", combine="concat", image_weight=[2.0, 0.5],
                   negative_image=str(tmp_path / "neg.png"), noise=None, content_strength=0.4, embeds_scaling="kv",
                   crop="top", tiles=False, lora_scale=0.5, seed=7)
    request = load_request(options)
    assert (request.scale, request.start, request.end, request.preset, request.combine, request.image_weights,
            request.content_strength, request.embeds_scaling, request.crop, request.tiles, request.lora_scale,
            request.seed) == (0.8, 0.1, 0.9, "style transfer", "concat", [2.0, 0.5], 0.4, "kv", "top", False, 0.5, 7)
    assert [img.tobytes() for img in request.images] == [Image.open(tmp_path / n).convert("RGB").tobytes()
                                                         for n in ("a.png", "b.png")]
    assert len(request.masks) == 2 and all(float(m.min()) == 1.0 for m in request.masks)
    assert request.negative_image.tobytes() == Image.open(tmp_path / "neg.png").convert("RGB").tobytes()
    noisy = load_request({**options, "mask": [], "negative_image": None, "noise": "fade:0.3", "combine": "average",
                          "preset": None, "tiles": True})
    assert (noisy.noise, noisy.combine, noisy.tiles, noisy.masks, noisy.negative_image) == (
        ("fade", 0.3), "average", True, [], None)


def test_the_requests_settings_reach_its_adapter_prompt(prompter) -> None:
    from ipadapter.conditioning.presets import preset

    images = [factories.reference_image(18), factories.reference_image(19)]
    prompt, refs = _refs(prompter, images=images, scale=0.8, start=0.1, end=0.9, embeds_scaling="kv",
                         image_weights=[2.0, 0.5])
    assert (prompt.scale, prompt.start, prompt.end, prompt.scaling) == (0.8, 0.1, 0.9, "kv")
    assert [r.weight for r in refs] == [2.0, 0.5] and prompt.layer_weights is None and not prompt.uncond_layers
    style, _ = _refs(prompter, images=images[:1], preset="style transfer")
    assert style.layer_weights == preset("style transfer", prompter.pipe.unet).layer_weights[0]
    precise, _ = _refs(prompter, images=images[:1], preset="style transfer precise")
    assert precise.uncond_layers == preset("style transfer precise", prompter.pipe.unet).uncond_layers
    assert precise.uncond_layers


def test_lora_scale_reaches_a_faceid_adapters_prompt_and_is_refused_without_a_lora(prompter, tmp_path) -> None:
    """A value nothing would act on is refused rather than dropped: only FaceID adapters carry a LoRA."""
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    torch.save(factories.published(pipe.unet, "faceid", factories.SD15_CROSS, lora_rank=4), tmp_path / "faceid.bin")
    faceid = ImagePrompter(pipe, load_adapter(tmp_path / "faceid.bin", pipe.unet))
    prompt, _ = _refs(faceid, face_embeds=torch.randn(1, 16), lora_scale=0.5)
    assert prompt.lora_scale == 0.5
    with pytest.raises(IPAdapterError) as err:
        _refs(prompter, images=[factories.reference_image(21)], lora_scale=0.5)
    assert str(err.value) == "lora_scale= scales a FaceID adapter's LoRA; this adapter (base) has none"


def test_a_preset_on_a_transformer_base_names_the_per_block_weights(prompter, monkeypatch) -> None:
    monkeypatch.setattr(prompter, "pipe", SimpleNamespace(transformer=object()))
    with pytest.raises(IPAdapterError) as err:
        build_prompt(prompter, GenerationRequest(images=[factories.reference_image(20)], preset="style transfer"))
    assert str(err.value) == ("preset= names UNet layers; on FLUX and SD 3 give per-block weights instead "
                              "(AdapterPrompt.layer_weights keyed by block names such as transformer_blocks.0.attn)")
