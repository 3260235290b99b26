"""`train`'s base loader on real pipeline folders (tiny random weights): what it loads, from where, and its refusals.

The truth is the saved folder itself: each part's weights as written by `save_pretrained`, the scheduler's saved
config, and the diffusers layout (unet, vae, scheduler, tokenizer, text_encoder, + tokenizer_2, text_encoder_2 for
SDXL).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipadapter.errors import IPAdapterError
from ipadapter.train.models import load_base
from tests import factories


def _same_weights(module: torch.nn.Module, folder: Path) -> None:
    saved = load_file(next(folder.glob("*.safetensors")))
    state = module.state_dict()
    assert set(saved) <= set(state)
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """An SD 1.5-like and an SDXL-like folder; SDXL's second tokenizer pads to 7 tokens, the first to 8, so each
    tokenizer shows which folder it came from."""
    root = tmp_path_factory.mktemp("bases")
    sdxl = factories.write_base(root / "sdxl", sdxl=True, seed=1)
    factories.write_tokenizer(sdxl / "tokenizer_2", max_length=7)
    return {"sd": factories.write_base(root / "sd"), "sdxl": sdxl}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_every_part_is_the_saved_one_and_the_encoders_are_frozen(bases, kind) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = bases[kind]
    models = load_base(str(folder))
    assert models.name == str(folder) and models.is_sdxl == (kind == "sdxl")
    _same_weights(models.unet, folder / "unet")
    _same_weights(models.vae, folder / "vae")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert {k: v for k, v in models.scheduler_config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.items() if not k.startswith("_")}
    parts = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    kinds = [CLIPTextModel] + ([CLIPTextModelWithProjection] if kind == "sdxl" else [])
    assert len(models.text_encoders) == len(models.tokenizers) == len(parts)
    for encoder, part, cls in zip(models.text_encoders, parts, kinds):
        assert type(encoder) is cls and not encoder.training
        assert not any(p.requires_grad for p in encoder.parameters())
        _same_weights(encoder, folder / part)
    assert [t.model_max_length for t in models.tokenizers] == [8, 7][: len(parts)]


def test_a_feature_cache_run_loads_neither_the_vae_nor_the_text_encoders(bases) -> None:
    models = load_base(str(bases["sdxl"]), encoders=False, vae=False)
    assert models.vae is None and models.text_encoders == [] and models.tokenizers == []
    assert load_base(str(bases["sd"]), encoders=False).vae is not None
    assert load_base(str(bases["sd"]), vae=False).text_encoders


def test_a_folder_without_a_scheduler_is_refused_in_one_sentence(bases, tmp_path) -> None:
    folder = shutil.copytree(bases["sd"], tmp_path / "base")
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(IPAdapterError) as caught:
        load_base(str(folder))
    assert str(caught.value) == (f"{folder} has no scheduler folder; a diffusers pipeline folder has unet, vae, "
                                 "scheduler, ...")


def test_an_sdxl_folder_without_its_second_text_encoder_is_refused(bases, tmp_path) -> None:
    folder = shutil.copytree(bases["sdxl"], tmp_path / "base")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(IPAdapterError) as caught:
        load_base(str(folder))
    assert str(caught.value) == f"{folder} is an SDXL base but has no text_encoder_2 folder"


@pytest.mark.parametrize("part,what", [
    ("unet", "UNet"), ("vae", "VAE"), ("tokenizer", "tokenizer"), ("text_encoder", "text encoder"),
    ("tokenizer_2", "tokenizer 2"), ("text_encoder_2", "text encoder 2"),
])
def test_a_broken_part_is_named_with_its_folder(bases, tmp_path, part, what) -> None:
    """A part whose files cannot be read: "cannot load the <part> from <base>/<subfolder>: <the library's reason>"."""
    folder = shutil.copytree(bases["sdxl"], tmp_path / "base")
    for file in (folder / part).iterdir():
        file.write_text("{ not json")
    with pytest.raises(IPAdapterError) as caught:
        load_base(str(folder))
    message = str(caught.value)
    assert message.startswith(f"cannot load the {what} from {folder}/{part}: ") and len(message) > len(
        f"cannot load the {what} from {folder}/{part}: ") + 5 and "\n" not in message


def test_a_cached_hub_id_is_read_with_no_request(bases, tmp_path, monkeypatch) -> None:
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/tiny-sdxl", bases["sdxl"])
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    models = load_base("ipadapter-tests/tiny-sdxl")
    assert models.name == "ipadapter-tests/tiny-sdxl" and len(models.text_encoders) == 2
    _same_weights(models.text_encoders[1], bases["sdxl"] / "text_encoder_2")
    assert [url for url in sent if "ipadapter-tests" in url] == []


def test_an_uncached_hub_id_is_one_line_naming_the_base(tmp_path, monkeypatch) -> None:
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    with pytest.raises(IPAdapterError) as caught:
        load_base("ipadapter-tests/not-cached")
    assert str(caught.value) == (
        "the base model ipadapter-tests/not-cached is not in the local Hugging Face cache and the Hub cannot be "
        "reached; download it once with network access (hf download ipadapter-tests/not-cached) or give a local "
        "folder")
    assert [url for url in sent if "ipadapter-tests" in url] == [
        "https://huggingface.co/api/models/ipadapter-tests/not-cached"]


def test_an_unreadable_config_is_named_with_its_folder(bases, tmp_path) -> None:
    """The scheduler's config (read by `load_base`) and the UNet's and VAE's (read by `base_configs` before any
    weights, to check a resolution): "cannot read <base>/<subfolder>: <the library's reason>"."""
    from ipadapter.train.models import base_configs

    for part, read in (("scheduler", load_base), ("unet", base_configs), ("vae", base_configs)):
        folder = shutil.copytree(bases["sd"], tmp_path / part)
        (folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")).write_text("{ not json")
        with pytest.raises(IPAdapterError) as caught:
            read(str(folder))
        prefix = f"cannot read {folder}/{part}: "
        assert str(caught.value).startswith(prefix) and len(str(caught.value)) > len(prefix) + 5


def test_the_configs_of_an_uncached_hub_id_are_one_line_naming_the_base(tmp_path, monkeypatch) -> None:
    from ipadapter.train.models import base_configs

    factories.hub_without_network(monkeypatch, tmp_path / "hub")
    with pytest.raises(IPAdapterError) as caught:
        base_configs("ipadapter-tests/not-cached")
    assert str(caught.value).startswith(
        "the base model ipadapter-tests/not-cached is not in the local Hugging Face cache and the Hub cannot be "
        "reached")


@pytest.mark.parametrize("vae_blocks,unet_blocks,step", [
    (4, 4, 64),  # SD 1.5: the VAE downscales 8x (three halvings), the UNet three more: sizes in steps of 64 px
    (4, 3, 32),  # SDXL: the same VAE, a UNet with two halvings
    (2, 2, 4),   # the tests' tiny models
])
def test_resolutions_come_in_steps_of_both_downscales(vae_blocks, unet_blocks, step) -> None:
    from ipadapter.errors import FieldError
    from ipadapter.train.models import check_resolution, resolution_step

    vae, unet = {"block_out_channels": [8] * vae_blocks}, {"down_block_types": ["DownBlock2D"] * unet_blocks}
    assert resolution_step(unet, vae) == step
    check_resolution(10 * step, unet, vae)
    with pytest.raises(FieldError) as caught:
        check_resolution(10 * step + step // 2, unet, vae)
    assert caught.value.problem == (
        f"{10 * step + step // 2} does not fit this base model: it must be a multiple of {step} (VAE downscale × "
        f"UNet downscale); try {10 * step} or {11 * step}")


def test_configs_of_models_in_memory_are_theirs_and_a_missing_vae_has_none(bases) -> None:
    from ipadapter.train.models import base_configs

    models = load_base(str(bases["sd"]), encoders=False)
    unet, vae = base_configs("ignored", models)
    assert unet == dict(models.unet.config) and vae == dict(models.vae.config)
    models.vae = None
    assert base_configs("ignored", models) == (dict(models.unet.config), {})
    on_disk = base_configs(str(bases["sd"]))
    assert on_disk[0]["block_out_channels"] == list(models.unet.config.block_out_channels)


def test_a_per_block_text_width_is_read_from_the_first_block() -> None:
    """diffusers lets a UNet config give `cross_attention_dim` per down block; the adapter's tokens take the first."""
    from types import SimpleNamespace

    from ipadapter.train.models import cross_dim

    assert cross_dim(SimpleNamespace(cross_attention_dim=(32, 64))) == 32
    assert cross_dim(SimpleNamespace(cross_attention_dim=[48, 48])) == 48
    assert cross_dim(SimpleNamespace(cross_attention_dim=96)) == 96
