"""The miniature ControlNet: object masks from the world, the model and its recipe at toy sizes, and
`ipadapter generate --controlnet` against diffusers' own ControlNet pipeline and IP-Adapter on the same weights."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from ipadapter.cli.main import build_parser, main
from ipadapter.errors import IPAdapterError
from ipadapter.miniature import base_model, controlnet, recipes, world
from ipadapter.miniature import tokenizer as tok
from tests import factories
from tests.killed_runs import assert_same_weights, kill_and_resume

GEN = ["--steps", "2", "--width", "32", "--height", "32", "--guidance", "6.0", "--seed", "3"]


def test_masked_batch_has_the_same_images_as_make_batch() -> None:
    images, attrs = world.make_batch(11, 24, "heldout")
    masked, masks, masked_attrs = world.make_masked_batch(11, 24, "heldout")
    assert np.array_equal(images, masked) and attrs == masked_attrs
    assert masks.shape == (24, 64, 64) and masks.dtype == np.float32
    assert masks.min() == 0.0 and masks.max() == 1.0


def test_mask_is_where_the_object_is_drawn() -> None:
    """Redraw each scene with another object colour from the same random state: exactly the masked pixels change,
    and fully covered pixels have the object's palette colour."""
    _, attrs = world.make_batch(3, 40)
    for i, a in enumerate(attrs):
        image, mask = world.draw_with_mask(a, np.random.default_rng(i))
        other = next(c for c in world.COLOURS if c not in (a.colour, a.bg_colour))
        recoloured = world.draw(replace(a, colour=other), np.random.default_rng(i))
        changed = (image != recoloured).any(axis=-1)
        assert np.array_equal(changed, mask > 0), a
        assert (image[mask == 1] == world.PALETTE[a.colour]).all()
        assert mask.sum() > 20


def test_dataset_writer_masks_change_nothing_else(tmp_path) -> None:
    plain = world.write_dataset(tmp_path / "plain", 3, seed=4)
    with_masks = world.write_dataset(tmp_path / "masked", 3, seed=4, masks=True)
    _, masks, _ = world.make_masked_batch(4, 3)
    for a, b, mask in zip(plain.read_text().splitlines(), with_masks.read_text().splitlines(), masks):
        a, b = json.loads(a), json.loads(b)
        assert "mask_file" not in a and {k: b[k] for k in a} == a
        assert (tmp_path / "plain" / a["image_file"]).read_bytes() == (tmp_path / "masked" / b["image_file"]).read_bytes()
        saved = np.asarray(Image.open(tmp_path / "masked" / b["mask_file"]))
        assert saved.shape == (64, 64) and np.abs(saved / 255.0 - mask).max() <= 0.5 / 255


def _tiny_unet(cross: int = 32):

    torch.manual_seed(0)
    return UNet2DConditionModel(**base_model.unet_config(cross, widths=(32, 32, 32))).eval()


def test_controlnet_maps_a_64px_mask_to_the_latent_grid_and_starts_as_a_no_op() -> None:
    unet = _tiny_unet()
    cn = controlnet.build_controlnet(unet).eval()
    mask = world.make_masked_batch(0, 2)[1]
    cond = controlnet.mask_condition(controlnet.mask_u8(mask))
    assert cond.shape == (2, 3, 64, 64) and 0.0 <= cond.min() and cond.max() == 1.0
    assert cn.controlnet_cond_embedding(cond).shape == (2, 32, base_model.LATENT_PX, base_model.LATENT_PX)
    x, text = torch.randn(2, base_model.LATENT_CHANNELS, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        down, mid = cn(x, 10, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        plain = unet(x, 10, encoder_hidden_states=text).sample
        steered = unet(x, 10, encoder_hidden_states=text, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    assert torch.equal(plain, steered), "zero convolutions: an untrained ControlNet must not change the UNet"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with a toy miniature-layout `pipeline/` (miniature VAE and tokenizer, tiny text tower and UNet)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    out = tmp_path_factory.mktemp("cn_run")
    tok.save_tokenizer(out / "tok")
    tokenizer = tok.load_tokenizer(out / "tok")
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=tokenizer.model_max_length, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**base_model.vae_config()), text_encoder=text, tokenizer=tokenizer, unet=_tiny_unet(),
        scheduler=base_model.sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "pipeline")
    return out


def test_recipe_trains_exports_and_resumes(tiny_run, tmp_path) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from safetensors import safe_open

    cache = controlnet.build_cache(tiny_run, tiny_run / "pipeline", n=8)
    data = torch.load(cache, weights_only=True)
    assert data["masks"].dtype == torch.uint8 and data["masks"].shape == (8, 64, 64)
    assert data["latents"].shape == (8, base_model.LATENT_CHANNELS, 16, 16)
    trained = controlnet.train_controlnet(tiny_run, cache, tiny_run / "pipeline", steps=2, batch=2)
    assert any(p.abs().sum() > 0 for p in trained.controlnet_down_blocks.parameters()), "zero convs must learn"
    controlnet.train_controlnet(tiny_run, cache, tiny_run / "pipeline", steps=3, batch=2, resume=True)
    assert "resumed from" in (tiny_run / "controlnet.log").read_text()

    size = controlnet.export_controlnet(tiny_run, tmp_path)
    weights = tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors"
    assert size == pytest.approx(sum(f.stat().st_size for f in (tmp_path / "controlnet").iterdir()) / 2**20)
    with safe_open(weights, "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    pipe = controlnet.controlnet_pipeline(tiny_run / "pipeline", tmp_path / "controlnet")
    assert isinstance(pipe, StableDiffusionControlNetPipeline) and pipe.controlnet.dtype == torch.float32
    assert isinstance(ControlNetModel.from_pretrained(tiny_run / "controlnet"), ControlNetModel)


def test_recipe_is_registered_and_checks_what_it_needs(tmp_path) -> None:
    from ipadapter.errors import IPAdapterError

    assert "controlnet" in recipes.RECIPES
    with pytest.raises(IPAdapterError, match="train unet"):
        recipes.run_recipe("controlnet", tmp_path, steps=1)


def test_mask_iou_scores_the_object_against_its_own_mask() -> None:
    images, masks, attrs = world.make_masked_batch(8, 6)
    for image, mask, a in zip(images, masks, attrs):
        assert controlnet.mask_iou(image, mask, a) > 0.7
        assert controlnet.mask_iou(image, np.roll(mask, 32, axis=(0, 1)), a) < 0.2


def test_the_eval_asks_for_each_reference_at_another_position_and_draws_its_mask_there() -> None:
    """The masks of `evaluate_controlnet` come from scenes moved off the reference's own cell (so copying the
    reference's layout scores as a miss): each mask's centre lies in its target's grid cell (16, 32 or 48 px, ±2 px
    of jitter), and only position and size change."""
    _, _, refs = world.make_masked_batch(3, 40)
    targets, masks = controlnet._moved(refs, np.random.default_rng(4))
    assert masks.shape == (40, 64, 64)
    for ref, target, mask in zip(refs, targets, masks):
        assert target.position != ref.position
        assert replace(target, position=ref.position, size=ref.size) == ref
        row, col = divmod(world.POSITIONS.index(target.position), 3)
        ys, xs = np.nonzero(mask > 0.5)
        box_centre = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
        assert abs(box_centre[0] - (16 + 16 * col)) <= 3.5 and abs(box_centre[1] - (16 + 16 * row)) <= 3.5
    assert len({t.size for t in targets}) == 3


def test_the_eval_scores_are_fractions_of_the_judges_readings_and_of_the_iou() -> None:
    """Three images judged by a stand-in: one drawn exactly on its mask (IoU 1), one on half of it (IoU 0.5, which
    counts as followed), one of background only (IoU 0); each attribute read right a different number of times, so a
    fraction of wrong readings cannot pass for one of right ones: position and size against the target's, position
    also against the reference's, colour and shape."""

    class Reading:
        def __init__(self, readings):
            self.readings = readings

        def predict(self, images):
            assert len(images) == len(self.readings)
            return self.readings

    target = world.Attrs("ring", "red", "small", "top left", "blue", "plain")
    ref = replace(target, position="center", size="large")
    mask = np.zeros((64, 64), np.float32)
    mask[10:20, 10:20] = 1.0
    empty = np.zeros((64, 64, 3), np.uint8)
    empty[:] = world.PALETTE["blue"]
    drawn, half = empty.copy(), empty.copy()
    drawn[mask > 0.5] = world.PALETTE["red"]
    half[10:15, 10:20] = world.PALETTE["red"]
    readings = [{"position": "top left", "size": "large", "colour": "red", "shape": "cross"},
                {"position": "top left", "size": "large", "colour": "red", "shape": "cross"},
                {"position": "center", "size": "small", "colour": "green", "shape": "cross"}]
    got = controlnet._scores(Reading(readings), np.stack([drawn, half, empty]), np.stack([mask] * 3), [target] * 3,
                             [ref] * 3)
    assert got == {"position": 2 / 3, "size": 1 / 3, "position_of_reference": 1 / 3, "colour": 2 / 3, "shape": 0.0,
                   "mask_iou": 0.5, "iou_at_least_0.5": 2 / 3}


def test_the_mask_is_its_pixels_covered_more_than_half_and_no_object_anywhere_scores_0() -> None:
    """An edge pixel the mask covers exactly half is outside it; a mask and an image both without an object give
    IoU 0, not the 1 of a perfect match."""
    target = world.Attrs("ring", "red", "small", "top left", "blue", "plain")
    background = np.full((64, 64, 3), world.PALETTE["blue"], np.uint8)
    image = background.copy()
    image[10:20, 10:20] = world.PALETTE["red"]
    mask = np.zeros((64, 64), np.float32)
    mask[10:20, 10:20] = 1.0
    mask[10:20, 20] = 0.5
    assert controlnet.mask_iou(image, mask, target) == 1.0
    assert controlnet.mask_iou(background, np.zeros_like(mask), target) == 0.0


# --- `ipadapter generate --controlnet` ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A saved SD-1.5-layout pipeline with an image encoder, a base adapter, a ControlNet whose zero convolutions are
    randomised (so it visibly acts), a 32-px reference and a mask."""
    root = tmp_path_factory.mktemp("cn_base")
    unet = UNet2DConditionModel.from_pretrained(factories.save_tiny_sd15_pipeline(root) / "unet")
    torch.manual_seed(5)
    cn = controlnet.build_controlnet(unet, channels=(16, 32))
    with torch.no_grad():
        for zero in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            zero.weight.normal_(0, 0.05)
    cn.save_pretrained(root / "cn")
    factories.reference_image(seed=2, size=32).save(root / "ref.png")
    world.mask_image(world.make_masked_batch(1, 1)[1][0]).save(root / "mask.png")
    return root


def _cli(root, out, *extra: str) -> int:
    return main(["generate", "--base", str(root / "pipe"), "--adapter", str(root / "base.bin"), "--image",
                 str(root / "ref.png"), "--prompt", "a red", "--out", str(out), *GEN, *extra])


def _diffusers(root, *, scale: float, control_scale: float = 1.0) -> np.ndarray:
    """diffusers alone: its ControlNet pipeline, its IP-Adapter loader, the same files."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    base = StableDiffusionPipeline.from_pretrained(root / "pipe", safety_checker=None)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=ControlNetModel.from_pretrained(root / "cn"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(root), subfolder="", weight_name="base.bin", image_encoder_folder=None)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(root / "pipe" / "image_encoder")
    pipe.feature_extractor = CLIPImageProcessor.from_pretrained(root / "pipe" / "feature_extractor")
    pipe.set_ip_adapter_scale(scale)
    mask = Image.open(root / "mask.png").convert("RGB")
    image = pipe(prompt="a red", ip_adapter_image=Image.open(root / "ref.png").convert("RGB"), image=mask,
                 controlnet_conditioning_scale=control_scale, num_inference_steps=2, guidance_scale=6.0,
                 height=32, width=32, generator=torch.Generator().manual_seed(3)).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_cli_controlnet_generation_equals_diffusers(tiny_base, tmp_path, scale: float) -> None:
    out = tmp_path / "o.png"
    assert _cli(tiny_base, out, "--scale", str(scale), "--controlnet", str(tiny_base / "cn"),
                "--control-image", str(tiny_base / "mask.png"), "--control-scale", "0.8") == 0
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - _diffusers(tiny_base, scale=scale, control_scale=0.8)).max() <= 1
    assert _cli(tiny_base, tmp_path / "plain.png", "--scale", str(scale)) == 0
    assert np.abs(got - np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.int16)).max() > 3, "ControlNet unused"


def test_adapter_is_on_the_unet_never_on_the_controlnet(tiny_base) -> None:
    from diffusers import StableDiffusionControlNetPipeline

    from ipadapter.attention import IPAttnProcessor
    from ipadapter.cli.generate import load_from_flags

    args = build_parser().parse_args(["generate", "--base", str(tiny_base / "pipe"), "--adapter",
                                      str(tiny_base / "base.bin"), "--controlnet", str(tiny_base / "cn")])
    pipe = load_from_flags(args).prompter.pipe
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    assert any(isinstance(p, IPAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert not any(isinstance(p, IPAttnProcessor) for p in pipe.controlnet.attn_processors.values())


def test_sdxl_base_gets_the_sdxl_controlnet_pipeline(tmp_path) -> None:
    from diffusers import StableDiffusionXLControlNetPipeline

    from ipadapter.pipelines import add_controlnet

    pipe = factories.tiny_sdxl_pipeline(tmp_path)
    controlnet.build_controlnet(pipe.unet, channels=(16, 32)).save_pretrained(tmp_path / "cn")
    cn_pipe = add_controlnet(pipe, tmp_path / "cn")
    assert isinstance(cn_pipe, StableDiffusionXLControlNetPipeline) and cn_pipe.unet is pipe.unet
    image = cn_pipe("a cat", image=Image.new("RGB", (32, 32)), num_inference_steps=1, height=32, width=32,
                    output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_miniature_keyword_uses_the_shipped_controlnet(tmp_path) -> None:
    from ipadapter.loading import controlnet_source
    from ipadapter.bundled import CONTROLNET_DIR

    if not (CONTROLNET_DIR / "config.json").is_file():
        pytest.skip("the miniature ControlNet is not exported yet")
    assert controlnet_source("miniature") == str(CONTROLNET_DIR)
    images, masks, _ = world.make_masked_batch(2, 1, "heldout")
    Image.fromarray(images[0]).save(tmp_path / "ref.png")
    world.mask_image(masks[0]).save(tmp_path / "mask.png")
    assert main(["generate", "--image", str(tmp_path / "ref.png"), "--controlnet", "miniature", "--control-image",
                 str(tmp_path / "mask.png"), "--steps", "2", "--out", str(tmp_path / "o.png")]) == 0
    assert Image.open(tmp_path / "o.png").size == (64, 64)


BAD = {
    "control image without controlnet": (["--control-image", "{root}/mask.png"], "--control-image needs --controlnet"),
    "controlnet without control image": (["--controlnet", "{root}/cn"], "--controlnet needs --control-image"),
    "missing control image": (["--controlnet", "{root}/cn", "--control-image", "{root}/none.png"], "not found"),
    "control image not an image": (["--controlnet", "{root}/cn", "--control-image", "{root}/base.bin"], "cannot read"),
    "missing controlnet": (["--controlnet", "{root}/none", "--control-image", "{root}/mask.png"],
                           "ControlNet folder not found"),
    "controlnet for another base": (["--controlnet", "{root}/xl", "--control-image", "{root}/mask.png"],
                                    "another base model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_control_input_is_one_line_and_writes_nothing(tiny_base, case, tmp_path, capsys) -> None:
    if case == "controlnet for another base" and not (tiny_base / "xl").exists():
        controlnet.build_controlnet(factories.sdxl_unet(), channels=(16, 32)).save_pretrained(tiny_base / "xl")
    flags, words = BAD[case]
    assert _cli(tiny_base, tmp_path / "o.png", *[f.format(root=tiny_base) for f in flags]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ipadapter: error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, sentence", [
    (["--control-image", "m.png"], "--control-image needs --controlnet (a ControlNet folder or Hub id, or 'miniature')"),
    (["--controlnet", "cn"], "--controlnet needs --control-image (the conditioning image, e.g. the object's mask)"),
])
def test_a_controlnet_and_its_image_go_together(flags, sentence) -> None:
    from ipadapter.cli.generate import control_kwargs

    with pytest.raises(IPAdapterError) as raised:
        control_kwargs(build_parser().parse_args(["generate", *flags]))
    assert str(raised.value) == sentence


def test_a_transparent_control_image_is_read_on_black(tmp_path) -> None:
    """The ControlNet's conditioning image is white on black: where a PNG is transparent there is no object, so it
    reads as black (not as the white a reference image's transparency reads as), whatever colour the hidden pixels
    hold; its scale is the flag's."""
    from ipadapter.cli.generate import control_kwargs

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (90, 200, 30)  # hidden colour under alpha 0
    rgba[2:6, 2:6] = (255, 255, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mask.png")
    args = build_parser().parse_args(["generate", "--controlnet", "cn", "--control-image", str(tmp_path / "mask.png"),
                                      "--control-scale", "0.7"])
    found = control_kwargs(args)
    expected = np.zeros((8, 8, 3), np.uint8)
    expected[2:6, 2:6] = 255
    assert found["controlnet_conditioning_scale"] == 0.7
    assert np.array_equal(np.asarray(found["image"]), expected)


def test_the_eval_generates_from_moved_masks_as_diffusers_controlnet_pipeline_does(tmp_path) -> None:
    """`evaluate_controlnet` on the bundled models, 2 references, 2 steps: the text rows are diffusers' own ControlNet
    pipeline given each moved scene's caption and mask at control scale 1 and 0; the image rows the same pipeline
    under the shipped base adapter with the reference and no text; each row the judge's scores of those images.
    The report and its grid are written."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from ipadapter import bundled
    from ipadapter.checkpoint import load_adapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.miniature import judge
    from ipadapter.prompter import ImagePrompter

    for name, source in (("pipeline", bundled.PIPELINE_DIR), ("controlnet", bundled.CONTROLNET_DIR),
                         ("judge", bundled.JUDGE_DIR), ("judge_clip", bundled.JUDGE_DIR / "clip")):
        (tmp_path / name).symlink_to(source)
    report = controlnet.evaluate_controlnet(tmp_path, n=2, steps=2, guidance=4.0, seed=30)
    refs, _, ref_attrs = world.make_masked_batch(30, 2, "heldout")
    targets, masks = controlnet._moved(ref_attrs, np.random.default_rng(31))
    controls = [world.mask_image(m).convert("RGB") for m in masks]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        bundled.PIPELINE_DIR, controlnet=ControlNetModel.from_pretrained(bundled.CONTROLNET_DIR), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scorer = judge.Judge.load(bundled.JUDGE_DIR)
    gen = {"num_inference_steps": 2, "guidance_scale": 4.0, "height": 64, "width": 64, "output_type": "np"}
    for scale in (1.0, 0.0):
        drawn = np.concatenate([pipe(world.caption(targets[i]), image=controls[i], controlnet_conditioning_scale=scale,
                                     generator=torch.Generator().manual_seed(30 + i), **gen).images for i in range(2)])
        images = (np.clip(drawn, 0, 1) * 255 + 0.5).astype(np.uint8)
        assert report[f"text_prompt_controlnet_{scale:g}"] == controlnet._scores(scorer, images, masks, targets,
                                                                                 ref_attrs)
    encoder = ImageEncoder.from_pretrained(bundled.PIPELINE_DIR, subfolder="image_encoder")
    prompter = ImagePrompter(pipe, load_adapter(bundled.ASSETS_DIR / "adapters" / "base.safetensors", pipe.unet),
                             encoder)
    for scale in (1.0, 0.0):
        drawn = np.concatenate([prompter.generate([Image.fromarray(refs[i])], prompt="", scale=1.0, image=controls[i],
                                                  controlnet_conditioning_scale=scale, seed=30 + i, steps=2,
                                                  guidance=4.0, width=64, height=64, output_type="np")
                                for i in range(2)])
        images = (np.clip(drawn, 0, 1) * 255 + 0.5).astype(np.uint8)
        assert report[f"image_prompt_controlnet_{scale:g}"] == controlnet._scores(scorer, images, masks, targets,
                                                                                  ref_attrs)
    assert (report["n"], report["ddim_steps"], report["guidance"]) == (2, 2, 4.0)
    assert json.loads((tmp_path / "controlnet_eval.json").read_text()) == report
    assert (tmp_path / "controlnet_samples.png").is_file()


@pytest.mark.parametrize("with_judge", [False, True])
def test_the_recipe_caches_scenes_once_trains_on_the_frozen_pipeline_and_evaluates_with_a_judge(tmp_path, monkeypatch,
                                                                                                with_judge) -> None:
    from ipadapter.miniature import judge

    seen = []
    monkeypatch.setattr(controlnet, "build_cache", lambda *a, **k: seen.append(("cache", a, k)))
    monkeypatch.setattr(controlnet, "train_controlnet", lambda *a, **k: seen.append(("train", a, k)))
    monkeypatch.setattr(controlnet, "evaluate_controlnet", lambda *a: seen.append(("eval", a)) or {"scores": 1})
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    if with_judge:
        (tmp_path / "judge").mkdir()
        (tmp_path / "judge" / judge.CLASSIFIER_WEIGHTS).write_bytes(b"")
    first = controlnet.run(tmp_path, 400, False)
    (tmp_path / controlnet.CACHE_NAME).write_bytes(b"")
    again = controlnet.run(tmp_path, 500, True, batch=8)
    cache = tmp_path / controlnet.CACHE_NAME
    train = [("train", (tmp_path, cache, tmp_path / "pipeline"), {"steps": 400, "batch": 64, "resume": False}),
             ("train", (tmp_path, cache, tmp_path / "pipeline"), {"steps": 500, "batch": 8, "resume": True})]
    evaluation = [("eval", (tmp_path,))] if with_judge else []
    assert seen == [("cache", (tmp_path, tmp_path / "pipeline"), {"n": 8192}), train[0], *evaluation, train[1],
                    *evaluation]
    assert first == again == ({"scores": 1} if with_judge else None)


def test_a_killed_controlnet_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_run, tmp_path, monkeypatch,
                                                                                every_step_checkpoints) -> None:
    cache = controlnet.build_cache(tmp_path, tiny_run / "pipeline", n=8)

    def run(out, resume):
        return controlnet.train_controlnet(out, cache, tiny_run / "pipeline", steps=3, batch=2, resume=resume)

    whole, resumed, drawn = kill_and_resume(run, controlnet, "noisy_batch", tmp_path, monkeypatch)
    assert drawn == 1
    assert_same_weights(whole, resumed)
