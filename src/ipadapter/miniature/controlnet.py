"""The miniature ControlNet: the object's mask (white on black) decides where and how large the object is drawn.

A trainable copy of the miniature UNet's encoder (`ControlNetModel.from_unet`) whose conditioning embedding has
three channel entries, i.e. two stride-2 convolutions, so a 64x64 mask lands on the 16x16 latent grid. It trains
on the frozen pipeline with the UNet's own objective (epsilon MSE on the DDPM schedule, offset noise). Its captions
leave out what the mask decides (shape, size, position): the base model follows those words, so with full captions
the text alone explains the layout and the ControlNet learns to add nothing. Text is also dropped often enough that
it works with an empty prompt, where an image prompt replaces the text. The
IP-Adapter's processors sit on the UNet only; the ControlNet never sees image tokens.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ipadapter.atomic import replacing_folder, save_torch
from ipadapter.errors import IPAdapterError
from ipadapter.miniature import tokenizer as tok
from ipadapter.miniature.base_model import encode_scenes, noisy_batch, training_scheduler
from ipadapter.miniature.runloop import TrainRun, log, size_mb
from ipadapter.miniature.world import (
    POSITIONS, SIZE_PX, SIZES, Attrs, caption, draw_with_mask, make_masked_batch, mask_image, partial_caption,
)

CONDITIONING_CHANNELS = (16, 32, 64)
TEXT_SLOTS = frozenset({"colour", "bg_colour", "pattern"})  # what the caption names; the mask gives the rest
TEXT_DROP = 0.15
CACHE_NAME = "controlnet_cache.pt"


def build_controlnet(unet, channels: tuple[int, ...] = CONDITIONING_CHANNELS):
    """Encoder copy of `unet`; len(channels) - 1 stride-2 convolutions take the mask from image to latent size."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)


def mask_condition(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 masks [N, 64, 64] -> [N, 3, 64, 64] in [0, 1]: what the ControlNet pipeline makes of a mask PNG."""
    m = torch.as_tensor(masks).float() / 255.0
    return m[:, None].expand(-1, 3, -1, -1)


def mask_u8(masks: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] -> the 8-bit values a saved mask PNG holds, so training sees exactly what users give."""
    return (np.clip(masks, 0, 1) * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def build_cache(out_dir: str | Path, pipeline_dir: str | Path, n: int = 4096, seed: int = 5) -> Path:
    """Encode `n` training scenes once with the pipeline's own VAE and text encoder, plus their masks (uint8)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    path = Path(out_dir) / CACHE_NAME
    pipeline_dir = Path(pipeline_dir)
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder").eval()
    tokenizer = tok.load_tokenizer(pipeline_dir / "tokenizer")
    images, masks, attrs = make_masked_batch(seed, n)
    cache = encode_scenes(vae, text_encoder, tokenizer, images, attrs, "controlnet cache",
                          describe=lambda a: partial_caption(a, TEXT_SLOTS))
    cache["masks"] = torch.from_numpy(mask_u8(masks))
    save_torch(cache, path)
    log.info("controlnet cache: %d scenes saved to %s", n, path)
    return path


def train_controlnet(
    out_dir: str | Path,
    cache_path: str | Path,
    pipeline_dir: str | Path,
    steps: int = 400,
    seed: int = 6,
    batch: int = 64,
    lr: float = 5e-4,
    offset_noise: float = 0.2,
    text_drop: float = TEXT_DROP,
    channels: tuple[int, ...] = CONDITIONING_CHANNELS,
    resume: bool = False,
    name: str = "controlnet",
):
    """Only the ControlNet learns; the UNet is the pipeline's, frozen. Same noise as `train_unet` (offset noise
    included) so the frozen UNet sees inputs like those it was trained on. Saves `out_dir/name/`."""
    from diffusers import UNet2DConditionModel

    out = Path(out_dir)
    cache = torch.load(cache_path, map_location="cpu", weights_only=True)
    latents, text, empty, masks = cache["latents"], cache["text"], cache["empty"], cache["masks"]
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_dir) / "unet").eval().requires_grad_(False)
    torch.manual_seed(seed)
    controlnet = build_controlnet(unet, channels)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=0.01)
    run = TrainRun(out, name, steps, {"controlnet": controlnet}, optimizer, resume=resume)
    log.info("%s: %d parameters, %d cached scenes", name, sum(p.numel() for p in controlnet.parameters()), len(latents))
    noise_scheduler = training_scheduler()
    controlnet.train()
    for step in range(run.start_step, steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx, noisy, t, cond, noise = noisy_batch(noise_scheduler, latents, text, empty, batch, g, offset_noise, text_drop)
        down, mid = controlnet(noisy, t, encoder_hidden_states=cond, controlnet_cond=mask_condition(masks[idx]),
                               return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, noise)
        run.optimize(step, loss, lr, controlnet.parameters())
        run.step_done(step + 1, loss.item())
    controlnet.eval()
    final = out / name
    controlnet.save_pretrained(final)
    log.info("%s: saved to %s (final loss %.4f, %.1f min)", name, final, run.last_loss, run.elapsed_s() / 60)
    return controlnet


def run(out: Path, steps: int, resume: bool, batch: int = 64, cache_n: int = 8192) -> dict | None:
    """The `controlnet` recipe: cache 8,192 scenes once, train on the frozen `out/pipeline/`, then evaluate
    when the judge exists. Returns the evaluation report (None without a judge)."""
    from ipadapter.miniature import judge

    pipeline_dir = out / "pipeline"
    if not (pipeline_dir / "model_index.json").is_file():
        raise IPAdapterError(f"Recipe 'controlnet' needs {pipeline_dir}; run `ipadapter miniature train unet` first.")
    cache = out / CACHE_NAME
    if not cache.exists():
        build_cache(out, pipeline_dir, n=cache_n)
    train_controlnet(out, cache, pipeline_dir, steps=steps, batch=batch, resume=resume)
    if (out / "judge" / judge.CLASSIFIER_WEIGHTS).exists():
        return evaluate_controlnet(out)
    return None


def controlnet_pipeline(pipeline_dir: str | Path, controlnet_dir: str | Path):
    """The miniature `StableDiffusionControlNetPipeline` in fp32, built as `ipadapter generate --controlnet` builds it."""
    from diffusers import StableDiffusionPipeline

    from ipadapter.pipelines import add_controlnet

    pipe = add_controlnet(StableDiffusionPipeline.from_pretrained(pipeline_dir, dtype=torch.float32), controlnet_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _foreground(image: np.ndarray, attrs: Attrs) -> np.ndarray:
    """Pixels nearer the object's palette colour than to the background colour or its pattern shade."""
    from ipadapter.miniature.world import PALETTE, shade

    bg = np.array(PALETTE[attrs.bg_colour], np.float32)
    centres = np.stack([np.array(PALETTE[attrs.colour], np.float32), bg, shade(bg)])
    dist = ((image.astype(np.float32)[..., None, :] - centres) ** 2).sum(-1)
    return dist.argmin(-1) == 0


def mask_iou(image: np.ndarray, mask: np.ndarray, attrs: Attrs) -> float:
    """IoU of the given mask (coverage > 0.5) with the generated image's object-coloured pixels."""
    target, found = mask > 0.5, _foreground(image, attrs)
    union = (target | found).sum()
    return float((target & found).sum() / union) if union else 0.0


def evaluate_controlnet(out: Path, n: int = 24, steps: int = 25, guidance: float = 5.0, seed: int = 900) -> dict:
    """How well generations follow a mask drawn from *another* scene, with and without the ControlNet, for image
    prompts (held-out references, shipped base adapter, empty text) and for text prompts -> controlnet_eval.json.

    Scores against the mask's scene: judge position and size accuracy, mean IoU of mask and object-coloured
    pixels, and the fraction with IoU >= 0.5. Writes `controlnet_samples.png` (reference | mask | with | without).
    """
    from PIL import Image

    from ipadapter.checkpoint import load_adapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.atomic import save_png, write_text
    from ipadapter.evaluate.grid import image_grid
    from ipadapter.miniature import judge
    from ipadapter.prompter import ImagePrompter
    from ipadapter.sources import miniature_adapter

    pipe = controlnet_pipeline(out / "pipeline", out / "controlnet")
    scorer = judge.Judge.load(out / "judge", clip_dir=out / "judge_clip")
    refs, _, ref_attrs = make_masked_batch(seed, n, "heldout")
    targets, masks = _moved(ref_attrs, np.random.default_rng(seed + 1))
    controls = [mask_image(m).convert("RGB") for m in masks]
    adapter = load_adapter(miniature_adapter().source, pipe.unet)
    encoder = ImageEncoder.from_pretrained(out / "pipeline", subfolder="image_encoder")
    prompter = ImagePrompter(pipe, adapter, encoder)
    gen = {"steps": steps, "guidance": guidance, "width": SIZE_PX, "height": SIZE_PX, "output_type": "np"}
    report: dict = {"n": n, "ddim_steps": steps, "guidance": guidance}
    samples = {}
    for mode in ("image", "text"):
        for scale in (1.0, 0.0):
            images = []
            for i in range(n):
                kwargs = dict(image=controls[i], controlnet_conditioning_scale=scale, seed=seed + i, **gen)
                if mode == "image":
                    out_i = prompter.generate([Image.fromarray(refs[i])], prompt="", scale=1.0, **kwargs)
                else:
                    out_i = prompter.generate(None, prompt=caption(targets[i]), **kwargs)
                images.append(out_i[0])
            images = (np.clip(np.stack(images), 0, 1) * 255 + 0.5).astype(np.uint8)
            samples[(mode, scale)] = images
            report[f"{mode}_prompt_controlnet_{scale:g}"] = _scores(scorer, images, masks, targets, ref_attrs)
            log.info("controlnet eval %s prompt, control scale %g: %s", mode, scale,
                     report[f"{mode}_prompt_controlnet_{scale:g}"])
    prompter.detach()
    write_text(out / "controlnet_eval.json", json.dumps(report, indent=2))
    columns = [("reference", refs), ("mask", mask_u8(masks)), ("with ControlNet", samples[("image", 1.0)]),
               ("without", samples[("image", 0.0)])]
    save_png(image_grid([(title, [Image.fromarray(a) for a in arrays]) for title, arrays in columns]),
             out / "controlnet_samples.png")
    return report


def _moved(refs: list[Attrs], rng: np.random.Generator) -> tuple[list[Attrs], np.ndarray]:
    """Each reference's scene at another position (never its own, so copying the reference's layout scores as a
    miss) and a random size, and the masks of those scenes: what the generations should show."""
    targets = []
    for r in refs:
        position = r.position
        while position == r.position:
            position = POSITIONS[rng.integers(len(POSITIONS))]
        targets.append(replace(r, position=position, size=SIZES[rng.integers(len(SIZES))]))
    return targets, np.stack([draw_with_mask(t, rng)[1] for t in targets])


def _scores(scorer, images: np.ndarray, masks: np.ndarray, targets: list[Attrs], refs: list[Attrs]) -> dict:
    predicted = scorer.predict(images)
    ious = [mask_iou(im, m, t) for im, m, t in zip(images, masks, targets)]
    return {
        "position": float(np.mean([p["position"] == t.position for p, t in zip(predicted, targets)])),
        "size": float(np.mean([p["size"] == t.size for p, t in zip(predicted, targets)])),
        "position_of_reference": float(np.mean([p["position"] == r.position for p, r in zip(predicted, refs)])),
        "colour": float(np.mean([p["colour"] == t.colour for p, t in zip(predicted, targets)])),
        "shape": float(np.mean([p["shape"] == t.shape for p, t in zip(predicted, targets)])),
        "mask_iou": float(np.mean(ious)),
        "iou_at_least_0.5": float(np.mean([v >= 0.5 for v in ious])),
    }


def export_controlnet(out: Path, assets_dir: Path) -> float:
    """fp16 safetensors of `out/controlnet/` into `assets_dir/controlnet/`; returns its size in MB (2**20 bytes).

    Written beside the target and swapped in, so a failed export leaves the previous asset in place.
    """
    from diffusers import ControlNetModel

    source = out / "controlnet"
    if not (source / "config.json").is_file():
        raise IPAdapterError(f"Cannot export: {source} is missing; run `ipadapter miniature train controlnet` first.")
    target = assets_dir / "controlnet"
    model = ControlNetModel.from_pretrained(source, dtype=torch.float32).half()
    with replacing_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    size = size_mb(target)
    log.info("controlnet exported to %s: %.2f MB", target, size)
    return size
