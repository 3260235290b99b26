"""A compiled UNet with adapters attached vs the compiled plain UNet: time per step, compile time, graph count.

SD 1.5's UNet (real architecture, random weights; `--dtype`, default fp32, on `--device`, default the CPU) at
`--latents` (default 32x32, 256 px), CFG batch of 2, 77 text tokens; a Plus-shaped adapter (16 image tokens per
reference) given its tokens directly. One `torch.compile(unet)` object serves both, switched by swapping the
attention processors (one attachment; its pre-call hook, a few µs of Python, also runs for "plain"): it is first
called with the original processors (compile: the plain graph), then with the adapter's (compile: the adapter's
graph); afterwards they run in `--repeats` passes of `--steps` timesteps (descending, as a generation's), the two
alternating at every step (each first at every other step: a step's pair is neighbours in time, and the overhead is
taken from the pairs' ratios), the adapter's scale changing from pass to pass and its reference once: dynamo's
counters must show exactly the two graphs, no graph break, no recompilation.
The compiled output is compared with the eager UNet's.

    python benchmarks/compiled.py                   # inductor (needs a C++ compiler on the CPU)
    python benchmarks/compiled.py --latents 16 --backend aot_eager
    python benchmarks/compiled.py --device cuda --dtype float16 --latents 64 --steps 30   # SD 1.5 at 512 px on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ipadapter.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inference import SD15_UNET, machine, pct, sync  # noqa: E402

SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="UNet calls per pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(SHORT), default="float32")
    ap.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/compiled-<device>.md)")
    args = ap.parse_args(argv)
    out_path = args.out or ROOT / "benchmarks" / "results" / f"compiled-{args.device}.md"
    place = dict(device=args.device, dtype=getattr(torch, args.dtype))
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from torch._dynamo.utils import counters

    from ipadapter import AdapterPrompt, Reference, attach
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.projection import ProjectionConfig

    torch.manual_seed(0)
    began = time.perf_counter()
    with torch.device(args.device):  # weights drawn where they run: one CPU core takes tens of seconds for them
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        adapter = IPAdapter.for_unet(unet, AdapterConfig("plus", ProjectionConfig(
            "resampler", in_dim=1280, cross_dim=768, tokens=16, dim=768, depth=1, heads=12)))
    unet.to(**place)
    adapter.to(**place)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(args.steps)
    sample = torch.randn(2, 4, args.latents, args.latents).to(**place)  # drawn on the CPU: the same inputs anywhere
    text = torch.randn(2, 77, 768).to(**place)
    refs = [torch.randn(1, 16, 768).to(**place) for _ in range(2)]
    uncond = torch.randn(1, 16, 768).to(**place)
    compiled = torch.compile(unet, backend=args.backend)
    plain_procs = dict(unet.attn_processors)
    att = attach(unet, adapter, scheduler=scheduler)  # switched by processors below: one attachment, its hook kept
    our_procs = dict(unet.attn_processors)

    def prompt(scale: float, ref: torch.Tensor) -> dict[str, AdapterPrompt]:
        return {"0": AdapterPrompt([Reference(cond=ref, uncond=uncond)], scale=scale)}

    @torch.no_grad()
    def steps(model: torch.nn.Module) -> tuple[list[float], torch.Tensor]:
        times = []
        for t in scheduler.timesteps:
            start = time.perf_counter()
            out = model(sample, t, encoder_hidden_states=text).sample
            sync(args.device)
            times.append(time.perf_counter() - start)
        return times, out

    torch._dynamo.reset()
    counters.clear()
    unet.set_attn_processor(dict(plain_procs))
    start = time.perf_counter()
    steps(compiled)
    compile_plain = time.perf_counter() - start
    print(f"models built in {start - began:.0f} s; plain UNet compiled and run in {compile_plain:.0f} s", flush=True)
    unet.set_attn_processor(dict(our_procs))
    att.set_prompts(prompt(1.0, refs[0]), rows=1)
    start = time.perf_counter()
    steps(compiled)
    compile_ours = time.perf_counter() - start
    print(f"with the adapter: compiled and run in {compile_ours:.0f} s", flush=True)
    graphs = counters["stats"]["unique_graphs"]

    @torch.no_grad()
    def paired(t: torch.Tensor, first: str) -> dict[str, float]:
        """One step of each UNet at timestep t, `first` first, each timed alone: neighbours in time, so a change of
        load (or clock) between steps is in both."""
        times = {}
        for name in (first, "ipadapter" if first == "plain" else "plain"):
            unet.set_attn_processor(dict(plain_procs if name == "plain" else our_procs))
            start = time.perf_counter()
            compiled(sample, t, encoder_hidden_states=text)
            sync(args.device)
            times[name] = time.perf_counter() - start
        return times

    per_step: dict[str, list[float]] = {"plain": [], "ipadapter": []}  # per pass: the median step
    ratios = []  # per pass: the median of its step-by-step ratios
    for i in range(args.repeats):
        att.set_prompts(prompt(1.0 - 0.1 * i, refs[i % 2]), rows=1)
        pairs = [paired(t, "plain" if j % 2 == 0 else "ipadapter") for j, t in enumerate(scheduler.timesteps)]
        for name in per_step:
            per_step[name].append(statistics.median(p[name] for p in pairs))
        ratios.append(statistics.median(p["ipadapter"] / p["plain"] for p in pairs))
    unet.set_attn_processor(dict(our_procs))
    recompiled = counters["stats"]["unique_graphs"] - graphs
    got, eager = steps(compiled)[1], steps(unet)[1]
    diff, scale = float((got - eager).abs().max()), float(eager.abs().max())
    att.detach()
    breaks = sum(counters["graph_break"].values())
    lines = [
        "# Compiled UNet with adapters", "",
        f"`python benchmarks/compiled.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{machine(args.device)}; torch {torch.__version__}, backend {args.backend}; SD 1.5 UNet (random weights, "
        f"{SHORT[args.dtype]}), {args.latents}x{args.latents} "
        f"latents, batch 2, one Plus-shaped reference (16 tokens); {args.repeats} interleaved passes of {args.steps} "
        "steps, the scale changing every pass.", "",
        "| | plain compiled | ipadapter compiled |", "|---|---|---|",
        f"| first call (compile + {args.steps} steps), s | {compile_plain:.1f} | {compile_ours:.1f} |",
        f"| per step, s: median [min–max] of the passes' medians | {statistics.median(per_step['plain']):.3f} "
        f"[{min(per_step['plain']):.3f}–{max(per_step['plain']):.3f}] | {statistics.median(per_step['ipadapter']):.3f} "
        f"[{min(per_step['ipadapter']):.3f}–{max(per_step['ipadapter']):.3f}] |", "",
        f"- adapter overhead per compiled step: {pct(ratios)} (target ≤ +0.5%): per pass the median of its "
        "step-by-step ratios (the two UNets alternate at every step, each first at every other), then their median "
        "[min, max]",
        f"- graphs: {graphs} (plain + with adapters); recompilations while scale and reference changed: {recompiled}; "
        f"graph breaks: {breaks}",
        f"- compiled vs eager output with the adapter: max abs diff {diff:.1e} (max abs output {scale:.3g})", "",
    ]
    text_out = "\n".join(lines)
    write_text(out_path, text_out)  # atomic: a killed run leaves the last result
    print(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
