"""`ipadapter miniature`: write shapes-world datasets, train the miniature models, export the shipped weights, and\nmeasure them (`eval`; `evaluate` is the same command)."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ipadapter.cli.quiet import show_own_logs
from ipadapter.errors import IPAdapterError
from ipadapter.extras import needs
from ipadapter.validation import check_counts, check_seed, output_folder


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    show_own_logs()


@contextmanager
def _dataset_folder(folder: Path) -> Iterator[Path]:
    """Create `folder` (and its missing parents) before anything is drawn; if creating or writing fails, remove what
    was created here, so a refused or broken run leaves no empty or half-written folder (an existing one is kept)."""
    created = None
    probe = folder.absolute()
    while not probe.exists():
        created, probe = probe, probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    except BaseException as err:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(err, OSError):
            raise IPAdapterError(f"--out {folder}: could not write the dataset there ({err.strerror or err})") from None
        raise


def _data(args: argparse.Namespace) -> int:
    from ipadapter.miniature.world import write_dataset

    check_counts([("--n", args.n)])
    check_seed(args.seed)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise IPAdapterError(f"--out {args.out} is a file; the dataset needs a folder")
    output_folder(args.out, "--out")
    with _dataset_folder(Path(args.out)) as out:
        manifest = write_dataset(out, args.n, args.seed, args.split, masks=args.masks)
    print(f"wrote {args.n} {args.split} images and {manifest}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ipadapter.miniature.recipes import run_recipe

    check_counts([("--steps", args.steps)])
    _threads(args)
    run_recipe(args.recipe, Path(args.out), args.steps, args.resume)
    return 0


def _quality(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ipadapter.miniature.models import Models
    from ipadapter.miniature.quality import QUICK, Size, evaluate

    size = QUICK if args.quick else Size()
    check_counts((f"--{flag}", getattr(args, flag)) for flag in ("n", "steps"))
    size = replace(size, references=args.n or size.references, steps=args.steps or size.steps)
    if args.models is not None and not Path(args.models).is_dir():
        raise IPAdapterError(f"--models {args.models} is not a folder")
    models = Models.from_folder(args.models) if args.models else None
    output_folder(args.out, "--out")
    _threads(args)
    results = evaluate(Path(args.out), models=models, size=size)
    for name, row in results["rows"].items():
        print(f"{name}: CLIP-I {row['clip_i']:.3f}", {k: round(v, 2) for k, v in row["agreement"].items()})
    for name, target in results["targets"].items():
        print({True: "met", False: "NOT met", None: "not measured"}[target["met"]], "-", name)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ipadapter.miniature.recipes import export

    _threads(args)
    sizes = export(Path(args.out))
    print("exported (MB):", {k: round(v, 2) for k, v in sizes.items()})
    return 0


# Each command's and option's help, keyed "command" or "command --flag" (prose for people, apart from the wiring).
HELP = {
    "miniature": "the offline shapes-world base models (data, training, export)",
    "data": "write PNGs + manifest.jsonl (image_file, text, attrs)",
    "data --out": "output folder",
    "data --n": "number of images (default 1000)",
    "data --seed": "seed of the drawn scenes (default 0)",
    "data --split": "heldout draws only the held-out (shape, colour, background colour) triples (default train)",
    "data --masks": "also write each object's mask (masks/*.png, mask_file): control images for the ControlNet",
    "--out": "run folder (checkpoints, logs, trained models)",
    "--threads": "torch threads (default: torch's own count)",
    "train": "run a training recipe (fixed seeds)",
    "train --steps": "override the recipe's step count",
    "train --resume": "continue from the run's last checkpoint",
    "eval": "the quality report: every stage (encoders, VAE, base model) then the adapters, on held-out scenes",
    "eval --out": "report folder (report.md, results.json, PNGs)",
    "eval --models": "a model folder: the bundled layout (pipeline/, adapters/, ...) or a rebuild's (clip/, vae/, "
                     "unet/, image_encoder/, ...); default: the bundled models",
    "eval --quick": "tiny sizes: the whole report in seconds (a smoke test)",
    "eval --n": "held-out references (default 48)",
    "eval --steps": "DDIM steps per image (default 25)",
    "export": "write fp16 weights into the package assets",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from ipadapter.miniature.recipes import DEFAULT_OUT, RECIPES

    parser = subparsers.add_parser("miniature", help=HELP["miniature"])
    sub = parser.add_subparsers(required=True)

    data = sub.add_parser("data", help=HELP["data"])
    data.add_argument("--out", required=True, help=HELP["data --out"])
    data.add_argument("--n", type=int, default=1000, help=HELP["data --n"])
    data.add_argument("--seed", type=int, default=0, help=HELP["data --seed"])
    data.add_argument("--split", choices=("train", "heldout"), default="train", help=HELP["data --split"])
    data.add_argument("--masks", action="store_true", help=HELP["data --masks"])
    data.set_defaults(func=_data)

    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, help=HELP["--threads"])
    common = argparse.ArgumentParser(add_help=False, parents=[threads])
    common.add_argument("--out", default=str(DEFAULT_OUT), help=HELP["--out"])

    train = sub.add_parser("train", parents=[common], help=HELP["train"])
    train.add_argument("recipe", choices=sorted(RECIPES), help="; ".join(f"{k}: {r.help}" for k, r in RECIPES.items()))
    train.add_argument("--steps", type=int, help=HELP["train --steps"])
    train.add_argument("--resume", action="store_true", help=HELP["train --resume"])
    train.set_defaults(func=_train)
    needs(train, "train")  # the adapter recipes run `ipadapter train`

    quality = sub.add_parser("eval", aliases=["evaluate"], parents=[threads], help=HELP["eval"])
    quality.add_argument("--out", default="eval/miniature-quality", help=HELP["eval --out"])
    quality.add_argument("--models", help=HELP["eval --models"])
    quality.add_argument("--quick", action="store_true", help=HELP["eval --quick"])
    quality.add_argument("--n", type=int, help=HELP["eval --n"])
    quality.add_argument("--steps", type=int, help=HELP["eval --steps"])
    quality.set_defaults(func=_quality)
    needs(quality, "eval")

    export = sub.add_parser("export", parents=[common], help=HELP["export"])
    export.set_defaults(func=_export)
