"""`ipadapter generate`: image-prompted generation from the command line."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import torch

from ipadapter.cli.true_cfg import check_true_cfg, true_cfg_kwargs
from ipadapter.errors import IPAdapterError
from ipadapter.request import IMAGE_OPTIONS, MODIFIERS
from ipadapter.validation import (
    check_counts, check_not_negative, check_seed, generation_size, model_source, output_file, regular_file,
)

EXAMPLES = """examples:
  ipadapter generate --image ref.png --out out.png                      # bundled miniature model
  ipadapter generate --image ref.png --prompt "on a green checker background" --scale 0.7
  ipadapter generate --image ref.png --base-lora miniature-custom       # a custom model fine-tuned from the base
  ipadapter generate --image ref.png --controlnet miniature --control-image mask.png   # object where the mask is
  ipadapter generate --manifest jobs.jsonl --out-dir out/ --batch-size 8   # many jobs, resumable (docs/scale.md)
  accelerate launch -m ipadapter.cli.main generate --manifest jobs.jsonl --out-dir out/   # one share per GPU
  ipadapter generate --base stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter h94/IP-Adapter \\
      --subfolder models --weight-name ip-adapter_sd15.bin --image ref.png --out out.png
  ipadapter generate --base models/checkpoints/dreamshaper_8.safetensors --adapter h94:plus-face \\
      --vae stabilityai/sd-vae-ft-mse --image face.png --out out.png   # a web UI's files, h94's file by name
  ipadapter generate --base black-forest-labs/FLUX.1-dev --adapter XLabs-AI/flux-ip-adapter \\
      --weight-name ip_adapter.safetensors --image-encoder openai/clip-vit-large-patch14 --image ref.png \\
      --true-cfg 4 --scale 0.7 --out out.png
  ipadapter generate --base models/unet/flux1-dev.safetensors --vae models/vae/ae.safetensors \\
      --text-encoder models/clip/clip_l.safetensors --text-encoder models/clip/t5xxl_fp16.safetensors \\
      --adapter XLabs-AI/flux-ip-adapter --weight-name ip_adapter.safetensors \\
      --image-encoder openai/clip-vit-large-patch14 --image ref.png --out out.png   # ComfyUI's separate files
"""


# The flags that only change what another flag does: `request.MODIFIERS` (manifest jobs refuse them too) and those
# of one generation alone (a manifest names no LoRA or ControlNet), in the same layout.
FLAG_MODIFIERS = (("--base-lora-scale", "base_lora_scale", 1.0, "--base-lora", "base_lora"),
                  ("--control-scale", "control_scale", 1.0, "--controlnet", "controlnet"), *MODIFIERS)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


SUMMARY = "generate images prompted by reference images"
# Each option's help, by its flag: prose for people, kept apart from the parser's wiring (`register`).
MODEL_HELP = {
    "--base": "diffusers pipeline folder or Hub id, or a whole SD 1.x / 2.x / SDXL checkpoint in one .safetensors file "
              "(web UIs' and ComfyUI's models/checkpoints), or a FLUX.1 / SD 3.5 transformer alone (ComfyUI's "
              "models/unet; the rest from its family's repository); default: the bundled miniature model",
    "--adapter": "adapter file, folder or Hub repo id (repeatable for evaluate and generate --manifest, whose jobs name "
                 "theirs); h94's published ones by name, the file chosen for the base: h94:base, h94:plus, "
                 "h94:plus-face, h94:faceid, ... (docs/checkpoints.md); the bundled miniature adapters: miniature "
                 "(default), miniature-plus, miniature-simple",
    "--weight-name": "adapter file name inside --adapter (per --adapter)",
    "--subfolder": "subfolder inside --adapter (per --adapter)",
    "--image-encoder": "CLIP vision folder or Hub id ('owner/repo/subfolder' allowed) or one .safetensors file "
                       "(ComfyUI's clip_vision); default: the one beside the adapter, else the published one of the "
                       "width the adapter reads",
    "--device": "cpu, cuda, mps (default: cuda when available)",
    "--dtype": "default: float16 on cuda, else float32",
    "--scheduler": "a diffusers scheduler class to use instead of the base model's own",
    "--vae": "a VAE to use instead of the base model's own: AutoencoderKL folder or Hub id ('owner/repo/subfolder' "
             "allowed) or one .safetensors file (web UIs' models/VAE)",
    "--text-encoder": "a text encoder to use instead of one of the base model's own: one .safetensors file "
                      "(ComfyUI's models/clip: clip_l, clip_g, t5xxl, fp8 and scaled fp8 too), the one it replaces "
                      "told by its kind and width (repeatable)",
}
HELP = {
    "--image": "reference image (repeatable)",
    "--prompt": "text prompt (default: empty = image-only prompting)",
    "--negative-prompt": "what the image should not show (text)",
    "--scale": "image prompt weight λ (default 1.0)",
    "--steps": "denoising steps (default: 25 miniature, else the pipeline's)",
    "--guidance": "classifier-free guidance scale (default: 7.5 miniature, else the pipeline's; FLUX: its distilled "
                  "guidance, default 3.5)",
    "--true-cfg": "FLUX only: true classifier-free guidance scale, a second transformer call per step with "
                  "--negative-prompt and the unconditional image tokens (XLabs v1 wants about 4, v2 1 = off)",
    "--seed": "0 to 2**64-1 (default 0)",
    "--num-images": "how many images to generate (default 1)",
    "--width": "output width in pixels, a multiple of the base's step (8 for Stable Diffusion and the miniature, 16 "
               "for FLUX); alone, the height follows the base's default aspect (square)",
    "--height": "output height; alone, the width follows the base's default aspect",
    "--out": "output PNG (default out.png); several images become OUT-0.png, OUT-1.png, ... (written all or none)",
    "--lora-scale": "FaceID LoRA strength (default 1.0; ComfyUI uses 0.6)",
    "--base-lora": "a custom model's LoRA (file or folder, diffusers or kohya format), fused into --base before the "
                   "adapter attaches; 'miniature-custom' = the bundled two-tone-style LoRA",
    "--base-lora-scale": "strength of --base-lora (default 1.0; --lora-scale is the FaceID adapter's own LoRA)",
    "--s-scale": "FaceID-PlusV2 shortcut scale (default 1.0)",
    "--face-embed": "precomputed ArcFace embedding .npy/.pt",
    "--mask": "mask image per --image (white = apply)",
    "--start": "fraction of the run where the adapter starts (default 0.0)",
    "--end": "fraction of the run where it stops (default 1.0)",
    "--preset": "layer-weight preset (e.g. 'style transfer', 'ease in'); see docs/control.md",
    "--combine": "concat, add, subtract, average, norm average, max, min (default concat)",
    "--image-weight": "weight per --image",
    "--negative-image": "an image to steer away from",
    "--noise": "noise negative TYPE:STRENGTH (fade, dissolve, gaussian, shuffle)",
    "--content-subtract": "words whose CLIP text embedding is removed from the image's",
    "--content-strength": "how much of --content-subtract is removed (default 1.0)",
    "--content-text-encoder": "the CLIP text model paired with the image encoder, for --content-subtract (folder or "
                              "Hub id; default: found in the base model or beside the encoder)",
    "--embeds-scaling": "v, kv, kv_penalty, k_mean_v (default v)",
    "--crop": "center, top, bottom, left, right (default center)",
    "--tiles": "tile large or non-square references, each tile masked",
    "--embeds": "saved embeddings (from `ipadapter encode`) instead of --image",
    "--controlnet": "ControlNet folder or Hub id ('owner/repo/subfolder' allowed); 'miniature' = the bundled mask "
                    "ControlNet of the miniature model",
    "--control-image": "the ControlNet's conditioning image (miniature: the object's mask, white on black)",
    "--control-scale": "ControlNet conditioning scale (default 1.0)",
    "--manifest": "JSONL, one job per line with these options by name (image, prompt, seed, ...; docs/scale.md); the "
                  "flags give the jobs' defaults",
    "--out-dir": "with --manifest: folder for <id>-<k>.png, index.jsonl, errors.jsonl (resumable)",
    "--batch-size": "with --manifest: jobs per UNet call (default 4)",
}
CACHE_KV_HELP = ("keep each layer's K'/V' of the image tokens for the generation, and the next one with the same "
                 "references: two projections fewer per layer and step for a few MiB (default: {default}); the images "
                 "are the same")
CACHE_KV_DEFAULT = {True: "on", False: "off, projected at every step as diffusers does"}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--base/--adapter/--image-encoder, shared by generate, encode, evaluate and app."""
    options = {"--adapter": {"action": "append"}, "--weight-name": {"action": "append"},
               "--text-encoder": {"action": "append"},
               "--subfolder": {"action": "append"}, "--dtype": {"choices": ["float32", "float16", "bfloat16"]}}
    for flag, text in MODEL_HELP.items():
        p.add_argument(flag, help=text, **options.get(flag, {}))


def add_cache_kv_flag(p: argparse.ArgumentParser, *, default: bool) -> None:
    """--cache-kv / --no-cache-kv (`ImagePrompter`'s `cache_kv`): on by default where references repeat (the app)."""
    p.add_argument("--cache-kv", action=argparse.BooleanOptionalAction, default=default,
                   help=CACHE_KV_HELP.format(default=CACHE_KV_DEFAULT[default]))


# Library parameters → the flags that set them: library errors name parameters ("weight_names="), a user of the
# command line reads the flag instead (`load_prompter`'s and `GenerationRequest`'s).
PARAMETER_FLAGS = {
    "base": "--base", "adapters": "--adapter", "subfolders": "--subfolder", "subfolder": "--subfolder",
    "weight_names": "--weight-name", "weight_name": "--weight-name", "image_encoder": "--image-encoder",
    "device": "--device", "dtype": "--dtype", "scheduler": "--scheduler", "vae": "--vae",
    "text_encoders": "--text-encoder", "base_lora": "--base-lora",
    "controlnet": "--controlnet", "scale": "--scale", "tiles": "--tiles", "masks": "--mask", "combine": "--combine",
    "noise": "--noise", "dino": "--dino", "inception": "--inception", "steps": "--steps", "face_embeds": "--face-embed",
    "image": "--image", "lora_scale": "--lora-scale", "s_scale": "--s-scale",
}
_PARAMETER = re.compile(r"\b(" + "|".join(PARAMETER_FLAGS) + r")=(?=(\w?))")


def with_flags(text: str) -> str:
    """`text` with the parameters it names written as the command line's flags ("combine=concat" →
    "--combine concat", "give weight_names= once" → "give --weight-name once")."""
    return _PARAMETER.sub(lambda m: PARAMETER_FLAGS[m.group(1)] + (" " if m.group(2) else ""), text)


def as_flags(err: IPAdapterError) -> IPAdapterError:
    """The same error as the command line's user reads it (`with_flags`)."""
    return IPAdapterError(with_flags(str(err)))


def load_from_flags(args: argparse.Namespace) -> Any:
    """`loading.load_prompter` with the model flags (those of `add_model_flags`, and generate's LoRA/ControlNet)."""
    from ipadapter.loading import check_model_args, load_prompter

    check_model_args(args)  # every command that loads (the app too) names a missing path as generate does
    try:
        return load_prompter(
            base=args.base, adapters=args.adapter or (), subfolders=args.subfolder or (),
            weight_names=args.weight_name or (), image_encoder=args.image_encoder, device=args.device,
            dtype=args.dtype, scheduler=args.scheduler, base_lora=getattr(args, "base_lora", None),
            base_lora_scale=getattr(args, "base_lora_scale", 1.0), controlnet=getattr(args, "controlnet", None),
            cache_kv=getattr(args, "cache_kv", False), vae=args.vae, text_encoders=args.text_encoder or (),
        )
    except IPAdapterError as err:
        raise as_flags(err) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help=SUMMARY, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    number = {"type": finite_float}
    options = {
        "--image": {"action": "append", "default": []}, "--prompt": {"default": ""},
        "--negative-prompt": {"default": ""}, "--scale": {**number, "default": 1.0}, "--steps": {"type": int},
        "--guidance": number, "--true-cfg": number, "--seed": {"type": int, "default": 0},
        "--num-images": {"type": int, "default": 1}, "--width": {"type": int}, "--height": {"type": int},
        "--out": {"default": "out.png"}, "--lora-scale": {**number, "default": 1.0},
        "--base-lora-scale": {**number, "default": 1.0}, "--s-scale": {**number, "default": 1.0},
        "--face-embed": {"action": "append", "default": []}, "--mask": {"action": "append", "default": []},
        "--start": {**number, "default": 0.0}, "--end": {**number, "default": 1.0}, "--combine": {"default": "concat"},
        "--image-weight": {"action": "append", **number}, "--content-strength": {**number, "default": 1.0},
        "--embeds-scaling": {"default": "v"}, "--crop": {"default": "center"}, "--tiles": {"action": "store_true"},
        "--control-scale": {**number, "default": 1.0}, "--batch-size": {"type": int, "default": 4},
    }
    for flag, text in HELP.items():
        p.add_argument(flag, help=text, **options.get(flag, {}))
    add_cache_kv_flag(p, default=False)
    p.set_defaults(func=run)


def output_paths(out: str, count: int) -> list[Path]:
    path = output_file(out, "--out", ".png")
    if count == 1:
        return [path]
    return [output_file(path.with_name(f"{path.stem}-{i}{path.suffix}"), "--out") for i in range(count)]


def check_args(args: argparse.Namespace) -> None:
    """Everything about the flags that can be wrong, checked before a file is read or a model loaded."""
    check_counts([("--num-images", args.num_images), ("--steps", args.steps)])
    if not args.image and not args.embeds and not args.face_embed and not args.prompt:
        raise IPAdapterError("give --image (or --embeds, or --face-embed for FaceID), --prompt, or both")
    if args.out_dir:
        raise IPAdapterError("--out-dir is the folder of a --manifest run; one generation writes --out")
    for flag, dest, default, needed_flag, needed in FLAG_MODIFIERS:
        if getattr(args, dest) != default and not getattr(args, needed):
            raise IPAdapterError(f"{flag} changes what {needed_flag} does, and no {needed_flag} was given")
    if not (args.image or args.embeds or args.face_embed):
        for flag, dest, default in IMAGE_OPTIONS:
            if getattr(args, dest) != default:
                raise IPAdapterError(f"{flag} changes the image prompt, and no --image, --embeds or --face-embed was "
                                     "given")
    if len(args.adapter or []) > 1:
        raise IPAdapterError(f"--adapter given {len(args.adapter)} times: one generate prompts one adapter (--image "
                             "cannot say which its images are for); to use several, give a --manifest whose jobs each "
                             "name theirs (\"adapter\": \"0\", \"1\", ... in --adapter order), or the Python API")
    check_seed(args.seed)
    check_not_negative([("--scale", args.scale), ("--guidance", args.guidance), ("--true-cfg", args.true_cfg),
                        ("--s-scale", args.s_scale),
                        ("--control-scale", args.control_scale), ("--content-strength", args.content_strength)])
    if args.embeds and args.image:
        raise IPAdapterError("give --image or --embeds, not both (--embeds already holds the images' features)")
    if args.embeds and (args.tiles or args.mask or args.crop != "center"):
        raise IPAdapterError("--tiles, --mask and --crop act on --image; saved --embeds cannot be re-cropped or tiled")
    if args.embeds and args.noise:
        raise IPAdapterError("--noise makes its negative from --image's pixels, which saved --embeds do not hold; "
                             "give --negative-image instead")
    if args.combine != "concat" and len(args.image) < 2 and not args.embeds:
        raise IPAdapterError(f"--combine {args.combine} merges several --image references; give at least two")
    if args.image_weight and len(args.image_weight) != len(args.image):
        raise IPAdapterError(f"got {len(args.image_weight)} --image-weight for {len(args.image)} --image; give one per image")
    if args.negative_image and args.noise:
        raise IPAdapterError("give --negative-image or --noise, not both (each is the negative reference)")
    if args.content_text_encoder:
        if not args.content_subtract:
            raise IPAdapterError("--content-text-encoder is the text model of --content-subtract; give both")
        model_source(args.content_text_encoder, "--content-text-encoder", subfolders=True)
    if args.embeds:
        regular_file(args.embeds, "embeddings file")
    for face in args.face_embed:
        from ipadapter.encoders import load_face_embedding

        regular_file(face, "face embedding")
        load_face_embedding(face, dim=1)  # readable and finite now; its width is the adapter's, checked once loaded


def control_kwargs(args: argparse.Namespace) -> dict:
    """The ControlNet pipeline's `image` / `controlnet_conditioning_scale`, checked before any model is loaded."""
    from ipadapter.conditioning.images import load_image

    if args.control_image and not args.controlnet:
        raise IPAdapterError("--control-image needs --controlnet (a ControlNet folder or Hub id, or 'miniature')")
    if not args.controlnet:
        return {}
    if not args.control_image:
        raise IPAdapterError("--controlnet needs --control-image (the conditioning image, e.g. the object's mask)")
    return {"image": load_image(args.control_image, background=(0, 0, 0)),
            "controlnet_conditioning_scale": args.control_scale}


def run(args: argparse.Namespace) -> int:
    try:
        if args.manifest:
            from ipadapter.cli.generate_manifest import run as run_manifest

            return run_manifest(args, load=load_from_flags, control=control_kwargs)
        return _generate(args)
    except IPAdapterError as err:
        raise as_flags(err) from None


def _generate(args: argparse.Namespace) -> int:
    from ipadapter.atomic import save_pngs
    from ipadapter.conditioning.embeds_file import check_features
    from ipadapter.loading import base_geometry, check_model_args
    from ipadapter.paired_text import paired_text_embeds
    from ipadapter.request import build_prompt, load_request

    check_args(args)
    check_model_args(args)
    check_true_cfg(args)
    paths = output_paths(args.out, args.num_images)
    width, height = args.width, args.height
    if width is not None or height is not None:
        step, default = base_geometry(args.base)
        width, height = generation_size(width, height, step, default)
    request = load_request(vars(args))
    control = control_kwargs(args)
    loaded = load_from_flags(args)
    prompter = loaded.prompter
    if args.face_embed:
        from ipadapter.encoders import load_face_embedding

        ip = prompter.adapter()
        if not ip.variant.face_id:
            raise IPAdapterError(f"--face-embed is a FaceID adapter's ID embedding; this adapter ({ip.variant.name}) "
                                 "reads the reference image (--image)")
        dim = ip.config.projection.in_dim
        request.face_embeds = torch.cat([load_face_embedding(f, dim) for f in args.face_embed])
    if args.embeds:
        from ipadapter.conditioning.embeds_file import EncoderIdentity, load_embeds

        ip = prompter.adapter()
        if prompter.encoder is None or ip.variant.features not in ("global", "patch"):
            raise IPAdapterError("--embeds holds CLIP features; this adapter takes face embeddings (--face-embed)")
        enc = prompter.encoder
        saved = load_embeds(args.embeds, encoder=EncoderIdentity.of(enc.model, enc.name), features=ip.variant.features)
        tail = (enc.global_dim,) if ip.variant.features == "global" else (enc.patch_tokens, enc.patch_dim)
        request.features = check_features(args.embeds, saved.tensors, tail)
    if args.content_subtract:
        request.content_text_embeds = paired_text_embeds(prompter.pipe, prompter.encoder, args.content_subtract,
                                                         args.content_text_encoder)
    prompter.set_s_scale(args.s_scale)  # --lora-scale is checked by build_prompt, as a manifest job's lora_scale
    control.update(true_cfg_kwargs(args.true_cfg, prompter.pipe))
    prompts = build_prompt(prompter, request)
    images_out = prompter.generate(
        prompts, prompt=args.prompt, negative_prompt=args.negative_prompt, num_images=args.num_images,
        steps=args.steps or loaded.default_steps, guidance=args.guidance if args.guidance is not None else loaded.default_guidance,
        seed=args.seed, width=width, height=height, **control,
    )
    try:
        save_pngs(images_out, paths)
    except OSError as err:
        raise IPAdapterError(f"could not write {args.out} ({err.strerror or err}); no image was written") from None
    for path in paths:
        print(path)
    return 0
