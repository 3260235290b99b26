"""Step windows and per-step weight schedules."""

from __future__ import annotations

import pytest

from ipadapter.conditioning.schedules import active_steps, check_window, constant, keyframes, linear
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt, Reference


@pytest.mark.parametrize("start,end,steps", [
    (0.0, 1.0, list(range(10))),
    (0.0, 0.5, [0, 1, 2, 3, 4]),
    (0.3, 0.7, [3, 4, 5, 6]),
    (0.5, 0.5, []),
    (1.0, 1.0, []),
    (0.0, 0.0, []),
])
def test_active_steps(start: float, end: float, steps: list[int]) -> None:
    assert active_steps(10, start, end) == steps


def test_active_steps_agree_with_the_attention_processors_rule() -> None:
    import torch

    prompt = AdapterPrompt([Reference(cond=torch.zeros(1, 4, 8))], start=0.25, end=0.75)
    assert active_steps(12, 0.25, 0.75) == [i for i in range(12) if prompt.step_factor(i / 12) != 0.0]


@pytest.mark.parametrize("start,end,message", [
    (0.6, 0.4, "start \\(0.6\\) must not be after end \\(0.4\\)"),
    (-0.1, 0.5, "start must be a fraction"),
    (0.0, 1.5, "end must be a fraction"),
    (float("nan"), 0.5, "start must be a fraction"),
])
def test_bad_windows(start: float, end: float, message: str) -> None:
    with pytest.raises(IPAdapterError, match=message):
        check_window(start, end)


def test_constant_and_linear() -> None:
    assert constant(0.7)(0.0) == constant(0.7)(0.99) == 0.7
    fade = linear(1.0, 0.0)
    assert [fade(p) for p in (0.0, 0.25, 0.5, 1.0)] == [1.0, 0.75, 0.5, 0.0]
    with pytest.raises(IPAdapterError, match="finite"):
        linear(float("inf"), 0.0)


def test_a_constant_schedule_defaults_to_the_plain_weight() -> None:
    assert constant()(0.0) == constant()(0.5) == 1.0


@pytest.mark.parametrize("make,message", [
    (lambda: constant(float("inf")), "the weight must be a finite number, got inf"),
    (lambda: linear(float("nan"), 0.0), "the first weight must be a finite number, got nan"),
    (lambda: linear(0.0, float("-inf")), "the last weight must be a finite number, got -inf"),
    (lambda: keyframes([]), "a keyframe schedule needs at least one (fraction, weight) point"),
    (lambda: keyframes([(-0.1, 1.0)]), "a keyframe's position must be a fraction of the run between 0 and 1, got -0.1"),
    (lambda: keyframes([(0.5, float("inf"))]), "a keyframe's weight must be a finite number, got inf"),
    (lambda: keyframes([(0.5, 1.0), (0.2, 0.0)]), "keyframe positions must increase strictly, got [0.5, 0.2]"),
])
def test_schedule_errors_say_which_value_is_wrong(make, message: str) -> None:
    with pytest.raises(IPAdapterError) as err:
        make()
    assert str(err.value) == message


def test_keyframes_interpolate_and_hold_the_ends() -> None:
    s = keyframes([(0.2, 1.0), (0.6, 0.0), (0.8, 0.5)])
    assert s(0.0) == 1.0 and s(0.2) == 1.0
    assert s(0.4) == pytest.approx(0.5)
    assert s(0.6) == 0.0
    assert s(0.7) == pytest.approx(0.25)
    assert s(0.9) == 0.5
    assert keyframes([(0.5, 0.3)])(0.1) == 0.3


@pytest.mark.parametrize("points,message", [
    ([], "at least one"),
    ([(0.5, 1.0), (0.5, 0.0)], "increase strictly"),
    ([(0.5, 1.0), (0.2, 0.0)], "increase strictly"),
    ([(1.2, 1.0)], "fraction"),
])
def test_bad_keyframes(points, message: str) -> None:
    with pytest.raises(IPAdapterError, match=message):
        keyframes(points)


def test_a_schedule_is_what_the_prompt_applies_inside_the_window() -> None:
    import torch

    prompt = AdapterPrompt([Reference(cond=torch.zeros(1, 4, 8))], end=0.5, schedule=linear(1.0, 0.0))
    assert prompt.step_factor(0.25) == 0.75
    assert prompt.step_factor(0.5) == 0.0
