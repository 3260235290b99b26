"""Which adapters act at one transformer block during one generation, and with which reference groups.

Resolved once per generation (each `Runtime.set`), as attention.py does for UNet layers; per call only the step
window's factor is applied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ipadapter.dit.blocks import Block
from ipadapter.dit.step import StepState
from ipadapter.groups import Group, reference_groups
from ipadapter.runtime import AdapterPrompt, Runtime
from ipadapter.token_grids import resize_mask


class BlockPlan(NamedTuple):
    """One adapter at one block: its prompt, weights, scale × layer weight, and reference groups."""

    name: str
    prompt: AdapterPrompt
    weights: nn.Module
    layer_weight: float
    groups: tuple[Group, ...]


class BlockState:
    """One block's share of the current generation: its plan and what is made from it (masks on the token grid, K'/V'
    under `cache_kv`). A plain object, so that renewing it at each generation costs no `nn.Module.__setattr__`
    (microseconds each, paid by every block: FLUX has 57)."""

    __slots__ = ("generation", "plan", "cache")

    def __init__(self) -> None:
        self.generation = -1
        self.plan: list[BlockPlan] = []
        self.cache: dict[tuple, object] = {}


class BlockProcessor(nn.Module):
    """The state every transformer block processor shares: the original processor (restored on detach, called
    whenever nothing of ours acts), the runtime, this block's adapter weights, the per-generation plan and masks."""

    def __init__(self, block: Block, original: object, runtime: Runtime, step: StepState,
                 adapters: dict[str, nn.Module]) -> None:
        super().__init__()
        self.block = block
        self.original = original
        self.runtime = runtime
        self.step = step
        self.adapters = nn.ModuleDict(adapters)
        self.state = BlockState()

    def clear_cache(self) -> None:
        self.state.cache = {}

    def plan(self) -> list[BlockPlan]:
        state = self.state
        if state.generation != self.runtime.generation:
            state.plan, state.cache, state.generation = [], {}, self.runtime.generation
            for name, weights in self.adapters.items():
                prompt = self.runtime.prompts.get(name)
                weight = prompt.layer_weight(self.block.name) if prompt is not None else 0.0
                groups = reference_groups(prompt, self.block.name, every_reference=False) if weight != 0.0 else ()
                if groups:  # no reference acts here: nothing to add (SD 3 makes no time tokens for it)
                    state.plan.append(BlockPlan(name, prompt, weights, weight, groups))
        return state.plan

    def active(self, text: torch.Tensor | None) -> list[tuple[BlockPlan, float]]:
        """(plan, its weight at this step) for every plan that acts now; none on a call without text (the image
        branch belongs to the joint text-image attention)."""
        if text is None:
            return []
        progress = self.runtime.progress
        acting = [(p, p.layer_weight * p.prompt.step_factor(progress)) for p in self.plan()]
        return [(p, w) for p, w in acting if w != 0.0]

    def factors(self, p: BlockPlan, group: Group) -> list[float]:
        """Each reference's own factor here (it multiplies that reference's values)."""
        return [p.prompt.references[i].weight_at(self.block.name) for i in group.refs]

    def mask_map(self, p: BlockPlan, group: Group, seq_len: int, like: torch.Tensor) -> torch.Tensor | None:
        """A masked group's (1, 1, L, 1) weights on the image-token grid, made once per generation."""
        if group.mask is None:
            return None
        key = ("mask", p.name, group.id, seq_len, self.runtime.latent_hw, like.device, like.dtype)
        cache = self.state.cache
        if key not in cache:
            m = resize_mask(group.mask.to(like.device), seq_len, self.runtime.latent_hw)
            cache[key] = m.to(like.dtype)[None, None]
        return cache[key]


def heads_layout(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, h·d) → (B, h, T, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)
