"""The data phase of a run: what it reads (manifest or shard stream, decoded; or the feature cache, built on first
use) and the checks that can refuse a run before any weights load (resolution, resume of another variant)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError
from ipadapter.sources import split_hub_path
from ipadapter.train.buckets import bucket_sizes, image_size, nearest_bucket
from ipadapter.train.config import TrainConfig
from ipadapter.train.data import (
    Batches, Decoder, IndexedStream, Record, ShardStream, collate, describe_skips, expand_shards, is_shard_pattern,
    read_manifest, sdxl_time_ids,
)
from ipadapter.train.models import (
    BaseModels, check_resolution, encode_latents, encode_text, freeze, load_base, module_fingerprint, resolution_step,
)
from ipadapter.train.step import encode_clip

logger = logging.getLogger("ipadapter.train")


def open_stream(config: TrainConfig, rank: int, world: int, *, single_pass: bool = False, shuffle: bool = True,
            buckets: list[tuple[int, int]] | None = None):
    """The raw data of this process; with `buckets`, a manifest's epoch order gives batches of one bucket each."""
    if is_shard_pattern(config.data):
        return ShardStream(expand_shards(config.data), rank=rank, world=world, seed=config.seed,
                           need_id=config.needs_id_embeds, single_pass=single_pass,
                           shuffle_buffer=config.shuffle_buffer if shuffle else 0)
    records = read_manifest(config.data, config.data_root, need_id=config.needs_id_embeds,
                            references=config.references)
    groups = None
    if buckets:
        sizes = [image_size(r.image) for r in records]
        groups = [buckets.index(nearest_bucket(s, buckets)) if s else -1 for s in sizes]
    return IndexedStream(records, rank=rank, world=world, seed=config.seed, shuffle=shuffle, single_pass=single_pass,
                         groups=groups, batch_size=config.batch_size)


def load_image_encoder(config: TrainConfig) -> ImageEncoder:
    """In the checkpoint's own dtype, as transformers loads the text encoders; the run casts it where it trains.
    `owner/repo/sub/folder` names a Hub subfolder, as in generate and evaluate. CLIP, or SigLIP where its config says
    so (the SD 3 adapters' encoder)."""
    from ipadapter.siglip import encoder_class

    repo, subfolder = split_hub_path(config.image_encoder)
    return encoder_class(repo, subfolder).from_pretrained(repo, subfolder=subfolder, dtype="auto")


def decoder(run: Any) -> Decoder:
    processor = run.encoder.processor if run.features else None
    return Decoder(run.config.resolution, processor, run.config.id_dim if run.config.needs_id_embeds else 0,
                   references=run.config.references, buckets=run.buckets)


def encode_for_cache(run: Any, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The frozen models on one batch, without dropout: what a cache row holds."""
    device = run.accelerator.device
    batch = collate(examples)
    mean, std = encode_latents(run.models.vae, batch["pixels"])
    text, pooled = encode_text(run.models, batch["text"], device)
    out = {"latent_mean": mean, "latent_std": std, "text_embeds": text}
    if pooled is not None:
        out["pooled"] = pooled
        out["time_ids"] = sdxl_time_ids(batch["original_size"], batch["crop"], batch["pixels"].shape[-2:])
    if run.features:
        out["image"] = encode_clip(run.encoder, batch["clip"], run.features)
    if "id" in batch:
        out["id"] = batch["id"]
    return out


@torch.no_grad()
def dropped_constants(run: Any) -> dict[str, torch.Tensor]:
    """The dropped inputs: the empty prompt's embeddings; the image features of a dropped image."""
    text, pooled = encode_text(run.models, [""], run.accelerator.device)
    out = {"uncond_text": text[0]}
    if pooled is not None:
        out["uncond_pooled"] = pooled[0]
    if run.features:
        out["uncond_image"] = run.encoder.uncond(run.features)[0]
    return {k: v.float().cpu() for k, v in out.items()}


# The base's parts a cache replaces, by folder (those a base lacks are skipped): every family's VAE and text encoders.
ENCODER_FOLDERS = ["vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]


def base_identity(config: TrainConfig, models: BaseModels | None) -> str:
    from ipadapter.single_file import parts_source
    from ipadapter.train.cache import folder_fingerprint

    if models is not None:
        parts = [module_fingerprint(models.vae)] + [module_fingerprint(e) for e in models.text_encoders]
        return "|".join(parts)
    return folder_fingerprint(parts_source(config.base), ENCODER_FOLDERS)


def encoder_identity(config: TrainConfig) -> str:
    """The fingerprint of `--image-encoder`'s files (its weights, config and preprocessor config): no weights read."""
    from ipadapter.train.cache import folder_fingerprint

    repo, subfolder = split_hub_path(config.image_encoder)
    return folder_fingerprint(repo, [subfolder or ""])


def open_cache(cache_dir: Path, fp: dict[str, Any], config: TrainConfig) -> Any:
    """A complete cache whose fingerprint is `fp`, opened (a `CacheReader`); None when there is none yet to build."""
    from ipadapter.train.cache import CacheReader, check_fingerprint, check_rebuildable

    if config.cache_complete():
        index = check_fingerprint(cache_dir, fp)
        logger.info("training from the feature cache %s (%d samples; when built: %s)", cache_dir, index["rows"],
                    describe_skips(Counter(index["skipped"])))
        return CacheReader(cache_dir)
    if not config.data:
        raise IPAdapterError(f"{cache_dir} holds no complete feature cache and no --data was given to build one")
    check_rebuildable(cache_dir)  # before any model loads
    logger.info("building the feature cache %s (one pass over the data)", cache_dir)
    return None


def prepare_cache(run: Any, given_models: BaseModels | None, given_encoder: ImageEncoder | None):
    """Check the cache's fingerprint, or build it (loading the frozen encoders only for that), and open it."""
    from ipadapter.train.cache import fingerprint

    config, acc = run.config, run.accelerator
    cache_dir = Path(config.cache)
    processor, encoder_id = None, ""
    if run.features:
        if given_encoder is not None:
            processor, encoder_id = given_encoder.processor, module_fingerprint(given_encoder.model)
        else:
            repo, subfolder = split_hub_path(config.image_encoder)
            processor, encoder_id = ImageEncoder.load_processor(repo, subfolder=subfolder), encoder_identity(config)
    fp = fingerprint(config=config, base_id=base_identity(config, given_models), encoder_id=encoder_id,
                     processor=processor, features=run.features, sdxl=run.sdxl)
    reader = open_cache(cache_dir, fp, config)
    if reader is not None:
        return reader
    run.models = given_models or load_base(config.base, encoders=True, vae=True)
    if run.features:
        run.encoder = given_encoder or load_image_encoder(config)
    device = acc.device
    for m in (run.models.vae, *run.models.text_encoders, run.encoder.model if run.encoder else None):
        if m is not None:
            freeze(m)
            m.to(device)
    reader = build_from_data(config, acc, decoder(run), lambda ex: encode_for_cache(run, ex), dropped_constants(run),
                             fp)
    if given_models is None:
        run.models = None  # the frozen encoders leave memory before training starts
    run.encoder = None if given_encoder is None else given_encoder
    return reader


def build_from_data(config: TrainConfig, accelerator: Any, decode: Callable[[Record], dict[str, Any]],
                    encode: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
                    constants: dict[str, torch.Tensor], fp: dict[str, Any]) -> Any:
    """The cache at `--cache` built by one pass over this process's share of the data, in order (`decode` each
    record, `encode` each batch into rows), then opened (a `CacheReader`): a UNet run's and a transformer run's."""
    from ipadapter.train.cache import CacheReader, build_cache

    stream = open_stream(config, accelerator.process_index, accelerator.num_processes, single_pass=True,
                         shuffle=False)
    batches = Batches(stream, decode, config.batch_size, workers=config.num_workers)
    try:
        build_cache(Path(config.cache), batches=batches, encode=encode, constants=constants, fp=fp,
                    accelerator=accelerator, dtype=getattr(torch, config.cache_dtype))
    finally:
        batches.close()
    logger.info("feature cache built: %s", describe_skips(batches.skipped))
    return CacheReader(Path(config.cache))



def data_phase(run: Any, models: BaseModels | None, image_encoder: ImageEncoder | None,
                unet_config: dict[str, Any]) -> None:
    """Refuse what can be refused from configs alone, then open the data: the feature cache or the raw stream."""
    from ipadapter.train.checkpoint import resume_from

    config, acc = run.config, run.accelerator
    rank, world = acc.process_index, acc.num_processes
    check_resolution(config.resolution, unet_config, run.vae_config)
    run.resume_path = resume_from(config.resume, Path(config.output), config.variant,
                                  say=logger.warning if acc.is_main_process else logger.debug)
    if config.cache:
        run.cache = prepare_cache(run, models, image_encoder)
        run.constants = run.cache.constants
        run.stream = IndexedStream(run.cache.records(), rank=rank, world=world, seed=config.seed)
        decode: Callable[[Record], dict[str, Any]] = run.cache
    else:
        if config.buckets:
            run.buckets = bucket_sizes(config.resolution, resolution_step(unet_config, run.vae_config))
            logger.info("aspect-ratio buckets (height × width): %s", ", ".join(f"{h}×{w}" for h, w in run.buckets))
        run.stream = open_stream(config, rank, world, buckets=run.buckets)
        if run.features:
            run.encoder = image_encoder or load_image_encoder(config)
        decode = decoder(run)
    run.batches = Batches(run.stream, decode, config.batch_size, workers=config.num_workers)
