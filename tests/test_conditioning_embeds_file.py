"""Saved embeddings round-trip and remember which encoder made them."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import CLIPVisionConfig

from ipadapter.conditioning.embeds_file import EncoderIdentity, load_embeds, save_embeds
from ipadapter.errors import IPAdapterError


def vit(hidden: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14, projection_dim=16)


def test_round_trip(tmp_path) -> None:
    encoder = EncoderIdentity.of(vit(), name="tiny-vit")
    tensors = {"cond": torch.randn(2, 16), "uncond": torch.zeros(1, 16)}
    path = tmp_path / "sub" / "refs.safetensors"
    save_embeds(path, tensors, encoder=encoder, features="global", extra={"images": "a.png,b.png"})
    saved = load_embeds(path, encoder=encoder, features="global")
    assert saved.encoder == encoder and saved.features == "global" and saved.extra == {"images": "a.png,b.png"}
    assert saved.tensors.keys() == tensors.keys()
    assert all(torch.equal(saved.tensors[k], tensors[k]) for k in tensors)
    assert os.listdir(path.parent) == ["refs.safetensors"], "no temporary file left behind"


def test_identity_ignores_the_path_but_not_the_architecture() -> None:
    a = EncoderIdentity.of(vit(), name="/models/a")
    b = EncoderIdentity.of({**vit().to_dict(), "_name_or_path": "/elsewhere", "transformers_version": "0.0"})
    assert a.config_hash == b.config_hash
    assert EncoderIdentity.of(vit(48)).config_hash != a.config_hash
    face = EncoderIdentity.of("buffalo_l")
    assert face.name == "buffalo_l" and face.config_hash != EncoderIdentity.of("antelopev2").config_hash


def test_another_encoder_is_refused_naming_the_one_that_made_the_file(tmp_path) -> None:
    path = tmp_path / "e.safetensors"
    save_embeds(path, {"cond": torch.randn(1, 16)}, encoder=EncoderIdentity.of(vit(), name="vit-h"), features="global")
    with pytest.raises(IPAdapterError, match="encoded with 'vit-h'.* this run uses 'bigg'"):
        load_embeds(path, encoder=EncoderIdentity.of(vit(48), name="bigg"))
    with pytest.raises(IPAdapterError, match="holds global features but this adapter needs patch"):
        load_embeds(path, features="patch")


def test_a_failed_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "e.safetensors"
    encoder = EncoderIdentity.of(vit())
    save_embeds(path, {"cond": torch.ones(1, 4)}, encoder=encoder, features="patch")
    with pytest.raises(Exception):
        save_embeds(path, {"cond": "not a tensor"}, encoder=encoder, features="patch")  # type: ignore[dict-item]
    assert torch.equal(load_embeds(path).tensors["cond"], torch.ones(1, 4))
    assert os.listdir(tmp_path) == ["e.safetensors"]


@pytest.mark.parametrize("content", [b"", b"hello", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_not_an_embeddings_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(IPAdapterError, match="x.safetensors"):
        load_embeds(path)


def test_bad_input(tmp_path) -> None:
    encoder = EncoderIdentity.of(vit())
    with pytest.raises(IPAdapterError, match="unknown features kind"):
        save_embeds(tmp_path / "a.safetensors", {"cond": torch.ones(1)}, encoder=encoder, features="pixels")
    with pytest.raises(IPAdapterError, match="not found"):
        load_embeds(tmp_path / "missing.safetensors")
