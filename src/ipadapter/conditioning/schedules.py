"""Step windows and per-step weight schedules, in fractions of the denoising run (scheduler-independent).

Progress is `step index / number of steps`, so it lies in [0, 1): 0 is the first step. An adapter acts on the steps
with `start <= progress < end` (the attention processor's rule): `end = 1` includes the last step and
`start == end` acts on none. A schedule is a callable `progress → weight factor`, set as `AdapterPrompt.schedule`;
it is evaluated on the run's progress, not on the position inside the window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ipadapter.errors import IPAdapterError

Schedule = Callable[[float], float]


def _fraction(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise IPAdapterError(f"{name} must be a fraction of the run between 0 and 1, got {value}")
    return float(value)


def _finite(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise IPAdapterError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_window(start: float, end: float) -> tuple[float, float]:
    """The window as floats, or one sentence on what is wrong with it."""
    start, end = _fraction("start", start), _fraction("end", end)
    if start > end:
        raise IPAdapterError(f"start ({start}) must not be after end ({end})")
    return start, end


def active_steps(steps: int, start: float, end: float) -> list[int]:
    """The step indices an adapter acts on in a run of `steps` steps (what the attention processor will do)."""
    start, end = check_window(start, end)
    return [i for i in range(steps) if start <= i / steps < end]


def constant(weight: float = 1.0) -> Schedule:
    weight = _finite("the weight", weight)
    return lambda progress: weight


def linear(begin: float, finish: float) -> Schedule:
    """Weight moving in a straight line from `begin` at the first step to `finish` at the end of the run."""
    begin, finish = _finite("the first weight", begin), _finite("the last weight", finish)
    return lambda progress: begin + (finish - begin) * progress


def keyframes(points: Sequence[tuple[float, float]]) -> Schedule:
    """Piecewise-linear through (fraction, weight) points; flat before the first point and after the last."""
    if not points:
        raise IPAdapterError("a keyframe schedule needs at least one (fraction, weight) point")
    frames = [(_fraction("a keyframe's position", f), _finite("a keyframe's weight", w)) for f, w in points]
    if any(b[0] <= a[0] for a, b in zip(frames, frames[1:])):
        raise IPAdapterError(f"keyframe positions must increase strictly, got {[f for f, _ in frames]}")

    def schedule(progress: float) -> float:
        if progress <= frames[0][0]:
            return frames[0][1]
        for (f0, w0), (f1, w1) in zip(frames, frames[1:]):
            if progress <= f1:
                return w0 + (w1 - w0) * (progress - f0) / (f1 - f0)
        return frames[-1][1]

    return schedule
