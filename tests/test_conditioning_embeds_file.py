"""Saved embeddings round-trip and remember which encoder made them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ipadapter.conditioning.embeds_file import EncoderIdentity, check_features, load_embeds, save_embeds
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


def test_config_hash_is_sha256_of_the_sorted_json_without_volatile_entries() -> None:
    """The hash is a closed form, so files from any install agree: the first 16 hex digits of SHA-256 over the
    config as JSON with sorted keys (nested too), load details dropped, lists kept, unknown objects as `str`."""
    config = {"layers": [3, {"width": 8, "act": Path("gelu")}], "hidden_size": 32, "_name_or_path": "/m/a",
              "transformers_version": "9.9"}
    text = '{"hidden_size": 32, "layers": [3, {"act": "gelu", "width": 8}]}'
    assert EncoderIdentity.of(config).config_hash == hashlib.sha256(text.encode()).hexdigest()[:16]
    reordered = {"hidden_size": 32, "layers": [3, {"act": Path("gelu"), "width": 8}]}
    assert EncoderIdentity.of(reordered, name="/m/a") == EncoderIdentity.of(config)
    other = {**config, "layers": [4, {"width": 8, "act": Path("gelu")}]}
    assert EncoderIdentity.of(other).config_hash != EncoderIdentity.of(config).config_hash


def test_identity_name_is_the_path_else_the_model_type_else_encoder(tmp_path) -> None:
    """Without a name: the folder transformers loaded the model from, else the config's `model_type`, else the
    `name` entry, else "encoder"."""
    config = vit()
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "enc")
    loaded = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "enc")
    assert loaded.config._name_or_path == str(tmp_path / "enc")
    assert EncoderIdentity.of(loaded).name == str(tmp_path / "enc")
    assert EncoderIdentity.of(config).name == CLIPVisionConfig.model_type == "clip_vision_model"
    assert EncoderIdentity.of({"name": "arcface", "width": 512}).name == "arcface"
    assert EncoderIdentity.of({"width": 512}).name == "encoder"
    assert EncoderIdentity.of({"width": 512}, name="mine").name == "mine"


def _raw(path, metadata: dict, tensors: dict | None = None) -> None:
    """A safetensors file written directly, with exactly this metadata."""
    save_file(tensors or {"cond": torch.ones(1, 4)}, str(path), metadata=metadata)


def test_file_without_extra_or_with_a_non_object_extra_loads_with_no_extra(tmp_path) -> None:
    base = {"format": "ipadapter-embeds/1", "encoder": "vit", "encoder_config_hash": "0123456789abcdef",
            "features": "global"}
    _raw(tmp_path / "none.safetensors", base)
    saved = load_embeds(tmp_path / "none.safetensors")
    assert saved.extra == {} and saved.encoder == EncoderIdentity("vit", "0123456789abcdef")
    _raw(tmp_path / "list.safetensors", {**base, "extra": json.dumps(["a.png"])})
    assert load_embeds(tmp_path / "list.safetensors").extra == {}


def test_damaged_metadata_and_non_finite_values_are_one_sentence(tmp_path) -> None:
    path = tmp_path / "e.safetensors"
    _raw(path, {"format": "ipadapter-embeds/1", "encoder_config_hash": "0123456789abcdef", "features": "global"})
    with pytest.raises(IPAdapterError) as caught:
        load_embeds(path)
    assert str(caught.value) == (f"{path} has damaged metadata (KeyError: {KeyError('encoder')}); "
                                 "encode the images again")
    _raw(path, {"format": "ipadapter-embeds/1", "encoder": "vit", "encoder_config_hash": "0123456789abcdef",
                "features": "global"}, {"cond": torch.tensor([[1.0, float("nan")]])})
    with pytest.raises(IPAdapterError) as caught:
        load_embeds(path)
    assert str(caught.value) == (f"{path}: tensor cond holds NaN or Inf values (a damaged file, or a diverged "
                                 "training)")


def test_save_refusals_are_whole_sentences(tmp_path) -> None:
    """The valid kinds are the four the module documents, in that order."""
    encoder = EncoderIdentity.of(vit())
    with pytest.raises(IPAdapterError) as caught:
        save_embeds(tmp_path / "a.safetensors", {"cond": torch.ones(1)}, encoder=encoder, features="pixels")
    assert str(caught.value) == "unknown features kind 'pixels'; valid: global, patch, faceid, faceid+patch"
    with pytest.raises(IPAdapterError) as caught:
        save_embeds(tmp_path / "a.safetensors", {}, encoder=encoder, features="global")
    assert str(caught.value) == "there are no embeddings to save"
    assert not os.listdir(tmp_path)


def test_check_features_returns_the_cond_tensors_in_order() -> None:
    tensors = {"cond.1": torch.ones(1, 4, 16), "uncond": torch.zeros(1, 4, 16), "cond.0": torch.zeros(2, 4, 16)}
    got = check_features("f.safetensors", tensors, (4, 16))
    assert len(got) == 2 and got[0] is tensors["cond.0"] and got[1] is tensors["cond.1"]


@pytest.mark.parametrize("shape, tail", [((2, 4, 8), (4, 16)), ((2, 16), (4, 16)), ((0, 4, 16), (4, 16))])
def test_check_features_refuses_another_shape(shape: tuple, tail: tuple) -> None:
    """Each `cond.*` tensor must be (N ≥ 1, *tail): another width, a missing axis, or no rows is refused."""
    tensors = {"cond.0": torch.zeros(1, *tail), "cond.1": torch.zeros(shape)}
    with pytest.raises(IPAdapterError) as caught:
        check_features("f.safetensors", tensors, tail)
    want = "(N, " + ", ".join(str(t) for t in tail) + ")"
    assert str(caught.value) == f"f.safetensors: cond.1 has shape {shape}, but this encoder makes {want}"


def test_check_features_without_cond_tensors() -> None:
    with pytest.raises(IPAdapterError) as caught:
        check_features("f.safetensors", {"uncond": torch.zeros(1, 16)}, (16,))
    assert str(caught.value) == "f.safetensors holds no image embeddings (no cond.* tensors); encode the images again"
