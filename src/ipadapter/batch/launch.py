"""Which `Shard` this process is: the only one, or its share of an `accelerate launch` run."""

from __future__ import annotations

import os

from ipadapter.batch.shards import Shard
from ipadapter.errors import IPAdapterError


def current() -> Shard:
    """This process's shard: from accelerate when launched as several processes, else the only one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    try:
        from ipadapter.batch.accelerated import AccelerateShard

        return AccelerateShard()
    except ModuleNotFoundError as err:
        if err.name != "accelerate":
            raise
        raise IPAdapterError("a run over several processes needs accelerate: pip install 'ipadapter[train]'") from None
