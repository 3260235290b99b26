"""Shared machinery of the miniature training runs: log lines, learning-rate schedule, atomic resumable checkpoints.

CPU hours are the bottleneck, so every run checkpoints every few minutes and resumes bit-for-bit where it stopped
(batches are a pure function of the step, so no data-loader state needs saving). A run that spans sessions on
machines that are not kept leaves a *snapshot* (`<name>.state.safetensors`: its modules in fp16 and the step, no
optimizer, about a quarter of the checkpoint) small enough to commit; resuming from one re-warms the learning rate
over `REWARM_STEPS` while the optimizer's moments build up again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from ipadapter.atomic import save_torch

log = logging.getLogger("ipadapter.miniature")
REWARM_STEPS = 100


def cosine_lr(step: int, total: int, peak: float, warmup: int = 50, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def size_mb(path: Path) -> float:
    """A file's size, or a folder's (every file under it), in MB of 2**20 bytes: what an export reports."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def write_snapshot(checkpoint: Path, snapshot: Path) -> int:
    """A checkpoint's modules in fp16 and its step as `snapshot` (safetensors, no optimizer); returns the step."""
    from ipadapter.atomic import save_safetensors

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    tensors = {
        f"{key}.{k}": v.half() if v.is_floating_point() else v
        for key, module_state in state["modules"].items() for k, v in module_state.items()
    }
    save_safetensors(tensors, snapshot, {"step": str(state["step"])})
    return int(state["step"])


class TrainRun:
    """One named run in `out_dir`: `<name>.log`, `<name>.ckpt.pt`; call `step_done` once per optimiser step."""

    def __init__(
        self,
        out_dir: str | Path,
        name: str,
        total_steps: int,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        resume: bool = False,
        checkpoint_every_s: float = 180.0,
        log_every: int = 10,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.total_steps = total_steps
        self.modules = modules
        self.optimizer = optimizer
        self.checkpoint_every_s = checkpoint_every_s
        self.log_every = log_every
        self.ckpt_path = self.out_dir / f"{name}.ckpt.pt"
        self.snapshot_path = self.out_dir / f"{name}.state.safetensors"
        self.rewarm_from: int | None = None
        self._attach_log_file()
        self.start_step = self._load() if resume else 0
        self._last_save = time.monotonic()
        self._t0 = time.monotonic()
        self._losses: list[float] = []
        self.last_loss = float("nan")

    def _attach_log_file(self) -> None:
        """Send the package log to this run's file only (a process may run several runs one after another)."""
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()
        handler = logging.FileHandler(self.out_dir / f"{self.name}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    def _load(self) -> int:
        if not self.ckpt_path.exists():
            if self.snapshot_path.exists():
                return self._load_snapshot()
            log.info("%s: no checkpoint at %s, starting from step 0", self.name, self.ckpt_path)
            return 0
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        step = int(state["step"])
        new = self._load_modules(state["modules"])
        if set(state["modules"]) != set(self.modules):
            self.rewarm_from = step
            log.info("%s: resumed from %s at step %d; the modules differ (%s start fresh), and so does the optimizer",
                     self.name, self.ckpt_path, step, ", ".join(new) or "none")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            log.info("%s: resumed from %s at step %d", self.name, self.ckpt_path, step)
        return step

    def _load_snapshot(self) -> int:
        from safetensors import safe_open

        with safe_open(self.snapshot_path, framework="pt") as f:
            step = int(f.metadata()["step"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            key, _, rest = k.partition(".")
            saved.setdefault(key, {})[rest] = v
        new = self._load_modules(saved)
        self.rewarm_from = step
        log.info("%s: resumed from snapshot %s at step %d (fresh optimizer moments%s)", self.name, self.snapshot_path,
                 step, f"; {', '.join(new)} start fresh" if new else "")
        return step

    def _load_modules(self, saved: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """Load every module the saved state holds (strictly); returns the names of those it does not hold.

        A later stage of a run may add modules (read-out heads for a new objective); they start fresh. Resuming an
        earlier stage from a later stage's checkpoint loads the modules they share (the stage then has nothing
        left to train)."""
        for key, module in self.modules.items():
            if key in saved:
                module.load_state_dict(saved[key])  # copied into the module's own dtypes (a snapshot is fp16)
        return [key for key in self.modules if key not in saved]

    def save(self, step: int) -> None:
        state = {
            "step": step,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
        }
        save_torch(state, self.ckpt_path)  # a kill mid-write leaves the previous checkpoint
        self._last_save = time.monotonic()

    def set_lr(self, step: int, peak: float) -> None:
        lr = cosine_lr(step, self.total_steps, peak)
        if self.rewarm_from is not None:
            lr *= min(1.0, (step - self.rewarm_from + 1) / REWARM_STEPS)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimize(self, step: int, loss: torch.Tensor, peak_lr: float, clip: Iterable[torch.Tensor] | None = None) -> None:
        """One optimiser step at `step`'s cosine learning rate; `clip`: parameters whose gradient norm is cut to 1."""
        self.set_lr(step, peak_lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        self.optimizer.step()

    def step_done(self, step: int, loss: float) -> None:
        """`step` is the number of completed steps; logs the mean loss and checkpoints on a timer and at the end."""
        self._losses.append(loss)
        if step % self.log_every == 0 or step == self.total_steps:
            self.last_loss = sum(self._losses) / len(self._losses)
            self._losses.clear()
            done = step - self.start_step
            rate = (time.monotonic() - self._t0) / max(1, done)
            eta = rate * (self.total_steps - step)
            log.info(
                "%s step %d/%d loss %.4f lr %.2e %.2fs/step eta %.1fmin",
                self.name, step, self.total_steps, self.last_loss,
                self.optimizer.param_groups[0]["lr"], rate, eta / 60,
            )
        if step == self.total_steps or time.monotonic() - self._last_save > self.checkpoint_every_s:
            self.save(step)

    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0
