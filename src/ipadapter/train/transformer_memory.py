"""`--dry-run` for FLUX and SD 3 runs: the UNet run's estimate (train/memory.py) for a transformer run.

The same count: frozen weights in the run's precision (the transformer; the VAE, text encoders and image encoder too
unless a feature cache replaces them), the trainable adapter in fp32 with its gradients, optimizer states and EMA,
and the activations a step keeps for its backward pass. Those are measured by running the loss a step runs
(`dit.flow.flow_matching_loss`, the adapter attached as in training) on fake tensors of the run's shapes, with the
models built from the base's configs (no weights read, no memory taken). A transformer run does not autocast: its
frozen models are cast to the run's precision and the adapter stays fp32, and so they are here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ipadapter.dit.flow import Batch, TransformerFamily
from ipadapter.train.config import TrainConfig
from ipadapter.train.memory import (
    Estimate, count, default_dtype, image_encoder_from_config, largest_resolution, saved_bytes, static_bytes,
)


def estimate_transformer(config: TrainConfig, batch_sizes: tuple[int, ...] = (1, 2, 4, 8)) -> Estimate:
    """The estimate of a FLUX or SD 3 run as `config` says, its sizes checked as the run checks them."""
    import diffusers

    from ipadapter.dit.train import family as family_of
    from ipadapter.single_file import configs_of
    from ipadapter.sources import read_config
    from ipadapter.train.stages import stage_configs
    from ipadapter.train.transformer import check_stages
    from ipadapter.train.transformer_feed import check_size
    from ipadapter.validation import vae_downscale
    from ipadapter.variants import get_variant

    variant = get_variant(config.variant)
    family = family_of(variant.denoiser)
    if config.stages:  # refused as the run would refuse them, and estimated at the largest stage
        check_stages(stage_configs(config))
    else:
        check_size(config, family)
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    transformer_class = getattr(diffusers, family.transformer)
    layout = configs_of(config.base)  # a FLUX.1 transformer file: its family's repository's configs
    transformer_config = read_config(transformer_class, layout, "transformer")
    vae_config = read_config(diffusers.AutoencoderKL, layout, "vae")
    with torch.device("meta"):  # counted only: weightless on the meta device
        vision = _vision(config.image_encoder)
        frozen = [] if config.cache else [diffusers.AutoencoderKL.from_config(vae_config),
                                          *_text_encoders(layout), vision]
    width, features = _features(vision, family)
    latent = largest_resolution(config) // vae_downscale(vae_config)
    text = family.text_tokens(layout)
    with FakeTensorMode():  # fake CPU tensors: shapes and dtypes, no memory
        batches = {b: _batch(family, transformer_config, b, latent, text, features, dtype) for b in batch_sizes}
        with default_dtype(dtype):  # frozen in the run's precision, as the run casts them
            transformer = transformer_class.from_config(transformer_config).requires_grad_(False)
        adapter = family.new_adapter(transformer, width, variant.tokens).requires_grad_(True)  # fp32, as trained
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        activations = {b: _activations(transformer, adapter, batch) for b, batch in batches.items()}
        frozen_params, trainable = count([transformer, *frozen]), count([adapter])
    return Estimate(frozen_params=frozen_params, trainable_params=trainable, activations=activations,
                    static_bytes=static_bytes(frozen_params, trainable, dtype=dtype, optimizer=config.optimizer,
                                              ema=config.ema_decay > 0))


def _batch(family: TransformerFamily, transformer: dict, batch: int, latent: int, text: int,
           features: tuple[int, ...], dtype: torch.dtype) -> Batch:
    """A batch of zeros of the run's shapes: latents `latent` a side, `text` tokens, image features `features`."""
    channels = transformer["in_channels"] // (4 if family.image_features == "global" else 1)  # FLUX packs 2 × 2
    pooled = torch.zeros(batch, transformer["pooled_projection_dim"], dtype=dtype)
    rows = {"latents": torch.zeros(batch, channels, latent, latent, dtype=dtype), "pooled": pooled,
            "text": torch.zeros(batch, text, transformer["joint_attention_dim"], dtype=dtype),
            "image": torch.zeros(batch, *features, dtype=dtype)}
    return family.assemble(rows, (rows["text"][:1], pooled[:1]))


def _activations(transformer: nn.Module, adapter: nn.Module, batch: Batch) -> int:
    """What one step's loss on `batch` saves for backward, nothing dropped, the adapter attached as a run attaches
    it (anew: a FLUX attachment takes a second call with the same timestep for true CFG's negative one)."""
    from ipadapter.dit.attach import attach_dit
    from ipadapter.dit.flow import flow_matching_loss
    from ipadapter.train.dropout import Drops

    rows = batch.latents.shape[0]
    none = torch.zeros(rows, dtype=torch.bool)
    attachment = attach_dit(transformer, adapter)
    try:
        return saved_bytes(lambda: flow_matching_loss(attachment, adapter, batch, sigma=torch.zeros(rows),
                                                      noise=torch.zeros_like(batch.latents),
                                                      drops=Drops(image=none, text=none)))
    finally:
        attachment.detach()


def _features(vision: nn.Module, family: TransformerFamily) -> tuple[int, tuple[int, ...]]:
    """(width, per-sample shape) of the image features the family reads: CLIP's global embedding, or SigLIP's patch
    features (no class token)."""
    c = vision.config
    if family.image_features == "global":
        return c.projection_dim, (c.projection_dim,)
    return c.hidden_size, ((c.image_size // c.patch_size) ** 2, c.hidden_size)


def _vision(source: str) -> nn.Module:
    """The image encoder built from its config: SigLIP where the config says so, else CLIP
    (`memory.image_encoder_from_config`, which refuses what a run would refuse)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from ipadapter.siglip import SiglipEncoder, encoder_class
    from ipadapter.sources import split_hub_path

    repo, subfolder = split_hub_path(source)
    if encoder_class(repo, subfolder) is not SiglipEncoder:
        return image_encoder_from_config(source)
    # encoder_class has just read this config (from the Hub cache, or downloaded into it): read it from disk
    config = SiglipVisionConfig.from_pretrained(repo, subfolder=subfolder or "", local_files_only=True)
    return SiglipVisionModel(config)


def _text_encoders(base: str) -> list[nn.Module]:
    """The base's text encoders (the modules its model_index.json names besides the transformer, VAE and image
    encoder), each built from its config."""
    import transformers
    from diffusers import DiffusionPipeline

    from ipadapter.sources import from_cache_or_hub

    index = from_cache_or_hub(lambda local: DiffusionPipeline.load_config(base, local_files_only=local), base,
                              "the base model")
    encoders = []
    for name, entry in sorted(index.items()):
        if not name.startswith("text_encoder") or entry[0] != "transformers":  # [library, class]; [None, None]
            continue
        cls = getattr(transformers, entry[1])
        config = from_cache_or_hub(lambda local: transformers.AutoConfig.from_pretrained(
            base, subfolder=name, local_files_only=local), base, "the base model")
        encoders.append(cls(config))
    return encoders
