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


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_deepspeed_is_told_the_micro_batch(monkeypatch, tmp_path) -> None:
    """DeepSpeed reads its micro-batch from the dataloaders it is given; ours streams itself, so the run writes
    `train_micro_batch_size_per_gpu` into the plugin's config before `prepare` (here a stand-in plugin: DeepSpeed needs
    GPUs, and `prepare` goes its way only for a DeepSpeed distributed type)."""
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState

    from ipadapter.train import train, trainer
    from tests import factories

    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}}, enable_msamp=False)
    real = trainer._accelerator_phase

    def with_plugin(*args):  # made as usual; from then on the state holds the stand-in
        accelerator = real(*args)
        monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", property(lambda self: plugin))
        return accelerator

    monkeypatch.setattr(trainer, "_accelerator_phase", with_plugin)
    manifest = factories.write_images(tmp_path / "data", 3)
    models, encoder = factories.in_memory()
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=3,
                         max_steps=1, num_workers=0)
    assert train(config, models=models, image_encoder=encoder, log_with=None).step == 1
    assert plugin.deepspeed_config == {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3}
