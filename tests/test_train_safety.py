"""Safe mixed precision: a step with non-finite loss or gradients changes nothing and is counted; under fp16 the
decision is accelerate's gradient scaler's (which also lowers its scale)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ipadapter import IPAdapterError
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

    factories.poison_micro_batches(monkeypatch, lambda n: n == 2)
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
    monkeypatch.undo()
    factories.reset_accelerate()
    with caplog.at_level(logging.INFO, logger="ipadapter.train"):
        three = train(_config(tmp_path / "b", manifest, max_steps=3, resume="latest"), models=models,
                      image_encoder=encoder, log_with=None)
    assert three.step == 3 and three.nonfinite_steps == 1, "the count goes on from the checkpoint's"
    factories.reset_accelerate()
    again = train(_config(tmp_path / "b", manifest, max_steps=3, resume="latest"), models=models,
                  image_encoder=encoder, log_with=None)
    assert again.step == 3 and again.losses == [] and again.nonfinite_steps == 1, "resumed at its last step: no step"
    assert f"resumed from {latest_checkpoint(two.output).parent / 'state-00000002'} at step 2" in caplog.messages


def test_a_run_stops_at_the_limit_of_consecutive_non_finite_steps(tmp_path, monkeypatch, caplog) -> None:
    """Steps 1-2 and 4-6 poisoned, the limit lowered to 3: step 3 applies and resets the count, so the run stops at
    step 6 (three in a row, five in all), with the caller's UNet as it was."""
    from ipadapter.train import trainer

    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    processors = dict(models.unet.attn_processors)
    calls = factories.poison_micro_batches(monkeypatch, lambda n: n != 3)
    monkeypatch.setattr(trainer, "NONFINITE_LIMIT", 3)
    with caplog.at_level(logging.WARNING, logger="ipadapter.train"), pytest.raises(IPAdapterError) as caught:
        train(_config(tmp_path, manifest, max_steps=10), models=models, image_encoder=encoder, log_with=None)
    assert str(caught.value) == ("3 consecutive steps had non-finite gradients (last at step 6); lower the learning "
                                 "rate, check the data, or use bf16 instead of fp16")
    assert calls["n"] == 6
    warned = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert warned == [f"step {s} skipped: non-finite loss or gradients ({n} so far)"
                      for n, s in enumerate([1, 2, 4, 5, 6], start=1)]
    assert dict(models.unet.attn_processors) == processors


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


@pytest.mark.parametrize("precision, frozen_dtype", [
    ("no", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
])
def test_the_frozen_models_run_in_the_runs_precision_without_gradients(tmp_path, precision, frozen_dtype) -> None:
    """The UNet, text encoder and image encoder are frozen (no gradient is ever computed for them) and cast to the
    run's precision; the VAE as its config asks (this one upcasts: fp32 under fp16); the adapter trains in fp32."""
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    if precision == "fp16":  # given in half precision: the adapter made from its to_k/to_v still trains in fp32
        models.unet.half()
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    result = train(_config(tmp_path, manifest, max_steps=2, mixed_precision=precision), models=models,
                   image_encoder=encoder, log_with=None)
    frozen = {"unet": models.unet, "text encoder": models.text_encoders[0], "image encoder": encoder.model,
              "vae": models.vae}
    for name, module in frozen.items():
        assert not any(p.requires_grad or p.grad is not None for p in module.parameters()), name
    vae_dtype = torch.float32 if precision == "fp16" else frozen_dtype
    assert {name: {p.dtype for p in m.parameters()} for name, m in frozen.items()} == {
        "unet": {frozen_dtype}, "text encoder": {frozen_dtype}, "image encoder": {frozen_dtype}, "vae": {vae_dtype}}
    assert {p.dtype for p in result.adapter.parameters()} == {torch.float32}
    after = models.unet.state_dict()
    assert all(torch.equal(after[k].float(), before[k].to(frozen_dtype).float()) for k in before)
