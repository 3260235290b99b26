"""Attach adapters to a UNet and detach them, PEFT-style: check everything first, keep the originals, restore them.

This is the only module that touches the UNet's attention processors.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ipadapter.adapter import IPAdapter
from ipadapter.attention import IPAttnProcessor
from ipadapter.errors import IPAdapterError
from ipadapter.layers import AttentionLayer, attention_layers
from ipadapter.runtime import AdapterPrompt, Runtime

_FAMILIES = {768: "SD 1.5", 1024: "SD 2.x", 2048: "SDXL"}


def family_of(cross_dim: int) -> str:
    return _FAMILIES.get(cross_dim, f"a model with {cross_dim}-wide text tokens")


def check_cross_dim(layers: list[AttentionLayer], cross_dim: int, name: str) -> None:
    """The commonest mistake (an SD 1.5 adapter on SDXL, or the reverse) named as such. `layers`: the UNet's
    `attention_layers` (the caller finds them once: that walks the whole UNet)."""
    cross = [l for l in layers if l.cross]
    if not cross:
        raise IPAdapterError("this UNet has no cross-attention layers to attach an IP-Adapter to")
    unet_dim = cross[0].cross_dim
    if cross_dim != unet_dim:
        raise IPAdapterError(
            f"{name} was made for {family_of(cross_dim)} (token width {cross_dim}) but this UNet is "
            f"{family_of(unet_dim)} (width {unet_dim}); use an adapter made for {family_of(unet_dim)}"
        )


def check_compatible(found: list[AttentionLayer], adapter: IPAdapter, name: str) -> None:
    """Raise one sentence saying what does not fit the UNet whose `attention_layers` are `found`, before anything is
    changed."""
    check_cross_dim(found, adapter.config.cross_dim, name)
    layers = {l.name: l for l in found}
    cross = [l for l in layers.values() if l.cross]
    ip_layers = [n for n, l in adapter.named_layers() if l.has_ip]
    missing = [l.name for l in cross if l.name not in ip_layers]
    extra = [n for n, l in adapter.named_layers() if n not in layers]
    if missing or extra:
        raise IPAdapterError(
            f"{name} has weights for {len(ip_layers)} cross-attention layers but this UNet has {len(cross)}"
            + (f" (first unknown layer: {extra[0]})" if extra else f" (first missing: {missing[0]})")
            + "; it was made for another UNet architecture"
        )
    for n, weights in adapter.named_layers():
        if weights.has_ip and not weights.concat and weights.to_k_ip.weight.shape[0] != layers[n].width:
            raise IPAdapterError(
                f"{name}'s layer {n} is {weights.to_k_ip.weight.shape[0]} wide but the UNet's is {layers[n].width}"
            )


class ProcessorSwap:
    """What every attachment shares: adapters on one denoiser (a UNet or a transformer), the processors it put in,
    the originals it put aside, and its pre-call hook; `detach` restores the originals exactly."""

    replaced_by = "set_attn_processor"  # what commonly replaces this denoiser's processors, for `check_intact`

    def __init__(self, denoiser: nn.Module, adapters: Mapping[str, IPAdapter], scheduler: Any = None) -> None:
        self.denoiser = denoiser
        self.adapters = dict(adapters)
        self.scheduler = scheduler
        self.pipeline: Any = None  # the pipeline whose loop calls the denoiser, when known (`_loop_timestep`)
        self.runtime = Runtime()
        self.rows: int | None = None
        self._originals: dict[str, Any] = {}
        self._processors: list = []
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        # (the scheduler's timesteps, their CPU copy, each one's first position: what the nearest-value search finds)
        self._timesteps: tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None = None

    @property
    def attached(self) -> bool:
        return bool(self._originals)

    def clear(self) -> None:
        self.rows = None
        self.runtime.clear()

    def check_intact(self) -> None:
        """The adapter is silently lost when something replaces processors after attaching; say so instead. Checked
        at every generation, so each layer is found through the `_modules` dicts (`get_submodule` reads attributes:
        0.4 ms for SDXL's 70 layers) and its processor compared with the one put in."""
        for name, processor in zip(self._originals, self._processors):
            module: nn.Module | None = self.denoiser
            for part in name.split("."):
                module = module._modules.get(part)
                if module is None:
                    break
            if module is None or module.processor is not processor:
                raise IPAdapterError(
                    f"the attention processor of {name} was replaced after the adapter was attached (for example by "
                    f"{self.replaced_by}); attach the adapter again"
                )

    def clear_cache(self) -> None:
        """Forget the K'/V' kept for the next generation (a few MiB at most): frees them, or forces recomputation."""
        for processor in self._processors:
            processor.clear_cache()

    def detach(self) -> None:
        """Put back the exact processor objects that were there before; the denoiser is as if never touched."""
        for name, original in self._originals.items():
            self.denoiser.get_submodule(name).set_processor(original)
        self._originals.clear()
        self._processors.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _progress(self, timestep: Any, value: float | None = None) -> float | None:
        """Fraction of the denoising run at this call: the index of the scheduler's timestep nearest in value to
        `timestep`, over the step count; for a view into the scheduler's timesteps, the first position of its value,
        looked up (the same index). `value`: the call's timestep in the scheduler's units, where the caller knows it
        (FLUX's transformer gets the scheduler's timestep divided by 1000). Without a scheduler's timesteps the
        timestep is not read at all (the training-memory estimate runs the UNet on the meta device)."""
        values = self._host_timesteps()
        if values is None or timestep is None:
            return None
        if value is None and isinstance(timestep, torch.Tensor):
            index = self._scheduler_index(timestep)
            if index is not None:  # one of the scheduler's own (SD, SDXL pipelines): its place, nothing computed
                return self._timesteps[2][index] / len(values)
        t = self._timestep_value(timestep) if value is None else value
        # float32, as the timesteps: it holds every integer timestep exactly and keeps a fractional one.
        return int(torch.argmin((values - torch.tensor(t, dtype=torch.float32)).abs())) / len(values)

    def _loop_timestep(self) -> float | None:
        """The timestep of the pipeline's current step, from the CPU copy of the scheduler's timesteps, without
        waiting for the GPU. Placed by the pipeline's `current_timestep` where it sets one (FluxPipeline: a view into
        the timesteps), else by the scheduler's own position, a Python int: `step_index` once it has stepped,
        `begin_index` before (the img2img and inpainting pipelines set it; FLUX's ControlNet and Fill pipelines set
        neither, so their first step is read). None outside a loop, or where nothing says."""
        values = self._host_timesteps()
        if values is None:
            return None
        t = getattr(self.pipeline, "current_timestep", None)
        if isinstance(t, torch.Tensor):
            index = self._scheduler_index(t)
        else:
            index = getattr(self.scheduler, "step_index", None)
            index = getattr(self.scheduler, "begin_index", None) if index is None else index
        return float(values[index]) if isinstance(index, int) and 0 <= index < len(values) else None

    def _host_timesteps(self) -> torch.Tensor | None:
        """The scheduler's timesteps as float32 on the CPU, copied once each time the scheduler sets them (pipelines
        keep them on the GPU: reading them there at every call would wait for the GPU at every step)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None
        timesteps = torch.as_tensor(timesteps)
        held = self._timesteps
        if held is None or held[0] is not timesteps:  # set_timesteps makes a new tensor each time
            values = timesteps.detach().to("cpu", torch.float32)
            first: dict[float, int] = {}
            places = tuple(first.setdefault(v, i) for i, v in enumerate(values.tolist()))
            self._timesteps = held = (timesteps, values, places)
        return held[1]

    def _timestep_value(self, timestep: Any) -> float | None:
        """The call's timestep as a number, read without waiting for the GPU where the pipeline passes one of the
        scheduler's own timesteps (SD, SDXL and SD 3 pipelines iterate over them: each is a view into them)."""
        if timestep is None:
            return None
        if isinstance(timestep, (int, float)):
            return float(timestep)
        if not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu":
            return float(torch.as_tensor(timestep).flatten()[0])
        index = self._scheduler_index(timestep)
        if index is not None:
            return float(self._host_timesteps()[index])
        return float(timestep.flatten()[0])  # a tensor of its own on the GPU (FLUX passes t / 1000): read it

    def _scheduler_index(self, t: torch.Tensor) -> int | None:
        """`t`'s position among the scheduler's timesteps when it is a view into them (`view_index`), else None."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        return view_index(t, timesteps) if isinstance(timesteps, torch.Tensor) else None


def view_index(t: torch.Tensor, timesteps: torch.Tensor) -> int | None:
    """The position in `timesteps` of the element `t` starts at, when `t` is a view into them (an element, or one
    expanded over the batch); None otherwise. Reads addresses only, never values."""
    base = t._base
    if base is None or timesteps.dim() != 1 or t.dtype != timesteps.dtype or t.device != timesteps.device:
        return None
    if base is not timesteps and base is not timesteps._base:
        return None
    offset, stride = t.storage_offset() - timesteps.storage_offset(), timesteps.stride(0)
    if stride <= 0 or offset % stride:
        return None
    index = offset // stride
    return index if 0 <= index < len(timesteps) else None


class Attachment(ProcessorSwap):
    """Adapters attached to one UNet. `runtime` carries the per-generation prompts to the processors."""

    replaced_by = "set_attn_processor or enable_xformers_memory_efficient_attention"

    def __init__(
        self, unet: nn.Module, adapters: Mapping[str, IPAdapter], scheduler: Any, layers: list[AttentionLayer],
    ) -> None:
        """`layers`: the UNet's `attention_layers`, which `attach` has already found for its checks."""
        super().__init__(unet, adapters, scheduler)
        self.unet = unet
        self._layers = {l.name: l for l in layers}
        self._cross_names = frozenset(name for name, l in self._layers.items() if l.cross)
        self._prepared: tuple | None = None  # the layout the processors were last prepared for

    def clear_cache(self) -> None:
        super().clear_cache()
        self._prepared = None  # the processors forgot what they prepared

    def _install(self) -> None:
        per_layer: dict[str, dict[str, nn.Module]] = {}
        for adapter_name, adapter in self.adapters.items():
            for layer_name, weights in adapter.named_layers():
                per_layer.setdefault(layer_name, {})[adapter_name] = weights
        for layer_name, weights in per_layer.items():
            attn = self.unet.get_submodule(layer_name)
            self._originals[layer_name] = attn.processor
            processor = IPAttnProcessor(self._layers[layer_name], attn.processor, self.runtime, weights,
                                        heads=attn.heads)
            self._processors.append(processor)
            attn.set_processor(processor)
        self._hook = self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)

    def _before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Runs before every UNet call, outside any compiled graph: the call's layout and progress; for a compiled
        UNet (`torch.compile(unet)`) also each processor's terms and the step factors as tensors."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.runtime.latent_hw = tuple(sample.shape[-2:])
        if self.rows is not None:
            self.runtime.cfg = sample.shape[0] == 2 * self.rows
        self.runtime.progress = self._progress(timestep)
        if _in_compiled_module():
            self.runtime.refresh_step_tensor(sample.device)
            layout = (self.runtime.generation, sample.shape[0], self.runtime.cfg, sample.dtype, sample.device,
                      self.runtime.latent_hw)
            if layout != self._prepared:  # once per generation and layout, not at every step (SDXL: 70 layers)
                for processor in self._processors:
                    processor.prepare(sample.shape[0], sample.dtype, sample.device)
                self._prepared = layout
        elif self._prepared is not None:
            for processor in self._processors:
                processor.forget_prepared()
            self._prepared = None

    # Outside compiled graphs; by assignment, not as a decorator, since mutmut skips decorated functions.
    _before_unet = torch.compiler.disable(_before_unet)

    def set_prompts(self, prompts: Mapping[str, AdapterPrompt], *, rows: int | None = None, cfg: bool = False) -> None:
        """Prompts for the next UNet calls; `rows` (prompts × images) lets the hook recognise a CFG batch."""
        unknown = set(prompts) - set(self.adapters)
        if unknown:
            raise IPAdapterError(f"no adapter named {sorted(unknown)[0]!r}; attached: {', '.join(self.adapters)}")
        known = self._cross_names
        for name, prompt in prompts.items():
            names = set(prompt.layer_weights or ()) | set(prompt.uncond_layers)
            for ref in prompt.references:
                names |= set(ref.layer_weights or ())
            unknown = sorted(names - known)
            if unknown:
                raise IPAdapterError(
                    f"adapter {name!r}: layer weights name {unknown[0]!r}, which is not a cross-attention layer of this "
                    "UNet (a weight map made for another base model?)"
                )
        self.rows = rows
        self.runtime.set(prompts, cfg=cfg, weights={name: self.adapters[name].weights_token() for name in prompts})



def _in_compiled_module() -> bool:
    """True inside `torch.compile(module)`'s call (dynamo's flag; False where this torch version lacks it)."""
    flag = getattr(sys.modules.get("torch._dynamo.eval_frame"), "_is_in_optimized_module", None)
    return bool(flag is not None and flag())


def attach(
    unet: nn.Module, adapters: IPAdapter | list[IPAdapter] | Mapping[str, IPAdapter], *, scheduler: Any = None
) -> Attachment:
    """Attach one or several adapters (named "0", "1", ... unless a mapping is given) to `unet`.

    The adapters are used as given: never moved nor cast (a trainable fp32 adapter on a bf16 UNet stays fp32; the
    processors cast at their boundaries). They must be on the UNet's device.
    """
    if isinstance(adapters, IPAdapter):
        adapters = [adapters]
    if not isinstance(adapters, Mapping):
        adapters = {str(i): a for i, a in enumerate(adapters)}
    layers = attention_layers(unet)  # walks the whole UNet: once for the checks and the attachment
    if any(isinstance(unet.get_submodule(l.name).processor, IPAttnProcessor) for l in layers):
        raise IPAdapterError("this UNet already has adapters attached; detach them first or attach all together")
    for name, adapter in adapters.items():
        check_compatible(layers, adapter, f"adapter {name!r}")
        if adapter.device != unet.device:
            raise IPAdapterError(
                f"adapter {name!r} is on {adapter.device} but the UNet on {unet.device}; move it first "
                "(adapter.to(unet.device)) or load it for this UNet (load_adapter places it on the UNet's device)"
            )
    attachment = Attachment(unet, adapters, scheduler, layers)
    attachment._install()
    return attachment
