"""Per-generation state the attention processors read: which references, with what weights, at which step.

Set once per generation (or per training batch); the processors cache what does not change across denoising
steps (batched tokens, K'/V') until the next `Runtime.set`. The step window's factors are computed once per UNet
call for all layers (`step_factors`), and as a tensor for a compiled UNet (`refresh_step_tensor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ipadapter.embed_cache import tensor_key
from ipadapter.errors import IPAdapterError

SCALING_MODES = ("v", "kv", "kv_penalty", "k_mean_v")
T = TypeVar("T")


@dataclass
class Reference:
    """One image prompt for one adapter, already projected to tokens.

    cond/uncond: (R, T, C) with R = 1 (shared by the whole batch) or R = number of prompts in the batch.
    mask: (H, W) in [0, 1], 1 = apply; any size and aspect ratio. weight: multiplies this reference's values;
    layer_weights: per-layer factors of this reference alone (None = 1 everywhere, missing names = 0).
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    weight: float = 1.0
    layer_weights: dict[str, float] | None = None
    _key: tuple = field(default=(), init=False, repr=False, compare=False)

    def tokens_key(self) -> str:
        """A digest of the tokens, by which K'/V' of equal tokens are reused across generations. Computed again only
        when the tokens change (reading them waits for the GPU): kept with the tensors it was computed for and their
        version counters, so another tensor (even one made where a freed one was) or a write in place is seen."""
        cond, uncond = self.cond, self.uncond
        versions = (_version(cond), _version(uncond))
        held = self._key
        if not held or held[0] is not cond or held[1] is not uncond or held[2] != versions:
            self._key = held = (cond, uncond, versions, tensor_key(cond, uncond))
        return held[3]

    def weight_at(self, layer: str) -> float:
        """This reference's own factor at a layer (presets like "style and composition" give each image its layers)."""
        return self.weight if self.layer_weights is None else self.weight * self.layer_weights.get(layer, 0.0)


def _version(t: torch.Tensor | None) -> int | None:
    """`t`'s count of in-place writes; None for an inference tensor, which keeps none (and takes no writes outside
    inference mode)."""
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


@dataclass
class AdapterPrompt:
    """How one adapter acts during one generation."""

    references: list[Reference]
    scale: float = 1.0
    layer_weights: dict[str, float] | None = None
    uncond_layers: frozenset[str] = frozenset()
    start: float = 0.0
    end: float = 1.0
    schedule: Callable[[float], float] | None = None
    scaling: str = "v"
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise IPAdapterError(f"the adapter scale must be a finite number, got {self.scale}")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0) or self.start > self.end:
            raise IPAdapterError(f"the step window must satisfy 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if self.scaling not in SCALING_MODES:
            raise IPAdapterError(f"unknown embeds scaling {self.scaling!r}; valid: {', '.join(SCALING_MODES)}")

    def layer_weight(self, layer: str) -> float:
        base = 1.0 if self.layer_weights is None else self.layer_weights.get(layer, 0.0)
        return self.scale * base

    def per_layer(self) -> bool:
        """Whether anything of this prompt differs between layers: its layer weights, its unconditional layers or a
        reference's own layer weights (without any, every layer resolves the same plan)."""
        return (self.layer_weights is not None or bool(self.uncond_layers)
                or any(r.layer_weights is not None for r in self.references))

    def step_factor(self, progress: float | None) -> float:
        """0 outside [start, end), else the schedule's value (1 without one). No progress known → always on."""
        if progress is None:
            return 1.0 if self.start < self.end else 0.0
        if not (self.start <= progress < self.end):
            return 0.0
        return 1.0 if self.schedule is None else float(self.schedule(progress))


@dataclass
class Runtime:
    """Shared by every processor of one attachment."""

    prompts: dict[str, AdapterPrompt] = field(default_factory=dict)
    cfg: bool = False
    progress: float | None = None
    latent_hw: tuple[int, int] | None = None
    cache_kv: bool = False
    generation: int = 0
    weights: dict[str, Hashable] = field(default_factory=dict)
    # The prompts with anything per layer (`AdapterPrompt.per_layer`): derived from `prompts`, never given.
    per_layer: frozenset[str] = field(default=frozenset(), init=False)
    step_tensor: torch.Tensor | None = field(default=None, repr=False)
    _factors: tuple[tuple, dict[str, float]] = field(default=((), {}), init=False, repr=False)
    _shared: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.per_layer = _per_layer(self.prompts)

    def set(self, prompts: dict[str, AdapterPrompt], *, cfg: bool, weights: dict[str, Hashable] | None = None) -> None:
        """A new generation's prompts; `weights`: each adapter's `IPAdapter.weights_token()` (K'/V' are reused
        across generations only under an equal token, so without one they are computed every time)."""
        self.prompts, self.cfg = dict(prompts), cfg
        self.weights = dict(weights or {})
        self.per_layer = _per_layer(self.prompts)
        self.progress = None
        self.generation += 1
        self._shared = {}

    def shared(self, key: Hashable, make: Callable[[], T]) -> T:
        """`make()` once per generation for every layer that asks with `key`: a mask on a token grid is the same at
        every layer of that grid size (SDXL: 70 layers, 3 sizes), so it is resized once, not once per layer."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def clear(self) -> None:
        self.set({}, cfg=False)

    def step_factors(self) -> dict[str, float]:
        """Each prompt's `step_factor` at the current progress, computed once per UNet call for all its layers. The
        same dict while the factors stay the same (every step, without a step window or schedule): the processors
        keep what they decided from it until it changes."""
        at = (self.generation, self.progress)
        if self._factors[0] != at:
            factors = {name: p.step_factor(self.progress) for name, p in self.prompts.items()}
            self._factors = (at, self._factors[1] if factors == self._factors[1] else factors)
        return self._factors[1]

    def refresh_step_tensor(self, device: torch.device) -> None:
        """`step_tensor` := the step factors in `prompts` order, one float32 tensor: what a compiled UNet reads, so a
        new step changes a tensor's value and no traced constant. Written in place, at a static address (as the
        processors' prepared tensors: CUDA graphs replay without copying it)."""
        values = list(self.step_factors().values())
        current = self.step_tensor
        if current is not None and current.device == device and current.shape[0] == len(values):
            current.copy_(torch.tensor(values, dtype=torch.float32), non_blocking=True)
        else:
            self.step_tensor = torch.tensor(values, dtype=torch.float32, device=device)
            torch._dynamo.mark_static_address(self.step_tensor, guard=False)

    def batch_tokens(self, tokens: torch.Tensor, uncond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Lay (R, T, C) tokens out along a UNet batch: [uncond rows; cond rows] under CFG, repeated per image."""
        return torch.cat(self.batch_halves(tokens, uncond, batch), dim=0)  # (batch, T, C), a new tensor

    def batch_halves(self, tokens: torch.Tensor, uncond: torch.Tensor | None, batch: int) -> list[torch.Tensor]:
        """The parts of `batch_tokens` before their concatenation: [uncond rows, cond rows] under CFG, else [cond
        rows], each repeated per image (once: the tensor given, no copy)."""
        halves = [(uncond if uncond is not None else torch.zeros_like(tokens)), tokens] if self.cfg else [tokens]
        if batch % len(halves):
            raise IPAdapterError(f"a classifier-free-guidance batch must be even, got {batch}")
        per_half = batch // len(halves)
        laid = []
        for t in halves:
            if per_half % t.shape[0]:
                raise IPAdapterError(
                    f"{t.shape[0]} image prompts cannot be spread over a batch of {per_half}; give one per prompt"
                )
            repeats = per_half // t.shape[0]
            laid.append(t.repeat_interleave(repeats, dim=0) if repeats > 1 else t)
        return laid


def _per_layer(prompts: dict[str, AdapterPrompt]) -> frozenset[str]:
    return frozenset(name for name, prompt in prompts.items() if prompt.per_layer())
