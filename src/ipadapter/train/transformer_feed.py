"""The data phase of a FLUX or SD 3 run: image-caption pairs through the frozen pipeline at every step, or the feature
cache (`--cache`), built on first use by one pass of the frozen models and read instead of running them after that.

Training from a complete cache loads the transformer and the scheduler alone. The VAE, the text encoders (FLUX's
T5-XXL, SD 3's three) and the image encoder stay on disk; they are loaded only to build the cache (the transformer
is not loaded then) and for the first validation grid (the VAE then stays, on the CPU between grids). A cache row
holds what the family's `features` gives; each step's batch is assembled from rows exactly as from features computed
on the spot, so the two paths train the same adapter. The cache is the UNet run's format (train/cache.py) with the
denoiser in its fingerprint.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ipadapter.dit.flow import Batch, TransformerFamily
from ipadapter.encoders import ImageEncoder
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.train.config import TrainConfig
from ipadapter.train.buckets import bucket_sizes
from ipadapter.train.data import Batches, Decoder, IndexedStream, collate

logger = logging.getLogger("ipadapter.train")
KEPT = ("transformer", "scheduler")  # what a run from the cache loads of the base


def load_transformer_pipeline(source: str, family: TransformerFamily, dtype: torch.dtype, **parts: Any) -> Any:
    """The `family.pipeline` of `--base`, without an image encoder (the run loads `--image-encoder` itself); `parts`
    replace components (None: not loaded)."""
    import diffusers

    from ipadapter import single_file
    from ipadapter.sources import from_cache_or_hub, plain_or_fp16

    cls = getattr(diffusers, family.pipeline)
    if single_file.is_single_file(source):  # a transformer file of the family (check_size has told it is one)
        return single_file.load_pipeline(source, dtype, **parts)
    try:
        return from_cache_or_hub(lambda local: plain_or_fp16(lambda variant: cls.from_pretrained(
            source, torch_dtype=dtype, local_files_only=local, **parts, **variant)), source, "the base model")
    except (OSError, ValueError, TypeError) as err:
        raise IPAdapterError(f"--base {source} is not a {family.name} pipeline ({first_clause(str(err))})") from None


def _frozen_parts(family: TransformerFamily, keep: tuple[str, ...] = KEPT) -> dict[str, None]:
    """Every component of the family's pipeline but those kept (the transformer and the scheduler), as None (not
    loaded)."""
    import diffusers

    names = inspect.signature(getattr(diffusers, family.pipeline)).parameters
    return {name: None for name in names if name not in keep}


def check_size(config: TrainConfig, family: TransformerFamily) -> list[tuple[int, int]] | None:
    """`--resolution` (and with `--buckets` its sizes, returned) against the base's VAE and transformer configs,
    before any weights load."""
    import diffusers

    from ipadapter import single_file
    from ipadapter.errors import FieldError
    from ipadapter.sources import read_config

    if Path(config.base).is_dir() and not (Path(config.base) / "transformer").is_dir():
        raise IPAdapterError(f"--base {config.base} is not a {family.name} pipeline: it has no transformer folder")
    if single_file.is_single_file(config.base) and (made := single_file.pipeline_name(config.base)) != family.pipeline:
        raise IPAdapterError(f"--base {config.base} is not a {family.name} transformer file: diffusers reads it as a "
                             f"{made}")
    layout = single_file.configs_of(config.base)
    transformer = read_config(getattr(diffusers, family.transformer), layout, "transformer")
    vae = read_config(diffusers.AutoencoderKL, layout, "vae")
    step = family.size_step(vae, transformer)
    if config.resolution % step:
        raise FieldError("resolution", f"{config.resolution} does not fit this {family.name} base: it must be a "
                                       f"multiple of {step} ({family.size_rule})")
    buckets = bucket_sizes(config.resolution, step) if config.buckets else None
    side = max(max(b) for b in buckets) if buckets else config.resolution
    largest = family.max_size(vae, transformer)
    if largest is not None and side > largest:
        made = f" makes sides up to {side} px with --buckets, which is" if buckets else " is"
        raise FieldError("resolution", f"{config.resolution}{made} larger than this {family.name} base takes "
                                       f"({largest} px)")
    if buckets:
        logger.info("aspect-ratio buckets (height × width): %s", ", ".join(f"{h}×{w}" for h, w in buckets))
    return buckets


def _place(pipe: Any, encoder: ImageEncoder | None, device: torch.device, dtype: torch.dtype) -> None:
    """On the run's device, frozen (an `ImageEncoder`'s model is frozen when it is made); the image encoder in the
    run's precision, as the pipeline is."""
    pipe.to(device)
    if encoder is not None:
        encoder.model.to(device, dtype)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)


class Feed:
    """What a step reads (`next_batch`), the pipeline it trains on, and the data's stream (its cursor is in the
    checkpoints). `width`: the image features' width, for a new adapter and `--init-from`'s check. `buckets`: the
    aspect-ratio sizes of `--buckets` (each batch one of them), None for square crops."""

    def __init__(self, config: TrainConfig, family: TransformerFamily, accelerator: Any, dtype: torch.dtype,
                 buckets: list[tuple[int, int]] | None = None) -> None:
        from ipadapter.train.feed import load_image_encoder, open_stream

        self.config, self.family, self.accelerator, self.dtype = config, family, accelerator, dtype
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        cache = _open_or_build(config, family, accelerator, dtype) if config.cache else None
        self.pipe = load_transformer_pipeline(config.base, family, dtype, **(_frozen_parts(family) if cache else {}))
        self.encoder = None if cache else load_image_encoder(config)
        _place(self.pipe, self.encoder, device, dtype)
        if cache is not None:
            empty = tuple(cache.constants[k][None].to(device, dtype) for k in ("uncond_text", "uncond_pooled"))
            self.width = int(cache(cache.records()[0])["image"].shape[-1])
            self.stream = IndexedStream(cache.records(), rank=rank, world=world, seed=config.seed)
            decode: Callable[[Any], dict[str, Any]] = cache
        else:
            empty = family.empty_prompt(self.pipe)  # a dropped caption's input, encoded once for every batch
            self.width = self.encoder.dim(family.image_features)
            self.stream = open_stream(config, rank, world, buckets=buckets)
            decode = Decoder(config.resolution, self.encoder.processor, buckets=buckets)
        self.batches = Batches(self.stream, decode, config.batch_size, workers=config.num_workers)
        self._empty, self._cached = empty, cache is not None
        self._vae: dict[str, Any] = {}  # a cached run's VAE, once a validation has loaded it

    def next_batch(self, _: torch.Generator) -> Batch:
        """The next batch, every frozen model applied (or read from the cache)."""
        examples = collate(self.batches.next_batch())
        if self._cached:
            rows = {k: v.to(self.accelerator.device, self.dtype) for k, v in examples.items()}
        else:
            rows = self.family.features(self.pipe, self.encoder, examples["pixels"], examples["clip"],
                                        examples["text"])
        return self.family.assemble(rows, self._empty)

    @contextlib.contextmanager
    def for_generation(self, encoders: bool) -> Iterator[tuple[Any, ImageEncoder | None]]:
        """A pipeline around the trained transformer and the image encoder, for the block: the run's own, or
        (training from the cache) loaded for it and let go of after; without `encoders`, a pipeline of the VAE alone
        around the transformer and no image encoder (for prompts and references encoded before). A cached run loads
        the VAE once and keeps it on the CPU between blocks, so training holds no more on the device than before."""
        from ipadapter.train.feed import load_image_encoder

        if not self._cached:
            yield self.pipe, self.encoder
            return
        parts = {} if encoders else {**_frozen_parts(self.family, keep=(*KEPT, "vae")), **self._vae}
        pipe = load_transformer_pipeline(self.config.base, self.family, self.dtype,
                                         **{**parts, "transformer": self.pipe.transformer})
        encoder = load_image_encoder(self.config) if encoders else None
        _place(pipe, encoder, self.accelerator.device, self.dtype)
        try:
            yield pipe, encoder
        finally:
            self._vae = {"vae": pipe.vae.to("cpu")}

    def close(self) -> None:
        self.batches.close()


def _open_or_build(config: TrainConfig, family: TransformerFamily, accelerator: Any, dtype: torch.dtype) -> Any:
    """The cache at `--cache`, its fingerprint checked; built first when it is not complete, with every frozen model
    but the transformer, which then leave memory."""
    from ipadapter.train.cache import fingerprint
    from ipadapter.train.feed import base_identity, build_from_data, encoder_identity, load_image_encoder, open_cache

    cache_dir = Path(config.cache)
    # the processor is not hashed apart: its config is one of the encoder folder's files, which are
    fp = fingerprint(config=config, base_id=base_identity(config, None), encoder_id=encoder_identity(config),
                     processor=None, features=family.image_features, sdxl=False, denoiser=family.variant)
    reader = open_cache(cache_dir, fp, config)
    if reader is not None:
        return reader
    pipe = load_transformer_pipeline(config.base, family, dtype, transformer=None)
    encoder = load_image_encoder(config)
    _place(pipe, encoder, accelerator.device, dtype)
    text, pooled = family.empty_prompt(pipe)

    def encode(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(examples)
        return family.features(pipe, encoder, batch["pixels"], batch["clip"], batch["text"])

    return build_from_data(config, accelerator, Decoder(config.resolution, encoder.processor), encode,
                           {"uncond_text": text[0].float().cpu(), "uncond_pooled": pooled[0].float().cpu()}, fp)
