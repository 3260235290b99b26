"""The recipe table: every shipped miniature model is rebuilt by one named function with fixed seeds and sizes.

Order: `clip` and `vae` (independent, can run at once), `judge` (independent), then `unet` (needs clip + vae) and
`decoder` (needs vae; keeps the encoder, so it can run alongside `unet`); whichever of those two ends last assembles
`pipeline/` and evaluates it with the judge. Then `export` (fp16 copies into the package's assets).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ipadapter import bundled
from ipadapter.atomic import replacing_folder
from ipadapter.errors import IPAdapterError
from ipadapter.miniature import adapters, base_model, judge, tiny_clip
from ipadapter.miniature.runloop import log, size_mb

DEFAULT_OUT = Path("runs/miniature")


@dataclass(frozen=True)
class Recipe:
    """`run(out, steps, resume)`; `steps` is the default the shipped weights were trained with."""

    run: Callable[[Path, int, bool], object]
    steps: int
    needs: tuple[str, ...] = ()
    help: str = ""


def _clip(out: Path, steps: int, resume: bool) -> object:
    return tiny_clip.train_clip(out, name="clip", steps=steps, seed=0, batch=64, lr=1e-3, resume=resume)


# The shipped encoder: 3,000 steps, resumed to 6,000 (the cosine schedule restarts at a resume: 5.6e-4 at step
# 3,000, down to 1e-4, so one 6,000-step run would decay differently), then resumed to 9,000 with per-patch read-outs
# added (`tiny_clip.PatchHeads`: Plus's resampler could not see where the object was). (total steps, per-patch).
IMAGE_ENCODER_STAGES = ((3000, False), (6000, False), (9000, True))


def _image_encoder(out: Path, steps: int, resume: bool) -> object:
    stages = IMAGE_ENCODER_STAGES if steps == IMAGE_ENCODER_STAGES[-1][0] else ((steps, True),)
    for i, (total, per_patch) in enumerate(stages):
        encoder = tiny_clip.train_image_encoder(out, out / "clip", steps=total, resume=resume or i > 0,
                                                per_patch=per_patch)
    return encoder


def _vae(out: Path, steps: int, resume: bool) -> object:
    return base_model.train_vae(out, steps=steps, seed=1, batch=16, lr=1e-3, resume=resume)


def _judge(out: Path, steps: int, resume: bool) -> object:
    return judge.train_judge(out, steps=steps, resume=resume)


def _unet(out: Path, steps: int, resume: bool) -> object:
    cache = out / "unet_cache.pt"
    if not cache.exists():
        base_model.build_cache(out, out / "vae")
    base_model.train_unet(out, cache, out / "clip", steps=steps, seed=3, resume=resume)
    return assemble(out)


def _decoder(out: Path, steps: int, resume: bool) -> object:
    base_model.train_vae_decoder(out, steps=steps, seed=4, resume=resume)
    return assemble(out) if (out / "unet" / "config.json").exists() else None


def _controlnet(out: Path, steps: int, resume: bool) -> object:
    from ipadapter.miniature import controlnet

    return controlnet.run(out, steps, resume)


def _custom(out: Path, steps: int, resume: bool) -> object:
    from ipadapter.miniature import custom_model

    return custom_model.run(out, steps, resume)


def assemble(out: Path = DEFAULT_OUT) -> object:
    """`out/pipeline/` from clip + unet + the fine-tuned decoder (plain vae if absent) + the image encoder (the CLIP's
    vision tower if absent); evaluates if the judge exists."""
    vae_dir = out / "vae_decoder" if (out / "vae_decoder" / "config.json").exists() else out / "vae"
    encoder_dir = out / "image_encoder" if (out / "image_encoder" / "config.json").exists() else None
    pipe = base_model.assemble_pipeline(vae_dir, out / "clip", out / "unet", encoder_dir)
    base_model.save_pipeline(pipe, out / "pipeline")
    if (out / "judge" / judge.CLASSIFIER_WEIGHTS).exists():
        evaluate_base(out)
    return pipe


def _adapter(name: str) -> Callable[[Path, int, bool], object]:
    return lambda out, steps, resume: adapters.train_adapter(out, name, steps, resume)


RECIPES: dict[str, Recipe] = {
    "clip": Recipe(_clip, 1200,
                   help="tiny CLIP: the pipeline's text encoder (image-encoder trains against its text tower)"),
    "image-encoder": Recipe(_image_encoder, IMAGE_ENCODER_STAGES[-1][0], needs=("clip",),
                            help="the adapters' image encoder (4 px patches) against the frozen text tower"),
    "vae": Recipe(_vae, 2000, help="tiny AutoencoderKL, 64x64x3 <-> 16x16x8"),
    "judge": Recipe(_judge, 500, help="judge CLIP + attribute classifier (measurement only)"),
    "unet": Recipe(_unet, 2600, needs=("clip", "vae"), help="UNet on cached latents, then the pipeline folder"),
    "decoder": Recipe(_decoder, 1500, needs=("vae",),
                       help="fine-tune the VAE decoder only, object-weighted (latents unchanged)"),
    "custom": Recipe(_custom, 700, help="a custom model: LoRA on the shipped UNet, two-tone scenes"),
    "adapter": Recipe(_adapter("base"), adapters.ADAPTERS["base"].steps, help="IP-Adapter (base: 4 tokens)"),
    "adapter-plus": Recipe(_adapter("plus"), adapters.ADAPTERS["plus"].steps, help="IP-Adapter Plus (resampler)"),
    "adapter-simple": Recipe(_adapter("simple"), adapters.ADAPTERS["simple"].steps,
                             help="the paper's simple-adapter ablation (tokens concatenated to the text)"),
    "controlnet": Recipe(_controlnet, 400, needs=("unet",), help="ControlNet on the object mask (frozen pipeline)"),
}


def run_recipe(name: str, out: Path = DEFAULT_OUT, steps: int | None = None, resume: bool = False) -> object:
    """Run one recipe; checks that the models it builds on exist first."""
    if name not in RECIPES:
        raise IPAdapterError(f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    recipe = RECIPES[name]
    for need in recipe.needs:
        if not (out / need / "config.json").exists():
            raise IPAdapterError(f"Recipe {name!r} needs {out / need}; run `ipadapter miniature train {need}` first.")
    return recipe.run(out, steps or recipe.steps, resume)


def evaluate_base(out: Path = DEFAULT_OUT, n: int = 64, steps: int = 25, guidance: float = 5.0) -> dict:
    """Judge accuracy of text-to-image samples for train-split and held-out captions -> base_eval.json + PNG grids."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ipadapter.atomic import save_png, write_text
    from ipadapter.evaluate.grid import image_grid

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scorer = judge.Judge.load(out / "judge", clip_dir=out / "judge_clip")
    report: dict = {"n": n, "ddim_steps": steps, "guidance": guidance}
    for split, seed in (("train", 777), ("heldout", 778)):
        prompts, attrs = judge.caption_batch(seed, n, split)
        images = base_model.sample(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
        report[split] = {
            "accuracy": scorer.accuracy(images, attrs),
            "clip_t": float(scorer.text_score(images, prompts).mean()),
        }
        tiles = [Image.fromarray(a) for a in images]
        save_png(image_grid([("", tiles[c::8]) for c in range(8)], title_lines=0), out / f"base_samples_{split}.png")
        log.info("base eval %s: %s", split, report[split])
    write_text(out / "base_eval.json", json.dumps(report, indent=2))
    return report


def export(out: Path = DEFAULT_OUT, assets_dir: Path = bundled.ASSETS_DIR) -> dict[str, float]:
    """Write fp16 safetensors of the pipeline, the tiny CLIP, the judge (when the run folder trained one; the shipped
    judge is kept otherwise: it measures images, whatever drew them), the ControlNet, the LoRA and the adapters into
    the package; returns sizes in MB."""
    from diffusers import StableDiffusionPipeline

    from ipadapter.miniature.controlnet import export_controlnet
    from ipadapter.miniature.custom_model import export_custom

    if not (out / "pipeline" / "model_index.json").exists():
        raise IPAdapterError(
            f"Cannot export: {out / 'pipeline' / 'model_index.json'} is missing; run the recipes first (see docs/miniature.md)."
        )
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", dtype=torch.float32)
    with replacing_folder(assets_dir / "pipeline") as pipe_dir:
        base_model.save_pipeline(pipe, pipe_dir, half=True)
    sizes = {"pipeline": size_mb(assets_dir / "pipeline")}
    if (out / "clip" / "config.json").is_file():
        # the pipeline keeps the text tower only; the whole CLIP (its text projection) lets the report measure
        # the text encoder's caption-vs-one-slot-changed retrieval on the bundle
        sizes["clip"] = _export_clip(out / "clip", assets_dir / "clip")
    if (out / "judge" / judge.CLASSIFIER_WEIGHTS).exists():
        sizes["judge"] = _export_judge(out, assets_dir / "judge")
    if (out / "custom_lora" / "pytorch_lora_weights.safetensors").is_file():
        sizes["custom_lora"] = export_custom(out, assets_dir)
    if (out / "controlnet" / "config.json").is_file():
        sizes["controlnet"] = export_controlnet(out, assets_dir)
    sizes.update({f"adapter {k}": v for k, v in adapters.export_adapters(out, assets_dir).items()})
    log.info("exported to %s: %s MB", assets_dir, {k: round(v, 2) for k, v in sizes.items()})
    return sizes


def _export_judge(out: Path, judge_dir: Path) -> float:
    from safetensors.torch import load_file, save_file

    state = load_file(out / "judge" / judge.CLASSIFIER_WEIGHTS)
    with replacing_folder(judge_dir) as tmp:
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp / judge.CLASSIFIER_WEIGHTS)
        shutil.copy(out / "judge" / judge.CLASSIFIER_CONFIG, tmp / judge.CLASSIFIER_CONFIG)
        _export_clip(out / "judge_clip", tmp / "clip")
    return size_mb(judge_dir)


def _export_clip(source: Path, target: Path) -> float:
    """A full tiny CLIP (both towers, projections, tokenizer) in fp16."""
    from transformers import CLIPModel

    from ipadapter.miniature.tokenizer import load_tokenizer

    model = CLIPModel.from_pretrained(source, dtype=torch.float32).half()
    with replacing_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        base_model.load_as_float32(tmp)
        load_tokenizer(source).save_pretrained(tmp)
    return size_mb(target)
