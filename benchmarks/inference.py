"""Inference speed: plain pipeline vs ipadapter vs diffusers' built-in IP-Adapter, same weights, one process.

Random weights with the real SD 1.5 (and SDXL) architectures; runs are interleaved and medians reported, as ratios
against the plain pipeline measured in the same run. Prints a markdown table.

    python benchmarks/inference.py                 # CPU-sized defaults (256 px, 8 steps)
    python benchmarks/inference.py --device cuda --resolution 512 --steps 30 --repeats 5 --sdxl
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import factories  # noqa: E402  (tiny tokenizer; the models below are full-size)

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, sample_size=128,
)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
             patch_size=14, projection_dim=1024)


def build_sd15(device: str, dtype: torch.dtype, small_encoder: bool):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, vocab_size=80,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    tok = factories.tiny_tokenizer(Path(tempfile.mkdtemp()))
    tok.model_max_length = 77
    vision = VIT_H if not small_encoder else dict(VIT_H, num_hidden_layers=4)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    processor = CLIPImageProcessor()
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=processor, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype), encoder.to(device, dtype).eval(), processor


def plus_state(unet, cross: int, seed: int = 0) -> dict:
    """A Plus (resampler) adapter in the published layout, ViT-H patch features in, sized for `unet`."""
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.checkpoint import published_state_dict
    from ipadapter.projection import ProjectionConfig

    torch.manual_seed(seed)
    heads = max(1, cross // 64)
    config = AdapterConfig("plus", ProjectionConfig("resampler", in_dim=1280, cross_dim=cross, tokens=16, dim=cross,
                                                    depth=4, heads=heads))
    adapter = IPAdapter.for_unet(unet, config)
    return published_state_dict(adapter, unet)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleave(runs: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    for k, fn in runs.items():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small-encoder", action="store_true", help="4-layer ViT-H-width encoder (faster on CPU)")
    ap.add_argument("--sdxl", action="store_true", help="also time an SDXL-architecture UNet (per-step)")
    ap.add_argument("--sdxl-latent", type=int, default=32)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)

    from ipadapter import AdapterPrompt, Reference, attach, load_adapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.prompter import ImagePrompter

    pipe, encoder, processor = build_sd15(args.device, dtype, args.small_encoder)
    ref_pipe = copy.deepcopy(pipe)
    folder = Path(tempfile.mkdtemp())
    state = plus_state(pipe.unet, 768)
    torch.save(state, folder / "ip-adapter-plus_sd15.bin")
    ref_pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter-plus_sd15.bin", image_encoder_folder=None)
    ref_pipe.image_encoder, ref_pipe.feature_extractor = encoder, processor
    ours = ImagePrompter(pipe, load_adapter(folder / "ip-adapter-plus_sd15.bin", pipe.unet), ImageEncoder(encoder, processor))
    images = [factories.reference_image(i, 256) for i in range(3)]
    res = args.resolution
    gen = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=res, width=res, output_type="latent")
    masks = [torch.zeros(res, res), torch.zeros(res, res)]
    masks[0][:, : res // 2] = 1
    masks[1][:, res // 2 :] = 1

    def plain():
        ours.attachment.clear()
        pipe(prompt="a photo", **gen)

    def ours_full(fresh: bool, masked: bool = False):
        def run():
            if fresh:
                ours.encoder.cache._items.clear()
            refs = images[:2] if masked else images[:1]
            _, r = ours.references(refs, masks=masks if masked else None)
            ours.generate({"0": AdapterPrompt(r)}, prompt="a photo", **{k: v for k, v in gen.items()
                           if k not in ("num_inference_steps", "guidance_scale")}, steps=args.steps, guidance=7.5)
        return run

    def diffusers_full(masked: bool = False):
        def run():
            if masked:
                m = torch.stack(masks)[None]  # (1, images, H, W): diffusers' binarised mask layout
                ref_pipe(prompt="a photo", ip_adapter_image=[[images[0], images[1]]],
                         cross_attention_kwargs={"ip_adapter_masks": [m]}, **gen)
            else:
                ref_pipe(prompt="a photo", ip_adapter_image=images[0], **gen)
        return run

    rows = []
    t = interleave({"plain": plain, "ours_first": ours_full(True), "ours_second": ours_full(False),
                    "diffusers": diffusers_full(), "ours_masked": ours_full(False, True),
                    "diffusers_masked": diffusers_full(True)}, args.repeats)
    rows.append(("SD1.5 Plus, full generation (encoding included)", t["plain"], t["ours_first"], t["diffusers"]))
    rows.append(("SD1.5 Plus, second generation, same reference", t["plain"], t["ours_second"], t["diffusers"]))
    rows.append(("SD1.5 Plus, two masked references", t["plain"], t["ours_masked"], t["diffusers_masked"]))

    # Per denoising step: the UNet alone, batch 2 (CFG), adapter tokens precomputed for both implementations.
    lat = res // 8
    sample = torch.randn(2, 4, lat, lat, device=args.device, dtype=dtype)
    text = torch.randn(2, 77, 768, device=args.device, dtype=dtype)
    patches = torch.randn(2, 1, 257, 1280, device=args.device, dtype=dtype)
    unet_ref = ref_pipe.unet

    adapter = ours.adapters["0"]
    with torch.no_grad():
        tokens = adapter.project(patches[:, 0])
    ours.attachment.set_prompts({"0": AdapterPrompt([Reference(cond=tokens[1:], uncond=tokens[:1])])}, rows=1)
    prompts = ours.attachment.runtime.prompts  # one generation: K'/V' computed on the first step, reused after

    @torch.no_grad()
    def step_plain():
        ours.attachment.runtime.prompts = {}
        pipe.unet(sample, 500, encoder_hidden_states=text)

    @torch.no_grad()
    def step_ours():
        ours.attachment.runtime.prompts = prompts
        pipe.unet(sample, 500, encoder_hidden_states=text)

    @torch.no_grad()
    def step_diffusers():
        unet_ref(sample, 500, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [patches]})

    s = interleave({"plain": step_plain, "ours": step_ours, "diffusers": step_diffusers}, max(args.repeats, 5))
    rows.append((f"SD1.5 UNet step, {lat}x{lat} latents, batch 2", s["plain"], s["ours"], s["diffusers"]))

    if args.sdxl:
        from diffusers import UNet2DConditionModel

        del pipe, ref_pipe, unet_ref
        torch.manual_seed(0)
        xl = UNet2DConditionModel(**SDXL_UNET).to(args.device, dtype).eval()
        xl_ref = copy.deepcopy(xl)
        st = plus_state(xl, 2048)
        xl_ref._load_ip_adapter_weights([copy.deepcopy(st)], low_cpu_mem_usage=False)
        torch.save(st, folder / "ip-adapter-plus_sdxl_vit-h.bin")
        att = attach(xl, load_adapter(folder / "ip-adapter-plus_sdxl_vit-h.bin", xl))
        n = args.sdxl_latent
        xs = torch.randn(2, 4, n, n, device=args.device, dtype=dtype)
        xt = torch.randn(2, 77, 2048, device=args.device, dtype=dtype)
        added = {"text_embeds": torch.randn(2, 1280, device=args.device, dtype=dtype),
                 "time_ids": torch.randn(2, 6, device=args.device, dtype=dtype)}
        with torch.no_grad():
            xtok = att.adapters["0"].project(patches[:, 0])

        att.set_prompts({"0": AdapterPrompt([Reference(cond=xtok[1:], uncond=xtok[:1])])}, rows=1)
        xl_prompts = att.runtime.prompts

        @torch.no_grad()
        def xl_plain():
            att.runtime.prompts = {}
            xl(xs, 500, encoder_hidden_states=xt, added_cond_kwargs=added)

        @torch.no_grad()
        def xl_ours():
            att.runtime.prompts = xl_prompts
            xl(xs, 500, encoder_hidden_states=xt, added_cond_kwargs=added)

        @torch.no_grad()
        def xl_diffusers():
            xl_ref(xs, 500, encoder_hidden_states=xt, added_cond_kwargs={**added, "image_embeds": [patches]})

        x = interleave({"plain": xl_plain, "ours": xl_ours, "diffusers": xl_diffusers}, max(args.repeats, 3))
        rows.append((f"SDXL UNet step, {n}x{n} latents, batch 2", x["plain"], x["ours"], x["diffusers"]))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nDevice: {device}; dtype {dtype}; {res}px, {args.steps} steps; medians of {args.repeats}+ interleaved runs\n")
    print("| case | plain (s) | ipadapter (s) | diffusers (s) | ipadapter overhead | diffusers overhead | ipadapter / diffusers |")
    print("|---|---|---|---|---|---|---|")
    for name, p, o, d in rows:
        print(f"| {name} | {p:.3f} | {o:.3f} | {d:.3f} | {100 * (o / p - 1):+.1f}% | {100 * (d / p - 1):+.1f}% | {o / d:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
