"""Batch generation: seconds per image of `ipadapter generate --manifest` with jobs batched per UNet call vs one at a time.

The same manifest (N jobs: each its own reference, prompt and seed, equal settings, so every batch is full) runs
through `ipadapter.batch.run.run_manifest` into a fresh folder at batch size 1 and at each `--batch-size`; the model
is loaded once, outside the timed region, and one untimed batch (the largest) warms it up. Runs are interleaved `--repeats` times
(the machine may be shared: interleaving gives every batch size the same load); medians. Files are written as the
command writes them (PNG encoding and records are in the time). The last column is the largest pixel difference of
the batched images from the one-at-a-time ones (float rounding of a larger batch; 0 to a few levels of 255).
Medians of wall time and of this process's CPU time (all threads) per image: on a shared CPU the CPU time is the
steadier measure of the work, the wall time what a user waits.

    python benchmarks/batch_generation.py                        # bundled miniature model, CPU, 16 jobs, batch 8
    python benchmarks/batch_generation.py --quick                # tiny test models, a smoke run (< 1 min)
    python benchmarks/batch_generation.py --base PIPE --adapter h94/IP-Adapter --subfolder models \\
        --weight-name ip-adapter_sd15.bin --device cuda --jobs 64 --batch-size 4 8 16 --steps 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ipadapter.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import inference  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny test models, 4 jobs, batch 4, 1 repeat")
    p.add_argument("--base", help="pipeline folder or Hub id (default: the bundled miniature model)")
    p.add_argument("--adapter", action="append")
    p.add_argument("--subfolder", action="append")
    p.add_argument("--weight-name", action="append")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--batch-size", type=int, nargs="+", default=[8])
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, 25 for the miniature)")
    p.add_argument("--size", type=int, help="width = height in pixels (default: the model's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (1: no thread waits counted as CPU time)")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.batch_size, args.repeats, args.steps, args.size = 4, [4], 1, 2, 32
    return args


def references(folder: Path, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """(manifest jobs, the generate flags of the model): miniature scenes for the miniature, else noise images."""
    if args.quick:
        from tests import factories

        factories.save_tiny_sd15_pipeline(folder)
        for i in range(args.jobs):
            factories.reference_image(i).save(folder / f"ref{i}.png")
        flags = ["--base", str(folder / "pipe"), "--adapter", str(folder / "base.bin")]
        return [{"image": f"ref{i}.png", "prompt": f"a picture {i}", "seed": i} for i in range(args.jobs)], flags
    from ipadapter.evaluate.miniature import miniature_manifest

    manifest = miniature_manifest(folder, args.jobs)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    flags = ["--base", args.base] if args.base else []
    for name in ("adapter", "subfolder", "weight_name"):
        for value in getattr(args, name) or []:
            flags += [f"--{name.replace('_', '-')}", value]
    return [{"image": r["image_file"], "prompt": r["text"], "seed": i} for i, r in enumerate(records)], flags


def benchmark(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from ipadapter.batch.jobs import OPTIONS, read_jobs
    from ipadapter.batch.run import Defaults, run_manifest
    from ipadapter.batch.shards import Shard
    from ipadapter.cli.generate import load_from_flags
    from ipadapter.cli.main import build_parser
    from ipadapter.loading import base_geometry

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    try:
        jobs, flags = references(work, args)
        (work / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
        size = ["--width", str(args.size), "--height", str(args.size)] if args.size else []
        steps = ["--steps", str(args.steps)] if args.steps else []
        cli = build_parser().parse_args(["generate", *flags, *size, *steps, "--device", args.device, "--manifest",
                                         str(work / "jobs.jsonl"), "--out-dir", str(work / "out")])
        loaded = load_from_flags(cli)
        loaded.prompter.pipe.set_progress_bar_config(disable=True)
        manifest = read_jobs(cli.manifest, {n: getattr(cli, n) for n in OPTIONS}, ["0"], lambda: base_geometry(cli.base))
        assert not manifest.failures, manifest.failures
        defaults = Defaults(loaded.default_steps, loaded.default_guidance)

        def run(batch: int, jobs=manifest) -> tuple[float, float, Path]:
            out = work / f"out-{batch}-{time.monotonic_ns()}"
            wall, cpu = time.perf_counter(), time.process_time()
            run_manifest(loaded.prompter, jobs, out, batch_size=batch, shard=Shard(), defaults=defaults, settings={})
            return time.perf_counter() - wall, time.process_time() - cpu, out

        run(max(args.batch_size), type(manifest)(manifest.jobs[: max(args.batch_size)], []))  # warm-up
        sizes = [1, *args.batch_size]
        times: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
        outs: dict[int, Path] = {}
        for _ in range(args.repeats):
            for batch in sizes:
                wall, cpu, outs[batch] = run(batch)
                times[batch].append((wall / len(manifest.jobs), cpu / len(manifest.jobs)))
        one = [statistics.median(t[i] for t in times[1]) for i in (0, 1)]
        rows = []
        for batch in sizes:
            diff = max(int(np.abs(np.asarray(Image.open(outs[batch] / f), dtype=np.int16)
                                  - np.asarray(Image.open(outs[1] / f), dtype=np.int16)).max())
                       for job in manifest.jobs for f in job.files)
            wall, cpu = (statistics.median(t[i] for t in times[batch]) for i in (0, 1))
            rows.append({"batch": batch, "per_image": wall, "ratio": one[0] / wall, "cpu_per_image": cpu,
                         "cpu_ratio": one[1] / cpu, "diff": diff})
        setting = {"model": cli.base or "bundled miniature", "device": args.device, "jobs": len(manifest.jobs),
                   "steps": cli.steps or loaded.default_steps, "repeats": args.repeats,
                   "machine": inference.machine(args.device)}
        return rows, setting
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(rows: list[dict], setting: dict) -> str:
    lines = ["# Batch generation: seconds per image, batched vs one at a time", "",
             ", ".join(f"{k}: {v}" for k, v in setting.items()), "",
             "| jobs per UNet call | wall s / image | speed-up | CPU s / image | speed-up (CPU time) | max pixel diff vs 1 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['per_image']:.3f} | {r['ratio']:.2f}x | {r['cpu_per_image']:.3f} | "
              f"{r['cpu_ratio']:.2f}x | {r['diff']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    text = render(*benchmark(args))
    print(text)
    if args.out:
        write_text(args.out, text)  # atomic: a killed run leaves the last result


if __name__ == "__main__":
    main()
