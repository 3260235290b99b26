"""The control features end to end on tiny UNets: masks, windows, scaling modes and precise presets in attention."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ipadapter import AdapterConfig, AdapterPrompt, IPAdapter, Reference, attach
from ipadapter.conditioning.presets import preset
from ipadapter.projection.detect import ProjectionConfig
from tests import factories

ARCHS = {"sd15": (factories.sd15_unet, factories.SD15_CROSS), "sdxl": (factories.sdxl_unet, factories.SDXL_CROSS)}
# Ten steps; timestep 499 is step 5, progress 0.5.
SCHEDULER = SimpleNamespace(timesteps=torch.arange(999, -1, -100))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny UNets run ~20x faster on one thread than on two when the machine's cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(arch: str):
    build, cross = ARCHS[arch]
    unet = build()
    torch.manual_seed(4)
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=24, cross_dim=cross, tokens=4))
    adapter = IPAdapter.for_unet(unet, config, init_from_unet=False)
    g = torch.Generator().manual_seed(8)
    tokens = torch.randn(1, 4, cross, generator=g)
    return unet, adapter, tokens


def run(unet, arch: str, batch: int = 2, hw: tuple[int, int] = (16, 16), timestep: int = 499) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(batch, 4, *hw, generator=g)
    text = torch.randn(batch, 6, ARCHS[arch][1], generator=g)
    added = None
    if arch == "sdxl":
        torch.manual_seed(11)
        added = factories.sdxl_added_cond(batch)
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample


@pytest.fixture(params=list(ARCHS))
def setup(request):
    arch = request.param
    unet, adapter, tokens = make(arch)
    plain = run(unet, arch)
    att = attach(unet, adapter, scheduler=SCHEDULER)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)])})
    full = run(unet, arch)
    assert (full - plain).abs().max() > 1e-3, "the adapter must change the output"
    yield SimpleNamespace(arch=arch, unet=unet, att=att, tokens=tokens, plain=plain, full=full)
    att.detach()


def output(s, **prompt) -> torch.Tensor:
    mask = prompt.pop("mask", None)
    s.att.set_prompts({"0": AdapterPrompt([Reference(cond=s.tokens, mask=mask)], **prompt)})
    return run(s.unet, s.arch)


def test_black_mask_gives_exactly_the_output_without_adapter(setup) -> None:
    assert torch.equal(output(setup, mask=torch.zeros(37, 91)), setup.plain)


@pytest.mark.parametrize("window", [(0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (0.6, 0.9), (0.0, 0.5)])
def test_empty_or_passed_window_gives_exactly_the_output_without_adapter(setup, window) -> None:
    start, end = window
    assert torch.equal(output(setup, start=start, end=end), setup.plain)


def test_white_mask_and_full_window_give_exactly_the_output_with_adapter(setup) -> None:
    assert torch.equal(output(setup, mask=torch.ones(37, 91)), setup.full)
    assert torch.equal(output(setup, start=0.0, end=1.0), setup.full)
    assert torch.equal(output(setup, start=0.5, end=0.6), setup.full)


def test_empty_window_without_a_scheduler(setup) -> None:
    setup.att.scheduler = None
    assert torch.equal(output(setup, start=0.3, end=0.3), setup.plain)
    assert torch.equal(output(setup, start=0.3, end=0.4), setup.full)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mask_hw,latent_hw", [((37, 91), (16, 24)), ((91, 37), (24, 8)), ((1, 1), (16, 16)),
                                               ((3, 200), (16, 24)), ((37, 91), (18, 30))])
def test_masks_of_any_size_and_aspect(arch: str, mask_hw, latent_hw) -> None:
    unet, adapter, tokens = make(arch)
    att = attach(unet, adapter)
    left = torch.zeros(mask_hw)
    left[:, : max(1, mask_hw[1] // 2)] = 1.0
    right = 1.0 - left
    refs = [Reference(cond=tokens, mask=left), Reference(cond=-tokens, mask=right), Reference(cond=tokens * 0.5)]
    att.set_prompts({"0": AdapterPrompt(refs)})
    out = run(unet, arch, hw=latent_hw)
    att.detach()
    assert out.shape == (2, 4, *latent_hw) and torch.isfinite(out).all()


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V per head, written out: (B, L, h·d)."""
    b, lq, width = q.shape
    d = width // heads
    q, k, v = (x.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for x in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).permute(0, 2, 1, 3).reshape(b, lq, width)


LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def layer_call(unet, name: str, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return unet.get_submodule(name)(x, encoder_hidden_states=text)


def expected_layer(unet, adapter, name: str, x, text, tokens, w: float, mode: str, rows=None) -> torch.Tensor:
    """The scaling modes of docs/control.md for one layer: V only, K+V, K+V with C penalty, K + mean(V) with penalty."""
    attn, ip = unet.get_submodule(name), adapter.layer(name)
    with torch.no_grad():
        q = attn.to_q(x)
        text_out = manual_attention(q, attn.to_k(text), attn.to_v(text), attn.heads)
        k, v = ip.to_k_ip(tokens), ip.to_v_ip(tokens)
        penalty = w * k.shape[-1] / 1280
        if mode == "v":
            image_out = w * manual_attention(q, k, v, attn.heads)
        elif mode == "kv":
            image_out = manual_attention(q, w * k, w * v, attn.heads)
        elif mode == "kv_penalty":
            image_out = manual_attention(q, penalty * k, penalty * v, attn.heads)
        else:
            mean = v.mean(dim=1, keepdim=True)
            image_out = manual_attention(q, penalty * k, v - mean + penalty * mean, attn.heads)
        if rows is not None:
            image_out = image_out * rows[:, None, None]
        return attn.to_out[0](text_out + image_out)


@pytest.mark.parametrize("mode", ["v", "kv", "kv_penalty", "k_mean_v"])
def test_scaling_modes_match_their_definitions(mode: str) -> None:
    unet, adapter, tokens = make("sd15")
    width = unet.get_submodule(LAYER).to_q.out_features
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 64, width, generator=g), torch.randn(2, 6, factories.SD15_CROSS, generator=g)
    att = attach(unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=3.0, scaling=mode)})
    got = layer_call(unet, LAYER, x, text)
    att.detach()
    expected = expected_layer(unet, adapter, LAYER, x, text, tokens.expand(2, -1, -1), 3.0, mode)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if mode != "v":
        v_only = expected_layer(unet, adapter, LAYER, x, text, tokens.expand(2, -1, -1), 3.0, "v")
        assert (v_only - expected).abs().max() > 1e-3, "the modes must differ"


def test_precise_preset_moves_the_reference_to_the_unconditional_rows() -> None:
    unet, adapter, tokens = make("sd15")
    p = preset("style transfer precise", unet)
    layout = "down_blocks.2.attentions.1.transformer_blocks.0.attn2"
    style = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert p.uncond_layers == {layout} and p.layer_weights[0] == {style: 1.0}
    att = attach(unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8, layer_weights=p.layer_weights[0],
                                        uncond_layers=p.uncond_layers)}, cfg=True)
    g = torch.Generator().manual_seed(3)
    for name in (layout, style):
        width = unet.get_submodule(name).to_q.out_features
        x, text = torch.randn(2, 16, width, generator=g), torch.randn(2, 6, factories.SD15_CROSS, generator=g)
        got = layer_call(unet, name, x, text)
        if name == layout:  # [uncond row, cond row]: only the unconditional row sees the reference
            refs = torch.cat([tokens, tokens])
            expected = expected_layer(unet, adapter, name, x, text, refs, 0.8, "v", rows=torch.tensor([1.0, 0.0]))
        else:  # the style layer: reference on the cond row, the zero "no image" tokens on the uncond row
            refs = torch.cat([torch.zeros_like(tokens), tokens])
            expected = expected_layer(unet, adapter, name, x, text, refs, 0.8, "v")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    precise = run(unet, "sd15")
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8, layer_weights=p.layer_weights[0])},
                    cfg=True)
    plain_style = run(unet, "sd15")
    att.detach()
    torch.testing.assert_close(precise[1], plain_style[1], atol=1e-6, rtol=0)
    assert (precise[0] - plain_style[0]).abs().max() > 1e-4, "the unconditional row must see the reference"


def test_style_and_composition_gives_each_reference_its_own_layers() -> None:
    unet, adapter, tokens = make("sdxl")
    p = preset("style and composition", unet, references=2)
    other = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(5))
    att = attach(unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens, layer_weights=p.layer_weights[0]),
                                         Reference(cond=other, layer_weights=p.layer_weights[1])], scale=0.9)})
    g = torch.Generator().manual_seed(6)
    for name, ref, silent in [("up_blocks.0.attentions.1.transformer_blocks.1.attn2", tokens, False),
                              ("down_blocks.2.attentions.1.transformer_blocks.0.attn2", other, False),
                              ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", None, True)]:
        width = unet.get_submodule(name).to_q.out_features
        x, text = torch.randn(1, 16, width, generator=g), torch.randn(1, 6, factories.SDXL_CROSS, generator=g)
        got = layer_call(unet, name, x, text)
        expected = expected_layer(unet, adapter, name, x, text, tokens if silent else ref, 0.0 if silent else 0.9, "v")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    att.detach()


def test_resized_masks_stay_within_zero_and_one() -> None:
    from ipadapter.token_grids import resize_mask

    mask = torch.zeros(4, 4)
    mask[:, :2] = 1.0
    weights = resize_mask(mask, 256, (16, 16))
    assert weights.min() >= 0.0 and weights.max() <= 1.0, "a mask must never turn into a negative or >1 weight"


def test_precise_layers_ignore_a_references_own_layer_map_as_they_ignore_the_prompts() -> None:
    unet, adapter, tokens = make("sd15")
    p = preset("style transfer precise", unet)
    layout = next(iter(p.uncond_layers))
    att = attach(unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens, layer_weights=p.layer_weights[0])], scale=0.8,
                                        uncond_layers=p.uncond_layers)}, cfg=True)
    width = unet.get_submodule(layout).to_q.out_features
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 16, width, generator=g), torch.randn(2, 6, factories.SD15_CROSS, generator=g)
    got = layer_call(unet, layout, x, text)
    att.detach()
    expected = expected_layer(unet, adapter, layout, x, text, torch.cat([tokens, tokens]), 0.8, "v",
                              rows=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
