"""The UNet's attention layers under their two orders.

Checkpoint order: a layer's position in `unet.attn_processors` (down → up → mid in diffusers), counting self- and
cross-attention; the published files key K'/V' by it. Execution order: down → mid → up, the order the community
presets count transformer blocks in. Everything inside this package is keyed by layer name; the positional index
is used only at the file boundary (checkpoint.py). Keeping both orders here, explicitly, avoids the mixed-order bug.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_PART_ORDER = {"down": 0, "mid": 1, "up": 2}
_NAME = re.compile(
    r"^(?P<part>down_blocks|up_blocks|mid_block)(?:\.(?P<block>\d+))?\.attentions\.(?P<attention>\d+)"
    r"\.transformer_blocks\.(?P<tblock>\d+)\.(?P<kind>attn1|attn2)$"
)


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of the UNet.

    name: module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2".
    index: position in checkpoint order (published files' "{index}.to_k_ip.weight").
    transformer: execution-order index of the enclosing transformer model (`attentions.k`): the presets' "t".
    """

    name: str
    index: int
    cross: bool
    width: int
    cross_dim: int
    part: str
    block: int
    attention: int
    transformer_block: int
    transformer: int = -1
    execution: int = -1

    @property
    def transformer_name(self) -> str:
        return self.name.rsplit(".transformer_blocks.", 1)[0]


def _parse(name: str) -> dict[str, int | str] | None:
    m = _NAME.match(name)
    if not m:
        return None
    part = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}[m["part"]]
    return {"part": part, "block": int(m["block"] or 0), "attention": int(m["attention"]),
            "transformer_block": int(m["tblock"]), "cross": m["kind"] == "attn2"}


def attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    """All attention layers in checkpoint order, each with its execution-order positions filled in."""
    raw = []
    # `unet.attn_processors`' order (a pre-order walk of the children, duplicates kept) without its `hasattr` on every
    # module instance, which costs an AttributeError on each that is not an attention: several times the walk itself.
    attentions = [(name, m) for name, m in unet.named_modules(remove_duplicate=False)
                  if name and hasattr(type(m), "get_processor")]
    for index, (name, module) in enumerate(attentions):
        parsed = _parse(name)
        if parsed is None:
            continue
        cross_dim = module.to_k.in_features
        raw.append(AttentionLayer(name=name, index=index, width=module.to_k.out_features, cross_dim=cross_dim,
                                  **parsed))

    def exec_key(layer: AttentionLayer) -> tuple[int, ...]:
        return (_PART_ORDER[layer.part], layer.block, layer.attention, layer.transformer_block, layer.cross)

    transformers = sorted({(exec_key(l)[:3], l.transformer_name) for l in raw})
    t_index = {name: t for t, (_, name) in enumerate(transformers)}
    ordered = sorted(raw, key=exec_key)
    e_index = {l.name: e for e, l in enumerate(ordered)}
    return [
        AttentionLayer(**{**l.__dict__, "transformer": t_index[l.transformer_name], "execution": e_index[l.name]})
        for l in raw
    ]


def cross_attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    return [layer for layer in attention_layers(unet) if layer.cross]
