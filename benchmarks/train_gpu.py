"""Training on a GPU: seconds per step, samples/s and peak memory under each mixed precision, the trainer's own loop.

Random weights, real architectures, nothing downloaded (the models of benchmarks/train_speed.py and
benchmarks/inference.py, drawn on the device):
  SD 1.5  its UNet, VAE, a CLIP-L-shaped text encoder and a ViT-H/14-shaped image encoder; the base adapter, 512 px,
          batch 8 (the paper's per-GPU batch), every frozen model run on every batch (no feature cache), under
          each of `--precisions` (default no, fp16, bf16).
  SDXL    its full UNet with the settings docs/training.md gives for a 24 GB card: Plus adapter on ViT-H patch
          features, 1024 px, feature cache (the VAE, text encoders and image encoder stay off the GPU while training),
          gradient checkpointing, 8-bit AdamW when bitsandbytes imports (else torch's AdamW; the table says which),
          at each of `--sdxl-batches` (default 1 and 4) under each of `--sdxl-precisions` (default bf16, the
          recipe's). The cache is built first by a one-step run that is not a row.

Each row is one `ipadapter.train.train` call: a fresh adapter; the frozen models start on the CPU (moved back between
rows) and the trainer casts and places them. s/step: the median of the steps after the first (warm-up), each step
as the trainer times it (data, forward, backward, optimizer). Peak: `torch.cuda.max_memory_allocated` (and
`max_memory_reserved`, what the card must hold) over the whole call, reset before it. A row that fails (out of
memory, say) shows its error and the others still run.

    python benchmarks/train_gpu.py                 # on a GPU (full-size models need CUDA)
    python benchmarks/train_gpu.py --tiny          # the tests' tiny models, anywhere (on a CPU: no and bf16)
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ipadapter.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import inference, train_speed  # noqa: E402
from tests import factories  # noqa: E402

GiB = 2**30
PRECISION_NAMES = {"no": "fp32", "fp16": "fp16 mixed", "bf16": "bf16 mixed"}


@dataclass(frozen=True)
class Setting:
    """One row: the base and what differs between rows."""

    base: str  # "sd15" or "sdxl"
    mixed_precision: str
    batch: int


@dataclass
class Row:
    label: str
    batch: int
    step_s: float | None = None
    peak: float | None = None  # GiB allocated
    reserved: float | None = None  # GiB reserved by the allocator
    nonfinite: int | None = None
    note: str = ""


def eight_bit_available() -> bool:
    """bitsandbytes can fail at import for reasons other than absence (no GPU build): any failure means no."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def ddpm_config() -> dict[str, Any]:
    """SD's training noise schedule (SD 1.5 and SDXL share it)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012).config)


def sd15_models(tmp: Path, device: str, tiny: bool) -> tuple[Any, Any]:
    """(BaseModels, ImageEncoder) of SD 1.5's shapes: train_speed's models drawn on `device`, or the tiny ones."""
    if tiny:
        return factories.in_memory()
    with torch.device(device):
        models, encoder, _, _ = train_speed.build_models(tmp, small_encoder=False)
    return models, encoder


def sdxl_models(tmp: Path, device: str, tiny: bool) -> tuple[Any, Any]:
    """(BaseModels, ImageEncoder): inference.py's full SDXL pipeline and a ViT-H/14-shaped encoder, or tiny ones."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter.encoders import ImageEncoder
    from ipadapter.train.models import BaseModels

    if tiny:
        return factories.in_memory(sdxl=True)
    pipe = inference.build_pipeline(inference.Setting(
        arch="sdxl", device=device, dtype="float32", resolution=1024, steps=1, encoder_layers=0, quick=False,
        step_latents=128), tmp)
    with torch.device(device):
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**inference.VIT_H)).eval()
    models = BaseModels(unet=pipe.unet.eval(), scheduler_config=ddpm_config(), vae=pipe.vae.eval(),
                        tokenizers=[pipe.tokenizer, pipe.tokenizer_2],
                        text_encoders=[pipe.text_encoder.eval(), pipe.text_encoder_2.eval()], name="sdxl-random")
    return models, ImageEncoder(vision, CLIPImageProcessor(), name="vit-h-random")


def park(models: Any, encoder: Any) -> None:
    """Every model back on the CPU, the GPU's cache emptied: each row starts as a process that has just loaded them."""
    for module in (models.unet, models.vae, *models.text_encoders, encoder.model):
        module.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def label_of(s: Setting, args: argparse.Namespace) -> str:
    precision = PRECISION_NAMES[s.mixed_precision]
    if s.base == "sd15":
        return f"SD 1.5, {16 if args.tiny else 512} px, batch {s.batch}, no cache, {precision}"
    optimizer = "8-bit AdamW" if args.eight_bit else "AdamW"
    return (f"SDXL, {16 if args.tiny else 1024} px, batch {s.batch}, cache + checkpointing + {optimizer}, "
            f"{precision}")


def failure(err: Exception) -> str:
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {first}"


@dataclass
class Bench:
    """One base's models and data; each `train` call starts from the models parked on the CPU."""

    args: argparse.Namespace
    models: Any
    encoder: Any
    manifest: Path
    tmp: Path

    def config(self, s: Setting, steps: int) -> Any:
        from ipadapter.train import TrainConfig

        sdxl = s.base == "sdxl"
        return TrainConfig(
            data=str(self.manifest), output=str(self.tmp / "run"), variant="plus" if sdxl else "base",
            resolution=16 if self.args.tiny else (1024 if sdxl else 512), batch_size=s.batch, max_steps=steps,
            mixed_precision=s.mixed_precision, gradient_checkpointing=sdxl,
            cache=str(self.tmp / "cache") if sdxl else "", save_every=10**6, seed=0,
            optimizer="adamw8bit" if sdxl and self.args.eight_bit else "adamw",
        )

    def train(self, s: Setting, steps: int) -> Any:
        """One `ipadapter.train.train` call; its output folder is removed afterwards."""
        from ipadapter.train import train

        park(self.models, self.encoder)
        factories.reset_accelerate()
        try:
            return train(self.config(s, steps), models=self.models, image_encoder=self.encoder, log_with=None)
        finally:
            shutil.rmtree(self.tmp / "run", ignore_errors=True)

    def measure(self, s: Setting) -> Row:
        """A row; a failure (out of memory, a precision the machine lacks) becomes its note, the next row still runs."""
        row = Row(label_of(s, self.args), s.batch)
        start = time.perf_counter()
        try:
            result = self.train(s, self.args.steps)
        except Exception as err:
            row.note = f"failed: {failure(err)}"
            return row
        row.step_s = statistics.median(result.step_times[1:])
        row.nonfinite = result.nonfinite_steps
        row.note = f"{time.perf_counter() - start:.0f} s in all"
        if torch.cuda.is_available():
            row.peak, row.reserved = torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB
        return row

    def build_cache(self, s: Setting) -> str:
        """The SDXL rows' feature cache, by a one-step run of their first setting; a note for the table."""
        start = time.perf_counter()
        try:
            self.train(s, 1)
        except Exception as err:  # each SDXL row then tries to build it and shows the error
            return f"- SDXL feature cache: not built ({failure(err)})"
        return f"- SDXL feature cache built (one-step run, not a row) in {time.perf_counter() - start:.0f} s"


def settings_of(args: argparse.Namespace) -> tuple[list[Setting], list[Setting], list[str]]:
    """SD 1.5 and SDXL rows; fp16 is skipped without CUDA, with the reason."""
    notes = []
    sd15 = [Setting("sd15", p, args.batch) for p in args.precisions]
    sdxl = [Setting("sdxl", p, b) for p in args.sdxl_precisions for b in args.sdxl_batches]
    if not torch.cuda.is_available() and any(s.mixed_precision == "fp16" for s in sd15 + sdxl):
        notes.append("- fp16 rows skipped: no CUDA here (on a CPU accelerate runs fp16 without autocast and without "
                     "the gradient scaler: not the path a GPU takes)")
        sd15 = [s for s in sd15 if s.mixed_precision != "fp16"]
        sdxl = [s for s in sdxl if s.mixed_precision != "fp16"]
    return sd15, sdxl, notes


def write_manifest(tmp: Path, tiny: bool, n: int) -> Path:
    return factories.write_images(tmp / "data", n) if tiny else train_speed.write_data(tmp / "data", n)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{inference.machine('cuda')}, CUDA {torch.version.cuda}"
    return f"{inference.machine('cpu')}, no CUDA"


def render(command: str, args: argparse.Namespace, rows: list[Row], notes: list[str]) -> str:
    lines = [f"# Training speed and memory{' (tiny models: a smoke run)' if args.tiny else ''}", "", f"`{command}`", "",
             f"{machine()}; torch {torch.__version__}; random weights, real architectures; {args.steps} steps per row, "
             "s/step the median after the first.", "",
             "| setting | s/step | samples/s | peak allocated (GiB) | peak reserved (GiB) | non-finite steps skipped "
             "| note |", "|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [table_row(r) for r in rows] + ["", *notes, ""])


def table_row(r: Row) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    rate = None if r.step_s is None else r.batch / r.step_s
    return (f"| {r.label} | {num(r.step_s, '.3f')} | {num(rate, '.2f')} | {num(r.peak, '.2f')} "
            f"| {num(r.reserved, '.2f')} | {'–' if r.nonfinite is None else r.nonfinite} | {r.note} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def names(text: str) -> list[str]:
        return [p for p in text.split(",") if p]

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny models at 16 px: a smoke run on any machine")
    ap.add_argument("--steps", type=int, help="steps per row, the first a warm-up (default 10; --tiny 4)")
    ap.add_argument("--batch", type=int, help="SD 1.5 batch (default 8; --tiny 2)")
    ap.add_argument("--precisions", type=names, default=["no", "fp16", "bf16"], help="SD 1.5 rows, comma-separated")
    ap.add_argument("--sdxl-precisions", type=names, default=["bf16"], help="SDXL rows (empty: none)")
    ap.add_argument("--sdxl-batches", type=lambda t: [int(b) for b in names(t)], default=[1, 4])
    ap.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/train-<device>.md)")
    args = ap.parse_args(argv)
    unknown = set(args.precisions + args.sdxl_precisions) - set(PRECISION_NAMES)
    if unknown:
        ap.error(f"unknown mixed precision {', '.join(sorted(unknown))}; valid: {', '.join(PRECISION_NAMES)}")
    args.steps = args.steps or (4 if args.tiny else 10)
    args.batch = args.batch or (2 if args.tiny else 8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out = args.out or ROOT / "benchmarks" / "results" / f"train-{device}{'-tiny' if args.tiny else ''}.md"
    args.eight_bit = eight_bit_available()
    if not (args.tiny or torch.cuda.is_available()):
        ap.error("full-size models need CUDA; use --tiny for a smoke run on this machine")
    return args


def run_base(settings: list[Setting], args: argparse.Namespace, manifest: Path,
             tmp: Path) -> tuple[list[Row], list[str]]:
    """The rows of one base on one set of models (built once, freed on return)."""
    sdxl = settings[0].base == "sdxl"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench = Bench(args, *(sdxl_models if sdxl else sd15_models)(tmp, device, args.tiny), manifest, tmp)
    notes = [bench.build_cache(settings[0])] if sdxl else []
    rows = []
    for s in settings:
        rows.append(bench.measure(s))
        print(table_row(rows[-1]), flush=True)
    return rows, notes


def benchmark(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Every row of both bases, and the notes for the table."""
    inference.quiet()
    sd15, sdxl, notes = settings_of(args)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ipadapter-train-gpu-") as name:
        tmp = Path(name)
        manifest = write_manifest(tmp, args.tiny, 2 * max([args.batch, *args.sdxl_batches]))
        for settings in (sd15, sdxl):
            if settings:
                found, said = run_base(settings, args, manifest, tmp)
                rows += found
                notes += said
                gc.collect()
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, notes = benchmark(args)
    command = " ".join(["python benchmarks/train_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    text = render(command, args, rows, notes)
    write_text(args.out, text)  # atomic: a killed run leaves the last result
    print(text)
    print(f"written to {args.out}")
    return 1 if any(r.step_s is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
