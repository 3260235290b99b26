"""The RNG state of a training process in safetensors: restoring it gives back exactly what Python's, NumPy's and
torch's own generators report (their getstate), cached Gaussian values included; a bad file is refused by name."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ipadapter import IPAdapterError
from ipadapter.train import rng_state


def _draws() -> list:
    return [random.gauss(0, 1), random.random(), np.random.randn(), np.random.rand(), torch.rand(3).tolist()]


def _states() -> tuple:
    numpy = np.random.get_state()
    return random.getstate(), (numpy[0], numpy[1].tolist(), *numpy[2:]), torch.get_rng_state().tolist()


@pytest.fixture
def saved_state(tmp_path):
    """A state saved with a Gaussian value cached in both Python's and NumPy's generator (each draws them in pairs);
    the generators are put back as they were afterwards."""
    before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)
    np.random.randn()
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    rng_state.save(tmp_path, 0)
    yield tmp_path
    random.setstate(before[0])
    np.random.set_state(before[1])
    torch.set_rng_state(before[2])


def test_restore_gives_back_every_generators_own_state(saved_state) -> None:
    states, draws = _states(), _draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    rng_state.restore(saved_state, 0)
    assert _states() == states
    assert _draws() == draws


def test_a_state_without_a_cached_gaussian_restores_none(tmp_path) -> None:
    before = random.getstate()
    try:
        random.seed(7)
        rng_state.save(tmp_path, 1)
        state = random.getstate()
        random.gauss(0, 1)
        rng_state.restore(tmp_path, 1)
        assert random.getstate() == state and state[2] is None
    finally:
        random.setstate(before)


def _rewrite(folder, change) -> None:
    path = rng_state.rng_file(folder, 0)
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("change, reason", [
    (lambda t: t.pop("python"), "python missing or of the wrong size"),
    (lambda t: t.update(numpy_keys=torch.zeros(623, dtype=torch.int64)), "numpy_keys missing or of the wrong size"),
    (lambda t: t.update(numpy_pos=torch.zeros(3, dtype=torch.int64)), "numpy_pos missing or of the wrong size"),
    (lambda t: t.pop("numpy_gauss"), "numpy_gauss missing or of the wrong size"),
    (lambda t: t.update(torch=t["torch"][:-1].clone()), "torch missing or of the wrong size"),
    (lambda t: t.pop("python_gauss"), "python_gauss of the wrong size"),
    (lambda t: t.update(python_gauss=torch.zeros(2, dtype=torch.float64)), "python_gauss of the wrong size"),
    (lambda t: t["python"].__setitem__(-1, 10_000), "invalid state"),  # Python's own words: a position past 624
])
def test_a_bad_state_is_refused_with_its_file_name(saved_state, change, reason) -> None:
    _rewrite(saved_state, change)
    before = random.getstate()
    with pytest.raises(IPAdapterError, match=r"^\S*rng-0\.safetensors is not a valid RNG state \(" + re.escape(reason)):
        rng_state.restore(saved_state, 0)
    assert random.getstate() == before


def test_a_missing_or_unreadable_file_is_refused(tmp_path) -> None:
    with pytest.raises(IPAdapterError, match=r"rng-2\.safetensors is missing: this state cannot be resumed exactly"):
        rng_state.read(tmp_path, 2)
    rng_state.rng_file(tmp_path, 2).write_bytes(b"not safetensors")
    with pytest.raises(IPAdapterError, match=r"rng-2\.safetensors is not a readable RNG state \(.+\)$"):
        rng_state.read(tmp_path, 2)
