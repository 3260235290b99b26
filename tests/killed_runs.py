"""A training run killed part-way and resumed, for the tests that require it to end where an uninterrupted run ends
(the miniature's runs draw each step's batch from a function, which the kill replaces for one run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch


def kill_and_resume(run: Callable[[Path, bool], torch.nn.Module], module: Any, batches: str, folder: Path,
                    monkeypatch: pytest.MonkeyPatch, kill_at: int = 3,
                    after_kill: Callable[[Path], None] | None = None) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """`run(out, resume)` whole in `folder/whole`; in `folder/cut` killed as it draws its `kill_at`-th batch
    (`module.<batches>` raising KeyboardInterrupt), `after_kill(folder/cut)` called, then resumed there. Returns the
    uninterrupted model, the resumed one and how many batches the resumed run drew."""
    whole = run(folder / "whole", False)
    real, drawn = getattr(module, batches), []

    def dies(*args, **kwargs):
        drawn.append(args)
        if len(drawn) == kill_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, batches, dies)
    with pytest.raises(KeyboardInterrupt):
        run(folder / "cut", False)
    if after_kill is not None:
        after_kill(folder / "cut")
    drawn.clear()
    monkeypatch.setattr(module, batches, lambda *a, **k: drawn.append(a) or real(*a, **k))
    resumed = run(folder / "cut", True)
    monkeypatch.setattr(module, batches, real)
    return whole, resumed, len(drawn)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), key
