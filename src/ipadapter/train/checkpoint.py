"""Training checkpoints: atomic, verified, resumable exactly; a good state is never deleted for a worse one.

Layout under `<output>/checkpoints/`: `state-<step>/` (accelerate's `save_state`: adapter weights, optimizer, LR
schedule, grad scaler; `rng-<rank>.safetensors` per process and `ema.safetensors` instead of pickles; and
`trainer_state.json` with the step, each process's data cursor and the size and SHA-256 of every other file) and
`latest`, a one-line pointer replaced atomically. States saved before the safetensors files (the EMA in
`custom_checkpoint_0.pkl`, the RNG in `random_states_<rank>.pkl`) still resume exactly, read with weights_only.

Saving: a state is written into `.tmp-state-<step>/`, checked (finite weights), renamed into place; only then does
`latest` move, and only states older than the new one are removed (the `keep` newest stay). A kill at any moment
leaves at least one complete state. A failed save (a full disk) removes its temporary folder and says so.

Resuming: `latest` that is missing, empty or names no complete state is not trusted: the newest complete state is
found by scanning (and the log says so); with none, the run is refused rather than silently started afresh. Every
file of the chosen state is checked (size, checksum, tensor shapes, finiteness) before anything is restored.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ipadapter.atomic import save_safetensors, swap_in, write_text
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.finite import require_finite
from ipadapter.train import rng_state

STATE_FILE = "trainer_state.json"
POINTER = "latest"
ADAPTER_FILE = "adapter.safetensors"
EMA_FILE = "ema.safetensors"
LEGACY_EMA = "custom_checkpoint_0.pkl"  # the EMA in states saved before EMA_FILE
_STATE_DIR = re.compile(r"^state-(\d+)$")
_CHUNK = 1 << 22


def checkpoints_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def step_of(path: Path) -> int | None:
    m = _STATE_DIR.match(path.name)
    return int(m.group(1)) if m else None


def state_dirs(output: str | Path) -> list[Path]:
    """Every `state-<step>` folder, oldest first (complete or not)."""
    root = checkpoints_dir(output)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of a state except trainer_state.json (which records them)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IPAdapterError(f"{path / STATE_FILE} is not a readable training state ({err})") from None
    ok = (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0
          and isinstance(state.get("data"), list) and isinstance(state.get("skipped"), list)
          and isinstance(state.get("files", {}), dict))
    if not ok:
        raise IPAdapterError(f"{path / STATE_FILE} is not a valid training state (step, data or files missing)")
    return state


def is_complete(path: Path) -> bool:
    """A readable state whose every recorded file is present at its recorded size (cheap: no checksums)."""
    try:
        state = read_state(path)
    except IPAdapterError:
        return False
    files = state.get("files") or {ADAPTER_FILE: None}  # states written before the manifest: the weights at least
    for name, entry in files.items():
        file = path / name
        if not file.is_file() or (entry is not None and file.stat().st_size != entry.get("bytes")):
            return False
    return True


def _pointer(root: Path) -> tuple[Path | None, str]:
    """The state `latest` names if it is complete, else None and what is wrong with the pointer."""
    pointer = root / POINTER
    if not pointer.is_file():
        return None, f"{pointer} is missing"
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"{pointer} is unreadable"
    if not name:
        return None, f"{pointer} is empty"
    target = root / name
    if "/" in name or "\\" in name or step_of(target) is None or not target.is_dir():
        return None, f"{pointer} names {name[:80]!r}, which does not exist"
    if not is_complete(target):
        return None, f"{pointer} names {name}, which is incomplete"
    return target, ""


def latest_checkpoint(output: str | Path) -> Path | None:
    """The state `latest` names when complete, else the newest complete state found by scanning, else None."""
    target, _ = _pointer(checkpoints_dir(output))
    if target is not None:
        return target
    return next((p for p in reversed(state_dirs(output)) if is_complete(p)), None)


def _has_run(output: Path) -> bool:
    root = checkpoints_dir(output)
    return bool(state_dirs(output)) or (root / POINTER).exists()


def resume_point(resume: str, output: str | Path, say: Callable[[str], None]) -> Path | None:
    """Where this run starts: None for a fresh start, else a complete state folder.

    resume "": a fresh start, refused over an existing run's checkpoints (they would be mixed with the new ones).
    "latest" or an output folder: the state `latest` names, else the newest complete one (said through `say`);
    refused when the run has checkpoints but none is complete. A state folder: that state, if complete.
    """
    output = Path(output)
    if not resume:
        if _has_run(output):
            raise IPAdapterError(
                f"{output} already holds a training run ({checkpoints_dir(output)}); continue it with --resume latest "
                "or choose another --output"
            )
        return None
    folder = output if resume == "latest" else Path(resume)
    if resume != "latest" and (folder / STATE_FILE).is_file():
        if not is_complete(folder):
            raise IPAdapterError(f"--resume {resume}: the state is incomplete (a file is missing or truncated)")
        return folder
    target, problem = _pointer(checkpoints_dir(folder))
    if target is not None:
        return target
    found = latest_checkpoint(folder)
    if found is not None:
        say(f"{problem}; resuming from the newest complete state found there, {found.name}")
        return found
    if _has_run(folder):
        raise IPAdapterError(
            f"--resume {resume}: {problem} and no complete state is in {checkpoints_dir(folder)}; nothing was changed"
        )
    if resume != "latest":
        raise IPAdapterError(f"--resume {resume}: no checkpoint there (expected {STATE_FILE} or checkpoints/{POINTER})")
    return None


def resume_from(resume: str, output: Path, variant: str, say: Callable[[str], None]) -> Path | None:
    """`resume_point`, and a state of another variant refused before any weights load."""
    path = resume_point(resume, output, say)
    if path is not None:
        found = read_state(path).get("variant")
        if found != variant:
            raise IPAdapterError(f"cannot resume from {path}: it trains variant {found!r}, this run {variant!r}")
    return path


def processes_progress(stream: Any, params: Any) -> dict[str, list]:
    """Every process's data cursor, skip counts and weight checksum (the replicas must agree), gathered for the state
    all processes save; every process calls it."""
    from accelerate.utils import gather_object

    checksum = float(sum(p.detach().double().sum() for p in params))
    per_rank = gather_object([{"data": stream.state_dict(), "skipped": dict(stream.skipped), "checksum": checksum}])
    return {"data": [p["data"] for p in per_rank], "skipped": [p["skipped"] for p in per_rank],
            "weight_checksums": [p["checksum"] for p in per_rank]}


def check_resumable(
    state: dict[str, Any], path: Path, *, variant: str, base_id: str, base: str, world: int, attention: str = "decoupled",
    model: str = "UNet",
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
            f"(a different {model})"
        )
    if state.get("num_processes") != world or len(state["data"]) != world or len(state["skipped"]) != world:
        raise IPAdapterError(
            f"cannot resume from {path} exactly: it ran on {state.get('num_processes')} process(es), this run on "
            f"{world}; launch with the same number of processes"
        )


def adapter_tensors(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under the names the checkpoint's adapter.safetensors uses (the own file format)."""
    return dict(adapter.state_dict())


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise IPAdapterError(f"{path} is missing") from None
    except (SafetensorError, OSError, RuntimeError) as err:
        raise IPAdapterError(f"{path} is not a readable safetensors file ({first_clause(str(err), 120)})") from None


def _check_like(path: Path, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for key in sorted(set(want) | set(got)):
        if key not in got or key not in want:
            raise IPAdapterError(f"{path} does not fit this run's adapter ({'missing' if key in want else 'unexpected'} {key})")
        if got[key].shape != want[key].shape:
            raise IPAdapterError(f"{path}: {key} has shape {tuple(got[key].shape)}, expected {tuple(want[key].shape)}")
    require_finite(got, str(path))


def _optimizer_tensors(path: Path) -> list[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise IPAdapterError(f"{path} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise IPAdapterError(f"{path} is not a readable optimizer state ({first_clause(str(err), 120)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise IPAdapterError(f"{path} is not an optimizer state")
    return [(f"state.{i}.{k}", v) for i, entry in state["state"].items() for k, v in dict(entry).items()]


def verify_state(path: Path, adapter: nn.Module, ema: Any | None) -> dict[str, Any]:
    """Every file of a state checked before anything is restored; the first bad one is named."""
    state = read_state(path)
    for name, entry in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise IPAdapterError(f"{file} is missing: this state is incomplete")
        if file.stat().st_size != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
            raise IPAdapterError(f"{file} differs from what was saved (truncated or changed)")
    _check_like(path / ADAPTER_FILE, _read_safetensors(path / ADAPTER_FILE), adapter_tensors(adapter))
    if (path / "optimizer.bin").exists() or "optimizer.bin" in state.get("files", {}):
        require_finite(_optimizer_tensors(path / "optimizer.bin"), str(path / "optimizer.bin"))
    if ema is not None:
        _check_like(path / EMA_FILE, _ema_tensors(path), {f"shadow.{i}": s for i, s in enumerate(ema.shadow)})
    for rank in range(len(state["data"])):
        if rng_state.rng_file(path, rank).exists() or not (path / _legacy_rng(rank)).exists():
            rng_state.read(path, rank)
        else:
            _legacy_load(path / _legacy_rng(rank), "RNG state")
    return state


def _legacy_rng(rank: int) -> str:
    """accelerate's own RNG file, in states saved before rng-<rank>.safetensors (read with weights_only=True)."""
    return f"random_states_{rank}.pkl"


def _legacy_load(path: Path, what: str) -> Any:
    from accelerate.utils import load

    try:
        return load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise IPAdapterError(f"{path} is not a readable {what} ({first_clause(str(err), 120)})") from None


@contextmanager
def _without_legacy_ema(path: Path) -> Iterator[Path]:
    """`path`, or for an older state a folder of links to its files but the EMA pickle: accelerate refuses a folder
    whose custom_checkpoint_*.pkl files outnumber the objects registered with it, and the EMA is read here instead."""
    if not (path / LEGACY_EMA).exists():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ipadapter-state-") as view:
        for file in path.iterdir():
            if file.name != LEGACY_EMA:
                (Path(view) / file.name).symlink_to(file.resolve())
        yield Path(view)


def _ema_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The EMA shadow weights: ema.safetensors, or accelerate's custom_checkpoint_0.pkl in older states."""
    legacy = path / LEGACY_EMA
    if (path / EMA_FILE).exists() or not legacy.exists():
        return _read_safetensors(path / EMA_FILE)
    saved = _legacy_load(legacy, "EMA state")
    shadow = saved.get("shadow") if isinstance(saved, dict) else None
    if not isinstance(shadow, list) or not all(isinstance(s, torch.Tensor) for s in shadow):
        raise IPAdapterError(f"{legacy} is not an EMA state")
    return {f"shadow.{i}": s for i, s in enumerate(shadow)}


def load_checkpoint(accelerator: Any, path: Path, adapter: nn.Module, ema: Any | None) -> dict[str, Any]:
    """Verify, then restore model, optimizer, schedule and this process's RNG (and the EMA)."""
    state = verify_state(path, adapter, ema)
    try:
        with _without_legacy_ema(path) as folder:
            accelerator.load_state(str(folder))
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise IPAdapterError(f"cannot restore the training state {path} ({first_clause(str(err))})") from None
    if ema is not None:
        saved = _ema_tensors(path)
        ema.load_state_dict({"decay": ema.decay, "shadow": [saved[f"shadow.{i}"] for i in range(len(ema.shadow))]})
    if rng_state.rng_file(path, accelerator.process_index).exists():
        rng_state.restore(path, accelerator.process_index)
    return state


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator: Any, output: str | Path, state: dict[str, Any], keep: int = 1,
                    ema: Any | None = None) -> Path:
    """Every process calls this (each writes its own RNG state); the main process checks, renames and prunes."""
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
        rank = accelerator.process_index
        rng_state.save(tmp, rank)
        (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)
        if accelerator.is_main_process and ema is not None:
            save_safetensors({f"shadow.{i}": s for i, s in enumerate(ema.shadow)}, tmp / EMA_FILE)
    except (OSError, RuntimeError, SafetensorError) as err:  # ENOSPC surfaces as any of these, by writer
        failure = err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and failure is None:
        try:
            _write_json(tmp / STATE_FILE, {**state, "files": file_manifest(tmp)})
        except OSError as err:
            failure = err
    if failure is not None:
        if accelerator.is_main_process:
            _discard(tmp)
        previous = latest_checkpoint(output)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        full = getattr(failure, "errno", None) == errno.ENOSPC or "No space left" in str(failure)
        reason = "the disk is full" if full else first_clause(str(failure))
        raise IPAdapterError(f"could not save the checkpoint at step {step} to {root} ({reason}); {kept}")
    if accelerator.is_main_process:
        try:
            require_finite(_read_safetensors(tmp / ADAPTER_FILE), f"the weights at step {step} were not saved")
        except IPAdapterError:
            _discard(tmp)
            raise
        swap_in(tmp, final)  # the same step saved again (a resume from an older state) is replaced, never half-gone
        write_text(root / POINTER, name + "\n")
        older = [p for p in state_dirs(output) if step_of(p) < step]
        for old in older[: max(0, len(older) - (keep - 1))]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def register_adapter_hooks(accelerator: Any, adapter: nn.Module) -> None:
    """Checkpoints hold the adapter's weights only (`ADAPTER_FILE`), not the frozen model that the wrapped module may
    also contain."""
    from ipadapter.checkpoint import save_adapter

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_adapter(adapter, Path(output_dir) / ADAPTER_FILE)
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        adapter.load_state_dict(load_file(str(Path(input_dir) / ADAPTER_FILE)))
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
