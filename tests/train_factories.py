"""Tiny models, data and folders for the training tests: an SD-1.5-like pipeline folder (UNet, VAE, CLIP text encoder,
character-level CLIP tokenizer written offline, DDPM scheduler), an SDXL-like one, and a CLIP vision encoder folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CROSS = 32
RES = 16  # pixels: VAE ÷2, UNet ÷2 → resolution must be a multiple of 4


def write_tokenizer(folder: Path, max_length: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {BOS: 0, EOS: 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "unk_token": EOS, "do_lower_case": True,
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS,
                                                                 "pad_token": EOS, "unk_token": EOS}))
    return folder


def text_encoder(seed: int = 1, *, projection: bool = False, hidden: int = CROSS):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=80, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(seed: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=RES).eval()


def unet(seed: int = 3, *, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=4 * 6 + CROSS, use_linear_projection=True)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=RES // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS * 2 if sdxl else CROSS, attention_head_dim=8,
        norm_num_groups=8, **extra,
    ).eval()


def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def image_encoder(seed: int = 4):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=24)
    return CLIPVisionModelWithProjection(cfg).eval()


def write_base(folder: Path, *, sdxl: bool = False, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A diffusers pipeline folder with tiny random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    unet(3 + seed, sdxl=sdxl).save_pretrained(folder / "unet")
    vae(2 + seed).save_pretrained(folder / "vae")
    scheduler(prediction_type).save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer")
    text_encoder(1 + seed).save_pretrained(folder / "text_encoder")
    if sdxl:
        write_tokenizer(folder / "tokenizer_2")
        text_encoder(5 + seed, projection=True).save_pretrained(folder / "text_encoder_2")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def write_image_encoder(folder: Path, seed: int = 4, *, processor: bool = True) -> Path:
    from transformers import CLIPImageProcessor

    image_encoder(seed).save_pretrained(folder)
    if processor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def in_memory(*, sdxl: bool = False, prediction_type: str = "epsilon"):
    """(BaseModels, ImageEncoder) without touching disk."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from ipadapter.encoders import ImageEncoder
    from ipadapter.train.models import BaseModels

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(Path(tmp) / "tok")))
    encoders = [text_encoder(1)] + ([text_encoder(5, projection=True)] if sdxl else [])
    models = BaseModels(unet=unet(3, sdxl=sdxl), scheduler_config=dict(scheduler(prediction_type).config), vae=vae(2),
                        tokenizers=[tok] * len(encoders), text_encoders=encoders, name="tiny")
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return models, ImageEncoder(image_encoder(4), proc, name="tiny-clip")


COLOURS = [(230, 40, 40), (40, 200, 60), (40, 60, 230), (230, 220, 40), (200, 40, 200), (40, 200, 200)]
WORDS = ["red", "green", "blue", "yellow", "magenta", "cyan"]


def write_images(folder: Path, n: int, *, size: tuple[int, int] = (24, 20), id_dim: int = 0, seed: int = 0,
                 corrupt: int = 0, missing: int = 0, manifest: str = "data.jsonl") -> Path:
    """n coloured images (a square on a colour) + a JSONL manifest; `corrupt`/`missing` bad entries appended."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        c = i % len(COLOURS)
        arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(COLOURS[c], np.uint8)
        y, x = rng.integers(0, size[1] - 8), rng.integers(0, size[0] - 8)
        arr[y : y + 8, x : x + 8] = 255 - arr[y, x]
        Image.fromarray(arr).save(folder / f"img{i}.png")
        entry = {"image_file": f"img{i}.png", "text": f"a {WORDS[c]} square"}
        if id_dim:
            np.save(folder / f"id{i}.npy", rng.standard_normal(id_dim).astype(np.float32))
            entry["id_embed_file"] = f"id{i}.npy"
        lines.append(entry)
    for j in range(corrupt):
        (folder / f"bad{j}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        lines.append({"image_file": f"bad{j}.png", "text": "broken", **({"id_embed_file": "id0.npy"} if id_dim else {})})
    for j in range(missing):
        lines.append({"image_file": f"missing{j}.png", "text": "gone", **({"id_embed_file": "id0.npy"} if id_dim else {})})
    path = folder / manifest
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    return path


def write_shards(folder: Path, n: int, per_shard: int, *, corrupt_every: int = 0) -> str:
    """img2dataset-style tar shards: {key}.jpg, {key}.txt, {key}.json."""
    import io
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                key = f"{i:09d}"
                buf = io.BytesIO()
                Image.new("RGB", (20, 18), COLOURS[i % 6]).save(buf, format="JPEG")
                data = buf.getvalue() if not (corrupt_every and i % corrupt_every == corrupt_every - 1) else b"garbage"
                members = {f"{key}.jpg": data, f"{key}.txt": f"a {WORDS[i % 6]} image".encode(),
                           f"{key}.json": json.dumps({"key": key, "caption": f"a {WORDS[i % 6]} image"}).encode()}
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / ("{00000..%05d}.tar" % ((n - 1) // per_shard)))


def reset_accelerate() -> None:
    """accelerate keeps process-wide state (mixed precision, ...); tests that build Accelerators start clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
