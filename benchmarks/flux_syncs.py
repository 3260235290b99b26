"""Waits for the GPU in a FLUX generation: the plain FluxPipeline against the same pipeline with ipadapter's FLUX
adapter (XLabs layout), true CFG off and on; and FluxImg2ImgPipeline on the same models, which sets no
`current_timestep` (ipadapter places its calls by the scheduler's position there).

A wait inside the step loop (a device value read, a copy to the CPU: torch's CUDA sync debug mode counts them) stops
the CPU queueing the next kernels while the GPU still runs the last ones; one such wait per step cost SDXL 19–26% on
an H200 (docs/benchmarks.md). FluxPipeline hands its transformer `t / 1000`, a new tensor at every call; ipadapter
places each call by the pipeline's `current_timestep` instead, a view into the scheduler's timesteps, so it should
add no wait. The count depends on the code path, not on the model's size: the models are the test suite's tiny ones
(tests/dit_factories.py), random weights in diffusers' and transformers' own classes. CUDA only (the sync debug mode
watches CUDA); `--device cpu` runs the same generations without counting, to check the wiring.

    python benchmarks/flux_syncs.py --device cuda --out benchmarks/results/flux-syncs-cuda.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ipadapter.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inference import count_waits, machine, quiet  # noqa: E402
from tests import dit_factories  # noqa: E402

CASES = (("first generation (ipadapter encodes the reference)", False), ("next generation, same reference", True))
IMG2IMG = "img2img (strength 0.6), next generation, true CFG on"


Count = tuple[str, str, Callable[[], Any], Callable[[], Any]]  # (row, implementation, untimed setup, counted run)


def generations(folder: Path, device: str, dtype: torch.dtype, steps: int) -> list[Count]:
    """The generations to count, in the order they must run: plain's before the adapter is attached (after one
    warm-up generation: CUDA's first calls set up libraries), then ipadapter's."""
    import ipadapter
    from diffusers import FluxImg2ImgPipeline, FluxPipeline
    from safetensors.torch import save_file

    root = dit_factories.save_flux_base(folder).parent
    save_file(dit_factories.xlabs_state(), str(root / "ip_adapter.safetensors"))
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    pipe = FluxPipeline.from_pretrained(str(root / "flux")).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    common = dict(prompt="a cat", width=16, height=16, max_sequence_length=8, output_type="latent")
    state: dict[str, Any] = {}

    def plain(true_cfg: float) -> Callable[[], Any]:
        negative = "blurry" if true_cfg > 1 else None
        return lambda: pipe(**common, num_inference_steps=steps, guidance_scale=3.5, true_cfg_scale=true_cfg,
                            negative_prompt=negative, generator=torch.Generator("cpu").manual_seed(1))

    def attach(target: Any = pipe) -> None:
        """A new attachment with empty caches: its first generation encodes the reference and the unconditional
        input."""
        if "prompter" in state:
            state.pop("prompter").detach()
        state["prompter"] = ipadapter.load(target, str(root / "ip_adapter.safetensors"),
                                           image_encoder=str(root / "flux" / "image_encoder"))

    def ours(true_cfg: float, **extra: Any) -> Callable[[], Any]:
        return lambda: state["prompter"].generate(reference, seed=1, steps=steps, guidance=3.5,
                                                  true_cfg_scale=true_cfg,
                                                  negative_prompt="blurry" if true_cfg > 1 else "", **common, **extra)

    init = dict(image=reference.resize((16, 16)), strength=0.6)

    def plain_img2img() -> Any:
        return img2img(**common, **init, num_inference_steps=steps, guidance_scale=3.5, true_cfg_scale=3.0,
                       negative_prompt="blurry", generator=torch.Generator("cpu").manual_seed(1))

    plain(1.0)()
    counts: list[Count] = []
    for impl in ("plain", "ipadapter"):
        for true_cfg in (1.0, 3.0):
            run = plain(true_cfg) if impl == "plain" else ours(true_cfg)
            for case, again in CASES:
                setup = attach if impl == "ipadapter" and not again else (lambda: None)
                counts.append((f"{case}, true CFG {'on' if true_cfg > 1 else 'off'}", impl, setup, run))
        # Each img2img row after an untimed generation of its own: the first encodes the init image (new kernels),
        # and ipadapter's first on its new attachment encodes the reference.
        if impl == "plain":
            counts.append((IMG2IMG, impl, plain_img2img, plain_img2img))
        else:
            ours_img2img = ours(3.0, **init)
            counts.append((IMG2IMG, impl, lambda: (attach(img2img), ours_img2img()), ours_img2img))
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the wiring without counting")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/flux-syncs-<device>.md)")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"flux-syncs-{args.device.split(':')[0]}.md"
    quiet()
    cuda = args.device.startswith("cuda")
    counts: dict[tuple[str, str], int | None] = {}
    with tempfile.TemporaryDirectory() as folder:
        for row, impl, setup, run in generations(Path(folder), args.device, getattr(torch, args.dtype), args.steps):
            setup()
            if cuda:
                counts[row, impl] = count_waits(run)
            else:
                run()
                counts[row, impl] = None
    rows = list(dict.fromkeys(row for row, _ in counts))
    extra = {r: counts[r, "ipadapter"] - counts[r, "plain"] if cuda else None for r in rows}

    def cell(value: int | None, sign: str = "") -> str:
        return "–" if value is None else f"{value:{sign}d}"

    table = [f"| {r} | {cell(counts[r, 'plain'])} | {cell(counts[r, 'ipadapter'])} | {cell(extra[r], '+')} |"
             for r in rows]
    steady = [extra[r] for r in rows if r.startswith(CASES[1][0]) or r == IMG2IMG]
    verdict = (f"- ipadapter's waits beyond plain's in a generation with a known reference: {', '.join(map(str, steady))}"
               f" ({'none: met' if not any(steady) else 'NOT met'})" if cuda else
               "- not counted: the sync debug mode watches CUDA only (this run checked that every generation runs)")
    text = "\n".join([
        "# Waits for the GPU in a FLUX generation", "",
        f"`python benchmarks/flux_syncs.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{machine(args.device)}; torch {torch.__version__}, {args.dtype}; tiny FLUX (tests/dit_factories.py), "
        f"{args.steps} steps, 16 px, latents out; each count is one generation under torch's CUDA sync debug mode.", "",
        "| generation | plain | ipadapter | ipadapter − plain |", "|---|---|---|---|", *table, "", verdict, ""])
    write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
