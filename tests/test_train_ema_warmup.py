"""The trainer's weight average and learning-rate warm-up against their closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ipadapter.train.trainer import EMA, warmup_then_constant


def test_the_average_moves_a_share_of_one_minus_decay_towards_the_weights_each_update() -> None:
    """Weights held at p after starting at s0: after k updates the average is p + decay^k (s0 - p)."""
    weight = nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))
    ema = EMA([weight], decay=0.8)
    start = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 0.0, -4.0]))
    for k in range(1, 4):
        ema.update()
        torch.testing.assert_close(ema.shadow[0], weight.detach() + 0.8**k * (start - weight.detach()))
    assert weight.tolist() == [3.0, 0.0, -4.0], "updating the average leaves the weights alone"


def test_the_average_is_kept_in_float32_and_written_back_in_the_weights_dtype() -> None:
    weight = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = EMA([weight], decay=0.5)
    assert ema.shadow[0].dtype == torch.float32 and ema.shadow[0].data_ptr() != weight.data_ptr()
    with torch.no_grad():
        weight.copy_(torch.tensor([2.0, 3.0]))
    ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.tensor([1.5, 2.5]))
    ema.copy_to()
    assert weight.dtype == torch.bfloat16 and weight.tolist() == [1.5, 2.5]


def test_the_averages_state_round_trips_onto_the_weights() -> None:
    weights = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(3))]
    ema = EMA(weights, decay=0.9)
    with torch.no_grad():
        weights[0].fill_(11.0)
    ema.update()
    state = ema.state_dict()
    assert state["decay"] == 0.9 and [s.device.type for s in state["shadow"]] == ["cpu", "cpu"]
    other = EMA([nn.Parameter(torch.full((2,), 5.0)), nn.Parameter(torch.full((3,), 5.0))], decay=0.1)
    other.load_state_dict(state)
    assert other.decay == 0.9
    torch.testing.assert_close(other.shadow[0], torch.full((2,), 2.0))
    torch.testing.assert_close(other.shadow[1], torch.zeros(3))


@pytest.mark.parametrize("warmup,factors", [
    (0, [1.0, 1.0, 1.0]),
    (-3, [1.0, 1.0]),
    (1, [1.0, 1.0]),
    (4, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]),
])
def test_warm_up_rises_linearly_to_the_constant_rate(warmup, factors) -> None:
    """Scheduler step i (from 0) scales the rate by (i + 1) / warmup until it reaches 1, then stays there."""
    schedule = warmup_then_constant(warmup)
    assert [schedule(i) for i in range(len(factors))] == pytest.approx(factors)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_the_warm_up_counts_every_processs_scheduler_step(processes: int) -> None:
    """accelerate steps a prepared scheduler once per process for each optimizer step, so `warmup_steps` optimizer
    steps are warmup_steps × processes scheduler steps: after k optimizer steps the factor is min(1, (k·n + 1) /
    (warmup·n))."""
    from types import SimpleNamespace

    from ipadapter.train import TrainConfig
    from ipadapter.train.trainer import _optimizer_phase

    adapter = nn.Linear(2, 2)
    run = SimpleNamespace(config=TrainConfig(warmup_steps=3, learning_rate=1.0),
                          accelerator=SimpleNamespace(num_processes=processes))
    opt = _optimizer_phase(run, adapter)
    rates = []
    for _ in range(4):
        rates.append(opt.lr_scheduler.get_last_lr()[0])
        for _ in range(processes):
            opt.lr_scheduler.step()
    assert rates == pytest.approx([min(1.0, (k * processes + 1) / (3 * processes)) for k in range(4)])


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_a_run_keeps_an_average_only_when_asked(tmp_path, decay: float) -> None:
    """`ema_decay` 0 (the default) keeps no average: its checkpoints hold none."""
    from ipadapter.train import TrainConfig, train
    from ipadapter.train.checkpoint import latest_checkpoint
    from tests import factories

    manifest = factories.write_images(tmp_path / "data", 2)
    models, encoder = factories.in_memory()
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=2,
                         max_steps=1, num_workers=0, ema_decay=decay)
    train(config, models=models, image_encoder=encoder, log_with=None)
    assert (latest_checkpoint(config.output) / "ema.safetensors").is_file() == (decay > 0)
