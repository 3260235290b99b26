"""Which share of the work this process does, and the few collective steps a sharded run needs, through accelerate.

Under `accelerate launch` (WORLD_SIZE > 1) each process is one shard: it takes the work items whose position is its
index modulo the process count, a split fixed by the item list alone. One process needs nothing of accelerate, so
`ipadapter generate --manifest` runs on the core install; a sharded run needs the `train` extra (accelerate).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar


T = TypeVar("T")


class Shard:
    """One process of a run of `count` processes; alone, every collective step is the identity."""

    index: int = 0
    count: int = 1
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index :: self.count])

    def wait(self) -> None:
        """Every process reaches this point before any goes on."""

    def gather(self, items: list) -> list:
        """The lists of every process concatenated in process order, on every process."""
        return list(items)

    def agree(self, step: Callable[[], T]) -> T:
        """Run `step`; when it fails on any process with a user error, every process raises that error (the first
        by process order), so none waits forever for a failed one at the next collective step."""
        return step()


class Progress:
    """The overall count of a sharded run: each process writes its own count to `folder`/<index>.json; the main
    process adds them up for its progress bar (the only one shown). On a folder not shared between machines the
    main process sees its own machine's processes only."""

    def __init__(self, folder: Path, shard: Shard, total: int, done: int, desc: str, show: bool = True) -> None:
        from tqdm import tqdm

        self.folder, self.shard, self.count = folder, shard, 0
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="img", disable=not (show and shard.is_main))
        self.start = done
        self._write()

    def _write(self) -> None:
        from ipadapter.atomic import write_text

        write_text(self.folder / f"{self.shard.index}.json", json.dumps({"done": self.count}))

    def _overall(self) -> int:
        total = 0
        for index in range(self.shard.count):
            try:
                total += json.loads((self.folder / f"{index}.json").read_text())["done"]
            except (OSError, ValueError, KeyError):
                continue
        return total

    def advance(self, images: int) -> None:
        self.count += images
        self._write()
        if self.shard.is_main:
            self.bar.n = self.start + self._overall()
            self.bar.refresh()

    @property
    def done(self) -> int:
        """The overall count as the main process last read it."""
        return self.bar.n

    def close(self, done: int | None = None) -> None:
        """`done`: the final overall count, once every process finished."""
        if done is not None:
            self.bar.n = done
            self.bar.refresh()
        self.bar.close()


def fresh_progress_folder(folder: Path, shard: Shard) -> None:
    """The main process empties the counts (and any temporary file) of an earlier run; call before a `wait()`."""
    if shard.is_main and folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
