"""Keep a miniature training run across machines: snapshot its finished models and its running stage into a folder
small enough to commit, or restore such a folder into a run folder.

    python scripts/miniature_snapshot.py save RUN_DIR STATE_DIR --stage unet --models clip vae
    python scripts/miniature_snapshot.py save RUN_DIR STATE_DIR --models clip vae unet image_encoder adapter-base
    python scripts/miniature_snapshot.py restore STATE_DIR RUN_DIR
    ipadapter miniature train unet --out RUN_DIR --resume     # continues from the snapshot
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ipadapter.miniature.runloop import write_snapshot


def save(run: Path, state: Path, stage: str | None, models: list[str]) -> None:
    """Copy the finished model folders `models` (or a training run's folder) and snapshot the running `stage`."""
    state.mkdir(parents=True, exist_ok=True)
    for name in models:
        target = state / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(run / name, target)
    if stage is not None:
        step = write_snapshot(run / f"{stage}.ckpt.pt", state / f"{stage}.state.safetensors")
        print(f"{stage} at step {step} saved to {state}")
    print(f"{', '.join(models) or 'no model folders'} copied to {state}")


def restore(state: Path, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for item in state.iterdir():
        if item.is_dir():
            shutil.copytree(item, run / item.name, dirs_exist_ok=True)
        elif item.suffix == ".safetensors":
            shutil.copy(item, run / item.name)
    print(f"restored {state} into {run}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save")
    s.add_argument("run", type=Path)
    s.add_argument("state", type=Path)
    s.add_argument("--stage", help="a running miniature recipe (`<stage>.ckpt.pt`) to snapshot")
    s.add_argument("--models", nargs="*", default=[])
    r = sub.add_parser("restore")
    r.add_argument("state", type=Path)
    r.add_argument("run", type=Path)
    args = parser.parse_args()
    if args.command == "save":
        save(args.run, args.state, args.stage, args.models)
    else:
        restore(args.state, args.run)


if __name__ == "__main__":
    main()
