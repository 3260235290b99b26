"""The variant table: every row is detectable, buildable, and describes its inputs as the published files need."""

from __future__ import annotations

import pytest

from ipadapter.projection import build_projection, new_projection
from ipadapter.variants import TRAINABLE, VARIANTS, detect_variant_name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_row_is_what_detection_returns_for_its_own_description(name: str) -> None:
    v = VARIANTS[name]
    tokens = v.when_tokens if v.when_tokens is not None else v.tokens
    lora = 8 if (v.lora if v.when_lora is None else v.when_lora) else 0
    assert detect_variant_name(v.head, tokens=tokens, lora_rank=lora, file_name=f"ip-adapter-{v.when_file or ''}.bin",
                               denoiser=v.denoiser) == name


def test_published_inputs_per_variant() -> None:
    """The inputs of the published families: base global CLIP, plus/full patches, FaceID an ArcFace embedding,
    FaceID-Plus both (the ID embedding and the face crop's patches); XLabs FLUX the global CLIP ViT-L/14 embedding,
    InstantX SD 3.5 SigLIP patches."""
    assert {n: v.features for n, v in VARIANTS.items()} == {
        "base": "global", "plus": "patch", "full": "patch", "faceid": "faceid", "faceid-portrait": "faceid",
        "faceid-plus": "faceid+patch", "faceid-plusv2": "faceid+patch", "flux": "global", "flux-v2": "global",
        "sd3": "patch",
    }
    assert {n: v.denoiser for n, v in VARIANTS.items() if v.denoiser != "unet"} == {
        "flux": "flux", "flux-v2": "flux", "sd3": "sd3"}
    assert [n for n, v in VARIANTS.items() if v.shortcut] == ["faceid-plusv2"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_trainable_head_builds(name: str) -> None:
    v = VARIANTS[name]
    config = new_projection(v.head, cross_dim=64, tokens=v.tokens or 5, embed_dim=24, hidden_dim=40, id_dim=16)
    assert config.head == v.head and config.tokens == (v.tokens or 5)
    build_projection(config, shortcut=v.shortcut)


def test_a_faceid_file_with_lora_is_never_the_portrait_variant() -> None:
    """FaceID-Portrait: 16 tokens a face and no LoRA; the LoRA decides even where the token count would match."""
    assert detect_variant_name("faceid", tokens=16, lora_rank=0) == "faceid-portrait"
    assert detect_variant_name("faceid", tokens=16, lora_rank=128) == "faceid"
    assert detect_variant_name("faceid", tokens=4, lora_rank=128) == "faceid"


def test_unknown_variants_and_heads_are_one_sentence() -> None:
    from ipadapter.errors import IPAdapterError
    from ipadapter.variants import get_variant

    with pytest.raises(IPAdapterError) as caught:
        get_variant("nope")
    assert str(caught.value) == f"unknown adapter variant 'nope'; valid: {', '.join(VARIANTS)}"
    assert ", plus, " in str(caught.value)
    with pytest.raises(IPAdapterError) as caught:
        detect_variant_name("conv", tokens=4, lora_rank=0)
    assert str(caught.value) == "no adapter variant has a 'conv' projection head"
