"""Safe mixed precision: a step with non-finite loss or gradients changes nothing and is counted; under fp16 the
decision is accelerate's gradient scaler's (which also lowers its scale)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ipadapter.train import TrainConfig, step, train
from ipadapter.train.checkpoint import latest_checkpoint
from tests import factories


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _config(tmp_path, data, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=2, num_workers=0,
                  save_every=1000, seed=0, learning_rate=1e-2)
    values.update(kw)
    return TrainConfig(**values)


def test_a_nan_batch_is_skipped_and_leaves_the_weights_unchanged(tmp_path, monkeypatch, caplog) -> None:
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    one = train(_config(tmp_path / "a", manifest, max_steps=1), models=models, image_encoder=encoder, log_with=None)
    factories.reset_accelerate()

    real, calls = step.step_inputs, {"n": 0}

    def poisoned(run, batch):
        latents, text, features, added = real(run, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            latents = torch.full_like(latents, float("nan"))
        return latents, text, features, added

    monkeypatch.setattr(step, "step_inputs", poisoned)
    with caplog.at_level(logging.WARNING, logger="ipadapter.train"):
        two = train(_config(tmp_path / "b", manifest, max_steps=2), models=models, image_encoder=encoder, log_with=None)
    assert two.step == 2 and two.nonfinite_steps == 1
    assert torch.isnan(torch.tensor(two.losses[1])) and not torch.isnan(torch.tensor(two.losses[0]))
    # the skipped second step left exactly the weights of the one-step run
    a, b = load_file(str(one.published)), load_file(str(two.published))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("step 2 skipped: non-finite" in r.getMessage() for r in caplog.records)
    state = json.loads((latest_checkpoint(two.output) / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1


def test_fp16_scaler_decides_and_lowers_its_scale() -> None:
    """accelerate's optimizer wrapper with a real GradScaler: Inf gradients skip the step, finite ones apply."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the wrapper reads accelerate's process state
    weight = torch.nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = AcceleratedOptimizer(torch.optim.SGD([weight], lr=0.1), device_placement=False, scaler=scaler)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda i: 1.0)
    accelerator = SimpleNamespace(scaler=scaler, clip_grad_norm_=lambda *a: None)

    scaler.scale((weight * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    assert step.optimizer_step(accelerator, optimizer, schedule, [weight], 0.0) is False
    assert torch.equal(weight.detach(), torch.ones(3)) and scaler.get_scale() < 2.0**8
    assert schedule.last_epoch == 0
    scaler.scale(weight.sum()).backward()  # a gradient of 1, scaled
    assert step.optimizer_step(accelerator, optimizer, schedule, [weight], 0.0) is True
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.9))
    assert schedule.last_epoch == 1


def test_sdxl_vae_stays_fp32_under_fp16() -> None:
    from ipadapter.train.models import vae_dtype

    sdxl_like = SimpleNamespace(config=SimpleNamespace(force_upcast=True))
    sd_like = SimpleNamespace(config=SimpleNamespace(force_upcast=False))
    assert vae_dtype(sdxl_like, torch.float16) == torch.float32
    assert vae_dtype(sdxl_like, torch.bfloat16) == torch.bfloat16  # bf16 has fp32's range
    assert vae_dtype(sd_like, torch.float16) == torch.float16
    assert vae_dtype(SimpleNamespace(config=SimpleNamespace()), torch.float16) == torch.float16  # says nothing


@pytest.mark.parametrize("weight_dtype,upcast,vae_expected", [
    (torch.float16, True, torch.float32),
    (torch.float16, False, torch.float16),
    (torch.bfloat16, True, torch.bfloat16),
])
def test_frozen_parts_are_placed_in_the_runs_precision_and_the_vae_as_it_needs(weight_dtype, upcast,
                                                                               vae_expected) -> None:
    """The text encoder in the run's precision, the VAE in it too unless fp16 would overflow it; a missing part
    (None) is skipped."""
    from ipadapter.train.models import place_frozen
    from tests import factories

    vae, encoder = factories.tiny_vae(), factories.tiny_text_encoder(16)
    vae.register_to_config(force_upcast=upcast)
    place_frozen("cpu", weight_dtype, vae, [encoder, None])
    assert {p.dtype for p in encoder.parameters()} == {weight_dtype}
    assert {p.dtype for p in vae.parameters()} == {vae_expected}
    place_frozen("cpu", torch.float32, None, [encoder])
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5, 2.0, 100.0])
def test_gradients_are_clipped_to_their_global_norm(max_grad_norm: float) -> None:
    """With SGD at lr 1 the update is the gradient; clipping scales all gradients together by c/‖g‖ when the
    global norm ‖g‖ is above c (here ‖g‖ = 5: (3, 4) over two parameters); 0 means no clipping."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    optimizer = torch.optim.SGD([a, b], lr=1.0)
    scheduled = []
    accelerator = SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    assert step.optimizer_step(accelerator, optimizer, SimpleNamespace(step=lambda: scheduled.append(1)), [a, b],
                               max_grad_norm)
    factor = min(1.0, max_grad_norm / 5.0) if max_grad_norm else 1.0
    torch.testing.assert_close(torch.cat([a.data, b.data]), -factor * torch.tensor([3.0, 4.0]))
    assert scheduled == [1] and a.grad is None and b.grad is None
