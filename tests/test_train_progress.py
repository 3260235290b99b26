"""What a training run shows a user: the progress bar on stderr while it runs (steps, loss, skipped samples,
non-finite steps; a resumed run's bar starts where it resumed) and the line it ends with."""

from __future__ import annotations

import logging
import re

import pytest

from ipadapter.train import train
from tests import factories


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _renders(stderr: str) -> list[str]:
    """The bar's successive renders: tqdm redraws its line after a carriage return."""
    return [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip().startswith("training:")]


def test_the_bar_counts_steps_and_shows_the_loss_and_the_skips(tmp_path, capsys) -> None:
    manifest = factories.write_images(tmp_path / "data", 4, corrupt=1)
    models, encoder = factories.in_memory()
    result = train(factories.train_config(tmp_path, manifest, max_steps=3), models=models, image_encoder=encoder,
                   log_with=None)
    renders = _renders(capsys.readouterr().err)
    assert renders, "no progress bar on stderr"
    assert re.search(r"\| 0/3 \[", renders[0]), renders[0]
    last = renders[-1]
    assert re.search(r"\| 3/3 \[", last) and re.search(r"\d(step/s|s/step)", last), last
    skipped = sum(result.skipped.values())
    assert skipped >= 1, "6 draws from 5 entries meet the corrupt one"
    postfix = set(last.rsplit("step/s, " if "step/s" in last else "s/step, ", 1)[1].rstrip("]").split(", "))
    assert postfix == {f"loss={result.losses[-1]:.4f}", f"skipped={skipped}", "nonfinite=0"}, last


def test_a_resumed_runs_bar_starts_at_its_step(tmp_path, capsys) -> None:
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    config = factories.train_config(tmp_path, manifest, max_steps=2, save_every=2)
    train(config, models=models, image_encoder=encoder, log_with=None)
    factories.reset_accelerate()
    capsys.readouterr()
    train(config.replace(resume="latest", max_steps=4), models=models, image_encoder=encoder, log_with=None)
    renders = _renders(capsys.readouterr().err)
    assert re.search(r"\| 2/4 \[", renders[0]) and re.search(r"\| 4/4 \[", renders[-1]), renders


def test_the_final_line_counts_the_skipped_samples_by_reason(tmp_path, caplog) -> None:
    manifest = factories.write_images(tmp_path / "data", 4, corrupt=1, missing=1)
    models, encoder = factories.in_memory()
    with caplog.at_level(logging.INFO, logger="ipadapter.train"):
        result = train(factories.train_config(tmp_path, manifest, max_steps=3, batch_size=4), models=models,
                       image_encoder=encoder, log_with=None)
    corrupt, missing = result.skipped["undecodable image"], result.skipped["missing image file"]
    assert corrupt >= 1 and missing >= 1, "12 draws from 6 entries meet each bad one"
    reasons = [(corrupt, "undecodable image"), (missing, "missing image file")]
    orders = [o for o in (reasons, reasons[::-1]) if o[0][0] >= o[1][0]]  # the most frequent first; a tie either way
    lines = {f"done at step 3: skipped {corrupt + missing} sample(s): {o[0][0]} {o[0][1]}, {o[1][0]} {o[1][1]}, "
             f"0 non-finite step(s) skipped; adapter written to {result.published}" for o in orders}
    assert lines & set(caplog.messages), (lines, caplog.messages)


def test_only_the_first_process_of_a_machine_draws_a_bar(tmp_path, capsys, monkeypatch) -> None:
    """Eight processes on one machine show one bar, not eight: here the process is told it is not the local first."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "is_local_main_process", property(lambda self: False))
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    result = train(factories.train_config(tmp_path, manifest), models=models, image_encoder=encoder, log_with=None)
    assert result.step == 2 and _renders(capsys.readouterr().err) == []


def test_tensorboard_gets_the_loss_lr_skips_and_non_finite_steps_every_log_every_and_at_the_end(
        tmp_path, monkeypatch) -> None:
    """log_every 2 over 5 steps logs steps 2, 4 and 5. Step 2 is poisoned (non-finite, skipped): it does not advance
    the warm-up, so the learning rate at a logged step is lr · min(1, (applied + 1) / warmup) with `applied` the steps
    applied so far. `on_step` gets each step and its loss; `step_times` holds one duration per step, within the run.
    The config goes with them as hyperparameters."""
    import time

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    factories.poison_micro_batches(monkeypatch, lambda n: n == 2)
    manifest = factories.write_images(tmp_path / "data", 4, corrupt=1)
    models, encoder = factories.in_memory()
    seen = []
    config = factories.train_config(tmp_path, manifest, max_steps=5, log_every=2, warmup_steps=4, learning_rate=1e-3)
    started = time.perf_counter()
    result = train(config, models=models, image_encoder=encoder, log_with="tensorboard",
                   on_step=lambda step, loss: seen.append((step, loss)))
    wall = time.perf_counter() - started
    assert len(seen) == 5 and [s for s, _ in seen] == [1, 2, 3, 4, 5]
    assert str([loss for _, loss in seen]) == str(result.losses)  # the NaN of step 2 included
    assert len(result.step_times) == 5 and all(0 < t for t in result.step_times) and sum(result.step_times) < wall

    events = EventAccumulator(str(result.output / "logs" / "train"))
    events.Reload()

    def logged(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in events.Scalars(tag)}

    applied = {2: 1, 4: 3, 5: 4}
    assert logged("train/lr") == pytest.approx({s: 1e-3 * min(1.0, (a + 1) / 4) for s, a in applied.items()})
    assert logged("train/nonfinite_steps") == {2: 1, 4: 1, 5: 1}
    losses = logged("train/loss")
    assert set(losses) == {2, 4, 5} and losses[2] != losses[2]  # NaN
    assert [losses[4], losses[5]] == pytest.approx([result.losses[3], result.losses[4]], rel=1e-6)
    skips = logged("data/skipped")
    assert set(skips) == {2, 4, 5} and skips[2] <= skips[4] <= skips[5] == sum(result.skipped.values()) >= 1
    # the run's config beside them, as hyperparameters: numbers and strings as they are, a list (stages) as its text
    (hparams,) = (result.output / "logs" / "train").glob("*/hparams.yml")
    values = yaml.safe_load(hparams.read_text())
    assert values["max_steps"] == 5 and values["log_every"] == 2 and values["learning_rate"] == 1e-3
    assert values["variant"] == "base" and values["gradient_checkpointing"] is False and values["stages"] == "[]"
