"""Tiny models with real architectures and random weights, built in the tests (nothing is downloaded)."""

from __future__ import annotations

import copy
import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import factories  # noqa: E402

# Toy-sized models gain nothing from threads, and contention with other processes makes them much slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _older_objects_frozen() -> None:
    """Each file starts with the garbage of the files before it collected and every object still alive frozen
    (`gc.freeze`): the imports of torch, diffusers and transformers are some 400 000 objects, which every full
    collection (the interpreter's own, and one per training run) walked again: a third of a training file's time, a
    tenth of others'. What a test makes is still collected; an object alive at a file's start that later becomes part
    of an unreachable cycle stays in memory until the worker exits (a few thousand objects in a whole run)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def sd15_unet_template():
    return factories.sd15_unet()


@pytest.fixture(scope="session")
def sdxl_unet_template():
    return factories.sdxl_unet()


@pytest.fixture
def sd15_unet(sd15_unet_template):
    """A fresh copy per test: a test that fails while an adapter is attached cannot leave it on the next test's UNet."""
    return copy.deepcopy(sd15_unet_template)


@pytest.fixture
def sdxl_unet(sdxl_unet_template):
    return copy.deepcopy(sdxl_unet_template)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state (mixed precision, ...): a training test leaves none for the next one."""
    yield
    factories.reset_accelerate()


@pytest.fixture
def every_step_checkpoints(monkeypatch):
    """A clock that jumps 1,000 s at each reading, so a miniature run checkpoints after every step."""
    from ipadapter.miniature import runloop

    now = [0.0]

    def tick() -> float:
        now[0] += 1000.0
        return now[0]

    monkeypatch.setattr(runloop.time, "monotonic", tick)
