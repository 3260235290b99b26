"""`AccelerateShard` in one process (its two-process runs are in test_batch_generate.py, in child processes): its
place among the processes, and what it gathers and agrees on."""

from __future__ import annotations

import pytest

from ipadapter.errors import IPAdapterError

pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def shard(monkeypatch):
    from ipadapter.batch.accelerated import AccelerateShard

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return AccelerateShard()


def test_one_process_is_the_first_of_one_on_the_gpu_if_there_is_one(shard) -> None:
    import torch

    assert (shard.index, shard.count) == (0, 1)
    assert shard.device.startswith("cuda") if torch.cuda.is_available() else shard.device == "cpu"
    shard.wait()  # a barrier with nobody else to wait for returns


def test_gathering_in_one_process_gives_back_its_own_items_as_a_list(shard) -> None:
    assert shard.gather(("a", 1, None)) == ["a", 1, None]
    assert shard.gather([]) == []


def test_agree_returns_the_steps_result(shard) -> None:
    assert shard.agree(lambda: {"rows": 3}) == {"rows": 3}


def test_agree_raises_the_users_mistake_with_its_sentence(shard) -> None:
    def refuse():
        raise IPAdapterError("the manifest names 2 missing images")

    with pytest.raises(IPAdapterError, match="^the manifest names 2 missing images$"):
        shard.agree(refuse)


def test_agree_lets_a_bug_through_as_itself(shard) -> None:
    def bug():
        raise KeyError("width")

    with pytest.raises(KeyError, match="width"):
        shard.agree(bug)
