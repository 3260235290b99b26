"""`ipadapter train --variant flux|flux-v2|sd3`: a FLUX or SD 3 adapter trained from the same config, data and model
folder as a UNet run.

The data is read and decoded as for the UNet (manifest or shards, centre crops, the image encoder's pixels, bad samples
skipped and counted); each batch goes through the frozen VAE and text encoders, or comes from the feature cache
(train/transformer_feed.py), then `dit.flow.fit` (the flow-matching recipe) with the family's parts
(`dit.train.family`). The folder gets the family's published layout (XLabs' for FLUX, InstantX's for SD 3: what
diffusers' `load_ip_adapter` reads), the project's own format, `config.json`, `logs/losses.csv`, `loss.png` and the
model card. Checkpoints and exact resume as a UNet run's (`_States`); under `accelerate launch` each process reads its
own share of the data and the gradients are averaged over them. The options it does not have are refused by
`TrainConfig.validate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ipadapter.dit.adapter import DiTAdapter
from ipadapter.dit.flow import TransformerFamily
from ipadapter.errors import FieldError, IPAdapterError, first_clause
from ipadapter.train.config import TrainConfig
from ipadapter.train.data import describe_skips
from ipadapter.train.trainer import EMA, OWN_NAME, PUBLISHED_NAME, TrainResult, start_trackers, warmup_then_constant
from ipadapter.train.transformer_feed import Feed, check_size
from ipadapter.variants import get_variant

logger = logging.getLogger("ipadapter.train")


def _start(config: TrainConfig, family: TransformerFamily, transformer: torch.nn.Module, feed: Feed) -> DiTAdapter:
    """`--init-from` (an adapter file of the variant being trained, for the image features the run reads) or a new
    adapter of the variant's tokens."""
    from ipadapter.dit.checkpoint import load_dit_adapter

    variant = get_variant(config.variant)
    if not config.init_from:
        return family.new_adapter(transformer, feed.width, variant.tokens)
    adapter = load_dit_adapter(config.init_from, transformer, dtype=torch.float32)  # not the transformer's bf16
    in_dim = adapter.config.projection.in_dim
    if feed.encoder is not None:
        feed.encoder.check_fits(in_dim, variant.clip, config.init_from)
    elif in_dim != feed.width:
        raise IPAdapterError(f"{config.init_from} expects {in_dim}-wide image features but the feature cache "
                             f"{config.cache} holds {feed.width}-wide ones; use the image encoder the adapter was "
                             "trained with")
    if adapter.config.variant != config.variant:
        raise IPAdapterError(
            f"--init-from {config.init_from} is a {adapter.config.variant!r} adapter; this run trains {config.variant!r}"
        )
    return adapter


def train_transformer(config: TrainConfig, *, on_step: Callable[[int, float], None] | None = None,
                      log_with: str | None = "tensorboard") -> TrainResult:
    """Train a FLUX or SD 3 adapter as `config` says; the frozen models in bf16 under `--mixed-precision bf16`, the
    adapter in fp32 always. `on_step(step, loss)` is called after every optimizer step; `log_with`: accelerate's
    tracker under `<output>/logs` (None: none), as a UNet run's."""
    from tqdm.auto import tqdm

    from ipadapter.atomic import write_text
    from ipadapter.dit.train import family as family_of
    from ipadapter.dit.flow import fit
    from ipadapter.train.checkpoint import resume_from
    from ipadapter.train.model_folder import append_loss, restart_losses
    from ipadapter.train.models import module_fingerprint
    from ipadapter.validation import output_folder

    config.validate()
    config.check_ready()
    family = family_of(get_variant(config.variant).denoiser)
    output = output_folder(config.output, "--output")
    accelerator = _accelerator(output, log_with)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    resume = resume_from(config.resume, output, config.variant, say=logger.warning if main else logger.debug)
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    feed = Feed(config, family, accelerator, dtype, buckets=check_size(config, family))
    transformer = feed.pipe.transformer
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(config.seed)
    adapter = _start(config, family, transformer, feed)
    adapter = adapter.to(accelerator.device, torch.float32).train().requires_grad_(True)
    states = _States(config, accelerator, adapter, feed.stream, base=module_fingerprint(transformer))
    start, nonfinite = states.restore(resume) if resume is not None else (0, 0)
    updates = 0  # steps that changed the weights in this process's run: the others were skipped as non-finite

    if main:
        write_text(output / "config.json", config.to_json())
        restart_losses(output, start)
    if log_with:
        start_trackers(accelerator, config)
    bar = tqdm(total=config.max_steps, initial=start, desc="training", unit="step", dynamic_ncols=True,
               disable=not main)

    def updated() -> None:
        nonlocal updates
        updates += 1
        if states.ema is not None:
            states.ema.update()

    def logged(i: int, loss: float) -> None:
        result.nonfinite_steps = nonfinite + (i - start) - updates
        if main:
            append_loss(output, i, loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if i % config.log_every == 0 and main:
            logger.info("step %d: loss %.5f", i, loss)
        if log_with and (i % config.log_every == 0 or i == config.max_steps):
            accelerator.log({"train/loss": loss, "train/lr": states.schedule.get_last_lr()[0],
                             "data/skipped": sum(feed.stream.skipped.values()),
                             "train/nonfinite_steps": result.nonfinite_steps}, step=i)
        if i % config.save_every == 0 or i == config.max_steps:
            states.save(i, result.nonfinite_steps)
        if on_step is not None:
            on_step(i, loss)

    result = TrainResult(step=start, output=output, adapter=adapter, nonfinite_steps=nonfinite)
    validator = _validator(config, accelerator) if config.validate_every else None

    def validate(i: int) -> None:
        if validator is not None:
            with feed.for_generation(encoders=validator.needs_encoders) as (pipe, encoder):
                result.validation[i] = validator.sample(i, pipe, adapter, encoder)
        accelerator.wait_for_everyone()

    try:
        result.losses = fit(transformer, adapter, feed.next_batch, steps=config.max_steps, optimizer=states.optimizer,
                            sigmas=family.sigmas(feed.pipe), seed=config.seed, start=start,
                            accumulate=config.grad_accum, schedule=states.schedule,
                            drop_rates=(config.drop_image, config.drop_text, config.drop_both),
                            max_grad_norm=config.max_grad_norm, on_step=logged, rank=rank,
                            average=(lambda t: accelerator.reduce(t, reduction="mean")) if world > 1 else None,
                            validate_every=config.validate_every, validate=validate,
                            on_update=updated)
    finally:
        bar.close()
        feed.close()
    adapter.eval().requires_grad_(False)
    if states.ema is not None:  # the averaged weights are the result, as in a UNet run
        states.ema.copy_to()
        adapter.weights_changed()
    result.step, result.skipped = start + len(result.losses), dict(feed.stream.skipped)
    if main:
        _write_folder(output, config, family, result, feed.stream)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def check_stages(stages: list[TrainConfig]) -> None:
    """Every stage's size against the base's configs (`--stages`), before the first stage trains."""
    from ipadapter.dit.train import family as family_of

    for stage in stages:
        try:
            check_size(stage, family_of(get_variant(stage.variant).denoiser))
        except FieldError as err:  # a stage's resolution is an entry of `stages`, not the run's `resolution`
            raise FieldError("stages",
                             f"entry {stage.resolution}:{stage.max_steps}: resolution {err.problem}") from None


def _accelerator(output: Path, log_with: str | None) -> Any:
    """One process, or each of `accelerate launch`'s (gloo on a machine without GPUs), its tracker writing under
    `output`/logs. The frozen models get their precision from `--mixed-precision` directly, so accelerate casts
    nothing. Not DeepSpeed: its engine would own the backward pass this loop runs itself."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", log_with=log_with,
                              project_config=ProjectConfiguration(project_dir=str(output),
                                                                  logging_dir=str(output / "logs")))
    if accelerator.state.deepspeed_plugin is not None:
        raise IPAdapterError("FLUX and SD 3 runs do not run under DeepSpeed: launch them without a DeepSpeed config "
                             "(several processes are taken)")
    return accelerator


def _validator(config: TrainConfig, accelerator: Any) -> Any:
    """The main process's validation (`train.validate.Validator`: grids under validation/, CLIP-I/CLIP-T with
    `--validation-judge`), on the run's own pipeline; None on the other processes."""
    from types import SimpleNamespace

    from ipadapter.train.validate import Validator

    if not accelerator.is_main_process:
        return None
    return Validator.prepare(SimpleNamespace(config=config, accelerator=accelerator))  # what it reads of a run


def _write_folder(output: Path, config: TrainConfig, family: TransformerFamily, result: TrainResult,
                  stream: Any) -> None:
    """The final adapter in the family's published layout and the own format, and the model card."""
    from ipadapter.checkpoint import save_adapter
    from ipadapter.train.model_folder import write_model_card

    records = getattr(stream, "records", None)  # shards are never counted up front
    try:
        result.published = family.save(result.adapter, output / PUBLISHED_NAME)
        result.own = save_adapter(result.adapter, output / OWN_NAME)
        write_model_card(output, config, result.adapter, result,
                         data_size=len(records) if records is not None else None)
    except OSError as err:
        raise IPAdapterError(f"could not write the final adapter to {output} ({first_clause(str(err))})") from None
    logger.info("done at step %d: %s; adapter written to %s", result.step, describe_skips(stream.skipped),
                result.published)


class _States:
    """The run's checkpoints, as a UNet run's (train/checkpoint.py through accelerate: atomic, verified, the newest
    `keep` kept): the adapter's weights, the optimizer, the EMA (`--ema-decay`), each process's data cursor and skip
    counts; each step's draws come from the seed, the step and the process (`dit.flow.step_generator`), so a resumed
    run continues exactly."""

    def __init__(self, config: TrainConfig, accelerator: Any, adapter: DiTAdapter, stream: Any, *, base: str) -> None:
        from ipadapter.train.checkpoint import register_adapter_hooks
        from ipadapter.train.optim import make_optimizer

        self.config, self.accelerator, self.adapter, self.stream, self.base = config, accelerator, adapter, stream, base
        params = list(adapter.parameters())
        optimizer = make_optimizer(config, params)
        self.ema = EMA(params, config.ema_decay) if config.ema_decay > 0 else None
        # accelerate steps a prepared scheduler once per process at each step, as in a UNet run
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_then_constant(config.warmup_steps * accelerator.num_processes))
        _, self.optimizer, self.schedule = accelerator.prepare(adapter, optimizer, schedule)
        register_adapter_hooks(self.accelerator, adapter)

    def restore(self, path: Path) -> tuple[int, int]:
        """The state at `path`, every file verified first; returns its step and the steps skipped as non-finite."""
        from ipadapter.train.checkpoint import check_resumable, load_checkpoint, read_state

        state = read_state(path)
        if state.get("mixed_precision") != self.config.mixed_precision:
            raise IPAdapterError(f"cannot resume from {path} exactly: it ran with --mixed-precision "
                                 f"{state.get('mixed_precision')}, this run with {self.config.mixed_precision}")
        acc = self.accelerator
        check_resumable(state, path, variant=self.config.variant, base_id=self.base, base=self.config.base,
                        world=acc.num_processes, model="transformer")
        load_checkpoint(acc, path, self.adapter, self.ema)
        self.stream.load_state_dict(state["data"][acc.process_index])
        self.stream.skipped.update(state["skipped"][acc.process_index])
        logger.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"]), int(state.get("nonfinite_steps", 0))

    def save(self, step: int, nonfinite: int) -> None:
        """Every process calls it (`processes_progress` gathers each one's cursor)."""
        from ipadapter.train.checkpoint import processes_progress, save_checkpoint

        config, acc = self.config, self.accelerator
        save_checkpoint(acc, Path(config.output), {
            "step": step, "nonfinite_steps": nonfinite, "variant": config.variant, "base": config.base,
            "base_id": self.base,
            "mixed_precision": config.mixed_precision, "num_processes": acc.num_processes,
            **processes_progress(self.stream, self.adapter.parameters()),
        }, keep=config.keep_checkpoints, ema=self.ema)
