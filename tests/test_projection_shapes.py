"""A new head has exactly the published layout of its family, and reading that layout back gives the same head.

The expected keys and shapes are written out from the published definitions (docs/checkpoints.md, section 1: the
`image_proj` state of h94/IP-Adapter and h94/IP-Adapter-FaceID at real sizes), not from this project's output.
The heads are built on the meta device: shapes only, no memory.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ipadapter.errors import IPAdapterError
from ipadapter.projection import build_projection, new_projection
from ipadapter.projection.detect import ProjectionConfig, detect_projection, detect_time_resampler
from tests import factories

Shapes = dict[str, tuple[int, ...]]


def _perceiver_layers(prefix: str, dim: int, heads: int, depth: int = 4, ff_mult: int = 4) -> Shapes:
    """Per layer: attention without biases (`0.{norm1, norm2, to_q, to_kv, to_out}`), then the feed-forward
    `1.{0: LayerNorm, 1: Linear up, 3: Linear down}` without biases; 64-wide heads."""
    inner = 64 * heads
    shapes: Shapes = {}
    for layer in range(depth):
        p = f"{prefix}layers.{layer}."
        shapes.update({
            f"{p}0.norm1.weight": (dim,), f"{p}0.norm1.bias": (dim,),
            f"{p}0.norm2.weight": (dim,), f"{p}0.norm2.bias": (dim,),
            f"{p}0.to_q.weight": (inner, dim), f"{p}0.to_kv.weight": (2 * inner, dim),
            f"{p}0.to_out.weight": (dim, inner),
            f"{p}1.0.weight": (dim,), f"{p}1.0.bias": (dim,),
            f"{p}1.1.weight": (ff_mult * dim, dim), f"{p}1.3.weight": (dim, ff_mult * dim),
        })
    return shapes


def _linear(rows: int, cols: int, prefix: str) -> Shapes:
    return {f"{prefix}.weight": (rows, cols), f"{prefix}.bias": (rows,)}


def _norm(dim: int, prefix: str) -> Shapes:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _resampler(in_dim: int, dim: int, out: int, heads: int, queries: int, prefix: str = "") -> Shapes:
    shapes = {**_linear(dim, in_dim, f"{prefix}proj_in"), **_linear(out, dim, f"{prefix}proj_out"),
              **_norm(out, f"{prefix}norm_out"), **_perceiver_layers(prefix, dim, heads)}
    if queries:
        shapes[f"{prefix}latents"] = (1, queries, dim)
    return shapes


# (published file, new_projection's arguments, the published image_proj layout)
PUBLISHED = {
    "ip-adapter_sd15": (dict(head="linear", cross_dim=768, tokens=4, embed_dim=1024),
                        {**_linear(4 * 768, 1024, "proj"), **_norm(768, "norm")}),
    "ip-adapter_sdxl": (dict(head="linear", cross_dim=2048, tokens=4, embed_dim=1280),
                        {**_linear(4 * 2048, 1280, "proj"), **_norm(2048, "norm")}),
    "ip-adapter-plus_sd15": (dict(head="resampler", cross_dim=768, tokens=16, hidden_dim=1280),
                             _resampler(1280, 768, 768, heads=12, queries=16)),
    "ip-adapter-plus_sdxl_vit-h": (dict(head="resampler", cross_dim=2048, tokens=16, hidden_dim=1280),
                                   _resampler(1280, 1280, 2048, heads=20, queries=16)),
    "ip-adapter-full-face_sd15": (dict(head="token_mlp", cross_dim=768, tokens=0, hidden_dim=1280),
                                  {**_linear(1280, 1280, "proj.0"), **_linear(768, 1280, "proj.2"),
                                   **_norm(768, "proj.3")}),
    "ip-adapter-faceid_sd15": (dict(head="faceid", cross_dim=768, tokens=4),
                               {**_linear(1024, 512, "proj.0"), **_linear(4 * 768, 1024, "proj.2"),
                                **_norm(768, "norm")}),
    "ip-adapter-faceid_sdxl": (dict(head="faceid", cross_dim=2048, tokens=4),
                               {**_linear(1024, 512, "proj.0"), **_linear(4 * 2048, 1024, "proj.2"),
                                **_norm(2048, "norm")}),
    "ip-adapter-faceid-plusv2_sd15": (dict(head="faceid_plus", cross_dim=768, tokens=4, hidden_dim=1280),
                                      {**_linear(1024, 512, "proj.0"), **_linear(4 * 768, 1024, "proj.2"),
                                       **_norm(768, "norm"),
                                       **_resampler(1280, 768, 768, heads=12, queries=0,
                                                    prefix="perceiver_resampler.")}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_new_head_has_the_published_layout_and_reads_back_as_itself(name: str) -> None:
    arguments, published = PUBLISHED[name]
    config = new_projection(**arguments)
    with torch.device("meta"):
        head = build_projection(config, shortcut=False)
    state = head.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == published
    assert detect_projection(state) == config


def test_a_narrow_head_keeps_one_attention_head() -> None:
    """Widths under 64 (the miniature's, tests' tiny models) still get one 64-wide head: to_q has 64 rows."""
    for head in ("resampler", "faceid_plus"):
        config = new_projection(head, cross_dim=32, tokens=4, hidden_dim=48)
        with torch.device("meta"):
            state = build_projection(config, shortcut=False).state_dict()
        prefix = "perceiver_resampler." if head == "faceid_plus" else ""
        assert config.heads == 1 and tuple(state[f"{prefix}layers.0.0.to_q.weight"].shape) == (64, 32)


def test_a_feed_forward_of_another_width_is_read_from_the_file() -> None:
    for head, prefix in (("resampler", ""), ("faceid_plus", "perceiver_resampler.")):
        config = new_projection(head, cross_dim=128, tokens=4, hidden_dim=96)
        with torch.device("meta"):
            state = build_projection(config, shortcut=False).state_dict()
        for layer in range(config.depth):  # feed-forward x2 instead of x4
            state[f"{prefix}layers.{layer}.1.1.weight"] = torch.empty(2 * 128, 128, device="meta")
            state[f"{prefix}layers.{layer}.1.3.weight"] = torch.empty(128, 2 * 128, device="meta")
        assert detect_projection(state).ff_mult == 2


def _error(state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(IPAdapterError) as caught:
        detect_projection(state)
    return str(caught.value)


def test_unrecognised_or_incomplete_heads_are_refused_with_a_sentence_naming_the_keys() -> None:
    t = torch.zeros(1)
    unknown = {name: t for name in ("a", "b", "c", "d", "e", "f", "g")}
    assert _error(unknown) == ("the file's image projection matches no IP-Adapter family (keys: a, b, c, d, e, f, ...)")
    # "norm.weight" alone is no FaceID MLP: that rule needs proj.0 too (docs/checkpoints.md)
    assert "matches no IP-Adapter family" in _error({"norm.weight": t, "norm.bias": t})
    # a linear head without its LayerNorm
    assert _error({"proj.weight": torch.zeros(8, 4)}) == (
        "the image projection weights are incomplete: missing 'norm.weight'")
    # latents make it a resampler even beside proj.0/norm: one without proj_in is incomplete, not a FaceID MLP
    assert "missing 'proj_in.weight'" in _error(
        {"latents": t, "norm.weight": t, "proj.0.weight": torch.zeros(8, 4), "proj.2.weight": torch.zeros(8, 8)})


def test_an_unknown_new_head_names_the_valid_ones() -> None:
    with pytest.raises(IPAdapterError) as caught:
        new_projection("perceiver", cross_dim=8, tokens=4)
    assert str(caught.value) == (
        "unknown projection head 'perceiver'; valid: linear, resampler, token_mlp, time_resampler, faceid, faceid_plus")


@pytest.mark.parametrize("heads", [2, 3])
def test_a_resampler_with_several_heads_projects_as_diffusers_does(heads: int) -> None:
    """The tiny families elsewhere have one attention head, where a head-merging mistake cannot show; the published
    Plus heads have 12 or 20. diffusers' own conversion of the same published-layout weights is the oracle."""
    torch.manual_seed(0)
    dim = 64 * heads
    state = factories._perceiver("", 40, dim, 48, depth=4, heads=heads, latents=8)  # diffusers: depth 4
    config = detect_projection(state)
    assert (config.heads, config.dim, config.depth) == (heads, dim, 4)
    ours = build_projection(config, shortcut=False)
    ours.load_state_dict(state)
    theirs = factories.sd15_unet()._convert_ip_adapter_image_proj_to_diffusers(state, low_cpu_mem_usage=False)
    patches = torch.randn(2, 17, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(patches), theirs(patches), atol=1e-5, rtol=1e-5)


def test_a_new_head_without_the_encoder_width_it_reads_is_refused() -> None:
    """A zero width would build an empty Linear that trains nothing; each head names the width it needs."""
    for head, width in (("linear", "embed_dim"), ("resampler", "hidden_dim"), ("token_mlp", "hidden_dim"),
                        ("faceid_plus", "hidden_dim")):
        with pytest.raises(IPAdapterError) as caught:
            new_projection(head, cross_dim=8, tokens=4)
        assert str(caught.value) == f"a new {head} head needs the encoder's width ({width}), got 0"
    with pytest.raises(IPAdapterError, match=r"^a new faceid head needs the encoder's width \(id_dim\), got 0$"):
        new_projection("faceid", cross_dim=8, tokens=4, id_dim=0)
    assert new_projection("faceid", cross_dim=8, tokens=4).in_dim == 512  # ArcFace's width unless told
    assert new_projection("linear", cross_dim=8, tokens=4, embed_dim=1).in_dim == 1  # any positive width


def _time_resampler(heads: int, depth: int = 2) -> ProjectionConfig:
    """The SD 3.5 head at a small size: 64-wide attention heads, `heads` of them, on a 96-wide stream."""
    return ProjectionConfig("time_resampler", in_dim=40, cross_dim=32, tokens=8, dim=96, depth=depth, heads=heads,
                            dim_head=64, ff_mult=2, hidden_dim=16)


@pytest.mark.parametrize("heads", [1, 3])
def test_an_sd3_head_reads_back_as_itself(heads: int) -> None:
    """Attention width 64 x heads differs from the stream's 96: heads come from to_q's rows, not its columns."""
    config = _time_resampler(heads)
    with torch.device("meta"):
        state = build_projection(config, shortcut=False).state_dict()
    assert tuple(state["layers.0.0.to_q.weight"].shape) == (64 * heads, 96)
    assert tuple(state["layers.1.2.1.weight"].shape) == (4 * 96, 96)  # adaLN: shift, scale for attention and MLP
    assert tuple(state["time_embedding.linear_1.weight"].shape) == (96, 16)
    assert detect_time_resampler(state) == config


def test_an_incomplete_sd3_head_names_the_missing_key() -> None:
    with torch.device("meta"):
        state = build_projection(_time_resampler(1), shortcut=False).state_dict()
    del state["time_embedding.linear_1.weight"]
    with pytest.raises(IPAdapterError) as caught:
        detect_time_resampler(state)
    assert str(caught.value) == ("the SD 3 image projection weights are incomplete: "
                                 "missing 'time_embedding.linear_1.weight'")


def _heads_and_inputs() -> dict[str, tuple[ProjectionConfig, tuple[torch.Tensor, ...]]]:
    patches, timestep = torch.randn(2, 5, 48), torch.tensor([999.0, 10.0])
    small = dict(cross_dim=32, tokens=4, embed_dim=24, hidden_dim=48, id_dim=16)
    return {
        "linear": (new_projection("linear", **small), (torch.randn(2, 24),)),
        "token_mlp": (new_projection("token_mlp", **small), (patches,)),
        "resampler": (new_projection("resampler", **small), (patches,)),
        "faceid": (new_projection("faceid", **small), (torch.randn(2, 16),)),
        "faceid_plus": (new_projection("faceid_plus", **small), (torch.randn(2, 16), patches)),
        "time_resampler": (dataclasses.replace(_time_resampler(1, depth=1), in_dim=48), (patches, timestep)),
    }


@pytest.mark.parametrize("name", sorted(_heads_and_inputs()))
def test_a_head_in_half_precision_takes_fp32_features(name: str) -> None:
    """Encoders often run in fp32 beside a bf16/fp16 adapter: the head casts what it is given to its own dtype, so
    fp32 features give what the same features cast beforehand give, in the head's dtype."""
    torch.manual_seed(0)
    config, inputs = _heads_and_inputs()[name]
    head = build_projection(config, shortcut=False).to(torch.bfloat16)
    cast = [t.to(torch.bfloat16) if t.dim() > 1 else t for t in inputs]  # SD 3's timesteps (1-D) stay as given
    with torch.no_grad():
        given, expected = head(*inputs), head(*cast)
    if name != "time_resampler":
        given, expected = (given,), (expected,)  # SD 3's head also returns its timestep embedding
    for a, b in zip(given, expected, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("head", ["resampler", "time_resampler"])
def test_learned_queries_start_as_randn_over_sqrt_dim(head: str) -> None:
    """The published initialisation (docs/checkpoints.md): latents = randn(1, Q, dim) / sqrt(dim). Training a new
    head starts from it; 16 x 512 samples put the measured spread within 3% of 1/sqrt(512)."""
    torch.manual_seed(0)
    config = (new_projection("resampler", cross_dim=512, tokens=16, hidden_dim=512) if head == "resampler"
              else dataclasses.replace(_time_resampler(1, depth=1), dim=512, tokens=16))
    latents = build_projection(config, shortcut=False).latents
    assert latents.shape == (1, 16, 512)
    assert abs(latents.std().item() * 512**0.5 - 1) < 0.03 and abs(latents.mean().item()) < 0.003


def test_building_an_unknown_head_names_the_valid_ones() -> None:
    with pytest.raises(IPAdapterError) as caught:
        build_projection(ProjectionConfig("perceiver", in_dim=8, cross_dim=8, tokens=4), shortcut=False)
    assert str(caught.value) == ("unknown projection head 'perceiver'; valid: linear, token_mlp, resampler, faceid, "
                                 "faceid_plus, time_resampler")
