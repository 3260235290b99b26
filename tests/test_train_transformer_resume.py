"""Checkpoints of FLUX and SD 3 runs: a run killed after a checkpoint and resumed with `--resume latest` ends with the
weights, loss file and skip counts of the run that was never stopped (bit for bit; with gradient accumulation, a
warm-up and an EMA, whose schedule and averaged weights the state carries), the newest `--keep-checkpoints` states
are kept, and a resume that cannot continue exactly is refused before anything changes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipadapter.errors import IPAdapterError
from ipadapter.train.config import TrainConfig
from ipadapter.train.transformer import train_transformer
from tests import dit_factories as df
from tests import factories

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds an Accelerator
FAMILIES = {"flux": df.save_flux_base, "sd3": df.save_sd3_base}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request, tmp_path_factory):
    """(variant, base folder, a manifest of five good images and one that cannot be decoded)."""
    root = tmp_path_factory.mktemp(request.param)
    return request.param, FAMILIES[request.param](root), factories.write_images(root / "data", 5, corrupt=1)


def _config(setup, out: Path, **overrides) -> TrainConfig:
    variant, base, data = setup
    values = dict(variant=variant, base=str(base), image_encoder=str(base / "image_encoder"), data=str(data),
                  resolution=16, batch_size=2, max_steps=4, save_every=2, num_workers=0, seed=3,
                  learning_rate=1e-2, grad_accum=2, warmup_steps=3, ema_decay=0.5, output=str(out))
    return TrainConfig(**{**values, **overrides})


class Killed(Exception):
    pass


def _kill_after(step: int):
    def on_step(i: int, loss: float) -> None:
        if i == step:
            raise Killed

    return on_step


def _skip_step(monkeypatch, skipped: int) -> None:
    """Step `skipped`'s first loss is NaN: the step is skipped as non-finite, in a run and in a resumed one."""
    import ipadapter.dit.flow as flow

    step_generator, loss, current = flow.step_generator, flow.flow_matching_loss, {}

    def generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
        current["step"] = step
        return step_generator(seed, step, rank)

    def poisoned(*args, **kwargs) -> torch.Tensor:
        value = loss(*args, **kwargs)
        return value * float("nan") if current["step"] == skipped else value

    monkeypatch.setattr(flow, "step_generator", generator)
    monkeypatch.setattr(flow, "flow_matching_loss", poisoned)


def test_a_killed_run_resumed_ends_where_the_uninterrupted_run_ends(setup, tmp_path, caplog, monkeypatch) -> None:
    """With a step skipped as non-finite before the cut: the resumed run counts it too, and TensorBoard has it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _skip_step(monkeypatch, 2)
    whole = train_transformer(_config(setup, tmp_path / "whole"))
    with pytest.raises(Killed):
        train_transformer(_config(setup, tmp_path / "cut"), on_step=_kill_after(3))  # after the step-2 state
    states = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("state-*"))
    assert states == ["state-00000002"]
    with caplog.at_level(logging.INFO, logger="ipadapter.train"):
        resumed = train_transformer(_config(setup, tmp_path / "cut", resume="latest"))
    assert any(r.getMessage().startswith(f"resumed from {tmp_path / 'cut' / 'checkpoints' / 'state-00000002'} at "
                                         "step 2") for r in caplog.records)
    assert resumed.step == whole.step == 4 and resumed.losses == whole.losses[2:]
    for name in ("ip-adapter.safetensors", "adapter.ipadapter.safetensors"):
        ours, theirs = load_file(str(tmp_path / "cut" / name)), load_file(str(tmp_path / "whole" / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "cut" / "logs" / "losses.csv").read_text() == \
        (tmp_path / "whole" / "logs" / "losses.csv").read_text()
    assert resumed.skipped == whole.skipped and sum(whole.skipped.values()) >= 1
    assert resumed.nonfinite_steps == whole.nonfinite_steps == 1
    events = EventAccumulator(str(tmp_path / "whole" / "logs" / "train"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/nonfinite_steps")] == [(4, 1.0)]  # the last step
    assert [e.step for e in events.Scalars("train/loss")] == [4] and "train/lr" in events.Tags()["scalars"]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("state-*")) == ["state-00000004"]


def test_each_step_draws_anew_from_the_seed_and_the_step_alone() -> None:
    """What makes a resume exact without a saved generator: a step's draws depend on (seed, step) only, and differ
    from step to step and seed to seed (the same noise at every step would be a broken recipe that resumes fine)."""
    from ipadapter.dit.flow import step_generator

    def draws(seed: int, step: int) -> torch.Tensor:
        return torch.randn(8, generator=step_generator(seed, step))

    assert torch.equal(draws(3, 2), draws(3, 2))
    assert torch.equal(draws(3, 2), torch.randn(8, generator=step_generator(3, 2, 0)))  # one process: rank 0
    assert not torch.equal(draws(3, 2), draws(3, 3)) and not torch.equal(draws(3, 2), draws(4, 2))


def test_the_written_adapter_is_the_ema_of_the_weights_after_each_step(setup, tmp_path, monkeypatch) -> None:
    """`--ema-decay d`: shadow₀ = the starting weights, shadowₖ = d·shadowₖ₋₁ + (1 − d)·(the weights after step k),
    and the file holds the last shadow; the training itself is the run's without an EMA."""
    import ipadapter.train.transformer as run

    start, adapters, trajectory = run._start, [], []

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in adapters[-1].state_dict().items()}

    def spied(*args):
        adapters.append(start(*args))
        trajectory.append(weights())
        return adapters[-1]

    monkeypatch.setattr(run, "_start", spied)
    plain = train_transformer(_config(setup, tmp_path / "plain", ema_decay=0.0, save_every=10))
    trajectory.clear()
    averaged = train_transformer(_config(setup, tmp_path / "ema", ema_decay=0.75, save_every=10),
                                 on_step=lambda i, loss: trajectory.append(weights()))
    assert averaged.losses == plain.losses and len(trajectory) == 1 + 4
    assert all(torch.equal(trajectory[-1][k], v) for k, v in plain.adapter.state_dict().items())
    shadow = trajectory[0]
    for after in trajectory[1:]:
        shadow = {k: 0.75 * shadow[k] + 0.25 * after[k] for k in shadow}
    written = averaged.adapter.state_dict()
    for k in shadow:
        torch.testing.assert_close(written[k], shadow[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(written[k], trajectory[-1][k]) for k in written)
    ours, theirs = load_file(str(averaged.published)), load_file(str(plain.published))  # the file is the average
    assert ours.keys() == theirs.keys() and any(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_resume_that_cannot_continue_exactly_is_refused_and_changes_nothing(setup, tmp_path) -> None:
    variant, base, _ = setup
    train_transformer(_config(setup, tmp_path / "run", max_steps=2))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    state = tmp_path / "run" / "checkpoints" / "state-00000002"
    with pytest.raises(IPAdapterError) as caught:
        train_transformer(_config(setup, tmp_path / "run", resume="latest", max_steps=4, mixed_precision="bf16"))
    assert str(caught.value) == (f"cannot resume from {state} exactly: it ran with --mixed-precision no, this run "
                                 "with bf16")
    other = {"flux": "flux-v2", "sd3": "flux"}[variant]
    with pytest.raises(IPAdapterError) as caught:
        train_transformer(_config(setup, tmp_path / "run", resume="latest", variant=other))
    assert str(caught.value) == f"cannot resume from {state}: it trains variant {variant!r}, this run {other!r}"
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_a_deepspeed_launch_is_refused_before_anything_loads(setup, tmp_path, monkeypatch) -> None:
    """DeepSpeed's engine would own the backward pass the transformer loop runs itself: refused in one sentence."""
    import accelerate

    class DeepSpeedLaunch:
        state = type("State", (), {"deepspeed_plugin": object()})()

        def __init__(self, **kwargs: object) -> None:
            pass

    monkeypatch.setattr(accelerate, "Accelerator", DeepSpeedLaunch)
    with pytest.raises(IPAdapterError) as caught:
        train_transformer(_config(setup, tmp_path / "run"))
    assert str(caught.value) == ("FLUX and SD 3 runs do not run under DeepSpeed: launch them without a DeepSpeed "
                                 "config (several processes are taken)")
    assert not (tmp_path / "run").exists()
