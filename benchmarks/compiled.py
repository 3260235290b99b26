"""A compiled UNet with adapters attached vs the compiled plain UNet and diffusers' compiled IP-Adapter, per step.

`--arch`'s UNet (real architecture, random weights; `--dtype`, default fp32, on `--device`, default the CPU) at
`--latents` (default 32x32), CFG batch of 2, 77 text tokens, with a random adapter in the published layout: SD 1.5
(default) with Plus (16 tokens, resampler of depth 4 on ViT-H patch features), SDXL with the base adapter (4 tokens
from the ViT-bigG embedding). ipadapter is given the reference's tokens (projected once per generation, as its
pipelines do); diffusers is given the image features, which its UNet projects at every step, as its pipelines do.
One `torch.compile(unet)` object serves all three, switched by swapping the attention processors and diffusers'
projection (one attachment; its pre-call hook, a few µs of Python, also runs for the others): each is compiled at
its first call. Then `--repeats` passes of `--steps` timesteps (descending, as a
generation's) take turns at every step, each first at every third (a step's three runs are neighbours in time, so a
change of load is in all), ipadapter's scale changing from pass to pass and its reference at every pass: dynamo's
counters must show one graph each, no graph break in ours, no recompilation. Each overhead is the median of all the
steps' ratios with a distribution-free 95% confidence interval, judged against the target only when the interval is
on one side of it. The floor is the adapter's own arithmetic per step: matmul, convolution and attention FLOPs (SDPA's
math backend, so that attention is counted) of the eager step with K'/V' made beforehand, as the compiled graph has
them. The compiled output is compared with the eager UNet's, and ipadapter's eager output with diffusers'.

    python benchmarks/compiled.py                   # inductor (needs a C++ compiler on the CPU)
    python benchmarks/compiled.py --latents 8 --backend eager --steps 2 --repeats 2   # wiring only, in a minute
    python benchmarks/compiled.py --repeats 12 --steps 30   # 360 steps each: a 95% interval of about ±0.3 points here
    python benchmarks/compiled.py --device cuda --dtype float16 --latents 64 --steps 30 --mode reduce-overhead
    python benchmarks/compiled.py --arch sdxl --device cuda --dtype float16 --latents 128 --steps 30   # 1024 px
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ipadapter.atomic import write_text
from ipadapter.projection import ProjectionConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inference import SD15_UNET, SDXL_UNET, machine, median_ci, quiet, sync, verdict  # noqa: E402

SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
TARGET = 0.005  # issue 20: the adapter adds at most 0.5% to a compiled step
NAMES = ("plain", "ipadapter", "diffusers")


class Arch(NamedTuple):
    """A base model and the published adapter it is timed with."""

    label: str
    unet: dict[str, Any]
    variant: str
    projection: ProjectionConfig
    features: tuple[int, ...]  # one image's features, as diffusers is given them (patch tokens or one embedding)
    pooled: int  # width of SDXL's pooled text embedding, which its UNet also takes (0: none)


ARCHS = {
    "sd15": Arch("SD 1.5", SD15_UNET, "plus", ProjectionConfig(
        "resampler", in_dim=1280, cross_dim=768, tokens=16, dim=768, depth=4, heads=12), (257, 1280), 0),
    "sdxl": Arch("SDXL", SDXL_UNET, "base", ProjectionConfig("linear", in_dim=1280, cross_dim=2048, tokens=4),
                 (1280,), 1280),
}


class Impl(NamedTuple):
    """What one implementation puts on the shared UNet, and what its calls add."""

    processors: dict[str, Any]
    projection: torch.nn.Module | None  # diffusers' image projection (`unet.encoder_hid_proj`)
    extra: dict[str, Any]


@torch.no_grad()
def step_flops(unet: torch.nn.Module, *args: torch.Tensor, **kwargs: Any) -> int:
    """FLOPs of a UNet call after a first one (which makes what is kept across steps), attention included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels are not counted
        unet(*args, **kwargs)
        with FlopCounterMode(display=False) as counter:
            unet(*args, **kwargs)
    return counter.get_total_flops()


def overhead(ratios: list[float]) -> str:
    interval = median_ci(ratios)
    spread = "" if interval is None else f", 95% CI [{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"
    return f"{100 * statistics.median(ratios):+.2f}%{spread}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=list(ARCHS), default="sd15")
    ap.add_argument("--latents", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="UNet calls per pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--mode", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs on a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(SHORT), default="float32")
    ap.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/compiled-<device>.md)")
    args = ap.parse_args(argv)
    out_path = args.out or ROOT / "benchmarks" / "results" / f"compiled-{args.device}.md"
    place = dict(device=args.device, dtype=getattr(torch, args.dtype))
    quiet()
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from torch._dynamo.utils import counters

    from ipadapter import AdapterPrompt, Reference, attach
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.checkpoint import published_state_dict

    arch = ARCHS[args.arch]
    torch.manual_seed(0)
    with torch.device(args.device):  # weights drawn where they run: one CPU core takes tens of seconds for them
        unet = UNet2DConditionModel(**arch.unet).eval()
        adapter = IPAdapter.for_unet(unet, AdapterConfig(arch.variant, arch.projection))
    plain_procs = dict(unet.attn_processors)
    unet._load_ip_adapter_weights([published_state_dict(adapter, unet)], low_cpu_mem_usage=False)
    unet.to(**place)
    adapter.to(**place)
    theirs = Impl(dict(unet.attn_processors), unet.encoder_hid_proj, {})
    unet.encoder_hid_proj = None
    unet.set_attn_processor(dict(plain_procs))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(args.steps, device=args.device)  # as the pipelines: each step's `t` a view on the device
    sample = torch.randn(2, 4, args.latents, args.latents).to(**place)  # drawn on the CPU: the same inputs anywhere
    text = torch.randn(2, 77, unet.config.cross_attention_dim).to(**place)
    features = [torch.randn(2, 1, *arch.features).to(**place) for _ in range(2)]  # per reference: [uncond; cond]
    added = {}  # SDXL's pooled text and size conditioning, the same for every implementation
    if arch.pooled:
        added = {"text_embeds": torch.randn(2, arch.pooled).to(**place),
                 "time_ids": torch.tensor([[8 * args.latents] * 2 + [0, 0] + [8 * args.latents] * 2] * 2).to(**place)}
    with torch.no_grad():
        tokens = [adapter.project(f[:, 0]) for f in features]
    att = attach(unet, adapter, scheduler=scheduler)  # switched by processors below: one attachment, its hook kept
    impls = {"plain": Impl(plain_procs, None, {"added_cond_kwargs": added}),
             "ipadapter": Impl(dict(unet.attn_processors), None, {"added_cond_kwargs": added}), "diffusers": theirs}

    def switch(name: str) -> None:
        unet.encoder_hid_proj = impls[name].projection  # first: diffusers' resampler has attention layers of its own
        unet.set_attn_processor(dict(impls[name].processors))

    def set_reference(reference: int, scale: float = 1.0) -> None:
        """A new generation for ipadapter (its plan, K'/V', weights) and diffusers' features for that reference."""
        ref = Reference(cond=tokens[reference][1:], uncond=tokens[reference][:1])
        att.set_prompts({"0": AdapterPrompt([ref], scale=scale)}, rows=1)
        impls["diffusers"].extra["added_cond_kwargs"] = {**added, "image_embeds": [features[reference]]}

    def call(model: torch.nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
        return model(sample, t, encoder_hidden_states=text, **impls[name].extra).sample

    set_reference(0)
    at = scheduler.timesteps[0]
    flops = {}
    for name in NAMES:
        switch(name)
        att.runtime.cache_kv = name == "ipadapter"  # its first call makes K'/V', as `prepare` does before a graph
        flops[name] = step_flops(unet, sample, at, encoder_hidden_states=text, **impls[name].extra)
        att.runtime.cache_kv = False
        att.clear_cache()
    floor, theirs_floor = (flops[n] / flops["plain"] - 1 for n in ("ipadapter", "diffusers"))
    print(f"step: {flops['plain'] / 1e9:.1f} GFLOP plain; ipadapter adds {100 * floor:.2f}%, diffusers "
          f"{100 * theirs_floor:.2f}%", flush=True)

    compiled = torch.compile(unet, backend=args.backend, mode=args.mode)
    torch._dynamo.reset()
    counters.clear()
    compile_s, graphs, breaks = {}, {}, {}
    for name in NAMES:
        switch(name)
        before_graphs, before_breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        start = time.perf_counter()
        with torch.no_grad():
            for t in scheduler.timesteps:
                call(compiled, name, t)
        sync(args.device)
        compile_s[name] = time.perf_counter() - start
        graphs[name] = counters["stats"]["unique_graphs"] - before_graphs
        breaks[name] = sum(counters["graph_break"].values()) - before_breaks
        print(f"{name}: compiled and run in {compile_s[name]:.0f} s ({graphs[name]} graphs, {breaks[name]} breaks)",
              flush=True)
    compiled_graphs = counters["stats"]["unique_graphs"]

    @torch.no_grad()
    def round_of(t: torch.Tensor, first: int) -> dict[str, float]:
        """One step of each implementation at timestep t, starting with NAMES[first], each timed alone."""
        times = {}
        for name in NAMES[first:] + NAMES[:first]:
            switch(name)
            start = time.perf_counter()
            call(compiled, name, t)
            sync(args.device)
            times[name] = time.perf_counter() - start
        return times

    per_step: dict[str, list[float]] = {name: [] for name in NAMES}  # per pass: the median step
    ratios: dict[str, list[float]] = {"ipadapter": [], "diffusers": [], "ours/theirs": []}
    for i in range(args.repeats):
        set_reference(i % 2, scale=1.0 - 0.5 * i / args.repeats)
        rounds = [round_of(t, j % 3) for j, t in enumerate(scheduler.timesteps)]
        for name in NAMES:
            per_step[name].append(statistics.median(r[name] for r in rounds))
        ratios["ipadapter"] += [r["ipadapter"] / r["plain"] - 1 for r in rounds]
        ratios["diffusers"] += [r["diffusers"] / r["plain"] - 1 for r in rounds]
        ratios["ours/theirs"] += [r["ipadapter"] / r["diffusers"] - 1 for r in rounds]
        print(f"pass {i + 1}/{args.repeats}: ipadapter {100 * statistics.median(ratios['ipadapter']):+.2f}%, "
              f"diffusers {100 * statistics.median(ratios['diffusers']):+.2f}% over plain so far", flush=True)
    recompiled = counters["stats"]["unique_graphs"] - compiled_graphs
    skipped = counters["inductor"]["cudagraph_skips"]  # a graph CUDA graphs refused runs without them

    set_reference(0)
    with torch.no_grad():
        switch("ipadapter")
        got, eager = call(compiled, "ipadapter", at), call(unet, "ipadapter", at)
        switch("diffusers")
        reference_out = call(unet, "diffusers", at)
        switch("plain")
        effect = float((eager - call(unet, "plain", at)).abs().max())
    diff, vs_diffusers = float((got - eager).abs().max()), float((eager - reference_out).abs().max())
    att.detach()

    def stat(name: str, values: list[float]) -> str:
        return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}]"

    mode = f", mode {args.mode}" if args.mode else ""
    lines = [
        "# Compiled UNet with adapters", "",
        f"`python benchmarks/compiled.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{machine(args.device)}; torch {torch.__version__}, backend {args.backend}{mode}; {arch.label} UNet (random "
        f"weights, {SHORT[args.dtype]}), {args.latents}x{args.latents} latents, batch 2, a {arch.variant} adapter "
        f"({arch.projection.tokens} tokens); "
        f"{args.repeats} passes of {args.steps} steps, the three taking turns at every step, ipadapter's scale and "
        "reference changing every pass.", "",
        "| | plain compiled | ipadapter compiled | diffusers compiled |", "|---|---|---|---|",
        f"| first call (compile + {args.steps} steps), s | "
        + " | ".join(f"{compile_s[n]:.1f}" for n in NAMES) + " |",
        "| per step, s: median [min–max] of the passes' medians | "
        + " | ".join(stat(n, per_step[n]) for n in NAMES) + " |",
        "| graphs / graph breaks at the first call | " + " | ".join(f"{graphs[n]} / {breaks[n]}" for n in NAMES) + " |",
        "| arithmetic per step over plain (matmuls, convolutions, attention) | "
        f"{flops['plain'] / 1e9:.1f} GFLOP | +{100 * floor:.2f}% | +{100 * theirs_floor:.2f}% |", "",
        f"- ipadapter's overhead per compiled step: {overhead(ratios['ipadapter'])} over plain (the median of "
        f"{len(ratios['ipadapter'])} steps' ratios to the neighbouring plain step); target ≤ +{100 * TARGET:.1f}%: "
        f"{verdict(median_ci(ratios['ipadapter']), TARGET)}",
        f"- diffusers' overhead per compiled step: {overhead(ratios['diffusers'])} over plain; ipadapter vs diffusers: "
        f"{overhead(ratios['ours/theirs'])} (≤ 0: {verdict(median_ci(ratios['ours/theirs']), 0.0)})",
        f"- recompilations while ipadapter's scale and reference changed: {recompiled}"
        + (f"; CUDA graphs skipped: {skipped}" if args.mode == "reduce-overhead" else ""),
        f"- ipadapter compiled vs eager: max abs diff {diff:.1e}; ipadapter vs diffusers, eager: {vs_diffusers:.1e} "
        f"(the adapter's effect, ipadapter vs plain: {effect:.3g})", "",
    ]
    text_out = "\n".join(lines)
    write_text(out_path, text_out)  # atomic: a killed run leaves the last result
    print(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
