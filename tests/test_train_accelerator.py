"""The accelerator a run asks accelerate for: the run's precision and accumulation, its folders, and the CPU only
where several processes run on a machine without GPUs (they then talk over gloo, as CI runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipadapter.train import TrainConfig


@pytest.mark.parametrize("cuda, world, cpu", [
    (False, None, False), (False, "1", False), (False, "2", True), (False, "8", True),
    (True, None, False), (True, "2", False),
])
def test_the_cpu_is_forced_only_for_several_processes_without_gpus(monkeypatch, tmp_path, cuda: bool,
                                                                   world: str | None, cpu: bool) -> None:
    import accelerate
    import torch

    from ipadapter.train.trainer import _accelerator_phase

    asked = {}
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: asked.update(kwargs) or "accelerator")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    config = TrainConfig(output=str(tmp_path / "out"), grad_accum=3, mixed_precision="bf16")
    assert _accelerator_phase(config, "tensorboard") == "accelerator"
    project = asked.pop("project_config")
    assert asked == {"cpu": cpu, "gradient_accumulation_steps": 3, "mixed_precision": "bf16", "log_with": "tensorboard"}
    assert Path(project.project_dir) == tmp_path / "out" and Path(project.logging_dir) == tmp_path / "out" / "logs"
