"""Training checkpoints: atomic, resumable exactly, the last good one always kept.

Layout under `<output>/checkpoints/`: `state-<step>/` (accelerate's `save_state`: adapter weights, optimizer, LR
schedule, grad scaler, RNG of every process, EMA; plus `trainer_state.json` with the step and each process's data
cursor) and `latest`, a one-line pointer replaced atomically. A state is written into `.tmp-state-<step>/` and
renamed into place; only then does `latest` move and older states go. A kill at any moment leaves `latest` naming
a complete state. A failed save (a full disk) removes its temporary folder and says so; the previous state stays.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ipadapter.errors import IPAdapterError

STATE_FILE = "trainer_state.json"
POINTER = "latest"


def checkpoints_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def latest_checkpoint(output: str | Path) -> Path | None:
    root = checkpoints_dir(output)
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def resolve_resume(resume: str, output: str | Path) -> Path | None:
    """`latest` (this run's newest state, or a fresh start when there is none), an output folder, or a state folder."""
    if resume == "latest":
        return latest_checkpoint(output)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise IPAdapterError(f"--resume {resume}: no checkpoint there (expected {STATE_FILE} or checkpoints/{POINTER})")
    return found


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IPAdapterError(f"{path} is not a readable training checkpoint ({err})") from None


def check_resumable(
    state: dict[str, Any], path: Path, *, variant: str, base_id: str, base: str, world: int, attention: str = "decoupled",
) -> None:
    if state.get("variant") != variant:
        raise IPAdapterError(
            f"cannot resume from {path}: it trains variant {state.get('variant')!r}, this run variant {variant!r}"
        )
    if state.get("attention", attention) != attention:
        raise IPAdapterError(
            f"cannot resume from {path}: it trains {state['attention']!r} attention, this run {attention!r}"
        )
    if state.get("base_id") != base_id:
        raise IPAdapterError(
            f"cannot resume from {path}: it was trained on base {state.get('base')!r}, this run uses {base!r} "
            "(a different UNet)"
        )
    if state.get("num_processes") != world:
        raise IPAdapterError(
            f"cannot resume from {path} exactly: it ran on {state.get('num_processes')} process(es), this run on "
            f"{world}; launch with the same number of processes"
        )


def save_checkpoint(accelerator: Any, output: str | Path, state: dict[str, Any], keep: int = 1) -> Path:
    """Every process calls this (accelerate writes each process's RNG state); the main process renames."""
    root = checkpoints_dir(output)
    step = int(state["step"])
    name = f"state-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    failure: BaseException | None = None
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            _write_json(tmp / STATE_FILE, state)
    except (OSError, RuntimeError, SafetensorError) as err:  # ENOSPC surfaces as any of these, by writer
        failure = err
    accelerator.wait_for_everyone()
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        full = getattr(failure, "errno", None) == errno.ENOSPC or "No space left" in str(failure)
        reason = "the disk is full" if full else str(failure).splitlines()[0][:200]
        raise IPAdapterError(f"could not save the checkpoint at step {step} to {root} ({reason}); {kept}")
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / f".{POINTER}.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / POINTER)
        states = sorted(p for p in root.glob("state-*") if p.is_dir() and p != final)
        for old in states[: max(0, len(states) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
