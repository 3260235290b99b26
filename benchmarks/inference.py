"""Inference speed and peak memory: plain pipeline vs ipadapter vs diffusers' `load_ip_adapter`, same weights.

Models: random weights, real architectures, nothing downloaded; only the image resolution is reduced for a CPU (and
the text encoders' vocabulary, to the tiny test tokenizer's: an embedding table, no compute).
  SD 1.5  its UNet, VAE and CLIP-L text encoder; a Plus adapter (resampler, 16 tokens, as ip-adapter-plus_sd15) on
          a ViT-H/14 image encoder at full size (32 layers, width 1280, 224 px), 8 steps by default.
          `--vith-layers` shortens the encoder (and then says so in the table).
  SDXL    its full UNet (2.6 B parameters, real config, nothing reduced), VAE, CLIP-L and OpenCLIP-bigG text
          encoders; the base SDXL adapter (4 tokens from the global bigG embedding, as ip-adapter_sdxl) on a
          ViT-bigG/14 image encoder with its real width (1664, MLP 8192, 224 px) but 8 of its 48 layers
          (`--bigg-layers`): the full 1.8 B-parameter encoder (7.4 GB at fp32) does not fit in this machine's 23 GB
          next to the 10.3 GB UNet, the 2.9 GB of text encoders and the adapter (1.4 GB: K'/V' for 70 layers) held
          once by ipadapter and once by diffusers. A shallower encoder only understates what ipadapter saves.

Cases per architecture: (a) a full generation, encoding included (cold caches: the reference and the unconditional
image both go through the encoder), after an untimed one-step generation with another reference on the same
attachment, as in a session, ipadapter's caches then emptied; (b) a second generation with the same reference:
ipadapter's prompter has just run an untimed generation with it, as a UI re-running does (diffusers caches nothing,
so its (b) is its (a) run); (c) two masked references, encoding included, after a generation with two others as in
(a); (d) the UNet alone over a generation's steps at
`--step-latents` (default 32x32, the issue's per-step setting), the adapter's tokens given, the timesteps the
pipeline's scheduler sets on the device (each step's `t` one of them, as in the pipelines), reported per step: the
adapter's overhead per denoising step, each step timed: (d) the median of steps 2 to n, (e) the median first step,
where ipadapter also makes the generation's plan (which adapters act where, weights, masks on each token grid) and,
with `cache_kv=True`, the K'/V' of the image tokens for the whole generation (diffusers makes both at every step).
Before (d) and (e) each implementation runs one untimed UNet call, a previous generation (for ipadapter with
another reference): the first step is a generation's first, not also the first call after switching implementations
(ipadapter's switch attaches anew, whose walk over the UNet's modules slowed the next call's kernels by about 1% on
the CPU; attaching is once per session). Rows (a) to (c) follow a generation for the same reason.

Time: one process. The three implementations share one pipeline (one UNet: the SDXL one is 10 GB at fp32) and are
switched between runs, outside the timed region, by swapping the attention processors (and diffusers'
`encoder_hid_proj`): ipadapter attaches/detaches through its public API, so "plain" is the untouched UNet. One
warm-up pass (none for (d): the generations ran the same UNet shapes), then `--repeats` passes (default 5, `--quick`
9), the cases interleaved within each pass. Times are medians; overheads and ratios are taken pass by pass (the runs
of one pass are neighbours in time, so a load change between passes cancels) and given as median [min, max]; the
targets are judged on the 95% interval of the median (distribution-free, `median_ci`) with 6 passes or more, else
on that spread: "in every pass", "in the median only" (within the noise) or not. "Slower than diffusers" is judged
for all the rows of a report together (`against_diffusers`): a row is slower beyond the noise when the interval of its
median ratio at 1 − 5%/m for m rows (Bonferroni) lies above 1, since at 95% each a report of 10 equal rows would name
one in up to 22% of runs; memory rows likewise on the median difference of the repeats (`heavier`). `--quick` on a
CPU times on one torch thread (`--threads`): its kernels take microseconds, and split over threads the hand-offs
between them are most of the noise. On CUDA each generation is then run once more, untimed, under torch's sync
debug mode, and a note counts the times it made the CPU wait for the GPU (a device value read or a copy to the CPU; a
wait per step stops the CPU queueing ahead). Latents of ipadapter
and diffusers are compared (same seed, same weights): the last column is their largest difference, next to the
output's largest magnitude. Where row (b) is timed, each pass also times every layer's K'/V' projections alone for a
generation's steps (`Bench.projection_run`), and a note splits row (b) pass by pass into them and the rest: without
`cache_kv` they are projected at every step (as diffusers does), so their time is the floor of row (b).

Peak memory: every implementation of every architecture runs in a fresh process that builds only what that
implementation needs: a new interpreter (spawned; a forked child of a process that had imported torch read tens of
MiB more, and not equally for each implementation), which first loads a small adapter with each implementation
(`benchmarks/memory_warmup.py`: the loading code's first use is not the models' memory). The child runs (a), (b),
(c) in order, as a user's process would
(plain: the same plain generation three times, so each row compares the same k-th generation of a process).
CPU: right before each generation it collects garbage, returns freed heap to the OS (malloc_trim) and resets the
kernel's RSS high-water mark (Linux /proc/self/clear_refs "5"); the number is VmHWM minus the RSS at that moment:
what the generation adds above the loaded models, every byte counted (tensors, allocator slack, Python objects).
The generations run under a fixed glibc mmap threshold (64 KiB, set once the models are loaded): otherwise the
allocator's adaptive threshold makes the same allocations cost tens of MiB more or less depending on the heap's
history (measured: one process, the same plain generation, 167 or 248 MiB). The models are built under glibc's
default, as in a user's process: under the fixed threshold every weight tensor of 64 KiB or more is a mapping of its
own, one page over its size (malloc's header on a page-multiple size), which diffusers' weights, views into the
memory-mapped checkpoint, do not pay (SD 1.5's adapter: 54 tensors, 0.21 MiB). Before "models loaded" is read every
weight is read once, so a
memory-mapped checkpoint counts there and not in the first generation. Each case is run once untimed before it is
measured (as the timing passes are warmed up): the RSS also counts the code of every kernel a process calls for the
first time, so a generation that is the first to call, say, a bicubic resize or a softmax over a 5-d view would be
charged for library code pages that no later generation needs (at the `--quick` sizes that was most of the
masked-reference row: 1.6 MiB above plain in a first generation, 0.5 MiB in the next).
`ru_maxrss` cannot be reset, so it would report model construction's transient peaks (a state dict loaded next to
its module) instead; a torch.profiler memory profile sees tensor allocations only. CUDA: no children, one
process measures each implementation in turn, each built and freed in its turn, since the allocator's counters see
tensors alone: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus `memory_allocated` at that
moment. A "models loaded" row gives the memory of what each child built. ipadapter runs with its default (K'/V'
projected at every call, as diffusers does); a fourth child runs it with `cache_kv=True` (each layer's K'/V' kept
for the generation), and the last column gives the size of what that cache holds in each case, computed from the
adapter's layer widths: the difference between the two ipadapter columns.
The peak does not depend on the number of steps (every step has the same shapes), so `--steps 2` measures it
faster.

    python benchmarks/inference.py            # CPU defaults: SD1.5 128 px 8 steps, SDXL 128 px 4 steps
    python benchmarks/inference.py --quick    # tiny models (the dispatch-bound regime), 9 passes
    python benchmarks/inference.py --archs sdxl --no-memory --rows d   # rows (d) and (e) alone, after a warm-up
    python benchmarks/inference.py --no-memory --rows b --repeats 15  # row (b)'s target, with a 95% interval
    python benchmarks/inference.py --no-memory --rows b --cache-kv   # the same with K'/V' kept for the generation
    python benchmarks/inference.py --device cuda --resolution 512 --sdxl-resolution 1024 --sdxl-steps 30 --repeats 5
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from ipadapter.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import factories  # noqa: E402  (tiny tokenizer and the --quick models; the others are full-size)

MiB = 2**20
PROMPT = "a photo"
IMPLS = ("plain", "ipadapter", "diffusers")
CACHED = "ipadapter, cache_kv=True"  # memory only: K'/V' kept for the generation instead of projected at every call
CASES = {
    "full": "(a) full generation, encoding included",
    "second": "(b) second generation, same reference",
    "masked": "(c) two masked references, encoding included",
}
ARCH_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
TARGET = dict(step_overhead=0.005, repeat_overhead=0.05)

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
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
TEXT = dict(vocab_size=80, bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77)  # tiny vocab
CLIP_L_TEXT = dict(TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
BIGG_TEXT = dict(TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
             patch_size=14, projection_dim=1024, hidden_act="gelu")
VIT_BIGG = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16, image_size=224,
                patch_size=14, projection_dim=1280, hidden_act="gelu")


@dataclass(frozen=True)
class Setting:
    """One architecture's configuration; picklable, it travels to the memory processes."""

    arch: str
    device: str
    dtype: str
    resolution: int
    steps: int
    encoder_layers: int
    quick: bool
    step_latents: int
    cache_kv: bool = False  # the timed ipadapter keeps K'/V' for the generation (memory measures both anyway)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def guidance(self) -> float:
        return 7.5 if self.arch == "sd15" else 5.0

    def describe(self) -> str:
        cached = "; ipadapter timed with cache_kv=True (K'/V' kept for the generation)" if self.cache_kv else ""
        return self._models() + cached

    def _models(self) -> str:
        if self.quick:
            return f"{ARCH_NAMES[self.arch]}: tiny test models, {self.resolution} px, {self.steps} steps"
        steps = f"{self.steps} steps, guidance {self.guidance}; (d) at {self.step_latents}x{self.step_latents} latents"
        if self.arch == "sd15":
            return f"SD1.5: Plus adapter, ViT-H/14 encoder {self.encoder_layers} of 32 layers, {self.resolution} px, {steps}"
        return (f"SDXL: full UNet, base adapter, ViT-bigG/14 encoder {self.encoder_layers} of 48 layers, "
                f"{self.resolution} px, {steps}")


def build_pipeline(s: Setting, folder: Path) -> Any:
    """The architecture's diffusers pipeline (random weights), without any IP-Adapter."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    if s.quick:
        return factories.tiny_sd15_pipeline(folder) if s.arch == "sd15" else factories.tiny_sdxl_pipeline(folder)
    tokenizer = factories.tiny_tokenizer(folder)
    tokenizer.model_max_length = 77
    # Weights are drawn where they will run: torch draws random numbers on one CPU core, tens of seconds for SDXL in
    # each of the memory mode's processes; a GPU takes about a second. Schedulers stay on the CPU (numpy reads them).
    with torch.device(s.device):
        vae = AutoencoderKL(**SD_VAE)  # SDXL's VAE has the same architecture
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        unet = UNet2DConditionModel(**(SD15_UNET if s.arch == "sd15" else SDXL_UNET))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TEXT)) if s.arch == "sdxl" else None
    if s.arch == "sd15":
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1)
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=scheduler, image_encoder=None, feature_extractor=None,
    )


def build_encoder(s: Setting) -> tuple[torch.nn.Module, Any]:
    """CLIP vision encoder and its processor: ViT-H for SD 1.5's Plus adapter, ViT-bigG for SDXL's base adapter."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    if s.quick:
        return factories.tiny_image_encoder()
    config = dict(VIT_H if s.arch == "sd15" else VIT_BIGG, num_hidden_layers=s.encoder_layers)
    with torch.device(s.device):  # as build_pipeline: drawn where it runs
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval(), CLIPImageProcessor()


def adapter_state(s: Setting, unet: torch.nn.Module, encoder: torch.nn.Module) -> tuple[str, dict]:
    """A random adapter in the published layout: SD 1.5 Plus on patch features, SDXL base on the global embedding."""
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.checkpoint import published_state_dict
    from ipadapter.projection import ProjectionConfig

    torch.manual_seed(2)
    cross = unet.config.cross_attention_dim
    if s.arch == "sd15":
        projection = ProjectionConfig("resampler", in_dim=encoder.config.hidden_size, cross_dim=cross, tokens=16,
                                      dim=cross, depth=4, heads=max(1, cross // 64))
        name, variant = "ip-adapter-plus_sd15.bin", "plus"
    else:
        projection = ProjectionConfig("linear", in_dim=encoder.config.projection_dim, cross_dim=cross, tokens=4)
        name, variant = "ip-adapter_sdxl.bin", "base"
    with torch.device(s.device):  # drawn where it runs, as the models (SDXL's: 0.35 B numbers), then saved from the
        adapter = IPAdapter.for_unet(unet, AdapterConfig(variant, projection))  # CPU in fp32, as files ship
    return name, published_state_dict(adapter.float().cpu(), unet)


Run = tuple[Callable[[], None], Callable[[], torch.Tensor]]  # (untimed setup, timed run returning its output)


class Bench:
    """One architecture's pipeline with the implementations asked for, all on one UNet; `use` switches them."""

    def __init__(self, s: Setting, impls: tuple[str, ...], cache_kv: bool = False) -> None:
        from ipadapter import load_adapter
        from ipadapter.encoders import ImageEncoder

        self.setting, self.cache_kv = s, cache_kv
        self._tmp = tempfile.TemporaryDirectory()
        folder = Path(self._tmp.name)
        self.pipe = build_pipeline(s, folder).to(s.device, s.torch_dtype)
        self.pipe.set_progress_bar_config(disable=True)
        unet = self.pipe.unet
        self.plain_procs = dict(unet.attn_processors)
        self.diffusers_procs = self.diffusers_proj = self.adapter = self.encoder = self.prompter = None
        if set(impls) - {"plain"}:
            model, self.processor = build_encoder(s)
            self.encoder_model = model.to(s.device, s.torch_dtype)
            weight_name, state = adapter_state(s, unet, self.encoder_model)
            torch.save(state, folder / weight_name)
            del state
        if "diffusers" in impls:
            self.pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, image_encoder_folder=None)
            self.pipe.image_encoder, self.pipe.feature_extractor = self.encoder_model, self.processor
            self.diffusers_procs, self.diffusers_proj = dict(unet.attn_processors), unet.encoder_hid_proj
        if "ipadapter" in impls:
            self.adapter = load_adapter(folder / weight_name, unet).to(s.device, s.torch_dtype)
            self.encoder = ImageEncoder(self.encoder_model, self.processor)
        self.images = [factories.reference_image(i, 256) for i in range(4)]  # 2 timed, 2 for untimed generations
        # Left and right halves, 8 px per latent as in SD's images: bicubic downsampling by 8 or more has no
        # overshoot at the edge, which ipadapter clamps and diffusers does not (the outputs would differ there).
        side = 8 * (s.resolution // self.pipe.vae_scale_factor)
        self.masks = [torch.zeros(side, side), torch.zeros(side, side)]
        self.masks[0][:, : side // 2] = 1
        self.masks[1][:, side // 2 :] = 1
        self.use("plain")

    def use(self, impl: str) -> None:
        """Put `impl` on the shared UNet."""
        from ipadapter.prompter import ImagePrompter

        if self.prompter is not None:
            self.prompter.detach()
            self.prompter = None
        unet = self.pipe.unet
        # The projection first: diffusers' Plus resampler has attention layers of its own, in diffusers_procs.
        unet.encoder_hid_proj = self.diffusers_proj if impl == "diffusers" else None
        unet.set_attn_processor(dict(self.diffusers_procs if impl == "diffusers" else self.plain_procs))
        if impl == "ipadapter":
            self.prompter = ImagePrompter(self.pipe, self.adapter, self.encoder, cache_kv=self.cache_kv)

    def generate(self, impl: str, case: str, *, other: bool = False) -> torch.Tensor:
        """One generation (latents out) of `case`; only ipadapter's runs differ between (a) and (b). `other`: one
        step with other reference images, a previous generation that leaves nothing the timed one can reuse (each
        step calls the same kernels: one is enough to have called them all)."""
        from ipadapter import AdapterPrompt

        s = self.setting
        masked = case == "masked"
        chosen = self.images[2:] if other else self.images[:2]
        images = chosen if masked else chosen[:1]
        steps = 1 if other else s.steps
        gen = dict(height=s.resolution, width=s.resolution, output_type="latent")
        if impl == "ipadapter":
            refs = self.prompter.references(images, masks=self.masks if masked else None)
            out = self.prompter.generate(AdapterPrompt(refs), prompt=PROMPT, steps=steps,
                                         guidance=s.guidance, seed=0, **gen)
            return torch.stack(out)
        extra: dict[str, Any] = {}
        if impl == "diffusers":
            extra["ip_adapter_image"] = [images] if masked else images[0]
            if masked:  # (1, images, H, W): diffusers' layout for one adapter's masks
                extra["cross_attention_kwargs"] = {"ip_adapter_masks": [torch.stack(self.masks)[None]]}
        return self.pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=s.guidance,
                         generator=torch.Generator("cpu").manual_seed(0), **gen, **extra).images

    def generation_run(self, impl: str, case: str) -> Run:
        """Each timed generation follows an untimed one on the same attachment, as in a session (attaching is once
        per session, and its walk over the UNet's modules left the next generation's first calls colder on the CPU).
        (a) and (c): after a generation with other references, ipadapter's caches then emptied, so the reference and
        the unconditional image go through the encoder again and, with `cache_kv`, that generation's K'/V' (kept for
        the next one) are not in the baseline of the peak; (b): after one with the same reference, as in a UI
        re-running a generation."""

        def setup() -> None:
            self.use(impl)
            self.generate(impl, case, other=case != "second")
            if impl == "ipadapter" and case != "second":
                self.prompter.cache.clear()
                self.prompter.attachment.clear_cache()

        return setup, lambda: self.generate(impl, case)

    def projection_run(self) -> Run:
        """Every layer's K' and V' projection of a CFG pair of token rows, once per step: what row (b) cannot do
        without while K'/V' are projected at every step (`cache_kv` off; diffusers does the same), timed in the same
        passes as the generations. At 128 px it is mostly the read of the projection weights (1.36 GB for SDXL)."""
        s, adapter = self.setting, self.adapter
        tokens = torch.randn(2, adapter.config.projection.tokens, adapter.config.cross_dim, device=s.device,
                             dtype=s.torch_dtype)
        layers = [layer for _, layer in adapter.named_layers()]

        @torch.no_grad()
        def run() -> torch.Tensor:
            for _ in range(s.steps):
                for layer in layers:
                    layer.to_k_ip(tokens)
                    out = layer.to_v_ip(tokens)
            return out

        return (lambda: None), run

    def step_runs(self) -> dict[str, Run]:
        """The UNet alone for one generation's steps, batch 2 (CFG), the adapter's input given to both."""
        from ipadapter import AdapterPrompt, Reference

        s, unet = self.setting, self.pipe.unet
        kw = dict(device=s.device, dtype=s.torch_dtype)
        torch.manual_seed(3)
        lat = s.step_latents
        sample = torch.randn(2, unet.config.in_channels, lat, lat, **kw)
        text = torch.randn(2, self.pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, **kw)
        added: dict[str, torch.Tensor] = {}
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            size = [s.resolution, s.resolution, 0, 0, s.resolution, s.resolution]
            added = {"text_embeds": torch.randn(2, pooled, **kw), "time_ids": torch.tensor([size] * 2, **kw)}
        c = self.encoder_model.config
        if self.adapter.variant.features == "patch":  # row 0: unconditional, row 1: the reference
            features = torch.randn(2, 1, (c.image_size // c.patch_size) ** 2 + 1, c.hidden_size, **kw)
        else:
            features = torch.randn(2, 1, c.projection_dim, **kw)
        with torch.no_grad():
            tokens = self.adapter.project(features[:, 0])
        self.step_times = {impl: [] for impl in IMPLS}

        def looping(impl: str, **extra: Any) -> Callable[[], torch.Tensor]:
            @torch.no_grad()
            def loop() -> torch.Tensor:
                # As the pipelines call the UNet: the scheduler's timesteps on the device, each step's `t` a view.
                self.pipe.scheduler.set_timesteps(s.steps, device=s.device)
                times = []
                for t in self.pipe.scheduler.timesteps:
                    start = time.perf_counter()
                    out = unet(sample, t, encoder_hidden_states=text, added_cond_kwargs={**added, **extra}).sample
                    sync(s.device)
                    times.append(time.perf_counter() - start)
                self.step_times[impl].append(times)
                return out

            return loop

        @torch.no_grad()
        def setup(impl: str, **extra: Any) -> None:
            """Switch to `impl` and run one untimed call: the timed loop is a generation after a previous one."""
            self.use(impl)
            name = next(iter(self.prompter.adapters)) if impl == "ipadapter" else None
            if name is not None:  # the previous generation with another reference: nothing of it is reused
                self.prompter.attachment.set_prompts({name: AdapterPrompt([Reference(cond=tokens[:1])])}, rows=1)
            self.pipe.scheduler.set_timesteps(s.steps, device=s.device)
            unet(sample, self.pipe.scheduler.timesteps[0], encoder_hidden_states=text,
                 added_cond_kwargs={**added, **extra})
            if name is not None:
                self.prompter.attachment.set_prompts(
                    {name: AdapterPrompt([Reference(cond=tokens[1:], uncond=tokens[:1])])}, rows=1)

        return {"plain": (lambda: setup("plain"), looping("plain")),
                "ipadapter": (lambda: setup("ipadapter"), looping("ipadapter")),
                "diffusers": (lambda: setup("diffusers", image_embeds=[features]),
                              looping("diffusers", image_embeds=[features]))}

    def launches(self) -> dict[str, tuple[int, float]]:
        """Operators that run a kernel in a UNet step of `step_runs`, per implementation: (the first step, the mean of
        the later ones). On a GPU each is a launch, and where kernels are fast (small latents, a fast GPU) the launches
        and the Python around them decide a step's time."""
        found, marks, mode = {}, [], Launches()
        hook = self.pipe.unet.register_forward_pre_hook(lambda *_: marks.append(mode.count))
        try:
            for impl, (setup, loop) in self.step_runs().items():
                setup()
                marks.clear()
                mode.count = 0
                with mode:
                    loop()
                marks.append(mode.count)
                per_step = [b - a for a, b in zip(marks, marks[1:])]
                found[impl] = (per_step[0], sum(per_step[1:]) / len(per_step[1:]))
        finally:
            hook.remove()
        return found

    def touch(self) -> None:
        """Read every weight once: a memory-mapped checkpoint (diffusers loads its adapter that way) is then resident,
        so "models loaded" counts it instead of the first generation paging it in."""
        modules = [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]
        modules += [m for m in (self.adapter, getattr(self, "encoder_model", None), self.diffusers_proj) if m is not None]
        modules += [p for p in (self.diffusers_procs or {}).values() if isinstance(p, torch.nn.Module)]
        with torch.no_grad():
            for module in modules:
                for t in [*module.parameters(), *module.buffers()]:
                    t.sum()

    def kv_mib(self, references: int) -> float:
        """MiB of K'/V' that ipadapter's cache holds for a CFG generation with `references` references: two rows
        (conditional, unconditional) of the adapter's tokens at every layer, K' and V' each as wide as the layer."""
        widths = sum(layer.to_k_ip.out_features + layer.to_v_ip.out_features for _, layer in self.adapter.named_layers())
        tokens = self.adapter.config.projection.tokens
        return 2 * references * tokens * widths * self.setting.torch_dtype.itemsize / MiB

    def close(self) -> None:
        self._tmp.cleanup()


def quiet() -> None:
    """diffusers warns on every `image_encoder_folder=None` load and transformers on missing torchvision: noise here."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine(device: str, threads: int | None = None) -> str:
    """What a result was measured on, for its table (called when the table is written): the GPU's name, or the CPU
    with its cores, torch threads (`threads`, else torch's setting now) and load average."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads{load}"


def interleave(
    runs: dict[Any, Run], repeats: int, device: str, warmup: bool = True, label: str = "passes"
) -> tuple[dict[Any, list[float]], dict[Any, torch.Tensor]]:
    """Seconds of each run in each pass (setups untimed) and its last output: a warm-up pass, then `repeats` passes,
    the runs interleaved within each pass, so that pass i of two runs saw the same machine load. Each pass starts one
    run later than the one before: no run always comes first after a pass's pause, or always after the heaviest run
    (on the H200, plain, always first, read slower than ipadapter's generation doing more work). A progress bar
    counts the passes on stderr: a full-size run takes tens of minutes."""
    times: dict[Any, list[float]] = {k: [] for k in runs}
    outputs: dict[Any, torch.Tensor] = {}
    keys = list(runs)
    for i in tqdm(range(int(not warmup), repeats + 1), desc=label, unit="pass", leave=False, mininterval=10):
        shift = i % len(keys)
        for key in keys[shift:] + keys[:shift]:
            setup, run = runs[key]
            setup()
            gc.collect()  # the setup's garbage (a new attachment's objects) is not collected inside the timed run
            sync(device)
            start = time.perf_counter()
            outputs[key] = run()
            sync(device)
            if i:
                times[key].append(time.perf_counter() - start)
    return times, outputs


@dataclass
class Row:
    """One case: each implementation's value in each pass (memory rows: one value each)."""

    label: str
    plain: list[float]
    ours: list[float]
    diffusers: list[float]
    diff: float | None = None  # largest |ipadapter − diffusers| over the outputs
    scale: float | None = None  # largest |diffusers output|, for scale
    cached: list[float] = field(default_factory=list)  # memory rows: ipadapter with cache_kv=True
    kv: float | None = None  # memory rows: MiB of K'/V' ipadapter's cache holds in that case

    def ratios(self, a: str, b: str) -> list[float]:
        """Pass by pass a / b: the runs of one pass are neighbours in time, so load drifts cancel in the ratio."""
        return [x / y for x, y in zip(getattr(self, a), getattr(self, b))]


def med(values: list[float]) -> float:
    return statistics.median(values)


def pct(values: list[float]) -> str:
    """Ratios as overheads: median and, with several passes, [min, max]."""
    text = f"{100 * (med(values) - 1):+.1f}%"
    return text if len(values) < 2 else f"{text} [{100 * (min(values) - 1):+.1f}, {100 * (max(values) - 1):+.1f}]"


Interval = tuple[float, float] | None  # a median's confidence interval (`median_ci`), None where too few values


def median_ci(values: list[float], confidence: float = 0.95) -> Interval:
    """A distribution-free confidence interval of the median: the order statistics (k, n + 1 − k) with the largest
    k whose binomial(n, ½) tail stays within (1 − confidence) / 2 on each side; None when n is too small for one."""
    n, tail, below = len(values), (1 - confidence) / 2, 0.0
    k = 0
    while True:
        below += math.comb(n, k) / 2**n  # P(fewer than k + 1 of n values lie below the median)
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def times_x(values: list[float]) -> str:
    text = f"{med(values):.2f}x"
    return text if len(values) < 2 else f"{text} [{min(values):.2f}–{max(values):.2f}]"


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(largest |ours − theirs|, largest |theirs|)."""
    ours, theirs = ours.float().cpu(), theirs.float().cpu()
    return float((ours - theirs).abs().max()), float(theirs.abs().max())


def device_syncs(bench: Bench, impl: str, case: str) -> int:
    """`count_waits` of one generation of `case` by `impl`."""
    setup, run = bench.generation_run(impl, case)
    setup()
    return count_waits(run)


def count_waits(run: Callable[[], Any]) -> int:
    """How many times `run` made the CPU wait for the GPU without being asked (torch's CUDA sync debug mode: a device
    value read, a copy to the CPU): once per step, that stops the CPU queueing the next kernels while the GPU still
    runs the last ones. Untimed: the mode's checks cost time."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


ROWS = {"a": "full", "b": "second", "c": "masked", "d": "steps"}  # --rows: d also gives (e), from the same runs


def diffusers_case(case: str) -> str:
    """diffusers' run for a row: its (b) is its (a), since it caches nothing."""
    return "masked" if case == "masked" else "full"


PROJECTIONS = ("projections", "second")  # the key of `Bench.projection_run` among row (b)'s runs


def interval_words(interval: tuple[float, float], *, overhead: bool, confidence: float = 0.95) -> str:
    """A median's interval in the words every verdict of this report uses: as overheads in points or as ratios."""
    low, high = interval
    level = f"{100 * confidence:.4g}% interval of the median"
    if overhead:
        return f"{level} [{100 * (low - 1):+.1f}, {100 * (high - 1):+.1f}]%"
    return f"{level} [{low:.3f}, {high:.3f}]"


def interval_text(ratios: list[float]) -> str:
    """The median overhead and its 95% interval, or the range where the passes are too few for one."""
    interval = median_ci(ratios)
    if interval is None:
        return pct(ratios)
    return f"{100 * (med(ratios) - 1):+.1f}% ({interval_words(interval, overhead=True)})"


class Launches(TorchDispatchMode):
    """Counts the operators that run a kernel: views and `_unsafe_view` only relabel memory, empty tensors are only
    allocated."""

    FREE = frozenset({torch.ops.aten._unsafe_view.default, torch.ops.aten.empty.memory_format,
                      torch.ops.aten.empty_strided.default})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not func.is_view and func not in self.FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def launches_note(arch: str, found: dict[str, tuple[int, float]]) -> str:
    return (f"- {arch} operators that run a kernel per UNet step, as in (d) and (e) (a launch each on a GPU), first / "
            "later steps: " + ", ".join(f"{impl} {first} / {later:g}" for impl, (first, later) in found.items()))


def projection_note(arch: str, steps: int, t: dict[Any, list[float]]) -> str:
    """Row (b) split pass by pass: the K'/V' projections alone (`Bench.projection_run`) over plain's generation, and
    the rest of ipadapter's second generation over plain."""
    plain, ours, kv = t["plain", "full"], t["ipadapter", "second"], t[PROJECTIONS]
    alone = [1 + k / p for k, p in zip(kv, plain)]
    rest = [(o - k) / p for o, k, p in zip(ours, kv, plain)]
    return (f"- {arch} (b), pass by pass: every layer's K'/V' projections alone, {steps} steps: {interval_text(alone)} "
            f"of plain's generation; the rest of ipadapter's second generation: {interval_text(rest)} over plain")


def generations_for(cases: list[str]) -> list[tuple[str, str]]:
    """The generations that rows of `cases` compare: plain's, ipadapter's case and diffusers' (`diffusers_case`)."""
    runs = [("plain", "full")] if cases else []
    for case in cases:
        runs += [("ipadapter", case), ("diffusers", diffusers_case(case))]
    return list(dict.fromkeys(runs))


def time_arch(s: Setting, repeats: int, rows_wanted: str = "abcd") -> tuple[list[Row], list[str]]:
    """The rows of one architecture named in `rows_wanted` (`ROWS`), timed in this process, and on CUDA a note of
    each generation's waits for the GPU."""
    bench = Bench(s, IMPLS, cache_kv=s.cache_kv)
    arch = ARCH_NAMES[s.arch]
    rows, notes = [], []
    cases = [ROWS[r] for r in rows_wanted if ROWS[r] in CASES]
    generations = generations_for(cases)
    if generations:
        runs = {k: bench.generation_run(*k) for k in generations}
        projected = "second" in cases and not s.cache_kv  # with the cache, row (b) projects nothing
        if projected:
            runs[PROJECTIONS] = bench.projection_run()
        t, out = interleave(runs, repeats, s.device, label=f"{arch} generations")
        for case in cases:
            theirs = diffusers_case(case)
            rows.append(Row(f"{arch} {CASES[case]}", t["plain", "full"], t["ipadapter", case], t["diffusers", theirs],
                            *compare(out["ipadapter", case], out["diffusers", theirs])))
        if projected:
            notes.append(projection_note(arch, s.steps, t))
    if "d" in rows_wanted:
        # The generations warmed the UNet up; without them the steps get a warm-up pass of their own, left out here.
        _, so = interleave(bench.step_runs(), repeats, s.device, warmup=not generations, label=f"{arch} steps")
        passes = {i: bench.step_times[i][int(not generations):] for i in IMPLS}
        first = [[run[0] for run in passes[i]] for i in IMPLS]
        later = [[med(run[1:]) for run in passes[i]] for i in IMPLS]  # per pass: its median later step
        lat = s.step_latents
        rows.append(Row(f"{arch} (d) UNet alone, per step: steps 2-{s.steps} ({lat}x{lat} latents, batch 2)",
                        *later, *compare(so["ipadapter"], so["diffusers"])))
        rows.append(Row(f"{arch} (e) UNet alone, first step (ipadapter: + the generation's plan)",
                        *first, *compare(so["ipadapter"], so["diffusers"])))
        notes.append(launches_note(arch, bench.launches()))
    if generations and s.device.startswith("cuda"):
        syncs = ", ".join(f"{impl} {CASES[case].split(')')[0]})={device_syncs(bench, impl, case)}"
                          for impl, case in generations)
        notes.append(f"- {arch} waits for the GPU per generation ({s.steps} steps; torch's sync debug mode): {syncs}")
    bench.close()
    return rows, notes


def _status(field: str) -> int:
    """A size from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class Memory:
    """Bytes in use now and the peak since `reset`: the process's RSS on CPU (Linux), the CUDA allocator on GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def reset(self) -> int:
        """Settle, restart the peak at the current use, and return that use."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: the baseline holds live memory only
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the kernel's RSS high-water mark := current RSS
        except OSError as err:
            raise RuntimeError(f"cannot reset the peak RSS ({err}); run with --no-memory") from None
        return _status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status("VmHWM")


def measure_memory(s: Setting, impl: str, child: bool = False) -> dict[str, float]:
    """MiB of the models `impl` needs, and the peak each case's generation adds above them. `child`: this is a fresh
    process of its own (CPU), whose allocator may be set for the generations (`fix_mmap_threshold`)."""
    quiet()
    if s.device == "cpu":  # the loading code used once first: its first use is not the models' memory
        import benchmarks.memory_warmup  # noqa: F401
    memory = Memory(s.device)
    start = memory.reset()
    cached = impl == CACHED
    impl = "ipadapter" if cached else impl
    bench = Bench(s, (impl,), cache_kv=cached)
    bench.touch()
    result = {"loaded": (memory.reset() - start) / MiB}
    if child:
        fix_mmap_threshold()
    for case in CASES:
        setup, run = bench.generation_run(impl, case)
        setup()
        run()  # warm-up: see the module docstring
        setup()
        before = memory.reset()
        run()
        result[case] = (memory.peak() - before) / MiB
    if bench.adapter is not None:
        result.update(kv1=bench.kv_mib(1), kv2=bench.kv_mib(2))
    bench.close()
    return result


def memory_arch(s: Setting, context: Any, repeats: int = 1) -> list[Row]:
    """Memory rows of one architecture, each implementation measured in its own fresh process (CPU), or in turn in
    this one (`context` None, CUDA: the allocator's counters see tensors alone, whatever the process holds);
    `repeats` times, each repeat starting one implementation later (the RSS of the same run varies by a tenth of a
    MiB from one process to the next). A progress bar counts the measurements on stderr."""
    impls = [*IMPLS, CACHED]
    found: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
    arch = ARCH_NAMES[s.arch]
    order = [impl for r in range(repeats) for impl in impls[r % len(impls):] + impls[: r % len(impls)]]
    for impl in tqdm(order, desc=f"{arch} memory", unit="run", leave=False, mininterval=10):
        if context is None:
            found[impl].append(measure_memory(s, impl))
            gc.collect()
            continue
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            found[impl].append(pool.submit(measure_memory, s, impl, child=True).result())
    labels = {"loaded": "models loaded (MiB)", **{k: f"{v}: peak above the models (MiB)" for k, v in CASES.items()}}
    ours = found["ipadapter"][0]
    kv = {"full": ours["kv1"], "masked": ours["kv2"]}
    return [Row(f"{arch} {label}", *([run[key] for run in found[i]] for i in IMPLS),
                cached=[run[key] for run in found[CACHED]], kv=kv.get(key))
            for key, label in labels.items()]


def fresh_processes() -> Any:
    """New interpreters (spawn), each importing what it needs: a child forked from a process that has imported torch
    and diffusers (as a forkserver's children are) read about 24 MiB more "models loaded" at the `--quick` sizes
    than a new interpreter building the same models, and not by the same amount for each implementation (ipadapter
    1.1 MiB above diffusers forked, 0.1 MiB below in new interpreters). About 7 s of imports and warm-up a child."""
    return multiprocessing.get_context("spawn")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold() -> None:
    """From now on every allocation of 64 KiB or more is a mapping of its own, returned to the OS when freed, so a
    generation's peak is that of its live buffers: glibc adapts the threshold to past frees, and the same allocations
    then raise the RSS peak by tens of MiB or not depending on the heap's history."""
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("glibc refused a fixed mmap threshold; run with --no-memory")


def verdicts(settings: list[Setting], rows: list[Row], memory: list[Row]) -> list[str]:
    """The issue's targets, each decided from the spread of the passes, not from one median."""
    lines = []
    for d, e in zip(rows, rows[1:]):
        if "(d) UNet alone" in d.label:
            over = d.ratios("ours", "plain")
            n = next(s.steps for s in settings if ARCH_NAMES[s.arch] == d.label.split()[0])
            whole = (med(e.ours) + (n - 1) * med(d.ours)) / (med(e.plain) + (n - 1) * med(d.plain)) - 1
            lines.append(f"- {d.label.split()[0]} adapter overhead per denoising step: {pct(over)} of the plain UNet "
                         f"(target ≤ +{100 * TARGET['step_overhead']:.1f}%): {decide(over, 1 + TARGET['step_overhead'])}"
                         f"; with the once-per-generation work spread over the {n} steps: {100 * whole:+.2f}%")
    for r in rows:
        if "(b)" in r.label:
            over = r.ratios("ours", "plain")
            lines.append(f"- {r.label.split()[0]} second generation, same reference, over plain: {pct(over)} (target "
                         f"≤ +{100 * TARGET['repeat_overhead']:.0f}%): {decide(over, 1 + TARGET['repeat_overhead'])}")
    if rows:
        lines += against_diffusers(rows)
    if memory:
        for name, attr in (("ipadapter", "ours"), (CACHED, "cached")):
            lines += heavier(name, {r.label: list(zip(getattr(r, attr), r.diffusers)) for r in memory})
    return lines


def joint_level(rows: int) -> float:
    """The confidence of each row's interval that holds 95% for `rows` rows together (Bonferroni)."""
    return 1 - 0.05 / rows


def by_chance(repeats: int) -> str:
    """How often a row comes out on one side in every one of `repeats` paired runs where nothing differs."""
    return f" (with no difference, 1 run in {2 ** repeats} for each row)" if repeats > 1 else ""


def heavier(name: str, pairs: dict[str, list[tuple[float, float]]]) -> list[str]:
    """Which memory rows `name` holds more in than diffusers, repeat by repeat (each repeat a fresh process of each):
    beyond the noise when the interval of the median difference, 95% for the rows together as in `against_diffusers`,
    lies above 0 (9 repeats or more for 8 rows). With fewer, the rows above in every repeat, with the odds of that
    where nothing differs: 3 repeats put each row above in all of them in 1 of 8 runs (a RSS peak of 1–2 MiB moves by
    a tenth of a MiB from one process to the next)."""
    n, family = len(next(iter(pairs.values()))), joint_level(len(pairs))
    joint = {label: median_ci([x - d for x, d in p], family) for label, p in pairs.items()}
    if all(i is not None for i in joint.values()):
        listed = [label for label, i in joint.items() if i[0] > 0]
        shown = [f"{label} (+{joint[label][0]:.2f} to +{joint[label][1]:.2f} MiB)" for label in listed]
        heading = (f"beyond the noise (the {100 * family:.4g}% interval of the median difference above 0: 95% for the "
                   f"{len(pairs)} rows together)")
    else:
        listed = shown = [label for label, p in pairs.items() if all(x > d for x, d in p)]
        heading = "in every repeat" + by_chance(n)
    lines = [f"- Memory rows where {name} is above diffusers {heading}: " + (", ".join(shown) or "none")]
    if n > 1:
        sometimes = [f"{label} ({sum(x > d for x, d in p)} of {n})" for label, p in pairs.items()
                     if label not in listed and med([x for x, _ in p]) > med([d for _, d in p])]
        lines.append(f"- Memory rows where {name} is above diffusers in the median, within the noise: "
                     + (", ".join(sometimes) or "none"))
    return lines


def against_diffusers(rows: list[Row]) -> list[str]:
    """Which rows are slower than diffusers beyond the noise, judged for the rows together: each median ratio's
    interval at 1 − 5%/m for m rows (Bonferroni), so that where no row differs a report names none with 95%
    probability, however the rows depend on each other. At 95% each, 10 equal rows would name one in up to 22% of
    reports (1 − 0.975¹⁰); the rows whose own 95% interval lies above 1 are still listed, apart. Too few passes for
    those intervals (9 for 10 rows, 6 for one): the rows slower in every pass, with the odds of that where nothing
    differs (3 passes: 1 in 8 for each row, so a GPU table of 5 rows names one in about half its runs)."""
    ratios = {r.label: r.ratios("ours", "diffusers") for r in rows}
    family = joint_level(len(rows))
    own = {label: median_ci(found) for label, found in ratios.items()}
    joint = {label: median_ci(found, family) for label, found in ratios.items()}

    def shown(labels: list[str], intervals: dict[str, Interval], confidence: float = 0.95) -> str:
        def one(label: str) -> str:
            interval = intervals[label]
            words = "" if interval is None else ", " + interval_words(interval, overhead=False, confidence=confidence)
            return f"{label} ({times_x(ratios[label])}{words})"

        return "; ".join(one(label) for label in labels) or "none"

    if all(i is not None for i in joint.values()):
        slower = [label for label, i in joint.items() if i[0] > 1]
        alone = [label for label, i in own.items() if i[0] > 1 and label not in slower]
        unsure = [label for label, i in own.items() if i[0] <= 1 < med(ratios[label])]
        return [f"- Rows slower than diffusers beyond the noise (the {100 * family:.4g}% interval of the median ratio "
                f"above 1: 95% for the {len(rows)} rows together): " + shown(slower, joint, family),
                f"- Rows whose own 95% interval lies above 1, within the noise of {len(rows)} rows: "
                + shown(alone, own),
                "- Rows slower in the median, within the noise (the 95% interval contains 1): " + shown(unsure, own)]
    slower = [label for label, found in ratios.items() if min(found) > 1]
    unsure = [label for label, found in ratios.items() if med(found) > 1 >= min(found)]
    passes = len(next(iter(ratios.values())))
    return [f"- Rows slower than diffusers in every pass{by_chance(passes)}: " + shown(slower, own),
            "- Rows slower in the median but not in every pass (within the noise): " + shown(unsure, own)]


def verdict(interval: Interval, limit: float) -> str:
    """A target on a ratio judged on the 95% interval of its median: met, not met, or not decided by these runs."""
    if interval is None:
        return "too few runs for an interval"
    if interval[1] <= limit:
        return "met"
    return "NOT met" if interval[0] > limit else "undecided (the interval contains the target)"


def decide(ratios: list[float], limit: float) -> str:
    """A target on a ratio: on the 95% interval of the median where the passes give one (6 or more), else on every
    pass: met in all, in the median only, or not."""
    interval = median_ci(ratios)
    if interval is not None:
        return f"{verdict(interval, limit)} ({interval_words(interval, overhead=True)})"
    if max(ratios) <= limit:
        return "met in every pass"
    if med(ratios) <= limit:
        return "met in the median (not in every pass: within the noise)"
    return "met in some passes only (noise)" if min(ratios) <= limit else "NOT met in any pass"


def render(header: list[str], rows: list[Row], memory: list[Row], notes: list[str]) -> str:
    out = [*header]
    if rows:
        out += ["", "| case | plain (s) | ipadapter (s) | diffusers (s) | ipadapter overhead [min, max] "
                "| diffusers overhead [min, max] | ipadapter / diffusers [min–max] "
                "| outputs: max abs diff ipadapter vs diffusers (max abs output) |",
                "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.label} | {med(r.plain):.3f} | {med(r.ours):.3f} | {med(r.diffusers):.3f} "
                   f"| {pct(r.ratios('ours', 'plain'))} | {pct(r.ratios('diffusers', 'plain'))} "
                   f"| {times_x(r.ratios('ours', 'diffusers'))} | {r.diff:.1e} ({r.scale:.3g}) |")
    if memory:
        out += ["", f"| memory | plain | ipadapter | diffusers | ipadapter / diffusers | {CACHED} | its / diffusers "
                "| K'/V' the cache holds (MiB) |", "|---|---|---|---|---|---|---|---|"]
        for r in memory:
            ratios = [times_x([x / d for x, d in zip(xs, r.diffusers)]) if min(r.diffusers) > 0 else "–"
                      for xs in (r.ours, r.cached)]
            kv = "–" if r.kv is None else f"{r.kv:.2f}"
            out.append(f"| {r.label} | {med(r.plain):.1f} | {med(r.ours):.1f} | {med(r.diffusers):.1f} | {ratios[0]} "
                       f"| {med(r.cached):.1f} | {ratios[1]} | {kv} |")
    return "\n".join(out + ["", *notes, ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA, else float32")
    ap.add_argument("--archs", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    ap.add_argument("--resolution", type=int, default=128, help="SD 1.5 image size (px)")
    ap.add_argument("--steps", type=int, default=8, help="SD 1.5 denoising steps (the target setting: 8)")
    ap.add_argument("--vith-layers", type=int, default=32, help="ViT-H encoder depth (full: 32)")
    ap.add_argument("--sdxl-resolution", type=int, default=128)
    ap.add_argument("--sdxl-steps", type=int, default=4)
    ap.add_argument("--bigg-layers", type=int, default=8, help="ViT-bigG encoder depth (full: 48)")
    ap.add_argument("--step-latents", type=int, default=32,
                    help="latent size of the (d) rows (the issue's per-step setting: 32, i.e. 256 px for SD 1.5)")
    ap.add_argument("--repeats", type=int, help="interleaved passes after the warm-up (default 5; --quick: 9)")
    ap.add_argument("--memory-repeats", type=int,
                    help="fresh processes per implementation for the memory rows (default 1; --quick on a CPU: 3); "
                         "9 or more decide which rows are heavier than diffusers beyond the noise")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="measure peak memory in fresh processes")
    ap.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                    help="time the cases in this process (--no-timing: memory rows only)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 32 px, 2 steps, 9 passes")
    ap.add_argument("--cache-kv", action="store_true",
                    help="time ipadapter with cache_kv=True (K'/V' kept for the generation); memory measures both")
    ap.add_argument("--rows", default="abcd",
                    help="the timed rows: any of a, b, c (generations) and d (the UNet steps, rows (d) and (e)); "
                         "e.g. --rows b --repeats 15 for row (b)'s target with a tighter interval")
    ap.add_argument("--threads", type=int,
                    help="torch threads for the timed rows (default: torch's, and 1 with --quick on a CPU: tiny "
                         "kernels on one core, as a GPU's host thread dispatches them, with no hand-offs)")
    ap.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/inference-<device>[-quick].md)")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    if not args.rows or set(args.rows) - set(ROWS):
        ap.error(f"--rows takes letters among {''.join(ROWS)}, got {args.rows!r}")
    if args.quick:
        args.resolution = args.sdxl_resolution = 32
        args.steps = args.sdxl_steps = 2
        args.step_latents = 8
    args.repeats = args.repeats or (9 if args.quick else 5)
    if args.threads is None and args.quick and args.device == "cpu":
        args.threads = 1
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.out = args.out or ROOT / "benchmarks" / "results" / f"inference-{args.device}{'-quick' if args.quick else ''}.md"
    return args


def settings_of(args: argparse.Namespace) -> list[Setting]:
    base = Setting("sd15", args.device, args.dtype, args.resolution, args.steps, args.vith_layers, args.quick,
                   args.step_latents, args.cache_kv)
    known = {"sd15": base,
             "sdxl": replace(base, arch="sdxl", resolution=args.sdxl_resolution, steps=args.sdxl_steps,
                             encoder_layers=args.bigg_layers)}
    return [known[a] for a in args.archs.split(",")]


Report = Callable[[list[Row], list[Row], list[str]], None]


def benchmark(args: argparse.Namespace, report: Report | None = None) -> tuple[list[Row], list[Row], list[str]]:
    """Memory first (the children run while this process holds no model), then time; returns rows and notes.
    `report` is given the rows so far after each architecture: a run stopped at a time limit keeps what it measured."""
    quiet()
    settings = settings_of(args)
    memory: list[Row] = []
    notes: list[str] = []
    if args.memory:
        # CUDA: no child processes. Importing torch and diffusers asks CUDA for its devices, after which a forked
        # child cannot use CUDA, and spawned ones re-import everything (over 20 s each on the GPU machine).
        context = fresh_processes() if args.device == "cpu" else None
        for s in settings:
            t = time.perf_counter()
            repeats = args.memory_repeats or (3 if args.quick and args.device == "cpu" else 1)
            memory += memory_arch(s, context, repeats)
            notes.append(f"- {ARCH_NAMES[s.arch]} memory processes: {time.perf_counter() - t:.0f} s")
            if report:
                report([], memory, notes)
    rows: list[Row] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        for s in settings if args.timing else []:
            t = time.perf_counter()
            timed, syncs = time_arch(s, args.repeats, args.rows)
            rows += timed
            gc.collect()
            notes += [*syncs, f"- {ARCH_NAMES[s.arch]} timing: {time.perf_counter() - t:.0f} s"]
            if report:
                report(rows, memory, notes)
    finally:
        torch.set_num_threads(threads)
    return rows, memory, verdicts(settings, rows, memory) + notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    command = " ".join(["python benchmarks/inference.py", *(sys.argv[1:] if argv is None else argv)])

    def write(rows: list[Row], memory: list[Row], notes: list[str], final: bool = False) -> str:
        """The table so far, written atomically: a killed run leaves the last architecture it finished."""
        header = [f"# Inference benchmark{' (quick smoke run)' if args.quick else ''}", "", f"`{command}`", "",
                  f"Device: {machine(args.device, args.threads)}; {args.dtype}; {args.repeats} interleaved passes "
                  "after a warm-up "
                  "pass (times: medians; overheads and ratios: median of the pass-by-pass ratios [min, max]); "
                  f"total {time.perf_counter() - start:.0f} s{'' if final else ' so far (the run did not finish)'}. "
                  "Random weights, real architectures:", "",
                  *(f"- {s.describe()}" for s in settings_of(args))]
        text = render(header, rows, memory, notes)
        write_text(args.out, text)
        return text

    rows, memory, notes = benchmark(args, write)
    print(write(rows, memory, notes, final=True))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
