"""Resolution stages: a run as a sequence of (resolution, steps), e.g. 512 px then 1024 px, each stage starting from
the previous stage's final adapter (`init_from`) with a fresh optimizer and schedule.

Stage i trains into `<output>/stages/<i>-<resolution>px/`, a complete run folder of its own (checkpoints, logs,
model card); a stage whose final adapter is there is done and is not run again, so `--resume latest` continues
the stage that was interrupted (without `--resume`, an output holding stages is refused, as for a plain run). The
last stage's model folder is copied to `<output>`, with the whole run's `config.json`, a `loss.png` over every stage
and a card that lists the stages. With a feature cache, each stage has its own
(`<cache>-<resolution>px`): the cache holds one resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipadapter.atomic import copy_file, save_png, write_text
from ipadapter.errors import IPAdapterError
from ipadapter.train.config import TrainConfig, parse_stage
from ipadapter.train.model_folder import loss_curve, read_losses
from ipadapter.train.models import base_configs, check_stage_resolutions
from ipadapter.train.trainer import OWN_NAME, PUBLISHED_NAME, TrainResult

logger = logging.getLogger("ipadapter.train")

FOLDER_FILES = (PUBLISHED_NAME, OWN_NAME, "README.md", "loss.png", "samples.png")


def stage_configs(config: TrainConfig) -> list[TrainConfig]:
    """One plain run config per stage (no `stages` of its own), chained by `init_from`."""
    out, previous, runs = Path(config.output), config.init_from, []
    for i, text in enumerate(config.stages, start=1):
        resolution, steps = parse_stage(text)
        folder = out / "stages" / f"{i}-{resolution}px"
        runs.append(config.replace(
            stages=[], resolution=resolution, max_steps=steps, output=str(folder), init_from=previous,
            cache=f"{config.cache}-{resolution}px" if config.cache else "", resume="latest" if config.resume else "",
        ))
        previous = str(folder / OWN_NAME)
    return runs


def run_stages(config: TrainConfig, train_one: Any, check: Callable[[list[TrainConfig]], None] | None = None,
               **kwargs: Any) -> TrainResult:
    """Each stage with `train_one(config, **kwargs)`; finished stages (final adapter written) are skipped. Returns the
    last stage's result pointing at the copied model folder (only the paths when every stage had finished before).
    `check(stages)` refuses a stage the base cannot take before the first one trains (by default a UNet base's)."""
    result = None
    stages = stage_configs(config)
    started = [s.output for s in stages if Path(s.output).is_dir() and any(Path(s.output).iterdir())]
    if started and not config.resume:  # as a plain run: a fresh start never builds on an earlier run's stages
        raise IPAdapterError(f"{config.output} already holds a staged training run ({started[0]}); continue it with "
                             "--resume latest or choose another --output")
    pending = [s for s in stages if not (Path(s.output) / OWN_NAME).is_file()]
    if pending and check is not None:
        check(pending)
    elif pending:  # the base's configs suffice (no weights read)
        check_stage_resolutions([(s.resolution, s.max_steps) for s in pending],
                                *base_configs(config.base, kwargs.get("models")))
    for stage in stages:
        if stage not in pending:
            logger.info("stage %s already finished; next stage", stage.output)
            continue
        logger.info("stage %s: %d px for %d steps%s", stage.output, stage.resolution, stage.max_steps,
                    f", from {stage.init_from}" if stage.init_from else "")
        result = train_one(stage, **kwargs)
    last, out = Path(stages[-1].output), Path(config.output)
    for name in FOLDER_FILES:
        if (last / name).is_file():
            copy_file(last / name, out / name)
    write_text(out / "config.json", config.to_json())
    save_png(loss_curve(run_losses(stages)), out / "loss.png")
    if (out / "README.md").is_file():
        write_text(out / "README.md", (out / "README.md").read_text(encoding="utf-8") + stages_section(stages, out))
    if result is None:
        result = TrainResult(step=stages[-1].max_steps, output=out)
    result.output = out
    result.published = out / PUBLISHED_NAME if (out / PUBLISHED_NAME).is_file() else None
    result.own = out / OWN_NAME
    return result


def run_losses(stages: list[TrainConfig]) -> list[tuple[int, float]]:
    """(step, loss) of the whole run: each stage's logged losses after the steps of the stages before it."""
    points, before = [], 0
    for stage in stages:
        points += [(before + step, loss) for step, loss in read_losses(Path(stage.output))]
        before += stage.max_steps
    return points


def stages_section(stages: list[TrainConfig], out: Path) -> str:
    """The card's account of the stages: its table above is the last stage's own card."""
    rows = "".join(f"| {i} | {s.resolution} px | {s.max_steps} | `{Path(s.output).relative_to(out)}/` |\n"
                   for i, s in enumerate(stages, start=1))
    return ("\n## Stages\n\nTrained in stages, each from the previous stage's adapter; the card above is the last "
            "stage's, `loss.png` covers every stage.\n\n| stage | resolution | steps | folder |\n|---|---|---|---|\n"
            + rows)
