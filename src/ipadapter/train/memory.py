"""Memory: the `--dry-run` estimate of what a training step holds.

The estimate counts what a step holds: frozen weights in the run's precision, the trainable weights in fp32 with
their gradients, optimizer states (AdamW: 2 × fp32; 8-bit AdamW: 2 × 1 byte) and EMA copy, plus the activations
kept for the backward pass. Those are measured, not guessed: one forward of the trainer's own module (the projection,
then the frozen UNet with the adapter attached) on fake CPU tensors (shapes and dtypes only, no memory, no weights
read), with inputs of the run's shapes, under the run's mixed precision by CUDA's autocast rules, records the size of
every tensor saved for backward; attention takes the fused kernel, as on a GPU. It is an estimate all the same:
allocator overhead, temporary buffers, CUDA kernels' workspaces and a checkpointed block recomputed in the backward
pass are not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def count(modules: Iterable[nn.Module | None]) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside hold their weights in `dtype`: a fake tensor cannot be cast in place afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# What CUDA's autocast runs in fp32 whatever its input's precision (PyTorch's autocast op reference), of the operations
# a UNet applies to whole activations; the CPU's autocast leaves them in half precision.
CUDA_FP32_OPS = (F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax)


class _CudaAutocast(TorchFunctionMode):
    """Over the CPU's autocast, the operations of `CUDA_FP32_OPS` in fp32, so that fake CPU tensors keep what a GPU
    keeps: fp32 outputs, and the fp32 activations that follow them."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in CUDA_FP32_OPS:
            return func(*args, **kwargs)

        def up(value: Any) -> Any:
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        with torch.autocast("cpu", enabled=False):
            return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()})


def activation_bytes(module: nn.Module, *, batch: int, latent: int, text_len: int, features: list[tuple[int, ...]],
                     dtype: torch.dtype, sdxl: bool, autocast: str) -> int:
    """Bytes of the tensors autograd saves in one forward of the trainer's `TrainModule` (the frozen UNet with the
    trainable adapter attached), for `batch` samples of `latent`-square latents, `text_len`-token captions (as wide as
    the UNet reads them: ChatGLM's width for Kolors) and encoder features of the shapes `features` (per sample), under
    autocast to `dtype` when that is half precision, by the rules of `autocast` ("cuda" or "cpu"), as the run's mixed
    precision does: the activations a backward pass needs. Run inside the `FakeTensorMode` the module was made in, so
    that the inputs are fake too."""
    from ipadapter.train.chatglm import is_kolors

    unet = module.unet
    text_width = unet.config.encoder_hid_dim if is_kolors(unet.config) else unet.config.cross_attention_dim
    added = None
    if sdxl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(batch, pooled, dtype=dtype), "time_ids": torch.zeros(batch, 6, dtype=dtype)}
    inputs = (torch.zeros(batch, unet.config.in_channels, latent, latent, dtype=dtype),
              torch.zeros(batch, dtype=torch.long),
              torch.zeros(batch, text_len, text_width, dtype=dtype),
              tuple(torch.zeros(batch, *shape) for shape in features), added)
    half = dtype != torch.float32
    rules = _CudaAutocast() if half and autocast == "cuda" else nullcontext()
    with torch.autocast("cpu", dtype=dtype, enabled=half), rules:
        return saved_bytes(lambda: module(*inputs))


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves in `forward()` for its backward pass (weights, which are counted apart,
    left out), counted while its result, and so its graph, is alive: what a computation whose result was dropped
    saved is freed already, as it would be on a GPU before the backward pass."""
    saved: dict[int, tuple[weakref.ref, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t._base if t._base is not None else t, nn.Parameter):  # weights (and views) are counted
            saved[id(t)] = weakref.ref(t), t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    held = sum(size for alive, size in saved.values() if alive() is not None)
    del result
    return held


@dataclass
class Estimate:
    frozen_params: int
    trainable_params: int
    static_bytes: int  # weights, gradients, optimizer states, EMA
    activations: dict[int, int]  # batch size → bytes

    def peak(self, batch: int) -> int:
        return self.static_bytes + self.activations[batch]


def static_bytes(frozen: int, trainable: int, *, dtype: torch.dtype, optimizer: str, ema: bool) -> int:
    states = 2 if optimizer == "adamw8bit" else 8
    return frozen * BYTES[dtype] + trainable * (4 + 4 + states + (4 if ema else 0))


def estimate(config: Any, batch_sizes: tuple[int, ...] = (1, 2, 4, 8), *, autocast: str = "cuda") -> Estimate:
    """The run's models built from the base's and encoder's configs (no weights read, no memory taken); mixed
    precision by the rules of CUDA's autocast (a GPU run's), or the CPU's with `autocast="cpu"`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ipadapter.adapter import IPAdapter
    from ipadapter.attach import attach
    from ipadapter.train.config import parse_stage
    from ipadapter.train.models import base_configs, check_resolution, check_stage_resolutions, cross_dim
    from ipadapter.train.shapes import adapter_config_for
    from ipadapter.train.trainer import TrainModule
    from ipadapter.validation import vae_downscale

    unet_config, vae_config = base_configs(config.base)
    if config.stages:  # refused as the run would refuse them, and estimated at the largest stage
        check_stage_resolutions([parse_stage(s) for s in config.stages], unet_config, vae_config)
    else:
        check_resolution(config.resolution, unet_config, vae_config)
    side = largest_resolution(config)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    with torch.device("meta"):  # counted only: weightless on the meta device
        # with a feature cache the VAE and encoders are not in memory while training
        frozen = [] if config.cache else [AutoencoderKL.from_config(vae_config),
                                          *_text_encoders(config.base, unet_config)]
        vision = image_encoder_from_config(config.image_encoder) if config.needs_image_encoder else None
    if vision is not None and not config.cache:
        frozen.append(vision)
    widths = {}
    if vision is not None:
        patches = (vision.config.image_size // vision.config.patch_size) ** 2 + 1
        widths = {"embed_dim": vision.config.projection_dim, "hidden_dim": vision.config.hidden_size,
                  "patch_tokens": patches}
    with FakeTensorMode():  # run as well: fake CPU tensors (shapes and dtypes, no memory) take CPU kernels and autocast
        with default_dtype(dtype):  # made in the run's precision (a fake tensor cannot be cast in place)
            unet = UNet2DConditionModel.from_config(unet_config).requires_grad_(False)  # frozen, as in training
        adapter = IPAdapter.for_unet(unet, adapter_config_for(  # fp32, torch's default, as the run trains it
            config.variant, cross_dim=cross_dim(unet.config), id_dim=config.id_dim,
            num_tokens=config.num_tokens, lora_rank=config.lora_rank, attention=config.attention, **widths))
        adapter.requires_grad_(True)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        frozen_params, trainable = count([unet, *frozen]), sum(p.numel() for p in adapter.parameters())
        latent = side // vae_downscale(vae_config)
        module = TrainModule(unet, adapter, attach(unet, {"0": adapter}), config.references)
        features, text_len = _feature_shapes(config, widths), text_length(config.base, unet_config)
        activations = {b: activation_bytes(module, batch=b, latent=latent, text_len=text_len, features=features,
                                           dtype=dtype, sdxl=sdxl, autocast=autocast) for b in batch_sizes}
    return Estimate(frozen_params=frozen_params, trainable_params=trainable, activations=activations,
                    static_bytes=static_bytes(frozen_params, trainable, dtype=dtype, optimizer=config.optimizer,
                                              ema=config.ema_decay > 0))


def _feature_shapes(config: Any, widths: dict[str, int]) -> list[tuple[int, ...]]:
    """Per sample, the encoder features the variant's projection reads, in the order the trainer passes them (ID
    embedding, then CLIP features); with several references per sample, one of each per reference."""
    from ipadapter.variants import get_variant

    per_reference = (config.references,) if config.references > 1 else ()
    shapes = {"faceid": (config.id_dim,), "global": (widths.get("embed_dim"),),
              "patch": (widths.get("patch_tokens"), widths.get("hidden_dim"))}
    return [(*per_reference, *shapes[kind]) for kind in get_variant(config.variant).features.split("+")]


def text_length(base: str, unet_config: dict[str, Any]) -> int:
    """The tokens of a training caption: Kolors' fixed ChatGLM length, else the base tokenizer's."""
    from ipadapter.train import chatglm
    from ipadapter.train.models import tokenizer_length

    return chatglm.MAX_LENGTH if chatglm.is_kolors(unet_config) else tokenizer_length(base)


def _text_encoders(base: str, unet_config: dict[str, Any]) -> list[nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ipadapter.sources import from_cache_or_hub
    from ipadapter.single_file import configs_of
    from ipadapter.train import chatglm

    if chatglm.is_kolors(unet_config):
        return [chatglm.from_config(base)]
    base = configs_of(base)

    def config(sub: str) -> CLIPTextConfig:
        return from_cache_or_hub(
            lambda local: CLIPTextConfig.from_pretrained(base, subfolder=sub, local_files_only=local), base,
            "the base model")

    encoders = [CLIPTextModel(config("text_encoder"))]
    if unet_config.get("addition_embed_type") == "text_time":
        encoders.append(CLIPTextModelWithProjection(config("text_encoder_2")))
    return encoders


def image_encoder_from_config(source: str) -> nn.Module:
    """Built from its config read as a real run reads it (`owner/repo/sub/folder`, a whole CLIP model), so a source the
    run would refuse is refused here too, in one line, before any estimate is printed."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter.encoders import clip_tower_config
    from ipadapter.errors import IPAdapterError, first_clause
    from ipadapter.sources import from_cache_or_hub, split_hub_path

    if Path(source).is_file():  # one .safetensors file, as ComfyUI keeps encoders
        from ipadapter.clip_file import vision_config

        return CLIPVisionModelWithProjection(vision_config(source))
    repo, subfolder = split_hub_path(source)

    def read(local: bool) -> tuple[str | None, CLIPVisionConfig | None]:
        found, _ = CLIPVisionConfig.get_config_dict(repo, subfolder=subfolder or "", local_files_only=local)
        kind = found.get("model_type") or found.get("_class_name")
        clip = kind in ("clip_vision_model", "clip")
        return kind, clip_tower_config(CLIPVisionConfig, repo, subfolder, local) if clip else None

    try:  # a weightless model is built here, so what the real run's weights would refuse is refused by its config
        kind, config = from_cache_or_hub(read, repo, "the image encoder", subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise IPAdapterError(f"could not read a CLIP vision encoder's config from {source} (not found offline, or not "
                             f"a CLIP vision model): {first_clause(str(err))}") from None
    if config is None:
        what = f"its config is a {kind}" if kind else "it has no model config"
        raise IPAdapterError(f"{source} is not a CLIP vision encoder ({what}); give a CLIPVisionModelWithProjection "
                             "folder or Hub id")
    return CLIPVisionModelWithProjection(config)


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def largest_resolution(config: Any) -> int:
    """The size the run's peak comes from: its largest stage's when it has stages."""
    from ipadapter.train.config import parse_stage

    return max((parse_stage(s)[0] for s in config.stages), default=config.resolution)


def report(config: Any, result: Estimate) -> str:
    """What `--dry-run` prints."""
    size_px = (f"{largest_resolution(config)} px (the largest of the stages {', '.join(config.stages)})"
               if config.stages else f"{config.resolution} px")
    lines = [
        f"base {config.base}, variant {config.variant}, {size_px}, precision {config.mixed_precision}, "
        f"optimizer {config.optimizer}, gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}, "
        f"feature cache {'on' if config.cache else 'off'}",
        f"parameters: {result.frozen_params + result.trainable_params:,} "
        f"(frozen in memory {result.frozen_params:,}; trainable {result.trainable_params:,})",
        f"weights, gradients, optimizer states{', EMA' if config.ema_decay > 0 else ''}: "
        f"{size(result.static_bytes)}",
        "estimated peak memory per process (weights + states + activations saved for backward; allocator overhead "
        "and kernel workspaces not counted):",
    ]
    lines += [f"  batch {b}: {size(result.peak(b))} (activations {size(result.activations[b])})"
              for b in sorted(result.activations)]
    return "\n".join(lines)
