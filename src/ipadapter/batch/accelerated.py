"""`Shard` over the processes of `accelerate launch` (the `train` extra): rank, barrier, gather, shared errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from ipadapter.batch.shards import Shard
from ipadapter.errors import IPAdapterError

T = TypeVar("T")


class AccelerateShard(Shard):
    def __init__(self) -> None:
        # On a machine without GPUs the processes talk over gloo (as CI runs them).
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.index, self.count = self.state.process_index, self.state.num_processes
        self.device = str(self.state.device)

    def wait(self) -> None:
        self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        return list(gather_object(list(items)))

    def agree(self, step: Callable[[], T]) -> T:
        result, error = None, None
        try:
            result = step()
        except IPAdapterError as err:
            error = str(err)
        errors = [e for e in self.gather([error]) if e is not None]
        if errors:
            raise IPAdapterError(errors[0])
        return result
