"""The miniature custom model: the outline style, the LoRA (training, format, export) and `--base-lora`.

Truths are independent of our code: the default world against the original drawing formula written out here,
`--base-lora` against diffusers' own `load_lora_weights` + `fuse_lora`, the saved LoRA against the peft model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from ipadapter.cli.main import main
from ipadapter.errors import IPAdapterError
from ipadapter.miniature import custom_model, world
from tests import factories


def _original_batch(seed: int, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """`make_batch` as it was before styles existed (the drawing formula copied from that version), and the
    objects' pixel coverage [n, 64, 64]."""
    rng = np.random.default_rng(seed)
    attrs = [world.sample_attrs(rng, split) for _ in range(n)]
    images, masks = [], []
    for a in attrs:
        background = world.background(a, rng)
        s = world.SUPERSAMPLE
        coverage = world.shape_mask(a, rng).reshape(64, s, 64, s).mean(axis=(1, 3))[..., None]
        colour = np.array(world.PALETTE[a.colour], dtype=np.float32)
        images.append(np.clip(background + coverage * (colour - background) + 0.5, 0, 255).astype(np.uint8))
        masks.append(coverage[..., 0])
    return np.stack(images), np.stack(masks)


@pytest.mark.parametrize("seed,split", [(0, "train"), (7, "heldout")])
def test_default_style_is_the_original_world(seed, split) -> None:
    images, attrs = world.make_batch(seed, 64, split)
    explicit, explicit_attrs = world.make_batch(seed, 64, split, style="plain")
    assert np.array_equal(images, _original_batch(seed, 64, split)[0])
    assert np.array_equal(images, explicit) and attrs == explicit_attrs


def test_two_tone_is_the_same_scene_with_a_shaded_lower_half() -> None:
    plain, attrs = world.make_batch(3, 32)
    styled, styled_attrs = world.make_batch(3, 32, style="two-tone")
    masks = _original_batch(3, 32)[1]
    assert attrs == styled_attrs
    assert np.array_equal(plain[masks == 0], styled[masks == 0]), "the background must not change"
    for image, mask, a in zip(styled, masks, attrs):
        colour = np.array(world.PALETTE[a.colour], dtype=np.float32)
        target = 0.0 if colour @ [0.299, 0.587, 0.114] > 0.6 * 255 else 255.0
        shade = np.clip(colour + 0.35 * (target - colour) + 0.5, 0, 255).astype(np.uint8)
        rows = np.flatnonzero(mask.max(axis=1) > 0)
        middle = (rows[0] + rows[-1] + 2) // 2  # the box is rows[0]..rows[-1]; a middle row counts as upper
        full = mask == 1
        assert (image[:middle][full[:middle]] == colour.astype(np.uint8)).all()
        assert (image[middle:][full[middle:]] == shade).all()
    assert abs(custom_model.two_tone_score(plain, attrs)) < 0.01
    assert custom_model.two_tone_score(styled, attrs) > 0.9
    upside_down = styled[:, ::-1]  # shade above, colour below: the score must see the difference
    assert custom_model.two_tone_score(upside_down, attrs) < -0.9
    with pytest.raises(ValueError, match="style"):
        world.make_batch(3, 1, style="sketch")


def _random_lora(unet, seed: int = 0, rank: int = 4):
    """A copy of `unet` with a LoRA whose B factors are random, so it visibly changes the model."""
    lora = copy.deepcopy(unet)
    lora.add_adapter(custom_model.lora_config(rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lora


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved SD-1.5-layout pipeline with image encoder, a base adapter, a LoRA of its UNet and a reference."""
    root = tmp_path_factory.mktemp("custom")
    unet = UNet2DConditionModel.from_pretrained(factories.save_tiny_sd15_pipeline(root) / "unet")
    custom_model.save_lora(_random_lora(unet), root / "lora")
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "ref.png")
    return root


def _diffusers_fused(tiny, scale: float):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny / "pipe", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tiny / "lora"))
    pipe.fuse_lora(lora_scale=scale)
    return pipe


GEN = ["--steps", "2", "--width", "32", "--height", "32", "--prompt", "a cat", "--seed", "3"]


def _generate(tiny, out, *extra: str) -> np.ndarray:
    code = main(["generate", "--base", str(tiny / "pipe"), "--adapter", str(tiny / "base.bin"), "--image",
                 str(tiny / "ref.png"), "--out", str(out), *GEN, *extra])
    assert code == 0
    return np.asarray(Image.open(out))


def test_base_lora_at_adapter_scale_0_is_diffusers_fused_pipeline(tiny, tmp_path) -> None:
    lora = str(tiny / "lora" / custom_model.LORA_WEIGHT_NAME)
    ours = _generate(tiny, tmp_path / "a.png", "--scale", "0", "--base-lora", lora, "--base-lora-scale", "0.7")
    pipe = _diffusers_fused(tiny, 0.7)
    truth = np.asarray(pipe("a cat", num_inference_steps=2, width=32, height=32,
                            generator=torch.Generator().manual_seed(3)).images[0])
    plain = _generate(tiny, tmp_path / "b.png", "--scale", "0")
    assert np.array_equal(ours, truth)
    assert np.abs(ours.astype(int) - plain).mean() > 1, "the LoRA must change the image"


def test_fusing_before_or_after_attaching_gives_the_same_images(tiny) -> None:
    from ipadapter.checkpoint import load_adapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.pipelines import fuse_base_lora, load_pipeline
    from ipadapter.prompter import ImagePrompter

    encoder = ImageEncoder.from_pretrained(str(tiny / "pipe"), subfolder="image_encoder")
    ref = [Image.open(tiny / "ref.png")]
    kwargs = {"prompt": "a cat", "scale": 0.8, "steps": 2, "width": 32, "height": 32, "seed": 1}

    def prompter(pipe):
        return ImagePrompter(pipe, load_adapter(str(tiny / "base.bin"), pipe.unet), encoder)

    first = prompter(fuse_base_lora(load_pipeline(tiny / "pipe"), tiny / "lora"))
    before = np.asarray(first.generate(ref, **kwargs)[0])
    pipe = load_pipeline(tiny / "pipe")
    originals = dict(pipe.unet.attn_processors)
    second = prompter(pipe)
    processors = dict(pipe.unet.attn_processors)
    fuse_base_lora(pipe, tiny / "lora")
    assert dict(pipe.unet.attn_processors) == processors, "fusing must not replace attention processors"
    after = np.asarray(second.generate(ref, **kwargs)[0])
    assert np.array_equal(before, after)
    second.detach()
    assert dict(pipe.unet.attn_processors) == originals
    fused = _diffusers_fused(tiny, 1.0)
    fused.unload_lora_weights()
    ours, theirs = pipe.unet.state_dict(), fused.unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_python_api_fuses_a_base_lora_at_diffusers_default_scale(tiny) -> None:
    """`load_prompter(base_lora=...)` with no scale is diffusers' `fuse_lora()` with no scale."""
    from diffusers import StableDiffusionPipeline

    from ipadapter.loading import load_prompter

    loaded = load_prompter(base=str(tiny / "pipe"), adapters=[str(tiny / "base.bin")], device="cpu",
                           base_lora=str(tiny / "lora"))
    loaded.prompter.detach()
    truth = StableDiffusionPipeline.from_pretrained(tiny / "pipe", torch_dtype=torch.float32)
    truth.load_lora_weights(str(tiny / "lora"))
    truth.fuse_lora()
    truth.unload_lora_weights()
    ours, theirs = loaded.prompter.pipe.unet.state_dict(), truth.unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_shipped_keyword_names_the_asset(monkeypatch, tmp_path) -> None:
    from ipadapter.loading import base_lora_source
    from ipadapter import bundled

    monkeypatch.setattr(bundled, "CUSTOM_LORA_DIR", tmp_path)
    with pytest.raises(IPAdapterError, match="ipadapter miniature train custom"):
        base_lora_source("miniature-custom")
    (tmp_path / custom_model.LORA_WEIGHT_NAME).write_bytes(b"")
    assert base_lora_source("miniature-custom") == str(tmp_path / custom_model.LORA_WEIGHT_NAME)
    assert base_lora_source(str(tmp_path)) == str(tmp_path)
    with pytest.raises(IPAdapterError, match="LoRA not found"):
        base_lora_source(str(tmp_path / "none.safetensors"))


@pytest.fixture(scope="module")
def other_model_lora(tiny):
    """A LoRA of an SDXL-layout UNet: its layer names partly exist in SD 1.5, its shapes do not."""
    (tiny / "xl").mkdir(exist_ok=True)
    xl = factories.tiny_sdxl_pipeline(tiny / "xl")
    return custom_model.save_lora(_random_lora(xl.unet), tiny / "xl_lora")


@pytest.mark.parametrize("case", ["missing", "other model", "not a lora"])
def test_bad_base_lora_is_one_line(tiny, other_model_lora, case, tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    save_file({"proj.weight": torch.zeros(2, 2)}, tmp_path / "adapter.safetensors")
    source, words = {"missing": (tmp_path / "none.safetensors", "not found"),
                     "other model": (other_model_lora, "another base model"),
                     "not a lora": (tmp_path / "adapter.safetensors", "invalid lora")}[case]
    code = main(["generate", "--base", str(tiny / "pipe"), "--adapter", str(tiny / "base.bin"), "--image",
                 str(tiny / "ref.png"), "--out", str(tmp_path / "o.png"), *GEN, "--base-lora", str(source)])
    err = capsys.readouterr().err.strip()  # progress bars of the pipeline loading may come first
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and err.endswith(errors[0]) and words in errors[0].lower(), err
    assert "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("name", ["ref.png", "notes.safetensors"])
def test_an_image_or_text_as_base_lora_is_no_weights_file_before_loading(tiny, name, tmp_path, capsys,
                                                                         monkeypatch) -> None:
    """diffusers' own error ("Unable to load weights from checkpoint file") said nothing of what the file is."""
    import ipadapter.loading

    def load_pipeline(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ipadapter.loading, "load_pipeline", load_pipeline)
    source = tiny / "ref.png" if name == "ref.png" else tmp_path / name
    if name != "ref.png":
        source.write_text("not weights\n")
    code = main(["generate", "--base", str(tiny / "pipe"), "--adapter", str(tiny / "base.bin"), "--image",
                 str(tiny / "ref.png"), "--out", str(tmp_path / "o.png"), *GEN, "--base-lora", str(source)])
    assert code == 2
    assert capsys.readouterr().err == (f"ipadapter: error: {source} is not a LoRA weights file (not a .safetensors or "
                                       ".bin file, or truncated)\n")
    assert not (tmp_path / "o.png").exists()


def test_train_resume_export_and_load(tiny, tmp_path) -> None:
    """2 steps on a cache of the tiny pipeline: resuming after step 1 gives the same LoRA as running straight
    through; the saved LoRA is the peft model (via diffusers' loader); the export is fp16 and loads too. One scene a
    step: a step on the 32x32 latents costs ~0.55 s a scene, and resuming restores the same state whatever the batch."""
    from safetensors import safe_open

    from ipadapter.pipelines import fuse_base_lora, load_pipeline

    cache = custom_model.build_style_cache(tmp_path, tiny / "pipe", n=8, seed=0)
    straight = custom_model.train_custom(tmp_path / "a", tiny / "pipe", cache, steps=2, batch=1)
    custom_model.train_custom(tmp_path / "b", tiny / "pipe", cache, steps=1, batch=1)
    resumed = custom_model.train_custom(tmp_path / "b", tiny / "pipe", cache, steps=2, batch=1, resume=True)
    with safe_open(straight, "pt") as f, safe_open(resumed, "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys()) and len(f.keys()) > 0
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
        assert "lora_adapter_metadata" in f.metadata()

    size = custom_model.export_custom(tmp_path / "a", tmp_path / "assets")
    exported = tmp_path / "assets" / custom_model.LORA_DIR / custom_model.LORA_WEIGHT_NAME
    with safe_open(exported, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert size == pytest.approx(exported.stat().st_size / 2**20)
    full = fuse_base_lora(load_pipeline(tiny / "pipe"), straight).unet.state_dict()
    half = fuse_base_lora(load_pipeline(tiny / "pipe"), exported).unet.state_dict()
    assert all(torch.allclose(full[k], half[k], atol=1e-3) for k in full)
    with pytest.raises(IPAdapterError, match="train custom"):
        custom_model.export_custom(tmp_path / "none", tmp_path / "assets")


def _diffusers_images(prompts: list[str], seed: int, lora_scale: float | None) -> np.ndarray:
    """The bundled pipeline drawing `prompts` through diffusers alone (the shipped LoRA fused at `lora_scale` by its own
    `load_lora_weights` + `fuse_lora`), DDIM 2 steps, guidance 5, one generator seeded `seed`, as uint8."""
    from diffusers import StableDiffusionPipeline

    from ipadapter import bundled

    pipe = StableDiffusionPipeline.from_pretrained(bundled.PIPELINE_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora_scale is not None:
        pipe.load_lora_weights(str(bundled.CUSTOM_LORA_DIR))
        pipe.fuse_lora(lora_scale=lora_scale)
    images = pipe(prompts, num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


def test_the_style_check_scores_the_base_and_the_custom_model_at_each_lora_scale(tmp_path) -> None:
    """`style_check` (custom_eval.json's "style"): the same training captions drawn by the base model and by the
    custom model at each LoRA scale, each scored for two-tone and by the judge; the drawn scenes as the bounds."""
    from ipadapter import bundled
    from ipadapter.miniature.judge import Judge

    report = custom_model.style_check(bundled.PIPELINE_DIR, bundled.CUSTOM_LORA_DIR, bundled.JUDGE_DIR,
                                      tmp_path / "check.png", n=2, seed=3, steps=2, scales=(1.0, 2.5))
    styled, attrs = world.make_batch(3, 2, split="train", style=custom_model.STYLE)
    plain, _ = world.make_batch(3, 2, split="train")
    judge = Judge.load(bundled.JUDGE_DIR)
    assert report["drawn"] == {"plain": custom_model.two_tone_score(plain, attrs),
                               "two_tone": custom_model.two_tone_score(styled, attrs)}
    prompts = [world.caption(a) for a in attrs]
    for label, scale in (("base", None), ("custom x1", 1.0), ("custom x2.5", 2.5)):
        images = _diffusers_images(prompts, 3, scale)
        assert report[label] == {"two_tone": custom_model.two_tone_score(images, attrs),
                                 "accuracy": judge.accuracy(images, attrs)}, label
    assert set(report) == {"n", "ddim_steps", "guidance", "drawn", "base", "custom x1", "custom x2.5"}
    assert (report["n"], report["ddim_steps"], report["guidance"]) == (2, 2, 5.0)
    assert (tmp_path / "check.png").is_file()


@pytest.mark.parametrize("own_pipeline", [False, True])
def test_the_evaluation_reuses_the_base_adapter_of_the_pipeline_the_lora_was_trained_for(tmp_path, monkeypatch,
                                                                                         own_pipeline) -> None:
    """`evaluate`: a LoRA trained on the shipped pipeline is checked with the shipped base adapter; one trained on a
    run folder's own pipeline with that folder's adapter (an adapter fits only its own UNet), and with none when the
    folder has not trained one. Both checks go to custom_eval.json, written whole."""
    import json

    from ipadapter import bundled

    seen = []
    monkeypatch.setattr(custom_model, "style_check", lambda *a: seen.append(("style", a)) or {"s": 1})
    monkeypatch.setattr(custom_model, "reuse_check", lambda *a: seen.append(("reuse", a)) or {"r": 2})
    if own_pipeline:
        (tmp_path / "pipeline").mkdir()
        (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    lora = tmp_path / "lora.safetensors"
    report = custom_model.evaluate(tmp_path, lora)
    pipeline = tmp_path / "pipeline" if own_pipeline else bundled.pipeline_path()
    style = ("style", (pipeline, lora, bundled.judge_path(), tmp_path / "custom_check.png"))
    if own_pipeline:
        assert seen == [style] and report == {"style": {"s": 1}}
        own = tmp_path / "adapter-base" / "adapter.ipadapter.safetensors"
        own.parent.mkdir()
        own.write_bytes(b"")
        seen.clear()
        report = custom_model.evaluate(tmp_path, lora)
        adapter = own
    else:
        adapter = bundled.ASSETS_DIR / "adapters" / "base.safetensors"
    assert seen == [style, ("reuse", (adapter, pipeline, lora, bundled.judge_path(), tmp_path / "custom_reuse.png"))]
    assert report == {"style": {"s": 1}, "reuse": {"r": 2}}
    assert json.loads((tmp_path / "custom_eval.json").read_text()) == report


def test_the_reuse_check_prompts_both_models_with_each_held_out_reference(tmp_path) -> None:
    """`reuse_check` (the quality report's custom row): reference i of the held-out scenes of `seed` given alone to
    the same base adapter on the base model and on the custom model (the LoRA fused by diffusers), seed + i, and the
    judge's bound for the custom style: the same scenes drawn two-tone."""
    from diffusers import StableDiffusionPipeline

    from ipadapter import bundled
    from ipadapter.checkpoint import load_adapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.miniature.judge import Judge
    from ipadapter.prompter import ImagePrompter

    adapter = bundled.ASSETS_DIR / "adapters" / "base.safetensors"
    report = custom_model.reuse_check(adapter, bundled.PIPELINE_DIR, bundled.CUSTOM_LORA_DIR, bundled.JUDGE_DIR,
                                      tmp_path / "reuse.png", n=2, seed=11, scale=0.7, steps=2, guidance=4.0)
    references, attrs = world.make_batch(11, 2, split="heldout")
    styled, _ = world.make_batch(11, 2, split="heldout", style=custom_model.STYLE)
    judge = Judge.load(bundled.JUDGE_DIR)
    assert report["references"] == {"accuracy": judge.accuracy(references, attrs)}
    assert report["references_two_tone"] == {"accuracy": judge.accuracy(styled, attrs)}
    encoder = ImageEncoder.from_pretrained(str(bundled.PIPELINE_DIR), subfolder="image_encoder")
    for label, lora in (("base", False), ("custom", True)):
        pipe = StableDiffusionPipeline.from_pretrained(bundled.PIPELINE_DIR, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(str(bundled.CUSTOM_LORA_DIR))
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        prompter = ImagePrompter(pipe, load_adapter(str(adapter), pipe.unet), encoder)
        images = np.stack([np.asarray(prompter.generate([Image.fromarray(r)], scale=0.7, steps=2, guidance=4.0,
                                                        seed=11 + i)[0].convert("RGB"))
                           for i, r in enumerate(references)])
        assert report[label] == {"accuracy": judge.accuracy(images, attrs),
                                 "two_tone": custom_model.two_tone_score(images, attrs)}, label
    assert (report["adapter"], report["n"], report["scale"], report["ddim_steps"], report["guidance"]) == (
        str(adapter), 2, 0.7, 2, 4.0)
    assert (tmp_path / "reuse.png").is_file()


def test_the_recipe_caches_the_style_once_trains_the_lora_and_evaluates_it(tmp_path, monkeypatch) -> None:
    from ipadapter import bundled

    seen = []
    monkeypatch.setattr(custom_model, "build_style_cache", lambda *a: seen.append(("cache", a)))
    monkeypatch.setattr(custom_model, "train_custom", lambda *a, **k: seen.append(("train", a, k)) or tmp_path / "l")
    monkeypatch.setattr(custom_model, "evaluate", lambda *a: seen.append(("eval", a)))
    assert custom_model.run(tmp_path, 700, False) == tmp_path / "l"
    (tmp_path / "custom_cache.pt").write_bytes(b"")
    custom_model.run(tmp_path, 900, True)
    cache, shipped = tmp_path / "custom_cache.pt", bundled.pipeline_path()
    assert seen == [("cache", (tmp_path, shipped)),
                    ("train", (tmp_path, shipped, cache), {"steps": 700, "resume": False}),
                    ("eval", (tmp_path, tmp_path / "l")),
                    ("train", (tmp_path, shipped, cache), {"steps": 900, "resume": True}),
                    ("eval", (tmp_path, tmp_path / "l"))]
