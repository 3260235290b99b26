"""`ipadapter train`: a config file (YAML/TOML) and/or flags; every config field is also a flag, flags win."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from ipadapter.cli.quiet import show_own_logs
from ipadapter.extras import needs

HELP = {
    "base": "diffusers pipeline folder or Hub id (unet, vae, text_encoder, tokenizer, scheduler; + _2 for SDXL; "
            "a FluxPipeline for --variant flux / flux-v2, a StableDiffusion3Pipeline for sd3), a base in one "
            ".safetensors file (a whole SD checkpoint, or a FLUX.1 / SD 3.5 transformer alone), or 'miniature': the "
            "bundled model",
    "image_encoder": "CLIPVisionModelWithProjection folder (SigLIP for sd3), Hub id, or owner/repo/sub/folder for a "
                     "Hub repo's subfolder (its image processor if saved); with --base miniature, the bundled one by "
                     "default",
    "data": "JSON/JSONL manifest of {image_file, text[, ref_image_file, id_embed_file]} or a tar shard pattern "
            "(data-{00000..00099}.tar)",
    "data_root": "folder that manifest paths are relative to (default: the manifest's folder)",
    "variant": "adapter variant to train (flux, flux-v2: XLabs' FLUX layout; sd3: InstantX's SD 3.5 layout; these "
               "have fewer options: docs/training.md)",
    "attention": "decoupled (the paper's IP-Adapter) or concat (its 'simple adapter' ablation: image tokens appended "
                 "to the text tokens of the frozen cross-attention; base variant only)",
    "output": "run folder: checkpoints/, logs/ (TensorBoard), validation/, the final adapter files",
    "init_from": "start from this adapter file (published .bin/.safetensors or ours) instead of a new adapter",
    "max_steps": "optimizer steps to train for",
    "batch_size": "samples per process per micro-batch (paper: 8 per GPU)",
    "resolution": "training size in pixels: shortest side → resolution, centre crop (paper: 512; with --base "
                  "miniature, the bundled model's own size unless given)",
    "learning_rate": "AdamW learning rate (paper: 1e-4, constant)",
    "weight_decay": "AdamW weight decay (paper: 0.01)",
    "adam_beta1": "AdamW's first-moment decay (torch's default)",
    "adam_beta2": "AdamW's second-moment decay (torch's default)",
    "adam_epsilon": "AdamW's epsilon (torch's default)",
    "seed": "seed of everything random (initialisation, data order, noise, dropout)",
    "drop_image": "probability of dropping only the image condition (paper: 0.05)",
    "drop_text": "probability of dropping only the text (paper: 0.05)",
    "drop_both": "probability of dropping both (paper: 0.05)",
    "num_tokens": "image tokens (0: the variant's default: 4 base/FaceID, 16 plus)",
    "lora_rank": "LoRA rank of the FaceID variants (published: 128)",
    "id_dim": "length of the FaceID identity embeddings (ArcFace: 512)",
    "grad_accum": "gradient accumulation steps",
    "max_grad_norm": "clip gradients to this norm (0: off)",
    "warmup_steps": "linear LR warm-up steps (0: none, the paper's constant LR)",
    "ema_decay": "keep an EMA of the weights with this decay and write it as the final adapter (0: off)",
    "noise_offset": "noise offset (0: off)",
    "snr_gamma": "min-SNR-gamma loss weighting (Hang et al., 2023; 5 is usual): low-noise steps weigh less "
                 "(0: off, the paper's uniform MSE)",
    "mixed_precision": "frozen models in this precision and autocast; the adapter trains in fp32",
    "gradient_checkpointing": "recompute UNet activations in the backward pass (less memory, slower)",
    "optimizer": "adamw, or adamw8bit (bitsandbytes' 8-bit states; falls back to adamw with a warning if it is "
                 "not installed)",
    "references": "reference images per sample (manifest ref_image_file lists; their tokens are concatenated)",
    "buckets": "aspect-ratio buckets of about resolution² pixels (SDXL's size/crop conditioning follows) instead of "
               "square centre crops; not with --cache",
    "stages": "resolution stages RESOLUTION:STEPS, run in order, each from the previous stage's adapter "
              "(e.g. --stages 512:8000 1024:2000)",
    "validation_judge": "a CLIP (both towers) folder or Hub id: CLIP-I and CLIP-T of the validation images",
    "prediction_type": "override the base scheduler's prediction type (epsilon, v_prediction)",
    "cache": "feature cache folder: built on the first run, reused afterwards (refused if models/settings differ)",
    "cache_dtype": "storage dtype of cached features",
    "num_workers": "decoding threads",
    "shuffle_buffer": "tar shards: samples held in the sample-level shuffle buffer, as webdataset's shuffle(n) "
                      "(0: shard order only)",
    "resume": "continue from a checkpoint: 'latest' (this output's newest complete state, found by scanning when the "
              "'latest' pointer is missing or damaged; a fresh start only when the output holds no run), an output "
              "folder or a state folder",
    "save_every": "save a checkpoint every N steps (and at the end)",
    "keep_checkpoints": "how many checkpoints to keep (only states older than a newly saved, verified one go)",
    "log_every": "log loss/LR to TensorBoard every N steps",
    "validate_every": "write a validation grid PNG every N steps (0: never)",
    "validation_images": "reference images for validation (default: the data's first 4)",
    "validation_prompts": "prompts for validation (\"\" = image only)",
    "validation_steps": "DDIM steps for validation samples",
    "validation_guidance": "classifier-free guidance for validation samples",
}

SUMMARY = "train an IP-Adapter (the paper's recipe), on one GPU or many (accelerate launch)"
DESCRIPTION = "Train an IP-Adapter. Every field of the config file is also a flag; flags override the file."
OWN_FLAGS = {
    "--config": "YAML or TOML config file",
    "--dry-run": "print parameters, trainable parameters and the estimated peak memory per batch size (models built "
                 "from their configs, no weights read), then stop",
}
EXAMPLES = """examples:
  ipadapter miniature data --out data/shapes --n 4096 && ipadapter train --base miniature \\
      --data data/shapes/manifest.jsonl --variant base --output runs/base    # the bundled model, at its 64 px
  ipadapter train --config src/ipadapter/train/configs/sd15-base.yaml      # in a clone of the repository
  ipadapter train --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --image-encoder h94/IP-Adapter/models/image_encoder \\
      --data data/train.jsonl --variant plus --output runs/plus --cache cache/plus
  accelerate launch --num_processes 8 --config_file deepspeed_zero2.yaml -m ipadapter.cli.main train --config my.yaml
  ipadapter train --config my.yaml --resume latest
  ipadapter train --base black-forest-labs/FLUX.1-dev --image-encoder openai/clip-vit-large-patch14 \\
      --data data/train.jsonl --variant flux --mixed-precision bf16 --resolution 512 --output runs/flux \\
      --cache cache/flux    # T5 and the VAE run once, then stay on disk
  ipadapter train --base stabilityai/stable-diffusion-3.5-large --image-encoder google/siglip-so400m-patch14-384 \\
      --data data/train.jsonl --variant sd3 --mixed-precision bf16 --resolution 1024 --output runs/sd3
"""


def with_bundled(config: Any, *, resolution_given: bool) -> Any:
    """`--base miniature` (and `--image-encoder miniature`) as the bundled model's folders, as generate reads the
    keyword; with the bundled base, its own image encoder unless another is named, and its own size (not the paper's
    512 px, 64 times the work) unless a resolution is given."""
    from ipadapter import bundled
    from ipadapter.loading import base_geometry

    if config.base == "miniature":
        encoder = config.image_encoder or ("miniature" if config.needs_image_encoder else "")
        changes = {"base": str(bundled.pipeline_path()), "image_encoder": encoder}
        if not resolution_given:
            changes["resolution"] = min(base_geometry(changes["base"])[1])
        config = config.replace(**changes)
    if config.image_encoder == "miniature":
        config = config.replace(image_encoder=str(bundled.image_encoder_path()))
    return config


def _run(args: argparse.Namespace) -> int:
    """The run, its errors about a config field worded with the flag when the value came from one."""
    from ipadapter.errors import FieldError, IPAdapterError
    from ipadapter.train import TrainConfig
    from ipadapter.train.config import flag, read_config_file

    show_own_logs()
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values = read_config_file(args.config) if args.config else {}
    config = TrainConfig.merge(values, overrides, source=str(args.config))
    config = with_bundled(config, resolution_given=args.resolution is not None or "resolution" in values)
    try:
        return _train_or_estimate(args, config)
    except FieldError as err:
        raise IPAdapterError(err.worded({name: flag(name) for name, v in overrides.items() if v is not None})) from None


def _train_or_estimate(args: argparse.Namespace, config: Any) -> int:
    from ipadapter.train import train
    from ipadapter.variants import get_variant

    if args.dry_run:
        from ipadapter.train.memory import estimate, report
        from ipadapter.train.transformer_memory import estimate_transformer

        config.check_ready(data=False)
        unet = get_variant(config.variant).denoiser == "unet"
        print(report(config, (estimate if unet else estimate_transformer)(config)))
        return 0
    train(config)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ipadapter.train.config import ATTENTION_MODES, MIXED_PRECISION, OPTIMIZERS, TRAIN_VARIANTS, TrainConfig, flag

    parser = subparsers.add_parser("train", help=SUMMARY, description=DESCRIPTION, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=OWN_FLAGS["--config"])
    parser.add_argument("--dry-run", action="store_true", help=OWN_FLAGS["--dry-run"])
    choices = {"variant": TRAIN_VARIANTS, "attention": ATTENTION_MODES, "mixed_precision": MIXED_PRECISION,
               "prediction_type": ("", "epsilon", "v_prediction"), "cache_dtype": ("float16", "bfloat16", "float32"),
               "optimizer": OPTIMIZERS}
    for f in fields(TrainConfig):  # each flag is None unless given, so the config file's value stands
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.type == "bool":
            how: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        elif f.type.startswith("list"):
            how = {"nargs": "*"}
        else:
            how = {"type": {"int": int, "float": float}.get(f.type), "choices": choices.get(f.name)}
        parser.add_argument(flag(f.name), help=f"{HELP[f.name]} (default: {default!r})", **how)
    parser.set_defaults(func=_run)
    needs(parser, "train")
