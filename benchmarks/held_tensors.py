"""Tensors each implementation holds through the denoising loop, counted exactly: plain vs ipadapter vs diffusers.

`inference.py` measures peak memory as the process's RSS, every byte counted, so a difference of a tenth of a MiB is
within its resolution (allocator slack, page granularity). This script counts tensors instead: when the UNet's first
up block starts in the last step (the point of a step where the down path's skip activations are all held), it sums
the storages of every live tensor that is not a weight of the models, in MiB, for each implementation and case of
`inference.py` (same architectures, same random weights, same cases). Deterministic: equal code, equal numbers.

    python benchmarks/held_tensors.py                  # SD 1.5 and SDXL, about 5 minutes on 2 cores
    python benchmarks/held_tensors.py --archs sd15
    python benchmarks/held_tensors.py --quick          # tiny models, seconds (the test suite checks these)
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from ipadapter.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import inference  # noqa: E402

MiB = 2**20
IMPLS = (("plain", False), ("diffusers", False), ("ipadapter", False), ("ipadapter", True))


def weights_of(bench: inference.Bench) -> set[int]:
    """Data pointers of every parameter and buffer of the models the three implementations use."""
    modules = [m for m in bench.pipe.components.values() if isinstance(m, torch.nn.Module)]
    modules += [m for m in (bench.adapter, bench.encoder_model, bench.diffusers_proj) if m is not None]
    modules += [p for p in (bench.diffusers_procs or {}).values() if isinstance(p, torch.nn.Module)]
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


def held(weights: set[int]) -> int:
    """Bytes of the distinct storages of live tensors that are not model weights (garbage collected first: only
    what something still refers to counts). Plain tensors only: parameters are weights, and the fake tensors a
    `torch.compile` earlier in the process may leave behind hold no memory (nor a readable data pointer)."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure(s: inference.Setting) -> dict[tuple[str, bool, str], float]:
    """MiB held at the last step's first up block, per (implementation, cache_kv, case)."""
    bench = inference.Bench(s, ("plain", "ipadapter", "diffusers"))
    weights = weights_of(bench)
    seen: list[int] = []
    hook = bench.pipe.unet.up_blocks[0].register_forward_pre_hook(lambda *_: seen.append(held(weights)))
    found = {}
    for impl, cache in IMPLS:
        bench.cache_kv = cache
        for case in inference.CASES:
            setup, run = bench.generation_run(impl, case)
            setup()
            seen.clear()
            with torch.no_grad():
                run()
            found[impl, cache, case] = seen[-1] / MiB
    hook.remove()
    bench.close()
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sd15,sdxl")
    ap.add_argument("--vith-layers", type=int, default=4, help="ViT-H depth: the encoder's activations are gone by then")
    ap.add_argument("--bigg-layers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny models, 32 px")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "held-tensors-cpu.md")
    args = ap.parse_args(argv)
    inference.quiet()
    settings = inference.settings_of(inference.parse_args(
        ["--archs", args.archs, "--steps", "2", "--sdxl-steps", "2", "--vith-layers", str(args.vith_layers),
         "--bigg-layers", str(args.bigg_layers), *(["--quick"] if args.quick else [])]))
    lines = ["# Tensors held through the denoising loop", "",
             f"`python benchmarks/held_tensors.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "MiB of live tensors outside the models when the UNet's first up block starts in the last step "
             "(torch " + torch.__version__ + "); the settings of `inference.py`:", "",
             *(f"- {s.describe()}" for s in settings), "",
             "| case | plain | diffusers | ipadapter | ipadapter − diffusers | ipadapter, cache_kv=True |",
             "|---|---|---|---|---|---|"]
    for s in settings:
        found = measure(s)
        for case, label in inference.CASES.items():
            plain, theirs = found["plain", False, case], found["diffusers", False, case]
            ours, cached = found["ipadapter", False, case], found["ipadapter", True, case]
            lines.append(f"| {inference.ARCH_NAMES[s.arch]} {label} | {plain:.3f} | {theirs:.3f} | {ours:.3f} "
                         f"| {ours - theirs:+.3f} | {cached:.3f} |")
    text = "\n".join(lines + [""])
    write_text(args.out, text)  # atomic: a killed run leaves the last result
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
