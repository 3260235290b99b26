"""Per-layer presets against tables written out by hand, on the real SD 1.5 and SDXL block layouts."""

from __future__ import annotations

import pytest
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

from ipadapter.conditioning.presets import (
    NAMED_PRESETS, PRESET_NAMES, WEIGHT_TYPES, available_presets, block_weights, preset,
)
from ipadapter.errors import IPAdapterError
from ipadapter.layers import cross_attention_layers
from tests import factories

# Transformer models in execution order (down → mid → up): t = position in these lists.
SD15_T = [
    "down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1", "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2",
]
SDXL_T = [
    "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.2.attentions.0",
    "down_blocks.2.attentions.1", "mid_block.attentions.0",
    "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.0.attentions.2",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
]

# The weight-type formulas of docs/control.md evaluated by hand, one value per t.
SD15_TYPES = {
    "linear": [1.0] * 16,
    "ease in": [1.0, 0.940625, 0.88125, 0.821875, 0.7625, 0.703125, 0.64375, 0.584375,
                0.525, 0.465625, 0.40625, 0.346875, 0.2875, 0.228125, 0.16875, 0.109375],
    "ease out": [0.05, 0.109375, 0.16875, 0.228125, 0.2875, 0.346875, 0.40625, 0.465625,
                 0.525, 0.584375, 0.64375, 0.703125, 0.7625, 0.821875, 0.88125, 0.940625],
    "ease in-out": [0.05, 0.16875, 0.2875, 0.40625, 0.525, 0.64375, 0.7625, 0.88125,
                    1.0, 0.88125, 0.7625, 0.64375, 0.525, 0.40625, 0.2875, 0.16875],
    "reverse in-out": [1.0, 0.88125, 0.7625, 0.64375, 0.525, 0.40625, 0.2875, 0.16875,
                       0.05, 0.16875, 0.2875, 0.40625, 0.525, 0.64375, 0.7625, 0.88125],
    "weak input": [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "weak middle": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "weak output": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
    "strong middle": [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 1.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
}
SDXL_TYPES = {
    "linear": [1.0] * 11,
    "ease in": [1.0, 0.9136364, 0.8272727, 0.7409091, 0.6545455, 0.5681818,
                0.4818182, 0.3954545, 0.3090909, 0.2227273, 0.1363636],
    "ease out": [0.05, 0.1363636, 0.2227273, 0.3090909, 0.3954545, 0.4818182,
                 0.5681818, 0.6545455, 0.7409091, 0.8272727, 0.9136364],
    "ease in-out": [0.05, 0.2227273, 0.3954545, 0.5681818, 0.7409091, 0.9136364,
                    0.9136364, 0.7409091, 0.5681818, 0.3954545, 0.2227273],
    "reverse in-out": [1.0, 0.8272727, 0.6545455, 0.4818182, 0.3090909, 0.1363636,
                       0.1363636, 0.3090909, 0.4818182, 0.6545455, 0.8272727],
    "weak input": [0.2, 0.2, 0.2, 0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "weak middle": [1.0, 1.0, 1.0, 1.0, 0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "weak output": [1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
    "strong middle": [0.2, 0.2, 0.2, 0.2, 1.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
}


def attn2(transformer: str, blocks: int = 1) -> list[str]:
    return [f"{transformer}.transformer_blocks.{b}.attn2" for b in range(blocks)]


# The tiny SDXL has 2 transformer blocks in every transformer model (real SDXL: 2 and 10).
SDXL_DEPTH = dict.fromkeys(SDXL_T, 2)
SD15_STYLE, SD15_LAYOUT = attn2("up_blocks.1.attentions.1"), attn2("down_blocks.2.attentions.1")
SDXL_STYLE, SDXL_LAYOUT = attn2("up_blocks.0.attentions.1", 2), attn2("down_blocks.2.attentions.1", 2)
SD15_ALL = [n for t in SD15_T for n in attn2(t)]
SDXL_ALL = [n for t in SDXL_T for n in attn2(t, SDXL_DEPTH[t])]

# name → (per-reference layers at weight 1, precise layers)
NAMED = {
    "sd15": {
        "style transfer": ([SD15_STYLE], []),
        "composition": ([SD15_LAYOUT], []),
        "strong style transfer": ([[n for n in SD15_ALL if n not in SD15_LAYOUT]], []),
        "style and composition": ([SD15_STYLE, SD15_LAYOUT], []),
        "style transfer precise": ([SD15_STYLE], SD15_LAYOUT),
        "composition precise": ([SD15_LAYOUT], SD15_STYLE),
    },
    "sdxl": {
        "style transfer": ([SDXL_STYLE], []),
        "composition": ([SDXL_LAYOUT], []),
        "strong style transfer": ([[n for n in SDXL_ALL if n not in SDXL_LAYOUT]], []),
        "style and composition": ([SDXL_STYLE, SDXL_LAYOUT], []),
        "style transfer precise": ([SDXL_STYLE], SDXL_LAYOUT),
        "composition precise": ([SDXL_LAYOUT], SDXL_STYLE),
    },
}


@pytest.fixture
def unets(sd15_unet, sdxl_unet):
    return {"sd15": sd15_unet, "sdxl": sdxl_unet}


def test_the_hand_tables_cover_every_cross_attention_layer(unets) -> None:
    assert sorted(SD15_ALL) == sorted(l.name for l in cross_attention_layers(unets["sd15"]))
    assert sorted(SDXL_ALL) == sorted(l.name for l in cross_attention_layers(unets["sdxl"]))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", list(SD15_TYPES))
def test_weight_types_equal_the_hand_tables(unets, arch: str, kind: str) -> None:
    transformers, table = (SD15_T, SD15_TYPES) if arch == "sd15" else (SDXL_T, SDXL_TYPES)
    depth = SDXL_DEPTH if arch == "sdxl" else dict.fromkeys(SD15_T, 1)
    expected = {n: table[kind][t] for t, name in enumerate(transformers) for n in attn2(name, depth[name])}
    got = preset(kind, unets[arch])
    assert got.references == 1 and got.uncond_layers == frozenset()
    assert got.layer_weights[0].keys() == expected.keys()
    for name, value in expected.items():
        assert got.layer_weights[0][name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", list(NAMED["sd15"]))
def test_named_presets_equal_the_hand_tables(unets, arch: str, name: str) -> None:
    per_reference, precise = NAMED[arch][name]
    got = preset(name, unets[arch], references=2)
    assert [{k for k, v in w.items() if v} for w in got.layer_weights] == [set(r) for r in per_reference]
    assert all(v == 1.0 for w in got.layer_weights for v in w.values())
    assert got.uncond_layers == frozenset(precise)


def test_the_mid_block_is_weighted_by_execution_order_not_checkpoint_order(unets) -> None:
    for arch, t_mid, count in (("sd15", 6, 16), ("sdxl", 4, 11)):
        layers = cross_attention_layers(unets[arch])
        mid = [l for l in layers if l.part == "mid"]
        assert all(l.index == max(x.index for x in layers) - (len(mid) - 1 - i) * 2 for i, l in enumerate(mid)), \
            "the mid block comes last in checkpoint order"
        weights = preset("ease in", unets[arch]).layer_weights[0]
        for layer in mid:
            assert weights[layer.name] == pytest.approx(0.05 + 0.95 * (1 - t_mid / count))
            assert weights[layer.name] != pytest.approx(0.05 + 0.95 * (1 - (count - 1) / count))
        assert preset("weak middle", unets[arch]).layer_weights[0][mid[0].name] == 0.2


def test_preset_errors(unets) -> None:
    with pytest.raises(IPAdapterError, match="valid: linear, ease in.*composition precise"):
        preset("style", unets["sdxl"])
    with pytest.raises(IPAdapterError, match="needs 2 reference images"):
        preset("style and composition", unets["sdxl"], references=1)
    partial = [l for l in cross_attention_layers(unets["sd15"]) if l.part != "mid"]
    with pytest.raises(IPAdapterError, match="SD 1.5 and SDXL layouts"):
        preset("style transfer", partial)
    assert len(PRESET_NAMES) == 15


def diffusers_oracle(unet, scales: dict) -> dict[str, float]:
    """diffusers' own expansion, applied to layer names with its prefix rule (`set_ip_adapter_scale`)."""
    expanded = _maybe_expand_lora_scales(unet, [scales], default_scale=0.0)[0]
    out = {}
    for layer in cross_attention_layers(unet):
        for prefix, value in expanded.items():
            if layer.name.startswith(prefix):
                out[layer.name] = value
    return out


BLOCK_CASES = {
    "sdxl": [
        {"up": {"block_0": [0.0, 1.0, 0.0]}},
        {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
        {"down": 0.5, "mid": 0.25, "up": {"block_1": 2.0}},
        {"mid": [0.7], "down": {"block_1": [0.3]}},
    ],
    "sd15": [
        {"up": {"block_1": [0.0, 1.0, 0.0]}},
        {"down": {"block_2": [0.0, 1.0]}, "mid": 1.0},
        {"down": {"block_0": [0.1, 0.2], "block_1": 0.3}, "up": 0.4},
    ],
}


@pytest.mark.parametrize("arch,case", [(a, c) for a, cases in BLOCK_CASES.items() for c in cases])
def test_block_weights_match_diffusers(unets, arch: str, case: dict) -> None:
    assert block_weights(case, unets[arch]) == diffusers_oracle(unets[arch], case)


def test_block_weights_by_hand_on_sdxl(unets) -> None:
    got = block_weights({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}, unets["sdxl"])
    assert {k for k, v in got.items() if v} == set(SDXL_LAYOUT + SDXL_STYLE)
    assert len(got) == len(SDXL_ALL)


@pytest.mark.parametrize("scales,message", [
    ({"down": {"block_0": 1.0}}, "no block 'block_0' with attentions; valid: block_1, block_2"),
    ({"up": {"block_0": [1.0, 0.0]}}, "up_blocks.0 has 3 attention\\(s\\) but 2 weights"),
    ({"mid": [1.0, 2.0]}, "the mid block has 1 attention\\(s\\) but 2 weights"),
    ({"mid": {"block_0": 1.0}}, "mid block takes a number"),
    ({"up": {"block_0": "high"}}, "up_blocks.0 takes a number or a list of numbers"),
    ({"middle": 1.0}, "unknown part 'middle'"),
])
def test_block_weight_errors(unets, scales: dict, message: str) -> None:
    with pytest.raises(IPAdapterError, match=message):
        block_weights(scales, unets["sdxl"])


def test_presets_carry_their_name_and_need_their_references(unets) -> None:
    """A preset is named by its name; one reference image is the default, too few give the exact sentence."""
    assert preset("ease in", unets["sd15"]).name == "ease in"
    assert preset("composition precise", unets["sd15"]).name == "composition precise"
    with pytest.raises(IPAdapterError) as caught:
        preset("style and composition", unets["sd15"])
    assert str(caught.value) == "preset 'style and composition' needs 2 reference images (style and layout), got 1"
    partial = [l for l in cross_attention_layers(unets["sd15"]) if l.part != "mid"]
    with pytest.raises(IPAdapterError) as caught:
        preset("style transfer", partial)
    assert str(caught.value) == (
        f"the style/composition presets know the SD 1.5 and SDXL layouts, but this UNet has {len(SD15_T) - 1} "
        "transformer models in another arrangement; use a weight type or per-block weights instead"
    )


@pytest.mark.parametrize("scales,message", [
    ({"mid": {"block_0": 1.0}}, "the mid block takes a number (or a one-element list), not per-block weights"),
    ({"up": {"block_x": 1.0}}, "up has no block 'block_x' with attentions; valid: block_0, block_1"),
    ({"up": {"blocks1": 1.0}}, "up has no block 'blocks1' with attentions; valid: block_0, block_1"),
    ({"down": {"xxxxx_1": 1.0}}, "down has no block 'xxxxx_1' with attentions; valid: block_1, block_2"),
])
def test_block_weight_sentences_on_sdxl(unets, scales: dict, message: str) -> None:
    """SDXL's blocks with attentions (SDXL_T): down 1 and 2, up 0 and 1; a block key is `block_<index>`."""
    with pytest.raises(IPAdapterError) as caught:
        block_weights(scales, unets["sdxl"])
    assert str(caught.value) == message


def test_menus_offer_the_style_presets_only_on_the_layouts_they_are_defined_for(unets) -> None:
    """docs/control.md: weight types apply to any UNet, style/composition presets to SD 1.5's and SDXL's layouts."""
    for unet in unets.values():
        assert available_presets(unet) == PRESET_NAMES
    other = factories.unet()
    assert available_presets(other) == tuple(WEIGHT_TYPES)
    for name in NAMED_PRESETS:
        with pytest.raises(IPAdapterError, match="SD 1.5 and SDXL layouts"):
            preset(name, other, references=2)
