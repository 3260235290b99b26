"""The training run in visible phases, in accelerate's fixed order: config and accelerator → data → models →
optimizer and one prepare → resume → loop (step, log, checkpoint, validate) → the finished model folder.

Frozen: UNet, VAE, text encoder(s), image encoder. Trained: the adapter (projection head, K'/V' per cross-attention
layer initialised from to_k/to_v, and for FaceID the LoRA), attached with `ipadapter.attach`; each batch sets the
adapter's tokens (`adapter.project(features)`) as the attachment's prompt with `cfg=False`. Loss: MSE against the
noise (epsilon) or the velocity (v-prediction), as the base's scheduler says, on DDPM-noised latents.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ipadapter.adapter import IPAdapter
from ipadapter.attach import Attachment, attach
from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.runtime import AdapterPrompt, Reference
from ipadapter.train.config import TrainConfig
from ipadapter.train.data import Batches, collate, describe_skips
from ipadapter.train.feed import data_phase
from ipadapter.train.models import BaseModels, base_configs, freeze, load_base, module_fingerprint, place_frozen
from ipadapter.train.shapes import adapter_config_for
from ipadapter.train.step import NONFINITE_LIMIT, diffusion_loss, optimizer_step, project_references
from ipadapter.variants import get_variant

logger = logging.getLogger("ipadapter.train")


def clip_features(variant: str) -> str:
    """The CLIP features a variant reads ("" = none), from the variant table."""
    return get_variant(variant).clip


PUBLISHED_NAME = "ip-adapter.safetensors"
OWN_NAME = "adapter.ipadapter.safetensors"


class TrainModule(nn.Module):
    """What accelerate wraps (DDP needs the loss's forward to run through the wrapper): the frozen UNet with the
    adapter attached. `forward` sets this batch's image tokens, then runs the UNet."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter, attachment: Attachment, references: int) -> None:
        super().__init__()
        self.unet, self.adapter = unet, adapter
        self.attachment = attachment
        self.references = references

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, features: tuple[torch.Tensor, ...],
                added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tokens = project_references(self.adapter, features, self.references)  # (B, K·T, C)
        self.attachment.set_prompts({name: AdapterPrompt([Reference(cond=tokens)]) for name in self.attachment.adapters},
                                    cfg=False)
        return self.unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample


class EMA:
    """Exponential moving average of the trainable weights; checkpointed with the rest of the state."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.params = params
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params)]


def start_trackers(accelerator: Any, config: TrainConfig) -> None:
    """The run's tracker (TensorBoard by default), its hyperparameters the config's, lists and paths as text;
    accelerate starts trackers on the main process only."""
    accelerator.init_trackers("train", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                               for k, v in config.to_dict().items()})


def warmup_then_constant(warmup: int) -> Callable[[int], float]:
    """The paper's constant LR, with an optional linear warm-up over `warmup` scheduler steps."""
    return lambda i: 1.0 if warmup <= 0 else min(1.0, (i + 1) / warmup)


@dataclass
class TrainResult:
    step: int
    output: Path
    published: Path | None = None
    own: Path | None = None
    losses: list[float] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    nonfinite_steps: int = 0  # optimizer steps skipped for non-finite gradients (weights unchanged)
    validation: dict[int, dict[str, float]] = field(default_factory=dict)  # step → CLIP-I / CLIP-T
    step_times: list[float] = field(default_factory=list)
    adapter: IPAdapter | None = None  # the trained adapter (EMA weights when EMA is on), detached


@dataclass
class _Run:
    """What the phases hand each other (kept explicit instead of a dozen locals)."""

    config: TrainConfig
    accelerator: Any
    features: str
    sdxl: bool
    vae_config: dict[str, Any]
    weight_dtype: torch.dtype = torch.float32
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    models: BaseModels | None = None
    encoder: ImageEncoder | None = None
    cache: Any = None
    batches: Batches | None = None
    stream: Any = None
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    resume_path: Path | None = None
    buckets: list[tuple[int, int]] | None = None
    base_name: str = ""
    base_id: str = ""
    noise_scheduler: Any = None  # DDPM, from the base's scheduler config
    prediction: str = "epsilon"


# ---- the phases ---------------------------------------------------------------------------------------------------


def _accelerator_phase(config: TrainConfig, log_with: str | None) -> Any:
    """The accelerator (several processes on a machine without GPUs: gloo on CPU, as CI runs it)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output = Path(config.output)
    cpu_world = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_world,
        gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision, log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )


def _model_phase(run: _Run, models: BaseModels | None) -> tuple[IPAdapter, TrainModule]:
    """Everything frozen, in the run's precision (an SDXL VAE stays fp32 under fp16: it overflows in half
    precision); then the adapter, new or `init_from`, attached in fp32 and trainable."""
    from diffusers import DDPMScheduler

    config, acc = run.config, run.accelerator
    if run.models is None:
        run.models = models or load_base(config.base, encoders=not config.cache, vae=not config.cache)
    m = run.models
    run.scheduler_config = m.scheduler_config
    run.noise_scheduler = DDPMScheduler.from_config(m.scheduler_config)
    run.prediction = config.prediction_type or run.noise_scheduler.config.prediction_type
    if run.prediction not in ("epsilon", "v_prediction"):
        raise IPAdapterError(f"the base's scheduler predicts {run.prediction!r}; only epsilon and v_prediction are "
                             "supported")
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    device = acc.device
    freeze(m.unet, m.vae, *m.text_encoders)  # an ImageEncoder's model is frozen when it is made
    run.base_name = config.base or m.name or "in-memory base"
    run.base_id = module_fingerprint(m.unet)  # before any cast: the same UNet in another precision is the same base
    adapter = _init_from(config, m.unet) if config.init_from else _new_adapter(run)
    m.unet.to(device, run.weight_dtype)
    if not config.cache:
        place_frozen(device, run.weight_dtype, m.vae, (*m.text_encoders, run.encoder.model if run.encoder else None))
    if config.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
    adapter.to(device=device, dtype=torch.float32).requires_grad_(True)  # trained in fp32 whatever the UNet's dtype
    return adapter, TrainModule(m.unet, adapter, _attach_for_training(m.unet, adapter), config.references)


def _attach_for_training(unet: nn.Module, adapter: IPAdapter) -> Attachment:
    """Attached as for generation; with gradients on, K'/V' are projected at every call and never cached."""
    return attach(unet, {"0": adapter})


def _new_adapter(run: _Run) -> IPAdapter:
    """K'/V' = copies of to_k/to_v (full precision); widths from the encoder, or from the cache's constants."""
    config, m, enc = run.config, run.models, run.encoder
    if enc is None and run.features and run.cache is not None:
        sample = run.constants["uncond_image"]
        widths = {"embed_dim": sample.shape[-1], "hidden_dim": sample.shape[-1], "patch_tokens": sample.shape[0]}
    elif enc is not None:
        widths = {"embed_dim": enc.global_dim, "hidden_dim": enc.patch_dim, "patch_tokens": enc.patch_tokens}
    else:
        widths = {}
    adapter_config = adapter_config_for(
        config.variant, cross_dim=m.cross_dim, id_dim=config.id_dim, num_tokens=config.num_tokens,
        lora_rank=config.lora_rank, encoder=config.image_encoder, base=run.base_name, attention=config.attention,
        **widths,
    )
    return IPAdapter.for_unet(m.unet, adapter_config)


@dataclass
class _Optimization:
    params: list[nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    ema: EMA | None


def _optimizer_phase(run: _Run, adapter: IPAdapter) -> _Optimization:
    """AdamW (8-bit when asked and bitsandbytes is there), constant LR after an optional warm-up (scheduler steps
    count every process), optional EMA."""
    from ipadapter.train.optim import make_optimizer

    config, world = run.config, run.accelerator.num_processes
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(config.warmup_steps * world))
    ema = EMA(params, config.ema_decay) if config.ema_decay > 0 else None
    return _Optimization(params, optimizer, lr_scheduler, ema)


def _resume_phase(run: _Run, adapter: IPAdapter, ema: EMA | None) -> tuple[int, int]:
    """(step, skipped non-finite steps) of the checkpoint, every file verified before anything is restored."""
    from ipadapter.train.checkpoint import check_resumable, load_checkpoint, read_state

    if run.resume_path is None:
        return 0, 0
    config, acc = run.config, run.accelerator
    state = read_state(run.resume_path)
    check_resumable(state, run.resume_path, variant=config.variant, base_id=run.base_id, base=run.base_name,
                    world=acc.num_processes, attention=config.attention)
    load_checkpoint(acc, run.resume_path, adapter, ema)
    run.stream.load_state_dict(state["data"][acc.process_index])
    run.stream.skipped.update(state["skipped"][acc.process_index])
    logger.info("resumed from %s at step %d", run.resume_path, state["step"])
    return int(state["step"]), int(state.get("nonfinite_steps", 0))


def _save_state(run: _Run, step: int, nonfinite: int, opt: _Optimization) -> None:
    from ipadapter.train.checkpoint import processes_progress, save_checkpoint

    config, acc = run.config, run.accelerator
    save_checkpoint(acc, Path(config.output), {
        "step": step, "variant": config.variant, "attention": config.attention, "base": run.base_name,
        "base_id": run.base_id, "num_processes": acc.num_processes, **processes_progress(run.stream, opt.params),
        "nonfinite_steps": nonfinite,
    }, keep=config.keep_checkpoints, ema=opt.ema)


def _loop(run: _Run, module: Any, adapter: IPAdapter, opt: _Optimization, result: TrainResult, *, start: int,
          nonfinite: int, log_with: str | None, on_step: Callable[[int, float], None] | None) -> None:
    """Micro-batches until `max_steps` optimizer steps: loss, guarded step, EMA, bar, logs, checkpoints, validation."""
    from tqdm.auto import tqdm

    from ipadapter.train.model_folder import append_loss, restart_losses

    config, acc = run.config, run.accelerator
    if acc.is_main_process:
        restart_losses(Path(config.output), start)
    validation = _validation_phase(run) if config.validate_every and acc.is_main_process else None
    step, consecutive = start, 0
    bar = tqdm(total=config.max_steps, initial=step, desc="training", unit="step",
               disable=not acc.is_local_main_process, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=acc.device)
    micro = 0
    last = time.perf_counter()
    try:
        while step < config.max_steps:
            batch = collate(run.batches.next_batch())
            with acc.accumulate(module):
                loss = diffusion_loss(run, module, run.noise_scheduler, run.prediction, batch)
                acc.backward(loss)
                if acc.sync_gradients:  # the last micro-batch of a step: the one that sets `applied`
                    applied = optimizer_step(acc, opt.optimizer, opt.lr_scheduler, opt.params, config.max_grad_norm)
            loss_sum += loss.detach()
            micro += 1
            if not acc.sync_gradients:
                continue
            step += 1
            if applied:
                consecutive = 0
                adapter.weights_changed()
                if opt.ema is not None:
                    opt.ema.update()
            else:
                nonfinite, consecutive = nonfinite + 1, consecutive + 1
                logger.warning("step %d skipped: non-finite loss or gradients (%d so far)", step, nonfinite)
                if consecutive >= NONFINITE_LIMIT:
                    raise IPAdapterError(
                        f"{consecutive} consecutive steps had non-finite gradients (last at step {step}); lower the "
                        "learning rate, check the data, or use bf16 instead of fp16"
                    )
            step_loss = float(acc.reduce(loss_sum / micro, reduction="mean"))
            loss_sum.zero_()
            micro = 0
            result.step_times.append(time.perf_counter() - last)  # data + forward/backward + optimizer
            result.losses.append(step_loss)
            result.nonfinite_steps = nonfinite
            bar.update(1)
            skipped = sum(run.stream.skipped.values())
            bar.set_postfix(loss=f"{step_loss:.4f}", skipped=skipped, nonfinite=nonfinite, refresh=False)
            if acc.is_main_process:
                append_loss(Path(config.output), step, step_loss)
            if log_with and (step % config.log_every == 0 or step == config.max_steps):
                acc.log({"train/loss": step_loss, "train/lr": opt.lr_scheduler.get_last_lr()[0],
                         "data/skipped": skipped, "train/nonfinite_steps": nonfinite}, step=step)
            if step % config.save_every == 0 or step == config.max_steps:
                _save_state(run, step, nonfinite, opt)
            if validation is not None and step % config.validate_every == 0:
                _validate_and_reattach(run, validation, module, adapter, step, result)
            if on_step is not None:
                on_step(step, step_loss)
            last = time.perf_counter()  # checkpoints, validation and callbacks are not step time
    finally:
        bar.close()
        run.batches.close()
    result.step = step


def _validation_phase(run: _Run) -> Any:
    from ipadapter.train.validate import Validator

    return Validator.prepare(run)


def _validate_and_reattach(run: _Run, validator: Any, module: Any, adapter: IPAdapter, step: int,
                           result: TrainResult) -> None:
    """Validation generates through `ImagePrompter` on a pipeline of the training UNet: the training attachment
    steps aside for it and comes back afterwards."""
    inner = run.accelerator.unwrap_model(module)
    inner.attachment.detach()
    try:
        result.validation[step] = validator.run(step, adapter)
    finally:
        inner.attachment = _attach_for_training(run.models.unet, adapter)


def _finish(run: _Run, adapter: IPAdapter, opt: _Optimization, result: TrainResult) -> None:
    """The final adapter (EMA weights when EMA is on) and the model folder around it, written by the main process."""
    from accelerate.utils import gather_object

    from ipadapter.checkpoint import save_adapter, save_published
    from ipadapter.train.model_folder import write_model_card

    acc, output = run.accelerator, Path(run.config.output)
    acc.wait_for_everyone()
    totals: Counter = Counter()
    for counts in gather_object([dict(run.stream.skipped)]):
        totals.update(counts)
    result.skipped = dict(totals)
    if not acc.is_main_process:
        return
    if opt.ema is not None:
        opt.ema.copy_to()
        adapter.weights_changed()
    try:
        # the simple-adapter ablation has no published layout (no to_k_ip/to_v_ip): own format only
        if adapter.config.attention == "decoupled":
            result.published = save_published(adapter, run.models.unet, output / PUBLISHED_NAME)
        result.own = save_adapter(adapter, output / OWN_NAME)
        write_model_card(output, run.config, adapter, result, data_size=_data_size(run))
    except (OSError, RuntimeError, SafetensorError) as err:
        from ipadapter.train.checkpoint import latest_checkpoint

        raise IPAdapterError(
            f"could not write the final adapter to {output} ({first_clause(str(err))}); the training state "
            f"{latest_checkpoint(output)} is intact: free space and run again with --resume latest"
        ) from None
    message = (f"done at step {result.step}: {describe_skips(totals)}, {result.nonfinite_steps} non-finite step(s) "
               f"skipped; adapter written to {result.published or result.own}")
    logger.info(message)
    if not logger.hasHandlers():  # used as a library without logging set up: still say it once
        from tqdm.auto import tqdm

        tqdm.write(message)


def _data_size(run: _Run) -> int | None:
    """Samples in the data (manifest entries or cache rows); None for shards, which are never counted up front."""
    records = getattr(run.stream, "records", None)
    return len(records) if records is not None else None


# ---- the run --------------------------------------------------------------------------------------------------------
def train(
    config: TrainConfig, *, models: BaseModels | None = None, image_encoder: ImageEncoder | None = None,
    on_step: Callable[[int, float], None] | None = None, log_with: str | None = "tensorboard",
) -> TrainResult:
    """Train an adapter. `models` / `image_encoder` may be given in memory (tests, benchmarks) instead of paths.
    `on_step(step, loss)` is called after every optimizer step (it may raise to stop the run)."""
    from accelerate.utils import set_seed

    from ipadapter.validation import output_folder

    # 1. config and accelerator
    config.validate()
    if get_variant(config.variant).denoiser != "unet":
        raise IPAdapterError(f"variant {config.variant!r} is trained by ipadapter.train.transformer.train_transformer, "
                             "not here")
    if models is None:
        config.check_ready()
    elif config.needs_image_encoder and image_encoder is None and not config.image_encoder:
        raise IPAdapterError(f"variant {config.variant!r} needs an image encoder")
    output = output_folder(config.output, "--output")
    accelerator = _accelerator_phase(config, log_with)
    unet_config, vae_config = base_configs(config.base, models)  # enough to refuse a bad resolution before weights
    run = _Run(config=config, accelerator=accelerator, features=clip_features(config.variant),
               sdxl=unet_config.get("addition_embed_type") == "text_time", vae_config=vae_config)
    # 2. data; 3. seed; 4. models
    data_phase(run, models, image_encoder, unet_config)
    set_seed(config.seed)
    inner: TrainModule | None = None
    try:
        adapter, inner = _model_phase(run, models)
        result, module = _train_attached(run, adapter, inner, output, log_with=log_with, on_step=on_step)
    except BaseException:  # the loop closes the data's decoding threads; none are started before it
        if inner is not None:  # a refused or stopped run leaves the caller's UNet as it was
            inner.attachment.detach()
        raise
    # The DDP wrapper goes before the process group. Left to the end of this function, torch's Reducer would drop the
    # last reference to a gloo group and join its worker threads holding the GIL, while a worker may still need the GIL
    # to release the last collective's tensors: that rank then hangs after training. The group's own Python object
    # releases the GIL in its destructor.
    accelerator.free_memory()
    del module
    gc.collect()
    accelerator.end_training()
    inner.attachment.detach()
    result.adapter = adapter
    return result


def _train_attached(run: _Run, adapter: IPAdapter, inner: TrainModule, output: Path, *, log_with: str | None,
                    on_step: Callable[[int, float], None] | None) -> tuple[TrainResult, Any]:
    """Phases 5-8, with the adapter attached to the UNet: the result, and the module as accelerate wrapped it."""
    from ipadapter.atomic import write_text
    from ipadapter.train.checkpoint import register_adapter_hooks

    config, accelerator = run.config, run.accelerator
    # 5. optimizer, one prepare (DeepSpeed infers its micro-batch from dataloaders; ours streams itself, so say it)
    opt = _optimizer_phase(run, adapter)
    plugin = accelerator.state.deepspeed_plugin  # None without DeepSpeed
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    module, opt.optimizer, opt.lr_scheduler = accelerator.prepare(inner, opt.optimizer, opt.lr_scheduler)
    register_adapter_hooks(accelerator, adapter)
    # 6. resume; the output folder is written only once all checks have passed
    step, nonfinite = _resume_phase(run, adapter, opt.ema)
    if accelerator.is_main_process:
        write_text(output / "config.json", config.to_json())
    if log_with:
        start_trackers(accelerator, config)
    # 7. loop; 8. the finished model folder
    result = TrainResult(step=step, output=output, nonfinite_steps=nonfinite)
    _loop(run, module, adapter, opt, result, start=step, nonfinite=nonfinite, log_with=log_with, on_step=on_step)
    _finish(run, adapter, opt, result)
    return result, module


def _init_from(config: TrainConfig, unet: nn.Module) -> IPAdapter:
    """Start from a published (or own) checkpoint; its variant must be the one being trained."""
    from ipadapter import load_adapter

    loaded = load_adapter(config.init_from, unet, dtype=torch.float32)
    if get_variant(loaded.config.variant).head != get_variant(config.variant).head:
        raise IPAdapterError(
            f"--init-from {config.init_from} is a {loaded.config.variant!r} adapter; this run trains {config.variant!r}"
        )
    if loaded.config.variant != config.variant:  # faceid-plus and -plusv2 share weights; the shortcut is the variant's
        loaded = load_adapter(config.init_from, unet, variant=config.variant, dtype=torch.float32)
    return loaded
