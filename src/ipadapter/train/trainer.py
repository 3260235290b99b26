"""The training loop, in accelerate's fixed order: accelerator → data → seed → models → optimizer → one prepare →
resume → loop.

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
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.attach import Attachment, attach
from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError
from ipadapter.projection.detect import new_projection
from ipadapter.runtime import AdapterPrompt, Reference
from ipadapter.train import dropout
from ipadapter.train.config import TrainConfig
from ipadapter.train.data import (
    Batches, Decoder, IndexedStream, Record, ShardStream, SkipSample, collate, describe_skips, expand_shards,
    is_shard_pattern, read_manifest, sdxl_time_ids,
)
from ipadapter.train.models import (
    BaseModels, base_configs, check_resolution, encode_latents, encode_text, freeze, load_base, load_text_encoders,
    load_vae, module_fingerprint,
)
from ipadapter.variants import get_variant

logger = logging.getLogger("ipadapter.train")


def clip_features(variant: str) -> str:
    """The CLIP features a variant reads ("" = none), from the variant table."""
    return get_variant(variant).clip


PUBLISHED_NAME = "ip-adapter.safetensors"
OWN_NAME = "adapter.ipadapter.safetensors"


# ---- the adapter's shape, from the variant table and the models' widths (tested as a table) -------------------
def adapter_config_for(
    variant: str, *, cross_dim: int, embed_dim: int = 0, hidden_dim: int = 0, patch_tokens: int = 0, id_dim: int = 512,
    num_tokens: int = 0, lora_rank: int = 128, encoder: str = "", base: str = "", attention: str = "decoupled",
) -> AdapterConfig:
    """A new adapter's config: the variant's head shaped by `new_projection`, its token count unless `num_tokens`
    is given (a per-token head has one token per encoder token, `patch_tokens`), LoRA of `lora_rank` if it has any."""
    v = get_variant(variant)
    if not v.trainable:
        raise IPAdapterError(f"variant {variant!r} cannot be trained")
    tokens = (num_tokens or v.tokens) if v.tokens else patch_tokens
    proj = new_projection(v.head, cross_dim=cross_dim, tokens=tokens, embed_dim=embed_dim, hidden_dim=hidden_dim,
                          id_dim=id_dim)
    return AdapterConfig(variant=variant, projection=proj, lora_rank=lora_rank if v.lora else 0, encoder=encoder,
                         base=base, attention=attention)


class TrainModule(nn.Module):
    """What accelerate wraps (DDP needs the loss's forward to run through the wrapper): the frozen UNet with the
    adapter attached. `forward` sets this batch's image tokens, then runs the UNet."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter, attachment: Attachment) -> None:
        super().__init__()
        self.unet, self.adapter = unet, adapter
        self.attachment = attachment

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, features: tuple[torch.Tensor, ...],
                added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tokens = self.adapter.project(*features)  # (B, T, C)
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
    constants: dict[str, torch.Tensor] = field(default_factory=dict)


# ---- data phase -----------------------------------------------------------------------------------------------------
def _stream(config: TrainConfig, rank: int, world: int, *, single_pass: bool = False, shuffle: bool = True):
    if is_shard_pattern(config.data):
        return ShardStream(expand_shards(config.data), rank=rank, world=world, seed=config.seed,
                           need_id=config.needs_id_embeds, single_pass=single_pass,
                           shuffle_buffer=config.shuffle_buffer if shuffle else 0)
    records = read_manifest(config.data, config.data_root, need_id=config.needs_id_embeds)
    return IndexedStream(records, rank=rank, world=world, seed=config.seed, shuffle=shuffle, single_pass=single_pass)


def load_image_encoder(config: TrainConfig) -> ImageEncoder:
    """In the checkpoint's own dtype, as transformers loads the text encoders; the run casts it where it trains."""
    return ImageEncoder.from_pretrained(config.image_encoder, dtype="auto")


def _decoder(run: _Run) -> Decoder:
    processor = run.encoder.processor if run.features else None
    return Decoder(run.config.resolution, processor, run.config.id_dim if run.config.needs_id_embeds else 0)


def _encode_for_cache(run: _Run, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The frozen models on one batch, without dropout: what a cache row holds."""
    device = run.accelerator.device
    batch = collate(examples)
    mean, std = encode_latents(run.models.vae, batch["pixels"])
    text, pooled = encode_text(run.models, batch["text"], device)
    out = {"latent_mean": mean, "latent_std": std, "text_embeds": text}
    if pooled is not None:
        out["pooled"] = pooled
        out["time_ids"] = sdxl_time_ids(batch["original_size"], batch["crop"], run.config.resolution)
    if run.features:
        out["image"] = run.encoder.encode_pixels(batch["clip"], run.features)
    if "id" in batch:
        out["id"] = batch["id"]
    return out


@torch.no_grad()
def _constants(run: _Run) -> dict[str, torch.Tensor]:
    """The dropped inputs: the empty prompt's embeddings; the image features of a dropped image."""
    text, pooled = encode_text(run.models, [""], run.accelerator.device)
    out = {"uncond_text": text[0]}
    if pooled is not None:
        out["uncond_pooled"] = pooled[0]
    if run.features:
        out["uncond_image"] = run.encoder.uncond(run.features)[0]
    return {k: v.float().cpu() for k, v in out.items()}


def _base_identity(config: TrainConfig, models: BaseModels | None) -> str:
    from ipadapter.train.cache import folder_fingerprint

    if models is not None:
        parts = [module_fingerprint(models.vae)] + [module_fingerprint(e) for e in models.text_encoders]
        return "|".join(parts)
    return folder_fingerprint(config.base, ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"])


def _prepare_cache(run: _Run, given_models: BaseModels | None, given_encoder: ImageEncoder | None):
    """Check the cache's fingerprint, or build it (loading the frozen encoders only for that), and open it."""
    from ipadapter.train.cache import CacheReader, build_cache, check_fingerprint, fingerprint, folder_fingerprint

    config, acc = run.config, run.accelerator
    cache_dir = Path(config.cache)
    processor = None
    if run.features:
        if given_encoder is not None:
            processor, encoder_id = given_encoder.processor, module_fingerprint(given_encoder.model)
        else:
            processor = ImageEncoder.load_processor(config.image_encoder)
            encoder_id = folder_fingerprint(config.image_encoder, [""])
    else:
        encoder_id = ""
    fp = fingerprint(config=config, base_id=_base_identity(config, given_models), encoder_id=encoder_id,
                     processor=processor, features=run.features, sdxl=run.sdxl)
    if config.cache_complete():
        index = check_fingerprint(cache_dir, fp)
        logger.info("training from the feature cache %s (%d samples; when built: %s)", cache_dir, index["rows"],
                    describe_skips(Counter(index["skipped"])))
        return CacheReader(cache_dir)
    if not config.data:
        raise IPAdapterError(f"{cache_dir} holds no complete feature cache and no --data was given to build one")
    logger.info("building the feature cache %s (one pass over the data)", cache_dir)
    run.models = given_models or load_base(config.base, encoders=True, vae=True)
    if run.features:
        run.encoder = given_encoder or load_image_encoder(config)
    device = acc.device
    for m in (run.models.vae, *run.models.text_encoders, run.encoder.model if run.encoder else None):
        if m is not None:
            freeze(m)
            m.to(device)
    stream = _stream(config, acc.process_index, acc.num_processes, single_pass=True, shuffle=False)
    batches = Batches(stream, _decoder(run), config.batch_size, workers=config.num_workers)
    dtype = getattr(torch, config.cache_dtype)
    build_cache(cache_dir, batches=batches, encode=lambda ex: _encode_for_cache(run, ex), constants=_constants(run),
                fp=fp, accelerator=acc, dtype=dtype)
    batches.close()
    logger.info("feature cache built: %s", describe_skips(batches.skipped))
    if given_models is None:
        run.models = None  # the frozen encoders leave memory before training starts
    run.encoder = None if given_encoder is None else given_encoder
    return CacheReader(cache_dir)


# ---- the step's inputs ----------------------------------------------------------------------------------------------
def _scale(vae_config: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
    shift = vae_config.get("shift_factor") or 0.0
    return (latents - shift) * vae_config["scaling_factor"]


@torch.no_grad()
def _inputs(run: _Run, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple, dict | None]:
    """(latents, text embeddings, projection inputs, SDXL added conditioning) with condition dropout applied."""
    config, device, dtype = run.config, run.accelerator.device, run.weight_dtype
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    drops = dropout.draw(first.shape[0], config.drop_image, config.drop_text, config.drop_both)
    added = None
    if run.cache is not None:
        c = run.constants
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        latents = _scale(run.vae_config, mean + std * torch.randn_like(mean))
        text = dropout.replace_rows(batch["text_embeds"].to(device), drops.text, c["uncond_text"].to(device))
        if run.sdxl:
            pooled = dropout.replace_rows(batch["pooled"].to(device), drops.text, c["uncond_pooled"].to(device))
            added = {"text_embeds": pooled.to(dtype), "time_ids": batch["time_ids"].to(device, dtype)}
        image = None
        if run.features:
            image = dropout.replace_rows(batch["image"].to(device), drops.image, c["uncond_image"].to(device))
    else:
        m = run.models
        texts = dropout.drop_texts(batch["text"], drops.text)
        text, pooled = encode_text(m, texts, device)
        dist = m.vae.encode(batch["pixels"].to(device, m.vae.dtype)).latent_dist
        latents = _scale(run.vae_config, dist.sample().float())
        if run.sdxl:
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop"], config.resolution)
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(device, dtype)}
        image = None
        if run.features == "global":
            image = dropout.replace_rows(run.encoder.encode_pixels(batch["clip"], "global").float(), drops.image, 0.0)
        elif run.features == "patch":  # a dropped image is zero pixel values through the encoder
            image = run.encoder.encode_pixels(dropout.replace_rows(batch["clip"], drops.image, 0.0), "patch").float()
    features: tuple[torch.Tensor, ...] = ()
    if config.needs_id_embeds:
        features = (dropout.replace_rows(batch["id"].to(device).float(), drops.image, 0.0),)
    if image is not None:
        features = features + (image.to(device).float(),)
    return latents.float(), text.to(device, dtype), features, added


# ---- validation -----------------------------------------------------------------------------------------------------
def _validation_set(run: _Run, reader: Any, count: int = 4):
    """Fixed references (config.validation_images, else the data's first samples) and prompts, computed once."""
    from ipadapter.train.validate import ValidationSet

    config, device = run.config, run.accelerator.device
    if run.models is not None and run.models.text_encoders:
        text_models = _TextOnly(run.models.tokenizers, run.models.text_encoders, run.sdxl)
    else:  # training from the cache: the text encoders come in once, for the prompts, and leave
        tokenizers, encoders = load_text_encoders(config.base, sdxl=run.sdxl)
        text_models = _TextOnly(tokenizers, [e.to(device) for e in encoders], run.sdxl)
    prompts, pooled = encode_text(text_models, list(config.validation_prompts), device)
    negative, neg_pooled = encode_text(text_models, [""], device)
    del text_models

    pixels = latents = None
    if reader is not None and not config.validation_images:
        rows = [reader(r) for r in reader.records()[:count]]
        batch = collate(rows)
        latents = _scale(run.vae_config, batch["latent_mean"])
        feats: tuple = ()
        if config.needs_id_embeds:
            feats += (batch["id"],)
        if run.features:
            feats += (batch["image"],)
        uncond: tuple = ()
        if config.needs_id_embeds:
            uncond += (torch.zeros_like(batch["id"][:1]),)
        if run.features:
            uncond += (run.constants["uncond_image"][None],)
    else:
        encoder = run.encoder or (load_image_encoder(config) if run.features else None)
        if encoder is not None:
            encoder.model.to(device)
        decode = Decoder(config.resolution, encoder.processor if encoder else None,
                         config.id_dim if config.needs_id_embeds else 0, need_text=False)
        if config.validation_images and not config.needs_id_embeds:
            records = [Record(key=p, text="", image=Path(p)) for p in config.validation_images]
        else:
            stream = _stream(config, 0, 1, single_pass=True, shuffle=False)
            records = [r for r in (stream.next_record() for _ in range(4 * count)) if r is not None]
        examples = []
        for r in records:
            try:
                examples.append(decode(r))
            except SkipSample:  # a bad reference is skipped here as in training
                continue
            if len(examples) == count:
                break
        if not examples:
            raise IPAdapterError("no usable validation reference (check --validation-images or the data)")
        batch = collate(examples)
        pixels = batch["pixels"]
        feats, uncond = (), ()
        if config.needs_id_embeds:
            feats += (batch["id"],)
            uncond += (torch.zeros_like(batch["id"][:1]),)
        if run.features:
            feats += (encoder.encode_pixels(batch["clip"], run.features).float().cpu(),)
            uncond += (encoder.uncond(run.features).float().cpu(),)
    return ValidationSet(features=feats, uncond_features=uncond, reference_pixels=pixels, reference_latents=latents,
                         prompt_embeds=prompts.float().cpu(), negative_embeds=negative.float().cpu(),
                         prompt_pooled=None if pooled is None else pooled.float().cpu(),
                         negative_pooled=None if neg_pooled is None else neg_pooled.float().cpu())


@dataclass
class _TextOnly:
    """`encode_text` needs only tokenizers, encoders and whether the base is SDXL."""

    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    is_sdxl: bool


def _validate(run: _Run, vset: Any, step: int, unet: nn.Module, adapter: IPAdapter, attachment: Attachment) -> Path:
    from ipadapter.train.validate import sample_grid, save_png

    config = run.config
    vae = run.models.vae if run.models is not None and run.models.vae is not None else None
    loaded = vae is None
    if loaded:  # training from the cache: the VAE comes in for validation only
        vae = load_vae(config.base).to(run.accelerator.device)
        freeze(vae)
    grid = sample_grid(vset, unet=unet, adapter=adapter, attachment=attachment, vae=vae,
                       scheduler_config=run.scheduler_config, resolution=config.resolution,
                       steps=config.validation_steps, guidance=config.validation_guidance, seed=config.seed)
    if loaded:
        del vae
    path = save_png(grid, Path(config.output) / "validation" / f"step-{step:08d}.png")
    try:
        run.accelerator.get_tracker("tensorboard").log_images({"validation": grid}, step=step, dataformats="HWC")
    except Exception:  # no tracker (logging disabled) is not a reason to stop training
        pass
    return path


# ---- the run --------------------------------------------------------------------------------------------------------
def train(
    config: TrainConfig, *, models: BaseModels | None = None, image_encoder: ImageEncoder | None = None,
    on_step: Callable[[int, float], None] | None = None, log_with: str | None = "tensorboard",
) -> TrainResult:
    """Train an adapter. `models` / `image_encoder` may be given in memory (tests, benchmarks) instead of paths.
    `on_step(step, loss)` is called after every optimizer step (it may raise to stop the run)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object, set_seed
    from tqdm.auto import tqdm

    from ipadapter.atomic import write_text
    from ipadapter.checkpoint import save_adapter, save_published
    from ipadapter.train.checkpoint import check_resumable, load_checkpoint, read_state, resume_point, save_checkpoint
    from ipadapter.validation import output_folder

    config.validate()
    if models is None:
        config.check_ready()
    elif config.needs_image_encoder and image_encoder is None and not config.image_encoder:
        raise IPAdapterError(f"variant {config.variant!r} needs an image encoder")
    output = output_folder(config.output, "--output")

    # 1. accelerator (several processes on a machine without GPUs: gloo on CPU, as CI runs it)
    cpu_world = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_world,
        gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision, log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )
    rank, world = accelerator.process_index, accelerator.num_processes

    # 2. data (the base's configs are enough to refuse a bad resolution before any weights load)
    if models is not None:
        unet_config, vae_config = dict(models.unet.config), dict(models.vae.config) if models.vae else {}
    else:
        unet_config, vae_config = base_configs(config.base)
    check_resolution(config.resolution, unet_config, vae_config)
    resume_path = resume_point(config.resume, output, say=logger.warning if accelerator.is_main_process else logger.debug)
    if resume_path is not None:
        found = read_state(resume_path).get("variant")
        if found != config.variant:  # refused before any weights load
            raise IPAdapterError(f"cannot resume from {resume_path}: it trains variant {found!r}, this run {config.variant!r}")
    run = _Run(config=config, accelerator=accelerator, features=clip_features(config.variant),
               sdxl=unet_config.get("addition_embed_type") == "text_time", vae_config=vae_config)
    if config.cache:
        run.cache = _prepare_cache(run, models, image_encoder)
        run.constants = run.cache.constants
        stream = IndexedStream(run.cache.records(), rank=rank, world=world, seed=config.seed)
        decode: Callable[[Record], dict[str, Any]] = run.cache
    else:
        stream = _stream(config, rank, world)
        if run.features:
            run.encoder = image_encoder or load_image_encoder(config)
        decode = _decoder(run)
    run.batches = batches = Batches(stream, decode, config.batch_size, workers=config.num_workers)

    # 3. seed
    set_seed(config.seed)

    # 4. models: everything frozen, then the adapter attached and trainable
    if run.models is None:
        run.models = models or load_base(config.base, encoders=not config.cache, vae=not config.cache)
    m = run.models
    run.scheduler_config = m.scheduler_config
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(m.scheduler_config)
    prediction = config.prediction_type or noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise IPAdapterError(f"the base's scheduler predicts {prediction!r}; only epsilon and v_prediction are supported")
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    freeze(m.unet, m.vae, *m.text_encoders, run.encoder.model if run.encoder else None)
    base_name = config.base or m.name or "in-memory base"
    base_id = module_fingerprint(m.unet)  # before any cast: the same UNet in another precision is the same base
    if config.init_from:
        adapter = _init_from(config, m.unet)
    else:
        enc = run.encoder
        if enc is None and run.features and run.cache is not None:
            sample = run.constants["uncond_image"]
            widths = {"embed_dim": sample.shape[-1], "hidden_dim": sample.shape[-1], "patch_tokens": sample.shape[0]}
        elif enc is not None:
            widths = {"embed_dim": enc.global_dim, "hidden_dim": enc.patch_dim, "patch_tokens": enc.patch_tokens}
        else:
            widths = {}
        adapter_config = adapter_config_for(
            config.variant, cross_dim=m.cross_dim, id_dim=config.id_dim, num_tokens=config.num_tokens,
            lora_rank=config.lora_rank, encoder=config.image_encoder, base=base_name, attention=config.attention,
            **widths,
        )
        adapter = IPAdapter.for_unet(m.unet, adapter_config)  # K'/V' = copies of to_k/to_v (full precision)
    m.unet.to(device, run.weight_dtype)
    if not config.cache:
        for frozen in (m.vae, *m.text_encoders, run.encoder.model if run.encoder else None):
            if frozen is not None:
                frozen.to(device, run.weight_dtype)
    if config.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
    adapter.to(device=device, dtype=torch.float32).requires_grad_(True)  # trained in fp32 whatever the UNet's dtype
    attachment = attach(m.unet, {"0": adapter})
    attachment.runtime.cache_kv = False  # every batch brings new tokens; never reuse K'/V'
    module = TrainModule(m.unet, adapter, attachment)

    # 5. optimizer (AdamW, constant LR after an optional warm-up: scheduler steps count every process)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(config.warmup_steps * world))
    ema = EMA(params, config.ema_decay) if config.ema_decay > 0 else None

    # 6. one prepare (DeepSpeed infers its micro-batch from dataloaders; ours streams itself, so say it)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    _register_adapter_hooks(accelerator, adapter)

    # 7. resume (every file verified first); the output folder is written only once all checks have passed
    step = 0
    if resume_path is not None:
        state = read_state(resume_path)
        check_resumable(state, resume_path, variant=config.variant, base_id=base_id, base=base_name, world=world,
                        attention=config.attention)
        load_checkpoint(accelerator, resume_path, adapter, ema)
        step = int(state["step"])
        stream.load_state_dict(state["data"][rank])
        stream.skipped.update(state["skipped"][rank])
        logger.info("resumed from %s at step %d", resume_path, step)
    if accelerator.is_main_process:
        write_text(output / "config.json", config.to_json())
    if log_with and accelerator.is_main_process:
        accelerator.init_trackers("train", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                   for k, v in config.to_dict().items()})

    vset = None
    if config.validate_every and accelerator.is_main_process:
        vset = _validation_set(run, run.cache)

    # 8. loop
    result = TrainResult(step=step, output=output)
    bar = tqdm(total=config.max_steps, initial=step, desc="training", unit="step",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    micro = 0
    last = time.perf_counter()
    try:
        while step < config.max_steps:
            batch = collate(batches.next_batch())
            with accelerator.accumulate(module):
                latents, text, features, added = _inputs(run, batch)
                noise = torch.randn_like(latents)
                if config.noise_offset:
                    noise = noise + config.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=device)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=device).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
                with accelerator.autocast():
                    pred = module(noisy.to(run.weight_dtype), timesteps, text, features, added)
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            micro += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            adapter.weights_changed()
            if ema is not None:
                ema.update()
            step_loss = float(accelerator.reduce(loss_sum / micro, reduction="mean"))
            loss_sum.zero_()
            micro = 0
            result.step_times.append(time.perf_counter() - last)  # data + forward/backward + optimizer
            result.losses.append(step_loss)
            bar.update(1)
            skipped = sum(stream.skipped.values())
            bar.set_postfix(loss=f"{step_loss:.4f}", skipped=skipped, refresh=False)
            if log_with and (step % config.log_every == 0 or step == config.max_steps):
                accelerator.log({"train/loss": step_loss, "train/lr": lr_scheduler.get_last_lr()[0],
                                 "data/skipped": skipped}, step=step)
            if step % config.save_every == 0 or step == config.max_steps:
                checksum = float(sum(p.detach().double().sum() for p in params))  # replicas must agree
                per_rank = gather_object([{"data": stream.state_dict(), "skipped": dict(stream.skipped),
                                           "checksum": checksum}])
                save_checkpoint(accelerator, output, {
                    "step": step, "variant": config.variant, "attention": config.attention, "base": base_name,
                    "base_id": base_id,
                    "num_processes": world, "data": [p["data"] for p in per_rank],
                    "skipped": [p["skipped"] for p in per_rank], "weight_checksums": [p["checksum"] for p in per_rank],
                }, keep=config.keep_checkpoints, ema=ema)
            if vset is not None and step % config.validate_every == 0:
                _validate(run, vset, step, m.unet, adapter, attachment)
            if on_step is not None:
                on_step(step, step_loss)
            last = time.perf_counter()  # checkpoints, validation and callbacks are not step time
    except BaseException:
        attachment.detach()  # a stopped run leaves the caller's UNet as it was
        raise
    finally:
        bar.close()
        batches.close()

    # the end: final adapter in the published layout and in the project's own format
    accelerator.wait_for_everyone()
    totals: Counter = Counter()
    for counts in gather_object([dict(stream.skipped)]):
        totals.update(counts)
    result.skipped, result.step = dict(totals), step
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to()
            adapter.weights_changed()
        try:
            # the simple-adapter ablation has no published layout (no to_k_ip/to_v_ip): own format only
            if adapter.config.attention == "decoupled":
                result.published = save_published(adapter, m.unet, output / PUBLISHED_NAME)
            result.own = save_adapter(adapter, output / OWN_NAME)
        except (OSError, RuntimeError, SafetensorError) as err:
            from ipadapter.train.checkpoint import latest_checkpoint

            raise IPAdapterError(
                f"could not write the final adapter to {output} ({str(err).splitlines()[0][:160]}); the training state "
                f"{latest_checkpoint(output)} is intact: free space and run again with --resume latest"
            ) from None
        message = f"done at step {step}: {describe_skips(totals)}; adapter written to {result.published or result.own}"
        logger.info(message)
        if not logger.hasHandlers():  # used as a library without logging set up: still say it once
            tqdm.write(message)
    # The DDP wrapper goes before the process group. Left to the end of this function, torch's Reducer would drop the
    # last reference to a gloo group and join its worker threads holding the GIL, while a worker may still need the GIL
    # to release the last collective's tensors: that rank then hangs after training. The group's own Python object
    # releases the GIL in its destructor.
    accelerator.free_memory()
    del module
    gc.collect()
    accelerator.end_training()
    attachment.detach()
    result.adapter = adapter
    return result


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


def _register_adapter_hooks(accelerator: Any, adapter: IPAdapter) -> None:
    """Checkpoints hold the adapter's weights only, not the frozen UNet that the wrapped module also contains."""
    from ipadapter.checkpoint import save_adapter

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_adapter(adapter, Path(output_dir) / "adapter.safetensors")
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        adapter.load_state_dict(load_file(str(Path(input_dir) / "adapter.safetensors")))
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
