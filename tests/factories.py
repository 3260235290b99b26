"""The tests' tiny models and files (nothing is downloaded).

Two sizes: the generation and parity models (SD 1.5 / SDXL block layouts, published-layout adapter state dicts,
whole pipelines), and below them the smaller training-size models, pipeline folders and datasets; at the end,
`calls_of`, which counts a module's calls (how often a projection ran).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from ipadapter.layers import attention_layers

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

    from ipadapter.train import TrainConfig

SD15_CROSS = 32
SDXL_CROSS = 64


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.5's block layout (3 cross-attention down blocks, 2 layers each; mid; 3 cross-attention up blocks)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=SD15_CROSS, attention_head_dim=8, norm_num_groups=16,
    ).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's layout: no attention in the first block, several transformer blocks per attention, text_time cond."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
        cross_attention_dim=SDXL_CROSS, norm_num_groups=16,
    ).eval()


def sdxl_added_cond(batch: int) -> dict[str, torch.Tensor]:
    return {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)}


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.05


def _perceiver(prefix: str, in_dim: int, dim: int, out_dim: int, depth: int, heads: int, latents: int | None) -> dict:
    sd = {}
    if latents:
        sd[f"{prefix}latents"] = torch.randn(1, latents, dim) / dim**0.5
    sd[f"{prefix}proj_in.weight"], sd[f"{prefix}proj_in.bias"] = _rand(dim, in_dim), _rand(dim)
    sd[f"{prefix}proj_out.weight"], sd[f"{prefix}proj_out.bias"] = _rand(out_dim, dim), _rand(out_dim)
    sd[f"{prefix}norm_out.weight"], sd[f"{prefix}norm_out.bias"] = 1 + _rand(out_dim), _rand(out_dim)
    inner = heads * 64
    for l in range(depth):
        p = f"{prefix}layers.{l}."
        for n in ("norm1", "norm2"):
            sd[p + f"0.{n}.weight"], sd[p + f"0.{n}.bias"] = 1 + _rand(dim), _rand(dim)
        sd[p + "0.to_q.weight"], sd[p + "0.to_kv.weight"] = _rand(inner, dim) * 4, _rand(2 * inner, dim) * 4
        sd[p + "0.to_out.weight"] = _rand(dim, inner) * 4
        sd[p + "1.0.weight"], sd[p + "1.0.bias"] = 1 + _rand(dim), _rand(dim)
        sd[p + "1.1.weight"], sd[p + "1.3.weight"] = _rand(4 * dim, dim) * 4, _rand(dim, 4 * dim) * 4
    return sd


def image_proj_state(family: str, cross: int, *, embed_dim: int = 24, patch_dim: int = 40, id_dim: int = 16) -> dict:
    """A published-layout `image_proj` state dict of the given family, random weights."""
    if family == "base":
        return {"proj.weight": _rand(4 * cross, embed_dim) * 8, "proj.bias": _rand(4 * cross),
                "norm.weight": 1 + _rand(cross), "norm.bias": _rand(cross)}
    if family == "full":
        return {"proj.0.weight": _rand(patch_dim, patch_dim) * 4, "proj.0.bias": _rand(patch_dim),
                "proj.2.weight": _rand(cross, patch_dim) * 4, "proj.2.bias": _rand(cross),
                "proj.3.weight": 1 + _rand(cross), "proj.3.bias": _rand(cross)}
    if family == "plus":
        return _perceiver("", patch_dim, 64, cross, depth=4, heads=1, latents=16)
    if family in ("faceid", "faceid-portrait"):
        tokens = 16 if family == "faceid-portrait" else 4
        return {"proj.0.weight": _rand(2 * id_dim, id_dim) * 4, "proj.0.bias": _rand(2 * id_dim),
                "proj.2.weight": _rand(tokens * cross, 2 * id_dim) * 4, "proj.2.bias": _rand(tokens * cross),
                "norm.weight": 1 + _rand(cross), "norm.bias": _rand(cross)}
    if family in ("faceid-plus", "faceid-plusv2"):
        sd = {"proj.0.weight": _rand(2 * id_dim, id_dim) * 4, "proj.0.bias": _rand(2 * id_dim),
              "proj.2.weight": _rand(4 * cross, 2 * id_dim) * 4, "proj.2.bias": _rand(4 * cross),
              "norm.weight": 1 + _rand(cross), "norm.bias": _rand(cross)}
        sd.update(_perceiver("perceiver_resampler.", patch_dim, cross, cross, depth=4, heads=max(1, cross // 64), latents=None))
        return sd
    raise ValueError(family)


def ip_adapter_state(unet: UNet2DConditionModel, *, lora_rank: int = 0, seed: int = 1) -> dict:
    """Published-layout `ip_adapter` weights ("{index}.to_k_ip.weight", optional "{index}.to_q_lora...")."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer in attention_layers(unet):
        if layer.cross:
            for k in ("to_k_ip", "to_v_ip"):
                sd[f"{layer.index}.{k}.weight"] = torch.randn(layer.width, layer.cross_dim, generator=g) * 0.2
        if lora_rank:
            kv_in = layer.cross_dim if layer.cross else layer.width
            for k, (i, o) in {"to_q": (layer.width, layer.width), "to_k": (kv_in, layer.width),
                              "to_v": (kv_in, layer.width), "to_out": (layer.width, layer.width)}.items():
                sd[f"{layer.index}.{k}_lora.down.weight"] = torch.randn(lora_rank, i, generator=g) * 0.1
                sd[f"{layer.index}.{k}_lora.up.weight"] = torch.randn(o, lora_rank, generator=g) * 0.1
    return sd


def published(unet: UNet2DConditionModel, family: str, cross: int, lora_rank: int = 0, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    return {"image_proj": image_proj_state(family, cross), "ip_adapter": ip_adapter_state(unet, lora_rank=lora_rank, seed=seed)}


def tiny_tokenizer(folder) -> "CLIPTokenizer":
    """A character-level CLIPTokenizer (16 positions) written to `folder` and read back (no download)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tokenizer(Path(folder), max_length=16)))


def tiny_text_encoder(hidden: int, seed: int = 0, projection: int | None = None, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=80, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def tiny_image_encoder(seed: int = 0, projection_dim: int = 24, hidden: int = 40):
    """CLIPVisionModelWithProjection at 32 px, patch 8 → 17 tokens; global dim 24, patch width 40."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=projection_dim)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32).eval()


def tiny_sd15_pipeline(tmp_path):
    """A StableDiffusionPipeline with the SD-1.5 block layout at toy sizes (32 px images, 16x16 latents)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    pipe = StableDiffusionPipeline(
        unet=sd15_unet(), vae=tiny_vae(), text_encoder=tiny_text_encoder(SD15_CROSS), tokenizer=tiny_tokenizer(folder),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd15_pipeline(root: Path, adapters: tuple[str, ...] = ("base",)) -> Path:
    """`tiny_sd15_pipeline` saved as `root/pipe` with its image_encoder/ and feature_extractor/, as `from_pretrained`
    reads it, and a published-layout adapter `root/{family}.bin` per family (LoRA rank 4 for FaceID); returns the
    pipeline folder. Shared by the command-line, evaluation and app tests, which load models from disk."""
    pipe = tiny_sd15_pipeline(root)
    encoder, processor = tiny_image_encoder()
    folder = root / "pipe"
    pipe.save_pretrained(folder)
    encoder.save_pretrained(folder / "image_encoder")
    processor.save_pretrained(folder / "feature_extractor")
    for family in adapters:
        state = published(pipe.unet, family, SD15_CROSS, lora_rank=4 if "faceid" in family else 0)
        torch.save(state, root / f"{family}.bin")
    return folder


def tiny_sdxl_pipeline(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    tok = tiny_tokenizer(folder)
    pipe = StableDiffusionXLPipeline(
        unet=sdxl_unet(), vae=tiny_vae(), text_encoder=tiny_text_encoder(32), text_encoder_2=tiny_text_encoder(32, 1, 32),
        tokenizer=tok, tokenizer_2=tok, scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"),
        image_encoder=None, feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(seed: int = 0, size: int = 48):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


# ---- training-size models, pipeline folders and datasets ---------------------------------------------------
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CROSS = 32
RES = 16  # pixels: VAE ÷2, UNet ÷2 → resolution must be a multiple of 4


def write_tokenizer(folder: Path, max_length: int = 8) -> Path:
    """A character-level CLIP tokenizer folder (vocabulary < 80, the tiny text encoders' size)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!"
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


def write_base(folder: Path, *, sdxl: bool = False, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A diffusers pipeline folder with tiny random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    unet(3 + seed, sdxl=sdxl).save_pretrained(folder / "unet")
    tiny_vae(2 + seed).save_pretrained(folder / "vae")
    scheduler(prediction_type).save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer")
    tiny_text_encoder(CROSS, 1 + seed).save_pretrained(folder / "text_encoder")
    if sdxl:
        write_tokenizer(folder / "tokenizer_2")
        tiny_text_encoder(CROSS, 5 + seed, projection=CROSS).save_pretrained(folder / "text_encoder_2")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def write_image_encoder(folder: Path, seed: int = 4, *, processor: bool = True) -> Path:
    from transformers import CLIPImageProcessor

    tiny_image_encoder(seed)[0].save_pretrained(folder)
    if processor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def in_memory(*, sdxl: bool = False, prediction_type: str = "epsilon"):
    """(BaseModels, ImageEncoder) without touching disk."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    import tempfile

    from ipadapter.encoders import ImageEncoder
    from ipadapter.train.models import BaseModels

    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(Path(tmp) / "tok")))
    encoders = [tiny_text_encoder(CROSS, 1)] + ([tiny_text_encoder(CROSS, 5, projection=CROSS)] if sdxl else [])
    models = BaseModels(unet=unet(3, sdxl=sdxl), scheduler_config=dict(scheduler(prediction_type).config), vae=tiny_vae(2),
                        tokenizers=[tok] * len(encoders), text_encoders=encoders, name="tiny")
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return models, ImageEncoder(tiny_image_encoder(4)[0], proc, name="tiny-clip")


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


def train_config(tmp_path: Path, data, **overrides) -> TrainConfig:
    """A short training run on `data` into tmp_path/out, on this file's tiny models: 2 steps of 2 samples, no
    checkpoint before the last step, decoding in the main thread."""
    from ipadapter.train import TrainConfig

    values = dict(data=str(data), output=str(tmp_path / "out"), resolution=RES, batch_size=2, max_steps=2,
                  save_every=1000, num_workers=0, seed=0)
    return TrainConfig(**{**values, **overrides})


def poison_micro_batches(monkeypatch, poisoned: Callable[[int], bool]) -> dict[str, int]:
    """Training inputs whose latents are NaN at the micro-batches `poisoned(n)` picks (n counts from 1), so that
    their steps are non-finite; returns the count of micro-batches made, as {"n": ...}."""
    from ipadapter.train import step

    real, calls = step.step_inputs, {"n": 0}

    def inputs(run, batch):
        latents, text, features, added = real(run, batch)
        calls["n"] += 1
        if poisoned(calls["n"]):
            latents = torch.full_like(latents, float("nan"))
        return latents, text, features, added

    monkeypatch.setattr(step, "step_inputs", inputs)
    return calls


def write_tar(path: Path, members: dict[str, bytes | None]) -> Path:
    """A tar of the members in order; a None payload is a folder entry."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def write_shards(folder: Path, n: int, per_shard: int, *, corrupt_every: int = 0) -> str:
    """img2dataset-style tar shards: {key}.jpg, {key}.txt, {key}.json."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        members: dict[str, bytes | None] = {}
        for i in range(s, min(n, s + per_shard)):
            key = f"{i:09d}"
            buf = io.BytesIO()
            Image.new("RGB", (20, 18), COLOURS[i % 6]).save(buf, format="JPEG")
            data = buf.getvalue() if not (corrupt_every and i % corrupt_every == corrupt_every - 1) else b"garbage"
            members.update({f"{key}.jpg": data, f"{key}.txt": f"a {WORDS[i % 6]} image".encode(),
                            f"{key}.json": json.dumps({"key": key, "caption": f"a {WORDS[i % 6]} image"}).encode()})
        write_tar(folder / f"{s // per_shard:05d}.tar", members)
    return str(folder / ("{00000..%05d}.tar" % ((n - 1) // per_shard)))


def process_with_gpu(monkeypatch, device: str | None) -> None:
    """Stand in for a process of `accelerate launch` on a machine of two GPUs, given `device` (None: no GPU of
    its own)."""
    from ipadapter.batch import launch
    from ipadapter.batch.shards import Shard

    shard = Shard()
    shard.device = device
    monkeypatch.setattr(launch, "current", lambda: shard)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def reset_accelerate() -> None:
    """accelerate keeps process-wide state (mixed precision, ...); tests that build Accelerators start clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---- measuring models of the evaluation tests -----------------------------------------------------------
def tiny_clip(seed: int = 0, image_size: int = 32):
    """A `CLIPModel` whose text tower reads `tiny_tokenizer` ids (vocab 80, 16 positions), 8 px patches."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=80, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(common, image_size=image_size, patch_size=8), projection_dim=24,
    )
    return CLIPModel(config).eval()


def save_judge(folder, image_size: int = 32) -> str:
    """A judge CLIP folder as `ClipJudge.load` reads it (model, tokenizer, image processor)."""
    from transformers import CLIPImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tiny_clip(image_size=image_size).save_pretrained(folder)
    tiny_tokenizer(folder).save_pretrained(folder)
    size = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    CLIPImageProcessor(size=size[0], crop_size=size[1]).save_pretrained(folder)
    return str(folder)


def fake_miniature_assets(root, pipe_dir, adapter_state) -> None:
    """An assets folder laid out as `ipadapter.bundled` expects, with tiny random models (64-px judge)."""
    import shutil

    from safetensors.torch import save_file

    from ipadapter.miniature.judge import CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, AttributeClassifier
    from ipadapter.miniature.world import ATTRIBUTES

    shutil.copytree(pipe_dir, root / "pipeline")
    (root / "adapters").mkdir(parents=True)
    flat = {f"{part}.{k}": v.contiguous() for part, sd in adapter_state.items() for k, v in sd.items()}
    save_file(flat, root / "adapters" / "base.safetensors")
    judge = root / "judge"
    save_judge(judge / "clip", image_size=64)
    torch.manual_seed(0)
    save_file(AttributeClassifier(width=8).state_dict(), judge / CLASSIFIER_WEIGHTS)
    (judge / CLASSIFIER_CONFIG).write_text(json.dumps({"width": 8, "attributes": ATTRIBUTES}))


def save_dino(folder) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).eval().save_pretrained(folder)
    return str(folder)


def write_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """`folder` laid out in the Hugging Face cache `cache` as huggingface_hub keeps a download of `repo`."""
    import shutil

    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def ascii_locale_env() -> dict[str, str]:
    """The environment of a child process whose default text encoding is not UTF-8 (as Windows' cp1252 is not): the C
    locale with Python's coercion and UTF-8 mode off. Checked, since a test under a UTF-8 locale would show nothing."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    probe = subprocess.run([sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
                           env=env, capture_output=True, text=True, check=True)
    assert "utf" not in probe.stdout.lower(), f"the child's locale is {probe.stdout.strip()}: this would show nothing"
    return env


class EncoderAsked(Exception):
    """Raised where `load` would read an image encoder; its args are the (source, subfolder) it asked for."""


def ask_encoder(monkeypatch) -> None:
    """`ipadapter.load` stops at its image encoder (`EncoderAsked`): which one it chose, without loading it."""
    class Asked:
        @staticmethod
        def from_pretrained(source, subfolder=None, **_):
            raise EncoderAsked(source, subfolder)

    monkeypatch.setattr("ipadapter.loading.encoder_class", lambda source, subfolder: Asked)


def hub_without_network(monkeypatch, cache: Path) -> list[str]:
    """Offline mode off and the Hugging Face cache at `cache`, every Hub request recorded, then failed as on a
    machine without network; returns the requests' URLs as they are sent."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    sent: list[str] = []

    def no_network(client, request, **kwargs):
        sent.append(str(request.url))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(type(get_session()), "send", no_network)  # every Hub request goes through it
    return sent


@contextmanager
def calls_of(modules: list[torch.nn.Module]) -> Iterator[list[int]]:
    """A list that grows by one at each call of any of `modules` while the block runs."""
    calls: list[int] = []
    hooks = [module.register_forward_hook(lambda *_: calls.append(1)) for module in modules]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()
