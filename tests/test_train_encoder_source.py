"""`train --image-encoder`: the `owner/repo/sub/folder` form generate and evaluate read, in a run, its feature cache and
its `--dry-run`; a source that is no CLIP vision encoder refused in one line; the shipped configs' encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipadapter import IPAdapterError
from ipadapter.cli.main import main
from ipadapter.sources import VIT_BIGG, VIT_H, split_hub_path
from ipadapter.train import config as train_config
from ipadapter.train.config import TrainConfig
from tests import factories

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

CONFIGS = Path(train_config.__file__).parent / "configs"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encsrc")
    return factories.write_base(root / "base"), factories.write_images(root / "data", 2)


@pytest.fixture
def hub_encoder(tmp_path, monkeypatch) -> Path:
    """`qa/enc` in an offline Hub cache, laid out as huggingface_hub stores it, its encoder in `image_encoder/`."""
    import huggingface_hub.constants as hub
    import transformers.utils.hub as transformers_hub

    cache = tmp_path / "hub"
    entry = cache / "models--qa--enc"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    for name in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE"):
        if hasattr(transformers_hub, name):
            monkeypatch.setattr(transformers_hub, name, str(cache))
    return factories.write_image_encoder(entry / "snapshots" / ("0" * 40) / "image_encoder")


def test_a_hub_subfolder_encoder_loads_its_weights(hub_encoder) -> None:
    from transformers import CLIPVisionModelWithProjection

    from ipadapter.train.feed import load_image_encoder

    encoder = load_image_encoder(TrainConfig(image_encoder="qa/enc/image_encoder"))
    saved = CLIPVisionModelWithProjection.from_pretrained(hub_encoder).state_dict()
    loaded = encoder.model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert encoder.processor.crop_size == {"height": 32, "width": 32}  # the processor saved beside it, not a default


def test_a_hub_subfolder_encoder_trains_with_a_feature_cache(folders, hub_encoder, tmp_path, capsys) -> None:
    """Building the cache reads the encoder's processor and fingerprints its own files: other weights in the same
    place refuse the cache (a fingerprint of the id alone would accept it)."""
    base, data = folders
    argv = ["train", "--base", str(base), "--image-encoder", "qa/enc/image_encoder", "--data", str(data),
            "--resolution", "16", "--max-steps", "1", "--num-workers", "0", "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "ip-adapter.safetensors").is_file()
    capsys.readouterr()
    factories.tiny_image_encoder(seed=9)[0].save_pretrained(hub_encoder)
    assert main([*argv, "--output", str(tmp_path / "b")]) == 2
    assert "was built with image encoder = " in capsys.readouterr().err


def test_dry_run_counts_a_hub_subfolder_encoder(folders, hub_encoder) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    from ipadapter.train.memory import estimate

    base, _ = folders
    found = estimate(TrainConfig(base=str(base), image_encoder="qa/enc/image_encoder", resolution=16),
                     batch_sizes=(1,))
    real = [UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
            AutoencoderKL.from_pretrained(base, subfolder="vae"),
            CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
            CLIPVisionModelWithProjection.from_pretrained(hub_encoder)]
    assert found.frozen_params == sum(p.numel() for m in real for p in m.parameters())


@pytest.mark.parametrize("encoder, message", [
    ("{base}/unet", "is not a CLIP vision encoder (its config is a UNet2DConditionModel)"),
    ("{base}/text_encoder", "is not a CLIP vision encoder (its config is a clip_text_model)"),
    ("{base}", "is not a CLIP vision encoder (it has no model config)"),
    ("nobody/nothing", "the image encoder nobody/nothing is not in the local Hugging Face cache and offline mode is "
                       "on ("),
])
def test_dry_run_refuses_what_is_no_clip_vision_encoder_in_one_line(folders, capsys, encoder, message) -> None:
    from ipadapter.train.memory import estimate

    base, _ = folders
    source = encoder.format(base=base)
    with pytest.raises(IPAdapterError) as info:
        estimate(TrainConfig(base=str(base), image_encoder=source, resolution=16), batch_sizes=(1,))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert main(["train", "--dry-run", "--base", str(base), "--image-encoder", source, "--resolution", "16"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ipadapter: error: ") and message in err[0], err
    assert "batch 1:" not in captured.out


def test_the_shipped_configs_name_h94s_published_encoders() -> None:
    """h94/IP-Adapter's root holds adapters, not an encoder: a config must name the encoder's subfolder."""
    configs = sorted(CONFIGS.glob("*.yaml"))
    named = {path.name: TrainConfig.load(path).image_encoder for path in configs if "image_encoder:" in path.read_text()}
    assert named, configs
    for name, encoder in named.items():
        if encoder.startswith("h94/"):
            assert split_hub_path(encoder) in (VIT_H, VIT_BIGG), (name, encoder)


def test_a_path_that_is_not_there_is_never_split_as_a_hub_id_with_a_subfolder(tmp_path) -> None:
    """"owner/repo/sub" is a Hub id and a subfolder; a relative or absolute path is a path even when it does not
    exist (huggingface_hub's own rule: no repo id starts with "." or "/")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    for path in ("./models/a/b", "/no/such/folder", str(tmp_path / "none" / "x")):
        with pytest.raises(HFValidationError):
            validate_repo_id(path.rsplit("/", 1)[0])
        assert split_hub_path(path) == (path, None)
    assert split_hub_path("h94/IP-Adapter/models/image_encoder") == VIT_H


def test_an_encoder_whose_config_is_unreadable_or_of_another_model_is_one_sentence(folders, tmp_path) -> None:
    from ipadapter.train.memory import estimate

    base, _ = folders
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(IPAdapterError) as info:
        estimate(TrainConfig(base=str(base), image_encoder=str(broken), resolution=16), batch_sizes=(1,))
    assert str(info.value).startswith(f"could not read a CLIP vision encoder's config from {broken} (not found "
                                      "offline, or not a CLIP vision model): ")
    assert str(broken / "config.json") in str(info.value)  # transformers' own reason follows, naming the file
    with pytest.raises(IPAdapterError) as info:
        estimate(TrainConfig(base=str(base), image_encoder=f"{base}/unet", resolution=16), batch_sizes=(1,))
    assert str(info.value) == (f"{base}/unet is not a CLIP vision encoder (its config is a UNet2DConditionModel); "
                               "give a CLIPVisionModelWithProjection folder or Hub id")


def test_dry_run_counts_the_vision_tower_of_a_whole_clip_model(folders, tmp_path) -> None:
    """A whole `CLIPModel` folder as the encoder: the run uses its vision tower and visual projection only, at the
    model's `projection_dim`."""
    from ipadapter.train.memory import estimate

    base, _ = folders
    clip = factories.tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    plain = estimate(TrainConfig(base=str(base), image_encoder=str(factories.write_image_encoder(tmp_path / "enc")),
                                 resolution=16), batch_sizes=(1,))
    whole = estimate(TrainConfig(base=str(base), image_encoder=str(tmp_path / "clip"), resolution=16),
                     batch_sizes=(1,))
    from transformers import CLIPVisionModelWithProjection

    saved = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "enc")
    tower = sum(p.numel() for m in (clip.vision_model, clip.visual_projection) for p in m.parameters())
    assert whole.frozen_params - plain.frozen_params == tower - sum(p.numel() for p in saved.parameters())


def test_an_uncached_hub_encoder_in_a_subfolder_is_named_with_its_download_command(folders) -> None:
    from ipadapter.train.memory import estimate

    base, _ = folders
    with pytest.raises(IPAdapterError) as info:
        estimate(TrainConfig(base=str(base), image_encoder="nobody/nothing/image_encoder", resolution=16),
                 batch_sizes=(1,))
    assert str(info.value).startswith("the image encoder nobody/nothing/image_encoder is not in the local Hugging Face "
                                      "cache and offline mode is on (")
    assert str(info.value).endswith("(hf download nobody/nothing --include 'image_encoder/*') or give a local folder")


def test_dry_run_reads_a_cached_hub_base_and_encoder_without_a_request(folders, tmp_path, monkeypatch) -> None:
    """Online (offline mode off), a base and an encoder in the cache are read from it alone: no request names them."""
    from ipadapter.train.memory import estimate

    base, _ = folders
    cache = tmp_path / "hub"
    factories.write_hub_cache(cache, "qa/base", base)
    factories.write_image_encoder(tmp_path / "enc-repo" / "image_encoder")
    factories.write_hub_cache(cache, "qa/enc", tmp_path / "enc-repo")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    sent = factories.hub_without_network(monkeypatch, cache)
    cached = estimate(TrainConfig(base="qa/base", image_encoder="qa/enc/image_encoder", resolution=16),
                      batch_sizes=(1,))
    assert [url for url in sent if "qa/" in url] == []
    local = estimate(TrainConfig(base=str(base), image_encoder=str(factories.write_image_encoder(tmp_path / "enc")),
                                 resolution=16), batch_sizes=(1,))
    assert cached == local
