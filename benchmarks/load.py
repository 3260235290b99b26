"""Seconds to load a published adapter file onto a UNet: `ipadapter.load_adapter` vs diffusers' `load_ip_adapter`.

Random weights in the real architectures, nothing downloaded (the models of benchmarks/inference.py): SD 1.5's
UNet with a Plus adapter (ip-adapter-plus_sd15.bin's layout) and, with `--archs sdxl`, SDXL's UNet
with the base adapter (ip-adapter_sdxl.bin's). The file is written once in fp16, as h94's files ship, and read
once untimed, so every timed load reads it from the page cache: what is measured is what each library does with
the bytes (unpickling, checks, building the modules, casting the weights to the fp32 UNet's dtype), not the disk.

  ipadapter  `load_adapter(file, unet)`: the adapter module, checked and on the UNet's device and dtype (attaching
             it is a separate, cheap call)
  diffusers  `pipe.load_ip_adapter(folder, weight_name=..., image_encoder_folder=None)`: its processors and
             projection put on the UNet; `unload_ip_adapter()` after each load, untimed

Loads alternate, `--repeats` of each after one untimed load of each; the table gives min / median / max and the
median of the pass-by-pass ratios.

    python benchmarks/load.py                    # SD 1.5, about a minute
    python benchmarks/load.py --archs sd15,sdxl  # SDXL's UNet needs about 14 GB
    python benchmarks/load.py --quick            # the tests' tiny models, seconds
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ipadapter.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inference import (ARCH_NAMES, Setting, adapter_state, build_encoder, build_pipeline,  # noqa: E402
                                  machine, quiet)


def measure(arch: str, repeats: int, quick: bool = False) -> list[str]:
    """The table rows of one architecture: each library's seconds and the ratio (`quick`: the tests' tiny models)."""
    from ipadapter import load_adapter

    s = Setting(arch, "cpu", "float32", 64, 1, 1, quick, 8)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        pipe = build_pipeline(s, folder)
        encoder, _ = build_encoder(s)  # the adapter's input width; one layer is enough for it
        weight_name, state = adapter_state(s, pipe.unet, encoder)
        fp16 = {group: {k: v.half() for k, v in part.items()} for group, part in state.items()}
        torch.save(fp16, folder / weight_name)
        params = sum(t.numel() for group in state.values() for t in group.values())
        del state, fp16, encoder
        gc.collect()

        def ours() -> None:
            load_adapter(folder / weight_name, pipe.unet)

        def theirs() -> None:
            pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, image_encoder_folder=None)

        times: dict[str, list[float]] = {"ipadapter": [], "diffusers": []}
        for i in range(repeats + 1):
            for impl, load in (("ipadapter", ours), ("diffusers", theirs)):
                gc.collect()
                start = time.perf_counter()
                load()
                took = time.perf_counter() - start
                if impl == "diffusers":
                    pipe.unload_ip_adapter()
                if i:
                    times[impl].append(took)
    ratios = [o / d for o, d in zip(times["ipadapter"], times["diffusers"])]

    def spread(values: list[float]) -> str:
        return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"

    return [f"| {ARCH_NAMES[arch]}: {weight_name}, {params / 1e6:.0f} M parameters | {spread(times['ipadapter'])} "
            f"| {spread(times['diffusers'])} | {statistics.median(ratios):.2f}x "
            f"[{min(ratios):.2f}–{max(ratios):.2f}] |"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sd15", help="comma-separated: sd15, sdxl")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the tests' tiny models: a smoke run")
    ap.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/load-cpu.md)")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / "load-cpu.md"
    quiet()
    rows = [row for arch in args.archs.split(",") for row in measure(arch, args.repeats, args.quick)]
    text = "\n".join([
        "# Loading a published adapter file", "",
        f"`python benchmarks/load.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{machine('cpu')}; torch "
        f"{torch.__version__}; fp16 file, fp32 UNet, read from the page cache; {args.repeats} alternating loads of "
        "each after one untimed.", "",
        "| file | ipadapter s (min / median / max) | diffusers s | ipadapter / diffusers [min–max] |",
        "|---|---|---|---|", *rows, "",
    ])
    write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
