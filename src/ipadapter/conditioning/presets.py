"""Per-layer weights as data: diffusers' per-block dicts, the community weight types, and the named presets.

Everything returned is keyed by cross-attention layer name (`AttentionLayer.name`), ready for
`AdapterPrompt.layer_weights` / `AdapterPrompt.uncond_layers`; positions never leave this module. The weight types
count transformer models in execution order (down → mid → up, `AttentionLayer.transformer`), never in checkpoint
order (down → up → mid): the mid block is t6 of 16 in SD 1.5 and t4 of 11 in SDXL, not the last.

Weights here are relative: the `w` of the formulas in docs/control.md is `AdapterPrompt.scale`, which the attention
processor multiplies in.

Style and layout layers (InstantStyle). SDXL, as published: style = up_blocks.0.attentions.1 (t6), layout =
down_blocks.2.attentions.1 (t3). SD 1.5 (also used for SD 2.x, same layout) has no single published pair;
InstantStyle names up_blocks.1 for style and down_blocks.2 for layout at block level. We take the same position
inside those blocks as in SDXL: style = up_blocks.1.attentions.1 (t8), layout = down_blocks.2.attentions.1 (t5).
Both are the second attention of the first 1280-wide up block and the last attention of the last 1280-wide down
block, exactly as in SDXL, so a preset means the same thing on both families.

"Precise" presets: the layer of the other role — layout for "style transfer precise", style for "composition
precise" — receives the reference on the unconditional rows only, so guidance pushes away from the reference's
layout (or style) while the kept layer pulls towards its style (or layout). Other layers stay silent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ipadapter.errors import IPAdapterError
from ipadapter.layers import AttentionLayer, cross_attention_layers

# Transformer models (`attentions.k` module paths) of each known layout, and its style / layout transformer.
_SD15_TRANSFORMERS = frozenset(
    [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)]
)
_SDXL_TRANSFORMERS = frozenset(
    [f"down_blocks.{b}.attentions.{a}" for b in (1, 2) for a in range(2)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{b}.attentions.{a}" for b in (0, 1) for a in range(3)]
)
STYLE_LAYOUT = {
    "SD 1.5": (_SD15_TRANSFORMERS, {"style": "up_blocks.1.attentions.1", "layout": "down_blocks.2.attentions.1"}),
    "SDXL": (_SDXL_TRANSFORMERS, {"style": "up_blocks.0.attentions.1", "layout": "down_blocks.2.attentions.1"}),
}


def _ease(t: int, count: int, kind: str) -> float:
    mid = count / 2
    return {
        "ease in": 0.05 + 0.95 * (1 - t / count),
        "ease out": 0.05 + 0.95 * t / count,
        "ease in-out": 0.05 + 0.95 * (1 - abs(t - mid) / mid),
        "reverse in-out": 0.05 + 0.95 * abs(t - mid) / mid,
    }[kind]


_PART_FACTORS = {
    "weak input": {"down": 0.2, "mid": 1.0, "up": 1.0},
    "weak middle": {"down": 1.0, "mid": 0.2, "up": 1.0},
    "weak output": {"down": 1.0, "mid": 1.0, "up": 0.2},
    "strong middle": {"down": 0.2, "mid": 1.0, "up": 0.2},
}

# A weight type: (layer, number of transformer models) → factor.
WEIGHT_TYPES: dict[str, Callable[[AttentionLayer, int], float]] = {
    "linear": lambda layer, count: 1.0,
    **{k: (lambda layer, count, k=k: _ease(layer.transformer, count, k))
       for k in ("ease in", "ease out", "ease in-out", "reverse in-out")},
    **{k: (lambda layer, count, f=f: f[layer.part]) for k, f in _PART_FACTORS.items()},
}


@dataclass(frozen=True)
class _Named:
    """A named preset as data: per reference, the roles whose layers act; roles moved to the unconditional rows."""

    references: tuple[str, ...]
    uncond: tuple[str, ...] = ()


# Roles: "style", "layout", "not layout" (every transformer but the layout one).
NAMED_PRESETS = {
    "style transfer": _Named(("style",)),
    "composition": _Named(("layout",)),
    "strong style transfer": _Named(("not layout",)),
    "style and composition": _Named(("style", "layout")),
    "style transfer precise": _Named(("style",), uncond=("layout",)),
    "composition precise": _Named(("layout",), uncond=("style",)),
}
PRESET_NAMES = tuple(WEIGHT_TYPES) + tuple(NAMED_PRESETS)


@dataclass(frozen=True)
class LayerPreset:
    """What a preset sets: one layer-weight map per reference image, and the uncond layers ("precise" presets).

    layer_weights[i] is for the i-th reference image: with one entry it is `AdapterPrompt.layer_weights`; with
    several (style and composition) each goes to its image's `Reference.layer_weights`.
    """

    name: str
    layer_weights: tuple[dict[str, float], ...]
    uncond_layers: frozenset[str] = frozenset()

    @property
    def references(self) -> int:
        return len(self.layer_weights)


def _cross_layers(unet_or_layers: nn.Module | Sequence[AttentionLayer]) -> list[AttentionLayer]:
    if isinstance(unet_or_layers, nn.Module):
        return cross_attention_layers(unet_or_layers)
    return [layer for layer in unet_or_layers if layer.cross]


def _transformer_count(layers: Sequence[AttentionLayer]) -> int:
    return len({layer.transformer_name for layer in layers})


def _roles(layers: Sequence[AttentionLayer]) -> dict[str, str]:
    transformers = frozenset(layer.transformer_name for layer in layers)
    for known, roles in STYLE_LAYOUT.values():
        if transformers == known:
            return roles
    raise IPAdapterError(
        f"the style/composition presets know the SD 1.5 and SDXL layouts, but this UNet has {len(transformers)} "
        "transformer models in another arrangement; use a weight type or per-block weights instead"
    )


def _role_layers(role: str, layers: Sequence[AttentionLayer], roles: dict[str, str]) -> list[str]:
    if role == "not layout":
        return [layer.name for layer in layers if layer.transformer_name != roles["layout"]]
    return [layer.name for layer in layers if layer.transformer_name == roles[role]]


def preset(name: str, unet_or_layers: nn.Module | Sequence[AttentionLayer], *, references: int = 1) -> LayerPreset:
    """The layer weights of a weight type or named preset on this UNet; `references` = images the user gave."""
    layers = _cross_layers(unet_or_layers)
    if name in WEIGHT_TYPES:
        count = _transformer_count(layers)
        return LayerPreset(name, ({layer.name: WEIGHT_TYPES[name](layer, count) for layer in layers},))
    if name not in NAMED_PRESETS:
        raise IPAdapterError(f"unknown preset {name!r}; valid: {', '.join(PRESET_NAMES)}")
    spec = NAMED_PRESETS[name]
    if references < len(spec.references):
        raise IPAdapterError(
            f"preset {name!r} needs {len(spec.references)} reference images ({' and '.join(spec.references)}), "
            f"got {references}"
        )
    roles = _roles(layers)
    weights = tuple({n: 1.0 for n in _role_layers(role, layers, roles)} for role in spec.references)
    uncond = frozenset(n for role in spec.uncond for n in _role_layers(role, layers, roles))
    return LayerPreset(name, weights, uncond)


def available_presets(unet_or_layers: nn.Module | Sequence[AttentionLayer]) -> tuple[str, ...]:
    """The presets `preset` accepts on this UNet, for menus: every weight type, and the style/composition presets
    only on the layouts they are defined for (SD 1.5 and SDXL), so a menu never offers one that must fail."""
    most = max(len(spec.references) for spec in NAMED_PRESETS.values())
    names = []
    for name in PRESET_NAMES:
        try:
            preset(name, unet_or_layers, references=most)
        except IPAdapterError:
            continue
        names.append(name)
    return tuple(names)


def _block_values(value: float | Sequence[float], count: int, where: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * count
    if not (isinstance(value, Sequence) and all(isinstance(v, (int, float)) for v in value)):
        raise IPAdapterError(f"{where} takes a number or a list of numbers, got {value!r}")
    values = [float(v) for v in value]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise IPAdapterError(f"{where} has {count} attention(s) but {len(values)} weights were given")
    return values


def block_weights(
    scales: Mapping[str, float | Sequence[float] | Mapping[str, float | Sequence[float]]],
    unet_or_layers: nn.Module | Sequence[AttentionLayer],
) -> dict[str, float]:
    """diffusers' per-block dict (`set_ip_adapter_scale`) → per-layer weights, with diffusers' semantics.

    Keys "down", "mid", "up"; a part is a number (all its attentions) or {"block_i": number | [one per attention]};
    `i` is the block's index in `unet.down_blocks` / `unet.up_blocks` and must be a block that has attentions;
    "mid" takes a number or a one-element list. Parts and blocks left out get 0. Unlike diffusers, a block without
    attentions is an error here rather than silently ignored.
    """
    layers = _cross_layers(unet_or_layers)
    unknown = set(scales) - {"down", "mid", "up"}
    if unknown:
        raise IPAdapterError(f"unknown part {sorted(unknown)[0]!r} in per-block weights; valid: down, mid, up")
    transformers: dict[tuple[str, int], list[str]] = {}
    for layer in sorted(layers, key=lambda l: l.execution):
        names = transformers.setdefault((layer.part, layer.block), [])
        if layer.transformer_name not in names:
            names.append(layer.transformer_name)
    weight_of: dict[str, float] = {}
    for part, value in scales.items():
        blocks = {b: names for (p, b), names in transformers.items() if p == part}
        if part == "mid":
            if isinstance(value, Mapping):
                raise IPAdapterError("the mid block takes a number (or a one-element list), not per-block weights")
            value = {"block_0": value}
        elif not isinstance(value, Mapping):
            value = {f"block_{b}": value for b in blocks}
        for key, block_value in value.items():
            index = int(key[6:]) if key.startswith("block_") and key[6:].isdigit() else None
            if index not in blocks:
                valid = ", ".join(f"block_{b}" for b in sorted(blocks))
                raise IPAdapterError(f"{part} has no block {key!r} with attentions; valid: {valid}")
            names = blocks[index]
            where = "the mid block" if part == "mid" else f"{part}_blocks.{index}"
            weight_of.update(zip(names, _block_values(block_value, len(names), where)))
    return {layer.name: weight_of.get(layer.transformer_name, 0.0) for layer in layers}
