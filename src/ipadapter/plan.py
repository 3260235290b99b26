"""The UNet processor's plan for a generation: what each adapter does at the layers that agree on it, the image
attentions (terms) made from it, and what each call then reads. Made once per generation and shared; the processor
(`attention.py`) only reads it at each call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ipadapter.groups import Group
from ipadapter.runtime import AdapterPrompt


class AdapterPlan(NamedTuple):
    """One adapter at the layers that agree on it, for one generation (the prompt is fixed until the next
    `Runtime.set`). It holds no weights: one plan serves every layer of the same kind and per-layer factors.

    has_ip/concat/has_lora: what the layer's `AdapterLayer` has; layer_weight: scale × the prompt's weight for this
    layer (0 without image K'/V' here); uncond_layer: the layer is one of the prompt's `uncond_layers` (the reference
    moves to the unconditional rows); lora_scale: 0 without LoRA; gridded: a group is masked or the layer is an uncond
    layer, so its terms carry weights for each token grid (else one set of terms serves every grid).
    """

    name: str
    prompt: AdapterPrompt
    has_ip: bool
    concat: bool
    has_lora: bool
    layer_weight: float
    uncond_layer: bool
    lora_scale: float
    groups: tuple[Group, ...]
    gridded: bool


class Laid(NamedTuple):
    """A reference group's tokens on the UNet batch, what K'/V' are projected from: each reference's batch rows
    (`Runtime.batch_halves`), its token count and its value factor."""

    halves: tuple[tuple[torch.Tensor, ...], ...]
    sizes: tuple[int, ...]
    factors: tuple[float, ...]
    scaled: bool  # a factor other than 1

    def tokens(self) -> torch.Tensor:
        """(B, R·T, C): the references side by side, each projection weight then read once for all (one reference
        laid out in one part: that tensor itself, nothing to join)."""
        if len(self.halves) == 1:  # one reference, no list made: this runs at every call of every layer
            h = self.halves[0]
            return torch.cat(h, dim=0) if len(h) > 1 else h[0]
        return torch.cat([torch.cat(h, dim=0) if len(h) > 1 else h[0] for h in self.halves], dim=1)


class Term(NamedTuple):
    """One image attention of one adapter at one layer, made once per generation and batch layout.

    k/v: K'/V' (B, h, T, d) of its references (`together` > 0: that many masked references in one attention, their
    tokens concatenated), or None with `laid`: projected from those tokens at every call (`cache_kv` off); maps:
    (query tokens, per-token weights or None) for each token count prepared, none where the plan is not gridded.
    """

    k: torch.Tensor | None
    v: torch.Tensor | None
    maps: tuple[tuple[int, torch.Tensor | None], ...]
    together: int
    laid: Laid | None = None


class Act(NamedTuple):
    """What one adapter does at one call: its image weight and LoRA scale now (floats eager, tensors compiled) and,
    compiled, its terms prepared before the UNet ran."""

    plan: AdapterPlan
    image: float | torch.Tensor
    lora: float | torch.Tensor
    terms: tuple[Term, ...] | None = None


class Acts(NamedTuple):
    """A call's acts, sorted once for `_attend`: every one, those with a LoRA acting, the simple (concat) adapters
    acting, and the decoupled ones that add an image attention. The eager path keeps them while the step factors
    and the CFG layout stay (every step, without a step window): a layer's call then decides nothing anew."""

    every: list[Act]
    lora: list[Act]
    concat: list[Act]
    image: list[Act]


def sort_acts(acts: list[Act], cfg: bool) -> Acts:
    def on(x: float | torch.Tensor) -> bool:
        return isinstance(x, torch.Tensor) or x != 0.0

    return Acts(
        acts,
        [a for a in acts if a.plan.has_lora and on(a.lora)],
        [a for a in acts if a.plan.concat and (isinstance(a.image, torch.Tensor) or a.image > 0.0)],
        [a for a in acts if a.plan.has_ip and not a.plan.concat
         and not (a.plan.uncond_layer and not cfg) and on(a.image)],
    )


class Prepared(NamedTuple):
    """An adapter's share of a compiled call, made before the UNet runs: its position in the runtime's step factors,
    its image weight and LoRA scale as tensors (changing them changes no graph), and its terms."""

    plan: AdapterPlan
    index: int
    image: torch.Tensor
    lora: torch.Tensor
    terms: tuple[Term, ...]


class Resolved:
    """A generation's plan for the layers that agree on it (`IPAttnProcessor._signature`), and what is made from it
    for all of them: the sorted acts, the weight maps and the terms without K'/V'. Made at the first such layer's
    first call and shared by the others (SDXL: 70 layers, one plan for a prompt without per-layer weights)."""

    __slots__ = ("plan", "maps", "terms", "acts", "factors", "cfg")

    def __init__(self, plan: list[AdapterPlan]) -> None:
        self.plan = plan
        self.maps: dict[tuple, torch.Tensor | None] = {}
        self.terms: dict[tuple, tuple[Term, ...]] = {}  # without K'/V' (`cache_kv` off): the same at these layers
        self.acts: Acts | None = None  # the eager call's, for `factors` (the runtime's step factors) and `cfg`
        self.factors: dict[str, float] | None = None
        self.cfg = False


class LayerState:
    """One layer's share of the current generation: the `Resolved` plan it reads (shared with the layers that agree
    on it) and its own terms with K'/V'. A plain object, so that renewing it at each generation costs no
    `nn.Module.__setattr__` (microseconds each, paid by every layer)."""

    __slots__ = ("generation", "resolved", "kv_terms")

    def __init__(self) -> None:
        self.generation = -1
        self.resolved = Resolved([])
        self.kv_terms: dict[tuple, tuple[Term, ...]] = {}  # with K'/V' (`cache_kv`): this layer's own
