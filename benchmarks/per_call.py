"""Microseconds per attention call: ipadapter's processor vs diffusers' IP-Adapter processor on the same layer.

One small cross-attention layer (width 64, 2 heads of 32, 64-wide text of 8 tokens, 4 image tokens per reference),
CFG batch of 2, 16 query tokens (`--tokens`: a 4x4 latent), one torch thread: the kernels take a few microseconds,
so the call's Python and dispatch work decides, as on a fast GPU (at SD sizes on this CPU the matmuls take
milliseconds and hide it). Same weights, same tokens; three processors on the same `Attention` module:

  plain      diffusers' `AttnProcessor2_0` (no adapter): the floor every row is measured against
  diffusers  `IPAdapterAttnProcessor2_0` given the projected image tokens, as its pipeline passes them
  ipadapter  `IPAttnProcessor` after its first call of the generation (the plan and resized masks are made once
             per generation, K'/V' at every call as diffusers does; diffusers makes all of them at every call)
  cached     the same with `cache_kv=True`: K'/V' made once per generation too

Cases: one reference; two masked references (left/right halves). Each repeat times `--calls` calls of every
processor, interleaved, after a warm-up; the table gives min / median / max over `--repeats` of the mean µs per
call, and "above plain" the median of the per-repeat differences. The verdict compares ipadapter's and diffusers'
medians against the spread of the repeats (their largest max − min).

    python benchmarks/per_call.py                 # about a minute
    python benchmarks/per_call.py --repeats 30 --calls 500
    python benchmarks/per_call.py --device cuda --dtype float16   # each kernel a launch: dispatch alone decides
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ipadapter.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inference import machine, sync  # noqa: E402

IMPLS = ("plain", "diffusers", "ipadapter", "cached")
NAME = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def processors(case: str, tokens: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
               ) -> tuple[torch.nn.Module, dict[str, Callable[[], torch.Tensor]]]:
    """The layer and a no-argument call of each processor on it, with equal weights and inputs, on `device` (the
    values drawn on the CPU: the same anywhere; masks stay on the CPU, as users give them)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

    from ipadapter.adapter import AdapterLayer
    from ipadapter.attention import IPAttnProcessor
    from ipadapter.layers import AttentionLayer
    from ipadapter.runtime import AdapterPrompt, Reference, Runtime

    torch.manual_seed(0)
    place = dict(device=device, dtype=dtype)
    width, cross, heads, image_tokens, text_tokens = 64, 64, 2, 4, 8
    attn = Attention(width, cross_attention_dim=cross, heads=heads, dim_head=width // heads).eval().to(**place)
    side = int(tokens**0.5)
    x, text = torch.randn(2, side * side, width).to(**place), torch.randn(2, text_tokens, cross).to(**place)
    refs = 2 if case == "masked" else 1
    cond = torch.randn(refs, image_tokens, cross).to(**place)
    uncond = torch.randn(1, image_tokens, cross).to(**place)
    masks = None
    if case == "masked":
        masks = torch.zeros(2, 8 * side, 8 * side)
        masks[0, :, : 4 * side] = 1
        masks[1, :, 4 * side :] = 1

    layer = AttentionLayer(NAME, 1, True, width, cross, "down", 0, 0, 0)
    weights = AdapterLayer(layer, cross).to(**place)
    references = [Reference(cond=cond[i : i + 1], uncond=uncond, mask=None if masks is None else masks[i])
                  for i in range(refs)]
    ours = {}
    for impl, cache_kv in (("ipadapter", False), ("cached", True)):
        runtime = Runtime(cache_kv=cache_kv)
        ours[impl] = IPAttnProcessor(layer, AttnProcessor2_0(), runtime, {"a": weights})
        runtime.set({"a": AdapterPrompt(references)}, cfg=True, weights={"a": ("bench",)})
        runtime.latent_hw = (side, side)

    theirs = IPAdapterAttnProcessor2_0(width, cross, num_tokens=(image_tokens,), scale=1.0).eval().to(**place)
    theirs.to_k_ip[0].weight.data.copy_(weights.to_k_ip.weight)
    theirs.to_v_ip[0].weight.data.copy_(weights.to_v_ip.weight)
    laid = torch.cat([uncond.expand(refs, -1, -1), cond])  # (B, refs, T, C): diffusers' CFG layout, uncond first
    embeds = [laid.view(2, refs, image_tokens, cross)]
    extra = {} if masks is None else {"ip_adapter_masks": [masks[None]]}
    plain = AttnProcessor2_0()
    calls = {
        "plain": lambda: plain(attn, x, text),
        "diffusers": lambda: theirs(attn, x, (text, embeds), **extra),
        "ipadapter": lambda: ours["ipadapter"](attn, x, text),
        "cached": lambda: ours["cached"](attn, x, text),
    }
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        for impl in ("ipadapter", "cached"):
            diff = (calls[impl]() - calls["diffusers"]()).abs().max()
            if diff > tolerance:
                raise RuntimeError(f"{impl} and diffusers disagree on the {case} case by {float(diff):.2e}")
    return attn, calls


def measure(calls: dict[str, Callable[[], torch.Tensor]], n: int, repeats: int, device: str = "cpu",
            ) -> dict[str, list[float]]:
    """µs per call of each processor, one value per repeat, the processors interleaved within each repeat (on a GPU
    from the first call to the end of the last one's kernels)."""
    found: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        for i in range(repeats + 1):
            for name, call in calls.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(n):
                    call()
                sync(device)
                if i:  # the first pass warms up
                    found[name].append(1e6 * (time.perf_counter() - start) / n)
    return found


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16, help="query tokens (a square latent), default 16")
    ap.add_argument("--calls", type=int, default=300, help="calls per processor per repeat")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no thread hand-offs in tiny kernels)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: on a GPU the kernels are launches")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/per-call-<device>.md)")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"per-call-{args.device.split(':')[0]}.md"
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    rows, verdicts = [], []
    for case in ("one reference", "masked"):
        _, calls = processors(case, args.tokens, args.device, getattr(torch, args.dtype))
        t = measure(calls, args.calls, args.repeats, args.device)
        above = {k: statistics.median(a - p for a, p in zip(t[k], t["plain"])) for k in IMPLS[1:]}
        gap = [o - d for o, d in zip(t["ipadapter"], t["diffusers"])]
        noise = max(max(v) - min(v) for v in t.values())
        label = "two masked references" if case == "masked" else case
        rows.append(f"| {label} | {' | '.join(spread(t[k]) for k in IMPLS)} | "
                     f"{' | '.join(f'{above[k]:+.1f}' for k in IMPLS[1:])} | {statistics.median(gap):+.1f} "
                     f"({min(gap):+.1f} … {max(gap):+.1f}) |")
        verdict = ("at or below diffusers'" if statistics.median(gap) <= 0 else
                   f"above diffusers' by less than the noise ({noise:.1f} µs)" if statistics.median(gap) <= noise
                   else "ABOVE diffusers'")
        verdicts.append(f"- {label}: ipadapter's call is {verdict}")
    text = "\n".join([
        "# Attention call cost", "", f"`python benchmarks/per_call.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "", f"{machine(args.device)}; torch {torch.__version__}, {args.dtype}; one layer (width 64, 2 heads, 8 text "
        f"tokens), batch 2 (CFG), {args.tokens} query tokens, 4 image tokens per reference; {args.repeats} repeats of "
        f"{args.calls} calls each, interleaved.", "",
        "| case | plain µs/call (min / median / max) | diffusers | ipadapter | ipadapter, cache_kv=True "
        "| diffusers above plain | ipadapter above plain | cache_kv=True above plain "
        "| ipadapter − diffusers (median of repeats) |", "|---|---|---|---|---|---|---|---|---|",
        *rows, "", *verdicts, "- noise: the largest max − min over the repeats of any row", ""])
    write_text(out, text)  # atomic: a killed run leaves the last result
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
