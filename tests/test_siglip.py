"""The SigLIP vision encoder of the SD 3.5 adapter: loaded from a folder, a subfolder or the Hugging Face cache as
transformers loads it, its patch features transformers' own penultimate hidden states, its unconditional input zero
features; and `encoder_class`, which tells a SigLIP folder from a CLIP one."""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipImageProcessor, SiglipVisionModel

from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.siglip import SiglipEncoder, encoder_class
from tests import dit_factories, factories


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SigLIP vision tower saved with a processor of its own size (`root/with`), the same without one
    (`root/bare/vision`), and a tiny CLIP vision tower (`root/clip`)."""
    root = tmp_path_factory.mktemp("siglip")
    model = dit_factories.siglip(8)
    model.save_pretrained(root / "with")
    SiglipImageProcessor(size={"height": 24, "width": 24}, image_mean=[0.4] * 3).save_pretrained(root / "with")
    model.save_pretrained(root / "bare" / "vision")
    factories.tiny_image_encoder()[0].save_pretrained(root / "clip")
    return root


def test_the_saved_tower_and_processor_are_read(saved) -> None:
    encoder = SiglipEncoder.from_pretrained(saved / "with")
    truth = SiglipVisionModel.from_pretrained(saved / "with")
    assert encoder.name == str(saved / "with")
    assert all(torch.equal(a, b) for a, b in zip(encoder.model.state_dict().values(), truth.state_dict().values()))
    assert list(encoder.processor.image_mean) == [0.4] * 3 and encoder.processor.size == {"height": 24, "width": 24}
    assert (encoder.global_dim, encoder.patch_tokens) == (0, 9)


def test_a_subfolder_without_a_processor_gets_one_of_the_towers_size(saved) -> None:
    encoder = SiglipEncoder.from_pretrained(saved / "bare", subfolder="vision", dtype=torch.bfloat16, device="meta")
    assert encoder.name == f"{saved / 'bare'}/vision"
    assert encoder.processor.size == {"height": 24, "width": 24}  # the tower's image_size
    assert (encoder.device.type, encoder.dtype) == ("meta", torch.bfloat16)


def test_a_folder_without_a_tower_is_one_sentence_with_transformers_reason(saved, tmp_path) -> None:
    with pytest.raises(OSError) as theirs:
        SiglipVisionModel.from_pretrained(tmp_path, local_files_only=True)
    with pytest.raises(IPAdapterError) as caught:
        SiglipEncoder.from_pretrained(tmp_path)
    assert str(caught.value) == f"could not load a SigLIP vision encoder from {tmp_path}: {first_clause(theirs.value)}"


def test_patch_features_are_the_penultimate_hidden_states_and_nothing_else(saved) -> None:
    encoder = SiglipEncoder.from_pretrained(saved / "with")
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        truth = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(encoder.encode_pixels(pixels, "patch"), truth)
    with pytest.raises(IPAdapterError) as caught:
        encoder.encode_pixels(pixels, "global")
    assert str(caught.value) == "a SigLIP encoder gives patch features only; this adapter needs a CLIP encoder"


def test_the_unconditional_input_is_zero_features_where_the_tower_lives(saved) -> None:
    encoder = SiglipEncoder.from_pretrained(saved / "with", dtype=torch.bfloat16)
    with torch.no_grad():
        tokens = encoder.model(pixel_values=torch.zeros(1, 3, 24, 24, dtype=torch.bfloat16)).last_hidden_state
    uncond = encoder.uncond("patch")
    assert uncond.shape == tokens.shape and uncond.dtype == torch.bfloat16 and not uncond.any()
    on_meta = SiglipEncoder.from_pretrained(saved / "with", device="meta").uncond("patch")
    assert on_meta.device.type == "meta"


def test_encoder_class_reads_the_config(saved, tmp_path, monkeypatch) -> None:
    assert encoder_class(str(saved / "with"), None) is SiglipEncoder
    assert encoder_class(str(saved / "bare"), "vision") is SiglipEncoder
    assert encoder_class(str(saved / "bare"), None) is ImageEncoder  # no config there: CLIP's loader says what is wrong
    assert encoder_class(str(saved / "clip"), None) is ImageEncoder
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/siglip", saved / "bare")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    assert encoder_class("ipadapter-tests/siglip", "vision") is SiglipEncoder
    assert [url for url in sent if "ipadapter-tests" in url] == []
    with pytest.raises(IPAdapterError) as caught:
        encoder_class("ipadapter-tests/elsewhere", "vision")
    assert str(caught.value) == ("the image encoder ipadapter-tests/elsewhere/vision is not in the local Hugging Face "
                                 "cache and the Hub cannot be reached; download it once with network access (hf "
                                 "download ipadapter-tests/elsewhere --include 'vision/*') or give a local folder")


def test_a_cached_hub_id_loads_with_no_request_and_an_uncached_one_names_the_download(saved, tmp_path,
                                                                                       monkeypatch) -> None:
    """Online, tower and processor come from the cache (the processor from the same subfolder); an id the cache lacks
    asks the Hub once, then says how to download that subfolder."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(saved / "with", repo / "processed")
    shutil.copytree(saved / "bare" / "vision", repo / "vision")
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/siglip", repo)
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    processed = SiglipEncoder.from_pretrained("ipadapter-tests/siglip", subfolder="processed")
    assert list(processed.processor.image_mean) == [0.4] * 3 and processed.name == "ipadapter-tests/siglip/processed"
    assert SiglipEncoder.from_pretrained("ipadapter-tests/siglip", subfolder="vision").patch_tokens == 9
    assert [url for url in sent if "ipadapter-tests" in url] == []
    with pytest.raises(IPAdapterError) as caught:
        SiglipEncoder.from_pretrained("ipadapter-tests/elsewhere", subfolder="vision")
    assert str(caught.value) == ("the image encoder ipadapter-tests/elsewhere/vision is not in the local Hugging Face "
                                 "cache and the Hub cannot be reached; download it once with network access (hf "
                                 "download ipadapter-tests/elsewhere --include 'vision/*') or give a local folder")


def test_a_missing_subfolder_is_named_with_its_folder(saved) -> None:
    with pytest.raises(OSError) as theirs:
        SiglipVisionModel.from_pretrained(saved / "bare", subfolder="none", local_files_only=True)
    with pytest.raises(IPAdapterError) as caught:
        SiglipEncoder.from_pretrained(saved / "bare", subfolder="none")
    assert str(caught.value) == (f"could not load a SigLIP vision encoder from {saved / 'bare'}/none: "
                                 f"{first_clause(theirs.value)}")
