"""The `--dry-run` memory estimate for SD 1.5 and SDXL shapes, from their published configs written here (no
weights, no GPU: the models are built on PyTorch's meta device). docs/training.md quotes its output as estimates.

    python benchmarks/train_memory.py [--base sdxl|sd15] [--resolution 1024] [--variant plus] ...
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
       "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "projection_dim": 768, "model_type": "clip_text_model"}
CLIP_G_TEXT = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "projection_dim": 1280, "model_type": "clip_text_model"}
TOKENIZER = {"model_max_length": 77}  # the captions' length in tokens, as every SD 1.5 / SDXL tokenizer pads them
VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
         "patch_size": 14, "image_size": 224, "projection_dim": 1024, "model_type": "clip_vision_model"}


def write_configs(root: Path, sdxl: bool) -> tuple[Path, Path]:
    def put(folder: Path, name: str, config: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))

    base = root / "base"
    put(base / "unet", "config.json", SDXL_UNET if sdxl else SD15_UNET)
    put(base / "vae", "config.json", {**VAE, "force_upcast": sdxl})
    put(base / "text_encoder", "config.json", CLIP_L_TEXT)
    put(base / "tokenizer", "tokenizer_config.json", TOKENIZER)
    if sdxl:
        put(base / "text_encoder_2", "config.json", CLIP_G_TEXT)
    put(root / "vit-h", "config.json", VIT_H)
    return base, root / "vit-h"


def main() -> None:
    from ipadapter.train import TrainConfig
    from ipadapter.train.memory import estimate, report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=("sd15", "sdxl"), default="sdxl")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--variant", default="plus")
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--optimizer", default="adamw8bit")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 2, 4, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, encoder = write_configs(Path(tmp), args.base == "sdxl")
        config = TrainConfig(base=str(base), image_encoder=str(encoder), variant=args.variant,
                             resolution=args.resolution, mixed_precision=args.mixed_precision,
                             optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
                             cache="cache" if args.cache else "")
        print(report(config, estimate(config, tuple(args.batch_sizes))))


if __name__ == "__main__":
    main()
