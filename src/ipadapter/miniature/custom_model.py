"""A "custom model" of the miniature world: the base UNet fine-tuned with a LoRA on the "two-tone" style.

The paper (Sec. 4.3.1) claims an IP-Adapter trained on a base model is reusable, without retraining, on custom models
fine-tuned from that base. This module builds such a custom model in miniature: a peft LoRA on the frozen shipped
UNet, trained on two-tone scenes with the base recipe's loss (epsilon MSE, DDPM schedule, offset noise, 10% empty
captions), saved in diffusers' LoRA format so `StableDiffusionPipeline.load_lora_weights` loads it. `style_check`
shows the style; `reuse_check` measures whether a base adapter still carries the reference's attributes on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ipadapter.atomic import replacing, save_png, save_safetensors, save_torch, write_text
from ipadapter.miniature import base_model
from ipadapter.miniature.runloop import TrainRun, log, size_mb
from ipadapter.miniature.world import PALETTE, Attrs, caption, make_batch, shade

if TYPE_CHECKING:
    from peft import LoraConfig

STYLE = "two-tone"
LORA_DIR = "custom_lora"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Attention projections (how the text steers the image) and the ResNet convolutions (where colours are painted,
# including the 16x16 blocks that have no attention).
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def lora_config(rank: int = 8) -> LoraConfig:
    """LoRA with alpha = rank (scale 1), initialised as diffusers' LoRA training scripts do (B = 0: no change)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGET_MODULES), init_lora_weights="gaussian")


def save_lora(unet: torch.nn.Module, folder: str | Path) -> Path:
    """The UNet's LoRA in diffusers' format (`unet.`-prefixed peft keys + the LoraConfig as metadata), atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    path = Path(folder) / LORA_WEIGHT_NAME
    with replacing(path) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp.parent, unet_lora_layers=state, weight_name=tmp.name, safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
    return path


@torch.no_grad()
def build_style_cache(out_dir: str | Path, pipeline_dir: str | Path, n: int = 4096, seed: int = 5) -> Path:
    """Encode `n` two-tone training scenes once with the pipeline's own VAE and text encoder (as `build_cache`
    does for the base UNet): scaled latent means, text states, and the empty caption's states."""
    from diffusers import StableDiffusionPipeline

    path = Path(out_dir) / "custom_cache.pt"
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    images, attrs = make_batch(seed, n, style=STYLE)
    cache = base_model.encode_scenes(pipe.vae, pipe.text_encoder, pipe.tokenizer, images, attrs, "custom cache")
    save_torch(cache, path)
    log.info("custom cache: %d pairs, latents std %.3f, saved to %s", n, cache["latents"].std().item(), path)
    return path


def train_custom(
    out_dir: str | Path,
    pipeline_dir: str | Path,
    cache_path: str | Path,
    steps: int = 700,
    seed: int = 6,
    batch: int = 32,
    lr: float = 2e-3,
    rank: int = 8,
    offset_noise: float = 0.2,
    resume: bool = False,
    name: str = "custom",
) -> Path:
    """LoRA on the frozen UNet of `pipeline_dir`, the base recipe's loss on the style cache; saves
    `out_dir/custom_lora/pytorch_lora_weights.safetensors` and returns its path."""
    from diffusers import UNet2DConditionModel

    out = Path(out_dir)
    cache = torch.load(cache_path, map_location="cpu", weights_only=True)
    latents, text, empty = cache["latents"], cache["text"], cache["empty"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet", dtype=torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    run = TrainRun(out, name, steps, {"unet": unet}, optimizer, resume=resume)
    trainable = sum(p.numel() for p in params)
    log.info("%s: %d LoRA parameters (rank %d) on a %d-parameter UNet, %d cached pairs", name, trainable, rank,
             sum(p.numel() for p in unet.parameters()) - trainable, len(latents))
    noise_scheduler = base_model.training_scheduler()
    unet.train()
    for step in range(run.start_step, steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss = base_model.diffusion_loss(unet, noise_scheduler, latents, text, empty, batch, g, offset_noise)
        run.optimize(step, loss, lr, params)
        run.step_done(step + 1, loss.item())
    path = save_lora(unet, out / LORA_DIR)
    log.info("%s: LoRA saved to %s (final loss %.4f, %.1f min)", name, path, run.last_loss, run.elapsed_s() / 60)
    return path


def export_custom(out: str | Path, assets_dir: str | Path) -> float:
    """Write the trained LoRA as fp16 into `assets_dir/custom_lora/` (metadata kept); returns its size in MB."""
    from safetensors import safe_open

    from ipadapter.errors import IPAdapterError

    source = Path(out) / LORA_DIR / LORA_WEIGHT_NAME
    if not source.is_file():
        raise IPAdapterError(
            f"Cannot export the custom LoRA: {source} is missing; run `ipadapter miniature train custom`."
        )
    with safe_open(source, "pt") as f:
        tensors = {k: f.get_tensor(k).half() for k in f.keys()}
        metadata = f.metadata()
    target = save_safetensors(tensors, Path(assets_dir) / LORA_DIR / LORA_WEIGHT_NAME, metadata=metadata)
    return size_mb(target)


def load_base(pipeline_dir: str | Path, lora: str | Path | None = None, lora_scale: float = 1.0) -> Any:
    """The miniature pipeline (fp32, CPU, quiet), with `lora` fused into it when given: the custom model."""
    from ipadapter.pipelines import fuse_base_lora, load_pipeline

    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return fuse_base_lora(pipe, lora, lora_scale) if lora is not None else pipe


def two_tone_score(images: np.ndarray, attrs: Sequence[Attrs], tolerance: float = 40.0) -> float:
    """How two-tone the objects of images of the scenes `attrs` look, from -1 to 1: the object's pixels are those
    near its colour or near its shade (RGB distance < `tolerance`); the score is the fraction of them near the
    shade in the lower half of their bounding box minus that in the upper half, averaged over the images with an
    object. Drawn two-tone scenes score ~1, plain ones 0; a washed-out blob is as pale above as below, so ~0."""
    scores = []
    for image, a in zip(images.astype(np.float32), attrs):
        colour = np.array(PALETTE[a.colour], dtype=np.float32)
        shaded = np.linalg.norm(image - shade(colour), axis=-1) < tolerance
        near = shaded | (np.linalg.norm(image - colour, axis=-1) < tolerance)
        if near.sum() < 4:
            continue
        rows = np.flatnonzero(near.any(axis=1))
        lower = np.arange(image.shape[0])[:, None] >= (rows[0] + rows[-1] + 2) // 2
        below, above = near & lower, near & ~lower
        scores.append((shaded[below].mean() if below.any() else 0.0) - (shaded[above].mean() if above.any() else 0.0))
    return float(np.mean(scores)) if scores else 0.0


def _grid(columns: dict[str, np.ndarray], count: int = 16):
    """Titled columns of [N, 64, 64, 3] images, `count` rows (the evaluation's one grid helper)."""
    from PIL import Image

    from ipadapter.evaluate.grid import image_grid

    return image_grid([(title, [Image.fromarray(a) for a in arrays[:count]]) for title, arrays in columns.items()])


def style_check(
    pipeline_dir: str | Path, lora: str | Path, judge_dir: str | Path, out_png: str | Path | None = None,
    n: int = 32, seed: int = 779, steps: int = 25, guidance: float = 5.0, scales: Sequence[float] = (1.0, 2.0, 3.0),
) -> dict:
    """Text-to-image on the base and on the custom model at each LoRA `scales` (same captions, same seed): the
    two-tone score (the style) and the judge's accuracy (the text still followed); `out_png` gets rows drawn
    columns drawn plain / drawn two-tone / base / custom at each scale."""
    from ipadapter.miniature.judge import Judge

    styled, attrs = make_batch(seed, n, split="train", style=STYLE)
    plain, _ = make_batch(seed, n, split="train")
    prompts = [caption(a) for a in attrs]
    judge = Judge.load(judge_dir)
    report: dict = {"n": n, "ddim_steps": steps, "guidance": guidance,
                    "drawn": {"plain": two_tone_score(plain, attrs), "two_tone": two_tone_score(styled, attrs)}}
    columns = {"drawn plain": plain, "drawn two-tone": styled}
    for label, scale in (("base", None), *((f"custom x{s:g}", s) for s in scales)):
        pipe = load_base(pipeline_dir) if scale is None else load_base(pipeline_dir, lora, scale)
        images = base_model.sample(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
        report[label] = {"two_tone": two_tone_score(images, attrs), "accuracy": judge.accuracy(images, attrs)}
        log.info("style check %s: %s", label, report[label])
        columns[label] = images
    if out_png is not None:
        save_png(_grid(columns), out_png)
    return report


def reuse_check(
    adapter_path: str | Path, pipeline_dir: str | Path, lora: str | Path, judge_dir: str | Path,
    out_png: str | Path | None = None, n: int = 32, seed: int = 4242, scale: float = 1.0, steps: int = 25,
    guidance: float = 5.0,
) -> dict:
    """Image-only generations from `n` held-out references with the same base adapter on the base and on the
    custom model (no retraining): judge agreement with each reference's attributes, and the two-tone score."""
    from PIL import Image

    from ipadapter.checkpoint import load_adapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.miniature.judge import Judge
    from ipadapter.prompter import ImagePrompter

    references, attrs = make_batch(seed, n, split="heldout")
    styled, _ = make_batch(seed, n, split="heldout", style=STYLE)
    judge = Judge.load(judge_dir)
    encoder = ImageEncoder.from_pretrained(str(pipeline_dir), subfolder="image_encoder")
    # The judge reads the same scenes drawn two-tone less well: the bound for the custom model's generations.
    report: dict = {"adapter": str(adapter_path), "n": n, "scale": scale, "ddim_steps": steps, "guidance": guidance,
                    "references": {"accuracy": judge.accuracy(references, attrs)},
                    "references_two_tone": {"accuracy": judge.accuracy(styled, attrs)}}
    samples = {}
    for label, lora_path in (("base", None), ("custom", lora)):
        pipe = load_base(pipeline_dir, lora_path)
        prompter = ImagePrompter(pipe, load_adapter(str(adapter_path), pipe.unet), encoder)
        images = [prompter.generate([Image.fromarray(r)], scale=scale, steps=steps, guidance=guidance, seed=seed + i)[0]
                  for i, r in enumerate(references)]
        prompter.detach()
        samples[label] = np.stack([np.asarray(im.convert("RGB")) for im in images])
        report[label] = {"accuracy": judge.accuracy(samples[label], attrs),
                         "two_tone": two_tone_score(samples[label], attrs)}
        log.info("reuse check %s: %s", label, report[label])
    if out_png is not None:
        save_png(_grid({"reference": references, "base model": samples["base"], "custom model": samples["custom"]}),
                 out_png)
    return report


def base_pipeline(out: Path) -> Path:
    """The pipeline a LoRA is trained for: the run folder's own `out/pipeline` when it has one, else the shipped one."""
    from ipadapter import bundled

    own = out / "pipeline"
    return own if (own / "model_index.json").is_file() else bundled.pipeline_path()


def evaluate(out: Path, lora: Path) -> dict:
    """Both checks of the LoRA `lora` on its pipeline, the reuse one with that pipeline's base adapter (the run
    folder's, else the shipped one, when present) -> `out/custom_eval.json`, `out/custom_check.png`,
    `out/custom_reuse.png`."""
    from ipadapter import bundled

    pipeline_dir, judge_dir = base_pipeline(out), bundled.judge_path()
    report = {"style": style_check(pipeline_dir, lora, judge_dir, out / "custom_check.png")}
    own = out / "adapter-base" / "adapter.ipadapter.safetensors"
    adapter = own if pipeline_dir == out / "pipeline" else bundled.ASSETS_DIR / "adapters" / "base.safetensors"
    if adapter.is_file():
        report["reuse"] = reuse_check(adapter, pipeline_dir, lora, judge_dir, out / "custom_reuse.png")
    write_text(out / "custom_eval.json", json.dumps(report, indent=2))
    return report


def run(out: Path, steps: int, resume: bool) -> Path:
    """The `custom` recipe on `base_pipeline(out)`: style cache (once), LoRA training, then `evaluate`."""
    pipeline_dir = base_pipeline(out)
    cache = out / "custom_cache.pt"
    if not cache.exists():
        build_style_cache(out, pipeline_dir)
    lora = train_custom(out, pipeline_dir, cache, steps=steps, resume=resume)
    evaluate(out, lora)
    return lora
