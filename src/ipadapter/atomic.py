"""Atomic file writes: write beside the target, then rename, so a crash leaves the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

# Read once, at import: some writers (safetensors) create their file owner-only, and a model file that only its
# writer can read is a surprise when the folder is shared or served; renamed files get the mode `open` would give.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replacing_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success it takes the place of `path` (whose old contents go
    whole, by `swap_in`), on any failure it is removed and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(folder: Path, path: Path) -> None:
    """Rename the finished `folder` to `path`, replacing what is there whole: the old folder is first renamed aside
    (`.{name}.old-{pid}`) and put back if the second rename fails, so `path` is never a mixture of old and new."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    try:
        folder.rename(path)
    except BaseException:
        if old.exists():
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _usual_mode(path: Path) -> None:
    if path.is_file():
        os.chmod(path, 0o666 & ~_UMASK)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def save_pngs(images: list[Image.Image], paths: list[Path]) -> list[Path]:
    """Several PNGs, all or none: every image is written to a temporary file first, then all are renamed. As many
    images as paths: a count that differs is a caller's bug, raised before anything is renamed."""
    tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in paths]
    try:
        for image, path, tmp in zip(images, paths, tmps, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(tmp, format="PNG")
            _usual_mode(tmp)
        for path, tmp in zip(paths, tmps):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return list(paths)


def copy_file(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    with replacing(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    """A `torch.save` checkpoint (the miniature runs' own, with optimizer state), whole or not at all."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Same tensors and metadata, same bytes: safetensors writes the metadata in a random order each time, so the
    header is rewritten with it sorted, and an export that changed nothing leaves nothing for `git diff` to show."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
    return Path(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with `__metadata__` sorted; the same keys and values in another order
    serialise to the same length, so the tensor bytes after it stay where they are."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            return
        f.seek(8)
        f.write(text.ljust(size))
