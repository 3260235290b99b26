"""Tensors each implementation holds, counted exactly: plain vs ipadapter vs diffusers.

`inference.py` measures peak memory as the process's RSS, every byte counted, so a difference of a tenth of a MiB is
within its resolution (allocator slack, page granularity). This script counts tensors instead, for each
implementation and case of `inference.py` (same architectures, same random weights, same cases), in MiB:
- held: when the UNet's first up block starts in the last step (the point of a step where the down path's skip
  activations are all held), the storages of every live tensor that is not a weight of the models;
- peak: over the whole generation, the most bytes of storages made during it that were alive at once (`LivePeak`:
  every operator's outputs, tracked until nothing refers to them), the exact counterpart of the RSS peak above the
  start. Buffers a kernel allocates and frees inside one operator (a convolution's workspace) are not seen; they
  depend on the shapes alone, which the three implementations share everywhere but in the adapter's attention.
Deterministic: equal code, equal numbers.

    python benchmarks/held_tensors.py                  # SD 1.5 and SDXL, about 5 minutes on 2 cores
    python benchmarks/held_tensors.py --archs sd15
    python benchmarks/held_tensors.py --quick          # tiny models, seconds (the test suite checks these)
"""

from __future__ import annotations

import argparse
import gc
import sys
import weakref
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def live_storages(weights: set[int]) -> dict[int, torch.UntypedStorage]:
    """Data pointer → storage, of the distinct storages of live tensors that are not model weights (garbage collected
    first: only what something still refers to counts). Plain tensors only: parameters are weights, and the fake
    tensors a `torch.compile` earlier in the process may leave behind hold no memory (nor a readable data pointer)."""
    gc.collect()
    storages: dict[int, torch.UntypedStorage] = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage
    return storages


def held(weights: set[int]) -> int:
    """Bytes of `live_storages`."""
    return sum(storage.nbytes() for storage in live_storages(weights).values())


class LivePeak(TorchDispatchMode):
    """The peak of the bytes of storages that operators made while the mode was on and that something still refers
    to. Each output tensor counts its storage once however many views share it, until the last of them is freed;
    storages in `before` (weights, caches: alive when the run started) are not counted, and are kept alive through
    the run so that no new storage takes one of their addresses."""

    def __init__(self, before: dict[int, Any]) -> None:
        super().__init__()
        self.before = before
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= self.sizes.pop(ptr)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if type(t) is not torch.Tensor or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if not ptr or ptr in self.before:
                continue
            if ptr not in self.refs:
                self.refs[ptr], self.sizes[ptr] = 0, t.untyped_storage().nbytes()
                self.live += self.sizes[ptr]
                self.peak = max(self.peak, self.live)
            self.refs[ptr] += 1
            weakref.finalize(t, self._release, ptr)
        return out


class Found(NamedTuple):
    held: float  # MiB alive when the first up block starts in the last step
    peak: float  # MiB at the generation's peak (`LivePeak`)


def measure(s: inference.Setting) -> dict[tuple[str, bool, str], Found]:
    """Both counts per (implementation, cache_kv, case)."""
    bench = inference.Bench(s, ("plain", "ipadapter", "diffusers"))
    weights = weights_of(bench)
    # One UNet call per step (CFG is batched). Only the last step's count is kept, and a count walks every object of
    # the process (about a quarter of a second each in a test run), so the earlier calls are only counted.
    calls: list[int] = []
    last: list[int] = []

    def count(*_: Any) -> None:
        calls.append(1)
        if len(calls) == s.steps:
            last.append(held(weights))

    hook = bench.pipe.unet.up_blocks[0].register_forward_pre_hook(count)
    found = {}
    for impl, cache in IMPLS:
        bench.cache_kv = cache
        for case in inference.CASES:
            setup, run = bench.generation_run(impl, case)
            setup()
            calls.clear()
            last.clear()
            peak = LivePeak({**dict.fromkeys(weights), **live_storages(weights)})
            with torch.no_grad(), peak:
                run()
            if len(calls) != s.steps:
                raise RuntimeError(f"{impl} {case}: {len(calls)} UNet calls for {s.steps} steps")
            found[impl, cache, case] = Found(last[0] / MiB, peak.peak / MiB)
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
    found = {s: measure(s) for s in settings}
    lines = ["# Tensors held through the denoising loop", "",
             f"`python benchmarks/held_tensors.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "Live tensors outside the models, counted exactly (torch " + torch.__version__ + "); the settings of "
             "`inference.py`:", "", *(f"- {s.describe()}" for s in settings)]
    for field, title in (("held", "MiB held when the UNet's first up block starts in the last step"),
                         ("peak", "MiB at the generation's peak: storages made during it, alive at once")):
        lines += ["", f"{title}:", "",
                  "| case | plain | diffusers | ipadapter | ipadapter − diffusers | ipadapter, cache_kv=True |",
                  "|---|---|---|---|---|---|"]
        for s in settings:
            for case, label in inference.CASES.items():
                plain, theirs, ours, cached = (getattr(found[s][impl, cache, case], field) for impl, cache in IMPLS)
                lines.append(f"| {inference.ARCH_NAMES[s.arch]} {label} | {plain:.3f} | {theirs:.3f} | {ours:.3f} "
                             f"| {ours - theirs:+.3f} | {cached:.3f} |")
    text = "\n".join(lines + [""])
    write_text(args.out, text)  # atomic: a killed run leaves the last result
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
