"""Loading the CLIP vision encoder (`ImageEncoder.from_pretrained`, `load_processor`) and its unconditional inputs.

Checked against independent truth: the weights and processor files saved here (read back with safetensors and
transformers' own `from_pretrained`), CLIP's documented preprocessing (shortest side → size, centre crop, OpenAI CLIP
mean/std), transformers' own error text for the reason part of our one-line messages, and the transformers model run
directly for the "patch" unconditional features and for encoded images. Every error message is asserted whole: the
CLI prints it as is. Tiny random CLIP vision towers (hidden 32, 32 px, patch 8) are built here; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ipadapter.conditioning.embeds_file import EncoderIdentity
from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError
from tests import factories

SUB = "image_encoder"
# Not CLIP's fallback (mean/std 0.5, resize to 40 then crop 32): a loaded copy of it can only come from the file.
SAVED_PROCESSOR = dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
LOAD_TEMPLATE = "could not load a CLIP vision encoder from {} (not found offline, or not a CLIP vision model): {}"
CONFIG_TEMPLATE = "could not read the CLIP vision config of {}: {}"


def _encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    return factories.tiny_image_encoder(seed, hidden=32)[0]


def _save(folder: Path, *, processor: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    _encoder(seed).to(dtype).save_pretrained(folder)
    if processor:
        CLIPImageProcessor(**SAVED_PROCESSOR).save_pretrained(folder)
    return folder


def _first_line(call) -> str:
    """The first line of transformers' own error, which our messages quote."""
    with pytest.raises((OSError, ValueError)) as err:
        call()
    return str(err.value).splitlines()[0]


def _assert_quotes_cut(message: str, prefix: str, line: str) -> None:
    """`message` is our sentence then `line` cut to one readable clause: its leading whole words (at most 200
    characters), marked "..." (a long line, so the cut is exercised)."""
    assert len(line) > 200 and "\n" not in message and message.startswith(prefix)
    reason = message[len(prefix):]
    assert reason.endswith("...")
    kept = reason[: -len("...")]
    assert 0 < len(kept) <= 200 and line.startswith(kept) and line[len(kept)] in " ,;:("


def _clip_default(size: int) -> dict:
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).to_dict()


def _assert_clip_default(processor: object, size: int) -> None:
    """CLIP's documented preprocessing sized to the encoder: shortest side → size, centre crop size², CLIP mean/std."""
    d = processor.to_dict()
    assert d["size"] == {"shortest_edge": size} and d["crop_size"] == {"height": size, "width": size}
    assert d["do_resize"] and d["do_center_crop"] and d["do_normalize"]
    assert list(d["image_mean"]) == list(OPENAI_CLIP_MEAN) and list(d["image_std"]) == list(OPENAI_CLIP_STD)
    assert d == _clip_default(size)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two pipeline-like roots holding `image_encoder/`: one with a saved processor, one without (read-only)."""
    base = tmp_path_factory.mktemp("roots")
    out = {}
    for name, processor in (("with", True), ("without", False)):
        _save(base / name / SUB, processor=processor)
        out[name] = base / name
    return out


def test_an_uncached_hub_id_is_one_line_naming_the_encoder_and_its_subfolder(tmp_path: Path, monkeypatch) -> None:
    """Without network, loading the encoder or only its processor asks the Hub once about an id the cache lacks and
    says what is missing, with the command that downloads that subfolder."""
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    expected = ("the image encoder ipadapter-tests/not-cached/image_encoder is not in the local Hugging Face cache and "
                "the Hub cannot be reached; download it once with network access (hf download "
                "ipadapter-tests/not-cached --include 'image_encoder/*') or give a local folder")
    for load in (ImageEncoder.from_pretrained, ImageEncoder.load_processor):
        with pytest.raises(IPAdapterError) as caught:
            load("ipadapter-tests/not-cached", subfolder=SUB)
        assert str(caught.value) == expected
    assert [url for url in sent if "ipadapter-tests" in url] == [
        "https://huggingface.co/api/models/ipadapter-tests/not-cached"] * 2


def test_a_cached_hub_id_without_a_saved_processor_is_read_with_no_request(tmp_path: Path, monkeypatch) -> None:
    """A cached encoder without a saved processor: its config, read for the image size, comes from the cache too."""
    _save(tmp_path / "repo" / SUB, processor=False)
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/encoder", tmp_path / "repo")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    _assert_clip_default(ImageEncoder.load_processor("ipadapter-tests/encoder", subfolder=SUB), 32)
    _assert_clip_default(ImageEncoder.from_pretrained("ipadapter-tests/encoder", subfolder=SUB).processor, 32)
    assert [url for url in sent if "ipadapter-tests" in url] == []


# ---- from_pretrained: weights, name, processor, dtype, device ----------------------------------------------
@pytest.mark.parametrize("via", ["subfolder", "folder"])
def test_loads_the_saved_weights_and_names_the_folder(roots: dict[str, Path], via: str) -> None:
    """The weights are the saved ones; the name is the folder read (root/subfolder, or the folder itself)."""
    root = roots["with"]
    if via == "subfolder":
        encoder = ImageEncoder.from_pretrained(root, subfolder=SUB)
        assert encoder.name == f"{root}/{SUB}"
    else:
        encoder = ImageEncoder.from_pretrained(str(root / SUB))
        assert encoder.name == str(root / SUB)
    saved = load_file(root / SUB / "model.safetensors")
    state = encoder.model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert encoder.dtype == torch.float32 and encoder.device == torch.device("cpu")
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training


@pytest.mark.parametrize("via", ["subfolder", "folder"])
def test_uses_the_saved_processor(roots: dict[str, Path], via: str) -> None:
    """A `preprocessor_config.json` beside the weights is the processor used, as transformers reads it."""
    root = roots["with"]
    encoder = (ImageEncoder.from_pretrained(root, subfolder=SUB) if via == "subfolder"
               else ImageEncoder.from_pretrained(root / SUB))
    expected = CLIPImageProcessor.from_pretrained(str(root / SUB)).to_dict()
    assert encoder.processor.to_dict() == expected
    assert expected["size"] == {"shortest_edge": 40} and list(expected["image_mean"]) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("via", ["subfolder", "folder"])
def test_without_a_saved_processor_uses_clip_preprocessing_sized_to_the_encoder(roots: dict[str, Path],
                                                                                 via: str) -> None:
    """No processor saved: CLIP's own preprocessing at the config's image size (32 here, not CLIP's 224)."""
    root = roots["without"]
    encoder = (ImageEncoder.from_pretrained(root, subfolder=SUB) if via == "subfolder"
               else ImageEncoder.from_pretrained(root / SUB))
    assert json.loads((root / SUB / "config.json").read_text())["image_size"] == 32
    _assert_clip_default(encoder.processor, 32)
    assert encoder.name == (f"{root}/{SUB}" if via == "subfolder" else str(root / SUB))


def test_float16_checkpoint_loads_as_float32_unless_auto(tmp_path: Path) -> None:
    """The default dtype is float32 whatever the file holds; `dtype="auto"` keeps the checkpoint's float16."""
    folder = _save(tmp_path / "half", processor=False, dtype=torch.float16)
    saved = load_file(folder / "model.safetensors")
    assert all(v.dtype == torch.float16 for v in saved.values())
    for dtype, want in ((None, torch.float32), ("auto", torch.float16), (torch.bfloat16, torch.bfloat16)):
        encoder = ImageEncoder.from_pretrained(folder, **({} if dtype is None else {"dtype": dtype}))
        assert encoder.dtype == want
        state = encoder.model.state_dict()
        assert all(state[k].dtype == want and torch.equal(state[k], saved[k].to(want)) for k in saved)


def test_device_is_applied(roots: dict[str, Path]) -> None:
    """`device` moves the loaded weights (the meta device stands for an accelerator on a CPU-only machine)."""
    encoder = ImageEncoder.from_pretrained(roots["without"], subfolder=SUB, device="meta")
    assert encoder.device.type == "meta"
    assert all(p.device.type == "meta" for p in encoder.model.parameters())


# ---- from_pretrained: errors -------------------------------------------------------------------------------
def test_missing_folder_is_one_line_error_quoting_transformers(tmp_path: Path) -> None:
    """A folder that does not exist: our sentence with the path and transformers' first line, cut at a word."""
    missing = tmp_path / ("missing-" + "x" * 150)
    line = _first_line(lambda: CLIPVisionModelWithProjection.from_pretrained(str(missing)))
    with pytest.raises(IPAdapterError) as err:
        ImageEncoder.from_pretrained(missing)
    _assert_quotes_cut(str(err.value), LOAD_TEMPLATE.format(missing, ""), line)


def test_missing_subfolder_names_root_and_subfolder(tmp_path: Path) -> None:
    """An existing root without the subfolder: the message names `root/subfolder`."""
    root = tmp_path / ("root-" + "y" * 150)
    root.mkdir()
    line = _first_line(lambda: CLIPVisionModelWithProjection.from_pretrained(str(root), subfolder=SUB))
    with pytest.raises(IPAdapterError) as err:
        ImageEncoder.from_pretrained(root, subfolder=SUB)
    _assert_quotes_cut(str(err.value), LOAD_TEMPLATE.format(f"{root}/{SUB}", ""), line)


def test_weights_of_another_shape_do_not_fit(tmp_path: Path) -> None:
    """Vision weights whose config says another width: transformers raises RuntimeError, reported in one line."""
    folder = _save(tmp_path / "root" / SUB, processor=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(RuntimeError):
        CLIPVisionModelWithProjection.from_pretrained(str(folder))
    with pytest.raises(IPAdapterError) as err:
        ImageEncoder.from_pretrained(tmp_path / "root", subfolder=SUB)
    assert str(err.value) == LOAD_TEMPLATE.format(
        f"{tmp_path / 'root'}/{SUB}", "its weights do not fit a CLIP vision model (a text encoder?)")


def test_a_whole_clip_model_loads_its_vision_tower_with_the_models_projection(tmp_path: Path) -> None:
    """A CLIPModel folder (e.g. openai/clip-vit-large-patch14, FLUX's encoder): transformers writes the vision section
    with its default projection width (512) beside the model's own (24); the tower must take the model's, and its
    embeddings equal the CLIPModel's image features. A config written without the model's width (by hand) takes the
    tower's own."""
    model = factories.tiny_clip()
    model.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["projection_dim"] == 24 and saved["vision_config"].get("projection_dim", 512) == 512
    encoder = ImageEncoder.from_pretrained(tmp_path)
    image = factories.reference_image(0, 32)
    pixels = encoder.pixel_values([image])
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels)
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert encoder.global_dim == 24
    torch.testing.assert_close(encoder.encode([image], "global"), expected)
    del saved["projection_dim"]
    saved["vision_config"]["projection_dim"] = 24
    (tmp_path / "config.json").write_text(json.dumps(saved))
    torch.testing.assert_close(ImageEncoder.from_pretrained(tmp_path).encode([image], "global"), expected)


@pytest.mark.parametrize("via", ["subfolder", "folder"])
def test_text_encoder_is_refused_with_its_missing_weights(tmp_path: Path, via: str) -> None:
    """A CLIPTextModelWithProjection folder loads without error in transformers but has none of the vision
    weights: refused, counting them and naming the first (sorted) missing key."""
    folder = tmp_path / "root" / SUB
    factories.tiny_text_encoder(32, projection=32).save_pretrained(folder)
    saved = set(load_file(folder / "model.safetensors"))
    vision = set(CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(str(folder))).state_dict())
    missing = vision - saved
    assert missing == vision  # no text-encoder key is a vision key
    where = f"{tmp_path / 'root'}/{SUB}" if via == "subfolder" else str(folder)
    with pytest.raises(IPAdapterError) as err:
        if via == "subfolder":
            ImageEncoder.from_pretrained(tmp_path / "root", subfolder=SUB)
        else:
            ImageEncoder.from_pretrained(folder)
    assert str(err.value) == (
        f"{where} is not a CLIP vision encoder: {len(missing)} of its weights are missing (e.g. {min(missing)}); "
        "give a CLIPVisionModelWithProjection folder or Hub id"
    )


def test_a_unet_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    """A diffusers model's folder (here a UNet's) given as the image encoder: named by its class, as an IPAdapterError
    (transformers' own reading of that config as a CLIP one fails on its fields with an error of another kind)."""
    folder = tmp_path / "unet"
    factories.unet().save_pretrained(folder)
    with pytest.raises(IPAdapterError) as err:
        ImageEncoder.from_pretrained(folder)
    assert str(err.value) == LOAD_TEMPLATE.format(folder, "its config is a UNet2DConditionModel's, not a CLIP model's")


# ---- load_processor on its own (configs only) --------------------------------------------------------------
def test_load_processor_reads_the_saved_processor(roots: dict[str, Path]) -> None:
    expected = CLIPImageProcessor.from_pretrained(str(roots["with"] / SUB)).to_dict()
    assert ImageEncoder.load_processor(roots["with"], subfolder=SUB).to_dict() == expected
    assert ImageEncoder.load_processor(roots["with"] / SUB, image_size=64).to_dict() == expected  # file wins


def test_load_processor_sizes_clip_preprocessing_from_the_config(roots: dict[str, Path]) -> None:
    """Without `image_size` the encoder's config gives it (32), in the subfolder or the folder itself; the root's
    own (absent) config is not the one read."""
    _assert_clip_default(ImageEncoder.load_processor(roots["without"], subfolder=SUB), 32)
    _assert_clip_default(ImageEncoder.load_processor(str(roots["without"] / SUB)), 32)


def test_load_processor_given_image_size_reads_no_config(tmp_path: Path) -> None:
    """With `image_size` given, no config is needed: a folder that does not exist still gets CLIP's preprocessing."""
    _assert_clip_default(ImageEncoder.load_processor(tmp_path / "absent", subfolder=SUB, image_size=48), 48)


@pytest.mark.parametrize("subfolder", [SUB, None])
def test_load_processor_without_processor_or_config_is_one_line_error(tmp_path: Path, subfolder: str | None) -> None:
    """Neither processor nor config (the folder does not exist): our sentence + transformers' first line, cut."""
    missing = tmp_path / ("absent-" + "z" * 150)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    line = _first_line(lambda: CLIPVisionConfig.from_pretrained(str(missing), **kwargs))
    with pytest.raises(IPAdapterError) as err:
        ImageEncoder.load_processor(missing, subfolder=subfolder)
    where = f"{missing}/{subfolder}" if subfolder else str(missing)
    _assert_quotes_cut(str(err.value), CONFIG_TEMPLATE.format(where, ""), line)


@pytest.mark.parametrize("subfolder", ["image_encoder", None])
def test_load_processor_on_a_folder_without_config_is_an_error(tmp_path: Path, subfolder: str | None) -> None:
    """transformers makes up a default (224 px) config for an existing folder without config.json: refused here,
    or the preprocessing would silently be sized for another encoder."""
    folder = tmp_path / "empty" / (subfolder or "")
    folder.mkdir(parents=True, exist_ok=True)
    with pytest.raises(IPAdapterError) as caught:
        ImageEncoder.load_processor(tmp_path / "empty", subfolder=subfolder)
    where = f"{tmp_path / 'empty'}" + (f"/{subfolder}" if subfolder else "")
    assert str(caught.value) == f"could not read the CLIP vision config of {where}: the folder has no config.json"


# ---- unconditional inputs ----------------------------------------------------------------------------------
def _bf16_encoder() -> ImageEncoder:
    model, _ = factories.tiny_image_encoder(1, hidden=32)
    return ImageEncoder(model.to(torch.bfloat16), CLIPImageProcessor(**SAVED_PROCESSOR), name="tiny-bf16")


def _direct_patch(model: CLIPVisionModelWithProjection) -> torch.Tensor:
    """The penultimate hidden states of an all-zero pixel tensor, computed with the transformers model itself."""
    dtype = next(model.parameters()).dtype
    zeros = torch.zeros(1, 3, model.config.image_size, model.config.image_size, dtype=dtype)
    with torch.no_grad():
        return model(pixel_values=zeros, output_hidden_states=True).hidden_states[-2]


def test_global_uncond_is_a_zero_embedding_of_the_encoders_dtype() -> None:
    encoder = _bf16_encoder()
    uncond = encoder.uncond("global")
    assert uncond.dtype == torch.bfloat16 and uncond.device == torch.device("cpu")
    assert uncond.shape == (1, encoder.model.config.projection_dim) and not uncond.any()


def test_patch_uncond_is_the_encoders_features_of_zero_pixels() -> None:
    encoder = _bf16_encoder()
    uncond = encoder.uncond("patch")
    expected = _direct_patch(encoder.model)
    assert expected.shape == (1, (32 // 8) ** 2 + 1, 32)
    assert uncond.dtype == torch.bfloat16 and torch.equal(uncond, expected)


@pytest.mark.parametrize("features", ["global", "patch"])
def test_uncond_is_on_the_encoders_device_not_the_default_one(features: str) -> None:
    """With torch's default device elsewhere (meta), the unconditional input still lives on the encoder's (CPU)."""
    encoder = ImageEncoder(_encoder(2), CLIPImageProcessor(**SAVED_PROCESSOR), name="tiny")
    expected = _direct_patch(encoder.model) if features == "patch" else torch.zeros(1, 24)
    torch.set_default_device("meta")
    try:
        uncond = encoder.uncond(features)
    finally:
        torch.set_default_device(None)
    assert uncond.device == torch.device("cpu") and torch.equal(uncond, expected)


def test_patch_uncond_follows_the_encoder_to_another_dtype_and_device() -> None:
    """Cached per (device, dtype): moving the encoder gives its new features, not the first ones."""
    encoder = ImageEncoder(_encoder(3), CLIPImageProcessor(**SAVED_PROCESSOR), name="tiny")
    first = encoder.uncond("patch")
    assert first.dtype == torch.float32 and torch.equal(first, _direct_patch(encoder.model))
    assert encoder.uncond("patch") is first  # cached
    encoder.model.to(torch.bfloat16)
    second = encoder.uncond("patch")
    assert second.dtype == torch.bfloat16 and torch.equal(second, _direct_patch(encoder.model))
    encoder.model.to("meta")
    assert encoder.uncond("patch").device.type == "meta"


# ---- name, identity, fit check, encoding -------------------------------------------------------------------
class _DictConfigModel(torch.nn.Module):
    """A module whose config is a plain dict (no `_name_or_path` attribute at all), as EncoderIdentity accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"hidden_size": 8}
        self.proj = torch.nn.Linear(8, 8)


def test_name_defaults_to_the_folder_transformers_loaded_else_clip_vision(tmp_path: Path) -> None:
    """No name given: the config's `_name_or_path` (set by transformers' own `from_pretrained`), else "clip-vision"
    for a model built in memory or one whose config has no such attribute."""
    _save(tmp_path / "enc", processor=False)
    loaded = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "enc"))
    assert loaded.config._name_or_path == str(tmp_path / "enc")
    processor = CLIPImageProcessor(**SAVED_PROCESSOR)
    assert ImageEncoder(loaded, processor).name == str(tmp_path / "enc")
    built = _encoder()
    assert built.config._name_or_path == ""
    assert ImageEncoder(built, processor).name == "clip-vision"
    assert ImageEncoder(_DictConfigModel(), processor).name == "clip-vision"
    assert ImageEncoder(built, processor, name="mine").name == "mine"


def test_identity_is_the_encoders_name_and_its_config_hash(tmp_path: Path) -> None:
    """`name#hash`: the name this encoder was given (not the config's own), and EncoderIdentity's hash of its config."""
    model = _encoder()
    encoder = ImageEncoder(model, CLIPImageProcessor(**SAVED_PROCESSOR), name="my-vit")
    assert encoder.identity() == f"my-vit#{EncoderIdentity.of(model.config).config_hash}"
    assert EncoderIdentity.of(model.config).name == "clip_vision_model"


def test_identity_is_hashed_once_not_at_each_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every generation keys its unconditional tokens with it: hashing the config again each time cost ~44 µs."""
    encoder = ImageEncoder(_encoder(), CLIPImageProcessor(**SAVED_PROCESSOR), name="my-vit")
    first = encoder.identity()

    def refuse(*_: object) -> None:
        raise AssertionError("the config was hashed again")

    monkeypatch.setattr(EncoderIdentity, "of", refuse)
    assert encoder.identity() == first
    encoder.encode([_image(0)], "global")


# h94's encoders by the widths they give (docs/checkpoints.md): ViT-H 1024 global / 1280 patch, bigG 1280 / 1664
VIT_H_HINT = "the published encoder of that width is image_encoder=h94/IP-Adapter/models/image_encoder"


def test_check_fits_names_both_encoder_families() -> None:
    """A bigG-width projection (1280) against a ViT-H adapter (1024): both named, whole sentence; the patch width
    (hidden 32) is named by its own table (1280 = ViT-H/14 there)."""
    model = factories.tiny_image_encoder(0, projection_dim=1280, hidden=32)[0]
    encoder = ImageEncoder(model, CLIPImageProcessor(**SAVED_PROCESSOR), name="tiny")
    encoder.check_fits(1280, "global")
    encoder.check_fits(32, "patch")
    with pytest.raises(IPAdapterError) as caught:
        encoder.check_fits(1024, "global")
    assert str(caught.value) == ("the adapter expects 1024-d (OpenCLIP ViT-H/14) global image features but the image "
                                 f"encoder tiny gives 1280-d (OpenCLIP ViT-bigG/14); {VIT_H_HINT}")
    with pytest.raises(IPAdapterError) as caught:
        encoder.check_fits(1280, "patch", "adapter 'plus'")
    assert str(caught.value) == ("adapter 'plus' expects 1280-d (ViT-H/14) patch image features but the image "
                                 f"encoder tiny gives 32-d; {VIT_H_HINT}")
    with pytest.raises(IPAdapterError) as caught:
        encoder.check_fits(1664, "patch")
    assert str(caught.value).startswith("the adapter expects 1664-d (ViT-bigG/14) patch image features")
    assert str(caught.value).endswith("; the published encoder of that width is "
                                      "image_encoder=h94/IP-Adapter/sdxl_models/image_encoder")
    with pytest.raises(IPAdapterError) as caught:  # a width no published encoder gives
        encoder.check_fits(48, "patch")
    assert str(caught.value).endswith("gives 32-d; use the encoder the adapter was trained with")


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (36, 44, 3), dtype=np.uint8))


def test_pixel_values_are_the_processors_on_the_encoders_device_and_dtype() -> None:
    model = _encoder(4).to(torch.bfloat16)
    processor = CLIPImageProcessor(**SAVED_PROCESSOR)
    encoder = ImageEncoder(model, processor, name="tiny")
    images = [_image(0), _image(1)]
    expected = processor(images=images, return_tensors="pt").pixel_values
    got = encoder.pixel_values(images)
    assert got.dtype == torch.bfloat16 and got.device == torch.device("cpu")
    assert torch.equal(got, expected.to(torch.bfloat16))
    model.to("meta")
    assert encoder.pixel_values(images).device.type == "meta"


def test_cached_features_follow_the_encoder_to_another_dtype_and_device() -> None:
    """First encoding: transformers' own image embeddings. After the encoder moves, the same image comes from the
    cache, converted to the encoder's new dtype, then device (meta stands for an accelerator); so are two images
    asked for together."""
    model = _encoder(5)
    processor = CLIPImageProcessor(**SAVED_PROCESSOR)
    encoder = ImageEncoder(model, processor, name="tiny")
    image, other = _image(2), _image(3)
    with torch.no_grad():
        direct, direct_other = (model(pixel_values=processor(images=[i], return_tensors="pt").pixel_values).image_embeds
                                for i in (image, other))
    first = encoder.encode([image], "global")
    assert first.dtype == torch.float32 and torch.equal(first, direct)
    encoder.encode([other], "global")
    model.to(torch.bfloat16)
    second = encoder.encode([image], "global")
    assert encoder.cache.hits == 1
    assert second.dtype == torch.bfloat16 and torch.equal(second, direct.to(torch.bfloat16))
    both = encoder.encode([image, other], "global")
    assert encoder.cache.hits == 3 and both.dtype == torch.bfloat16
    assert torch.equal(both, torch.cat([direct, direct_other]).to(torch.bfloat16))
    model.to("meta")
    third = encoder.encode([image], "global")
    assert encoder.cache.hits == 4 and third.device.type == "meta" and third.dtype == torch.bfloat16
    both = encoder.encode([image, other], "global")
    assert encoder.cache.hits == 6 and both.device.type == "meta" and both.dtype == torch.bfloat16


# ---- penultimate patch features --------------------------------------------------------------------------------
def _vision_models() -> dict[str, torch.nn.Module]:
    from tests import dit_factories

    return {"clip": factories.tiny_image_encoder(6)[0], "siglip": dit_factories.siglip(8)}


def _last_layer(model: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 names SigLIP's `encoder.layers`, CLIP's `vision_model.encoder.layers`."""
    return next(m for name, m in model.named_modules() if name.endswith("encoder.layers"))[-1]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_patch_features_are_transformers_penultimate_hidden_states_and_the_last_layer_never_runs(kind: str) -> None:
    """The truth is what diffusers and the authors' code read: `hidden_states[-2]` of the full forward pass."""
    from ipadapter.siglip import SiglipEncoder

    model = _vision_models()[kind]
    encoder = (SiglipEncoder if kind == "siglip" else ImageEncoder)(model, CLIPImageProcessor(), name=kind)
    size = model.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    calls = []
    counter = _last_layer(model).register_forward_hook(lambda *_: calls.append(1))
    got = encoder.encode_pixels(pixels, "patch")
    assert calls == [] and got.shape == expected.shape and torch.equal(got, expected)
    assert not _last_layer(model)._forward_pre_hooks  # the stop is removed: the next forward runs every layer
    with torch.no_grad():
        again = model(pixel_values=pixels, output_hidden_states=True)
    counter.remove()
    assert calls == [1] and torch.equal(again.hidden_states[-2], expected)


def test_another_thread_running_the_same_model_meanwhile_runs_every_layer() -> None:
    """While one thread's forward waits to stop at the last layer, a second thread's full forward (started from
    inside the first) gets its usual output: the stop belongs to the thread that set it."""
    import threading

    from ipadapter.encoders import penultimate_hidden_states

    model = factories.tiny_image_encoder(7)[0]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(pixel_values=pixels, output_hidden_states=True)
    seen: list = []

    def other_thread(*_: object) -> None:
        if not seen:
            seen.append(None)
            worker = threading.Thread(target=lambda: seen.append(model(pixel_values=pixels).image_embeds))
            worker.start()
            worker.join()

    hook = model.vision_model.embeddings.register_forward_hook(other_thread)
    try:
        with torch.no_grad():
            got = penultimate_hidden_states(model, pixels)
    finally:
        hook.remove()
    assert torch.equal(got, full.hidden_states[-2])
    assert len(seen) == 2 and torch.equal(seen[1], full.image_embeds)


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.factor * hidden_states


class _Layered(torch.nn.Module):
    """A model laid out as transformers' vision models are: `encoder.layers` run in turn, each given its input by
    keyword (as some models call them), and every layer's input in `hidden_states` only when asked for."""

    def __init__(self, layers: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.layers = layers

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> object:
        from types import SimpleNamespace

        states = [pixel_values]
        for layer in self.encoder.layers or [_Scale(2.0), _Scale(1.5)]:  # no layers listed: layers of its own
            states.append(layer(hidden_states=states[-1]))
        hidden_states = tuple(states) if output_hidden_states else None
        return SimpleNamespace(last_hidden_state=states[-1], hidden_states=hidden_states)


@pytest.mark.parametrize("layers", ["empty", "sequential"])
def test_a_model_without_one_encoder_layer_list_gives_its_hidden_states_second_last(layers: str) -> None:
    """No layers to stop at (an empty list, or layers that are not a `ModuleList`): the whole forward pass, asked for
    its hidden states."""
    from ipadapter.encoders import penultimate_hidden_states

    listed = torch.nn.ModuleList() if layers == "empty" else torch.nn.Sequential(_Scale(2.0), _Scale(1.5))
    pixels = torch.ones(1, 3, 4, 4)
    assert torch.equal(penultimate_hidden_states(_Layered(listed), pixels), 2 * pixels)


def test_the_last_of_several_layers_called_by_keyword_is_where_the_pass_stops() -> None:
    """Three layers, the last given its input by keyword: its input is the product of the first two (closed form),
    and it never runs."""
    from ipadapter.encoders import penultimate_hidden_states

    model = _Layered(torch.nn.ModuleList([_Scale(2.0), _Scale(3.0), _Scale(5.0)]))
    calls = []
    model.encoder.layers[2].register_forward_hook(lambda *_: calls.append(1))
    pixels = torch.ones(1, 3, 4, 4)
    assert torch.equal(penultimate_hidden_states(model, pixels), 6 * pixels) and calls == []


def test_a_model_that_never_reaches_its_last_layer_is_an_error_not_a_wrong_answer() -> None:
    from ipadapter.encoders import penultimate_hidden_states

    class Skips(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Module()
            self.encoder.layers = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.encoder.layers[0](pixel_values)

    model = Skips()
    with pytest.raises(RuntimeError, match="Skips returned without running its last encoder layer"):
        penultimate_hidden_states(model, torch.ones(1, 3, 4, 4))
    assert not model.encoder.layers[1]._forward_pre_hooks
