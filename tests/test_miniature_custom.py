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
    through; the saved LoRA is the peft model (via diffusers' loader); the export is fp16 and loads too."""
    from safetensors import safe_open

    from ipadapter.pipelines import fuse_base_lora, load_pipeline

    cache = custom_model.build_style_cache(tmp_path, tiny / "pipe", n=8, seed=0)
    straight = custom_model.train_custom(tmp_path / "a", tiny / "pipe", cache, steps=2, batch=4)
    custom_model.train_custom(tmp_path / "b", tiny / "pipe", cache, steps=1, batch=4)
    resumed = custom_model.train_custom(tmp_path / "b", tiny / "pipe", cache, steps=2, batch=4, resume=True)
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
