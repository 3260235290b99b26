"""Attach adapters to a FLUX or SD 3 transformer and detach them: check everything first, keep the original
processors, restore exactly those objects. The only module that touches a transformer's attention processors.

A pre-hook on the transformer tells the processors, before each call, where the run is (the step window), the
image-token grid (masks), whether the call is the negative prompt's (FLUX true CFG), and for SD 3 the
time-conditioned tokens of every reference at this timestep.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from ipadapter.attach import ProcessorSwap
from ipadapter.dit.adapter import DiTAdapter
from ipadapter.dit.blocks import DESCRIPTIONS, TIMESTEP_SCALE, dit_blocks, dit_kind
from ipadapter.dit.flux_attention import FluxIPProcessor
from ipadapter.dit.joint_attention import JointIPProcessor
from ipadapter.dit.plan import BlockProcessor
from ipadapter.dit.step import StepState
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt

# The transformer's forward: (hidden_states, encoder_hidden_states, pooled_projections, timestep, ...) for both.
_TIMESTEP_POSITION = 3


def check_fits(model: nn.Module, adapter: DiTAdapter, name: str) -> None:
    """One sentence saying what does not fit, before anything changes."""
    kind = dit_kind(model)
    if adapter.config.base != kind:
        raise IPAdapterError(
            f"{name} is an IP-Adapter for {DESCRIPTIONS[adapter.config.base]} but this base is "
            f"{DESCRIPTIONS.get(kind, type(model).__name__)}; use an adapter made for it"
        )
    blocks = {b.name: b for b in dit_blocks(model)}
    mine = dict(adapter.named_layers())
    if set(mine) != set(blocks):
        raise IPAdapterError(
            f"{name} has weights for {len(mine)} blocks but this transformer has {len(blocks)}; it was made for "
            "another model size"
        )
    for block_name, weights in mine.items():
        if weights.to_k_ip.out_features != blocks[block_name].width:
            raise IPAdapterError(
                f"{name}'s block {block_name} is {weights.to_k_ip.out_features} wide but the transformer's is "
                f"{blocks[block_name].width}; it was made for another model size"
            )


class DiTAttachment(ProcessorSwap):
    """Adapters attached to one transformer; the same interface as `attach.Attachment` for the prompter."""

    def __init__(self, model: nn.Module, adapters: Mapping[str, DiTAdapter], scheduler: Any = None) -> None:
        super().__init__(model, adapters, scheduler)
        self.model = model
        self.kind = dit_kind(model)
        self.step = StepState()
        self._ids: tuple[torch.Tensor, tuple[int, int]] | None = None  # FLUX's position ids and their grid

    def _install(self) -> None:
        processor_class = FluxIPProcessor if self.kind == "flux" else JointIPProcessor
        per_block: dict[str, dict[str, nn.Module]] = {}
        for adapter_name, adapter in self.adapters.items():
            for block_name, weights in adapter.named_layers():
                per_block.setdefault(block_name, {})[adapter_name] = weights
        for block in dit_blocks(self.model):
            attn = self.model.get_submodule(block.name)
            self._originals[block.name] = attn.processor
            processor = processor_class(block, attn.processor, self.runtime, self.step, per_block[block.name])
            self._processors.append(processor)
            attn.set_processor(processor)
        self._hook = self.model.register_forward_pre_hook(self._before_call, with_kwargs=True)

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        timestep = args[_TIMESTEP_POSITION] if len(args) > _TIMESTEP_POSITION else kwargs.get("timestep")
        readable = _has_values(hidden)
        if self.kind == "flux":
            ids = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
            self.runtime.latent_hw = None if ids is None or not readable else self._grid(ids)
        else:
            patch = self.model.config.patch_size
            self.runtime.latent_hw = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
            if self.rows is not None:
                self.runtime.cfg = hidden.shape[0] == 2 * self.rows
        value = None
        if self.kind == "flux":  # FLUX's true CFG calls it twice per step: the second call is the negative one
            # FLUX passes its own tensor (t / 1000): read it only where the pipeline does not say which step this is.
            value = self._loop_timestep()
            if value is None and timestep is not None and readable:
                value = self._timestep_value(timestep) * TIMESTEP_SCALE["flux"]
            current = (self.runtime.generation, value)
            self.step.negative = current == self.step.last and timestep is not None
            self.step.last = current
        self.runtime.progress = self._progress(timestep, value)
        if self.kind == "sd3":
            self._time_tokens(timestep, hidden.shape[0])

    def _grid(self, ids: torch.Tensor) -> tuple[int, int]:
        """`_grid_of(ids)`, read once for the ids tensor the pipeline passes at every step of a generation (on a GPU
        each read waits for it)."""
        if self._ids is None or self._ids[0] is not ids:
            self._ids = (ids, _grid_of(ids))
        return self._ids[1]

    def _time_tokens(self, timestep: Any, batch: int) -> None:
        """SD 3: each acting adapter's references through its timestep-aware resampler, once for all blocks."""
        self.step.tokens, self.step.temb = {}, {}
        for name, prompt in self.runtime.prompts.items():
            if prompt.scale == 0.0 or prompt.step_factor(self.runtime.progress) == 0.0:
                continue
            adapter = self.adapters[name]
            rows = [self.runtime.batch_tokens(r.cond, r.uncond, batch) for r in prompt.references]
            if not rows:
                continue
            t = torch.as_tensor(timestep, device=adapter.device).flatten()
            t = t.expand(batch) if t.numel() == 1 else t
            tokens, temb = adapter.image_proj(torch.cat(rows), t.repeat(len(rows)))  # it casts to its own dtype
            self.step.tokens[name] = list(tokens.split(batch))
            self.step.temb[name] = temb[:batch]

    def set_prompts(self, prompts: Mapping[str, AdapterPrompt], *, rows: int | None = None, cfg: bool = False) -> None:
        """Prompts for the next transformer calls; `rows` (prompts × images) lets SD 3's hook recognise a CFG batch."""
        unknown = set(prompts) - set(self.adapters)
        if unknown:
            raise IPAdapterError(f"no adapter named {sorted(unknown)[0]!r}; attached: {', '.join(self.adapters)}")
        known = set(self._originals)
        for name, prompt in prompts.items():
            names = set(prompt.layer_weights or ()) | set(prompt.uncond_layers)
            for ref in prompt.references:
                names |= set(ref.layer_weights or ())
            if prompt.uncond_layers:
                raise IPAdapterError(f"adapter {name!r}: unconditional layers are a UNet preset; a transformer has none")
            stray = sorted(names - known)
            if stray:
                raise IPAdapterError(
                    f"adapter {name!r}: layer weights name {stray[0]!r}, which is not an adapted block of this "
                    f"transformer (blocks are named like {next(iter(self._originals))!r})"
                )
        self.rows = rows
        self.runtime.set(prompts, cfg=cfg)  # K'/V' live for one generation here: no weights tokens to compare


@torch.compiler.disable  # outside a compiled graph, where the tensor is what it is
def _has_values(t: torch.Tensor) -> bool:
    """False for a fake tensor (`ipadapter train --dry-run` runs the model on them): no values to read a latent grid
    or a timestep from."""
    return not is_fake(t)


def _grid_of(ids: torch.Tensor) -> tuple[int, int]:
    """FLUX's image-token grid from its position ids (row, column in channels 1 and 2)."""
    ids = ids.reshape(-1, ids.shape[-1])
    return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def attach_dit(
    model: nn.Module, adapters: DiTAdapter | list[DiTAdapter] | Mapping[str, DiTAdapter], *, scheduler: Any = None,
) -> DiTAttachment:
    """Attach one or several adapters (named "0", "1", ... unless a mapping is given) to a FLUX or SD 3 transformer."""
    if isinstance(adapters, nn.Module):
        adapters = [adapters]
    if not isinstance(adapters, Mapping):
        adapters = {str(i): a for i, a in enumerate(adapters)}
    if any(isinstance(p, BlockProcessor) for p in model.attn_processors.values()):
        raise IPAdapterError("this transformer already has adapters attached; detach them first or attach all together")
    for name, adapter in adapters.items():
        if not isinstance(adapter, DiTAdapter):
            raise IPAdapterError(f"adapter {name!r} is an IP-Adapter for a UNet; this base is {DESCRIPTIONS[dit_kind(model)]}")
        check_fits(model, adapter, f"adapter {name!r}")
        if adapter.device != model.device:
            raise IPAdapterError(f"adapter {name!r} is on {adapter.device} but the transformer on {model.device}; move it first")
    attachment = DiTAttachment(model, adapters, scheduler)
    attachment._install()
    return attachment
