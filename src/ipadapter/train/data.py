"""Training data: JSON/JSONL manifests (the authors' format) and WebDataset tar shards (img2dataset's layout).

Both are read as a resumable stream per process: a cursor (epoch, position) says exactly where the next sample
comes from, so `--resume` continues with the sample an uninterrupted run would have seen. Manifests are shuffled
per epoch by a seeded permutation; shards are shuffled at the shard level and, through a bounded shuffle buffer
(webdataset's `shuffle(n)`), at the sample level.
A sample that cannot be used (missing file, undecodable image, bad ID embedding, unreadable shard) is skipped,
counted by reason and reported; it never stops the run.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipadapter.errors import IPAdapterError
from ipadapter.validation import check_pixels, read_utf8

logger = logging.getLogger("ipadapter.train")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
ID_EXTS = ("npy", "pt", "pth")


class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason counted in the report."""


@dataclass
class Record:
    """One undecoded sample: file paths (manifest) or bytes (shard members)."""

    key: str
    text: str | None
    image: Path | bytes | None
    id_embed: Path | tuple[str, bytes] | None = None
    face_image: Path | bytes | None = None
    row: tuple[int, int] | None = None  # (cache file, row) for cached features


# ---- sources --------------------------------------------------------------------------------------------------------
def read_manifest(path: str | Path, data_root: str = "", *, need_id: bool = False) -> list[Record]:
    """`{"image_file", "text"}` per entry (+ `"id_embed_file"` for FaceID), as a JSON list or JSON lines."""
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"manifest not found: {path}")
    root = Path(data_root) if data_root else path.parent
    text = read_utf8(path, "manifest")
    entries: list[tuple[int, Any]] = []
    if text.lstrip().startswith("["):
        try:
            entries = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise IPAdapterError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from None
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise IPAdapterError(f"{path} is not valid JSON lines: {err.msg} at line {n}") from None
    if not entries:
        raise IPAdapterError(f"manifest {path} is empty: no training samples")
    required = ("image_file", "text") + (("id_embed_file",) if need_id else ())
    records = []
    for n, entry in entries:
        where = f"{path}: entry {n}"
        if not isinstance(entry, dict):
            raise IPAdapterError(f"{where} is a {type(entry).__name__}, not an object with {', '.join(required)}")
        missing = [k for k in required if k not in entry]
        if missing:
            hint = " (FaceID variants need an ArcFace embedding per image)" if missing == ["id_embed_file"] else ""
            raise IPAdapterError(f"{where} has no {missing[0]!r} field{hint}; it has: {', '.join(sorted(entry)) or 'none'}")
        if not isinstance(entry["text"], str) or not isinstance(entry["image_file"], str):
            raise IPAdapterError(f"{where}: image_file and text must be strings")
        records.append(Record(
            key=str(entry.get("id", n)), text=entry["text"], image=root / entry["image_file"],
            id_embed=root / entry["id_embed_file"] if need_id else None,
            face_image=root / entry["face_image_file"] if entry.get("face_image_file") else None,
        ))
    return records


def expand_shards(pattern: str) -> list[str]:
    """`data-{00000..00099}.tar` (brace ranges, as webdataset) and/or glob wildcards; sorted, de-duplicated."""
    from braceexpand import braceexpand

    found: list[str] = []
    for item in braceexpand(pattern):
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else ([item] if Path(item).is_file() else [])
        found.extend(matches)
    found = sorted(dict.fromkeys(found))
    if not found:
        raise IPAdapterError(f"no tar shards matched {pattern!r}")
    return found


def is_shard_pattern(data: str) -> bool:
    return ".tar" in data or any(c in data for c in "*{")


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (folder + "/" + stem if folder else stem), ext.lower()


def iter_tar_groups(path: str, skipped: Counter) -> Iterator[dict[str, bytes]]:
    """Members grouped by key, streamed. A truncated or corrupt tar ends its shard (counted), not the run."""
    group: dict[str, bytes] = {}
    key = None
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key and group:
                    yield group
                    group = {}
                key = k
                data = tar.extractfile(member)
                group[ext] = data.read() if data is not None else b""
                group["__key__"] = k.encode()
    except (tarfile.TarError, OSError, EOFError) as err:
        skipped["unreadable shard"] += 1
        logger.warning("skipping the rest of shard %s: %s", path, err)
        return
    if group:
        yield group


def shard_record(group: dict[str, bytes], *, need_id: bool) -> Record:
    key = group.get("__key__", b"?").decode(errors="replace")
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    text = None
    if "txt" in group:
        text = group["txt"].decode("utf-8", errors="replace")
    elif "json" in group:
        try:
            meta = json.loads(group["json"])
            text = meta.get("caption") or meta.get("text")
        except (json.JSONDecodeError, AttributeError):
            text = None
    id_embed = next(((e, group[e]) for e in ID_EXTS if e in group), None) if need_id else None
    face = group.get("face.jpg") or group.get("face.png")
    return Record(key=key, text=text, image=image, id_embed=id_embed, face_image=face)


# ---- resumable per-process streams ---------------------------------------------------------------------------------
def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class IndexedStream:
    """Records of an indexable list (manifest or cache rows); process `rank` of `world` takes perm[rank::world]."""

    def __init__(self, records: list[Record], *, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True,
                 single_pass: bool = False) -> None:
        if len(records) < world:
            raise IPAdapterError(f"{len(records)} training samples cannot be split over {world} processes")
        self.records, self.rank, self.world, self.seed, self.shuffle = records, rank, world, seed, shuffle
        self.single_pass = single_pass
        self.epoch, self.pos = 0, 0
        self.skipped: Counter = Counter()
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            perm = epoch_permutation(len(self.records), self.seed, self.epoch) if self.shuffle else list(range(len(self.records)))
            self._order = perm[self.rank :: self.world]
        return self._order

    def next_record(self) -> Record | None:
        order = self._epoch_order()
        if self.pos >= len(order):
            if self.single_pass:
                return None
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
            order = self._epoch_order()
        record = self.records[order[self.pos]]
        self.pos += 1
        return record

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None


class ShardStream:
    """Records streamed from tar shards. With at least as many shards as processes each process reads its own
    shards; otherwise every process reads all shards and keeps every world-th sample.

    Shards come in a seeded order per epoch; `shuffle_buffer` > 0 also shuffles samples, as webdataset's
    `shuffle(n)`: records are read into a bounded buffer and each next record is drawn from it at random. The buffer
    is emptied at the end of an epoch, so every sample still comes once per epoch. The k-th draw of an epoch is a
    hash of (seed, epoch, rank, k), and the state names the buffered records by their place in the shards, so a
    resumed stream re-reads exactly those (undecoded, from the oldest one's shard up to the read position) and goes
    on with the sequence an uninterrupted one would have produced.
    """

    def __init__(self, shards: list[str], *, rank: int = 0, world: int = 1, seed: int = 0, need_id: bool = False,
                 single_pass: bool = False, shuffle_buffer: int = 0) -> None:
        self.shards, self.rank, self.world, self.seed, self.need_id = shards, rank, world, seed, need_id
        self.single_pass, self.shuffle_buffer = single_pass, shuffle_buffer
        self.by_shard = len(shards) >= world
        self.epoch, self.shard_pos, self.sample, self.counter = 0, 0, 0, 0
        self.drawn = 0  # records given out this epoch: the index of the next draw
        self.skipped: Counter = Counter()
        self._it: Iterator[dict[str, bytes]] | None = None
        self._buffer: list[tuple[tuple[int, int], dict[str, bytes]]] = []  # ((shard_pos, sample), tar group)
        self._restore: list[tuple[int, int]] = []  # buffered places of a loaded state, re-read on the next record
        self._epoch_read = False

    def _my_shards(self) -> list[str]:
        order = [self.shards[i] for i in epoch_permutation(len(self.shards), self.seed, self.epoch)]
        return order[self.rank :: self.world] if self.by_shard else order

    def _read(self) -> tuple[tuple[int, int], dict[str, bytes]] | None:
        """This process's next group of the epoch with its place (shard position, sample number), None at its end."""
        shards = self._my_shards()
        while self.shard_pos < len(shards):
            if self._it is None:
                self._it = iter_tar_groups(shards[self.shard_pos], self.skipped)
                for _ in range(self.sample):  # resume: skip what was consumed before (no decoding)
                    if next(self._it, None) is None:
                        break
            group = next(self._it, None)
            if group is None:
                self._it, self.sample = None, 0
                self.shard_pos += 1
                continue
            self.sample += 1
            self.counter += 1
            if not self.by_shard and (self.counter - 1) % self.world != self.rank:
                continue
            return (self.shard_pos, self.sample), group
        return None

    def _draw(self, n: int) -> int:
        """The epoch's `drawn`-th pick among n: a pure function of its inputs, so no generator state is saved."""
        key = f"{self.seed}:{self.epoch}:{self.rank}:{self.drawn}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % n

    def next_record(self) -> Record | None:
        if self._restore:
            self._reread(self._restore)
        while True:
            while len(self._buffer) < max(1, self.shuffle_buffer) and not self._epoch_read:
                item = self._read()
                if item is None:
                    self._epoch_read = True
                else:
                    self._buffer.append(item)
            if self._buffer:
                k = self._draw(len(self._buffer)) if len(self._buffer) > 1 else 0
                self._buffer[k], self._buffer[-1] = self._buffer[-1], self._buffer[k]
                self.drawn += 1
                return shard_record(self._buffer.pop()[1], need_id=self.need_id)
            if self.single_pass:
                return None
            if self.drawn == 0:
                raise IPAdapterError(
                    f"process {self.rank} found no samples in a full pass over its {len(self._my_shards())} "
                    f"shard(s) ({dict(self.skipped) or 'empty shards'})"
                )
            self.epoch, self.shard_pos, self.sample, self.counter, self.drawn = self.epoch + 1, 0, 0, 0, 0
            self._it, self._epoch_read = None, False

    def _reread(self, places: list[tuple[int, int]]) -> None:
        """Rebuild a loaded state's buffer: read from the oldest buffered record's shard up to the read position,
        keeping the buffered groups in their saved order, and leave the reader at that position."""
        shards, wanted = self._my_shards(), set(places)
        found: dict[tuple[int, int], dict[str, bytes]] = {}
        for pos in range(min(places)[0], min(self.shard_pos, len(shards) - 1) + 1):
            at_cursor = pos == self.shard_pos
            # shards before the read position were read (and their damage counted) before the state was saved
            it = iter_tar_groups(shards[pos], self.skipped if at_cursor else Counter())
            sample = 0
            while not at_cursor or sample < self.sample:
                group = next(it, None)
                if group is None:
                    break
                sample += 1
                if (pos, sample) in wanted:
                    found[(pos, sample)] = group
            if at_cursor:
                self._it = it
        self._buffer = [(place, found[place]) for place in places if place in found]
        self._restore = []

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "sample": self.sample, "counter": self.counter,
                "drawn": self.drawn, "buffer": [list(place) for place, _ in self._buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self.sample, self.counter = int(state["sample"]), int(state["counter"])
        # states saved before the buffer existed hold none; their process had yielded this epoch (drawn ≥ 1)
        self.drawn = int(state.get("drawn", 1))
        self._restore = [(int(pos), int(sample)) for pos, sample in state.get("buffer", [])]
        self._it, self._buffer, self._epoch_read = None, [], False


# ---- decoding ------------------------------------------------------------------------------------------------------
def open_image(source: Path | bytes | None, what: str = "image") -> Any:
    from PIL import Image, UnidentifiedImageError

    if source is None:
        raise SkipSample(f"no {what}")
    if isinstance(source, Path) and not source.is_file():
        raise SkipSample(f"missing {what} file")
    try:
        image = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
        check_pixels(image.width, image.height, what)  # from the header: a small file may declare a huge picture
        image.load()
        return image.convert("RGB")
    except IPAdapterError:
        raise SkipSample(f"{what} over the pixel limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise SkipSample(f"undecodable {what}") from None


def load_id_embed(source: Path | tuple[str, bytes] | None, id_dim: int) -> torch.Tensor:
    if source is None:
        raise SkipSample("no ID embedding")
    if isinstance(source, Path):
        if not source.is_file():
            raise SkipSample("missing ID embedding file")
        ext, raw = source.suffix.lstrip(".").lower(), source.read_bytes()
    else:
        ext, raw = source
    try:
        if ext == "npy":
            value = torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32))
        else:
            value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            value = torch.as_tensor(value, dtype=torch.float32)
    except Exception:  # numpy / torch raise many types for a broken file; all mean "unreadable"
        raise SkipSample("unreadable ID embedding") from None
    value = value.flatten()
    if value.numel() != id_dim or not bool(torch.isfinite(value).all()):
        raise SkipSample(f"ID embedding not {id_dim} finite values")
    return value


def center_crop(image: Any, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Shortest side → resolution (bilinear), centre crop; pixels in [-1, 1], plus SDXL's size/crop conditioning."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    crop = resized.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0  # (3, R, R)
    return pixels, (h, w), (top, left)


@dataclass
class Decoder:
    """Record → example dict, or SkipSample. `processor` is the image encoder's CLIPImageProcessor (None: no CLIP)."""

    resolution: int
    processor: Any = None
    id_dim: int = 0
    need_text: bool = True

    def __call__(self, record: Record) -> dict[str, Any]:
        if self.need_text and record.text is None:
            raise SkipSample("no caption")
        out: dict[str, Any] = {"key": record.key, "text": record.text or ""}
        image = open_image(record.image)
        out["pixels"], out["original_size"], out["crop"] = center_crop(image, self.resolution)
        if self.processor is not None:
            clip_source = open_image(record.face_image, "face image") if record.face_image is not None else image
            # The reference script gives CLIP the uncropped image; its processor does its own resize and crop.
            out["clip"] = self.processor(images=clip_source, return_tensors="pt").pixel_values[0]
        if self.id_dim:
            out["id"] = load_id_embed(record.id_embed, self.id_dim)
        return out


# ---- batches -------------------------------------------------------------------------------------------------------
class Batches:
    """Exactly `batch_size` usable examples per batch, in stream order; bad samples skipped and counted.

    Only as many records as still missing are taken from the stream (decoded in parallel threads), so the stream's
    cursor after a batch is exact and a resumed run sees the same next batch.
    """

    def __init__(self, stream: IndexedStream | ShardStream, decode: Callable[[Record], dict[str, Any]], batch_size: int,
                 *, workers: int = 0, max_consecutive_skips: int = 10_000) -> None:
        self.stream, self.decode, self.batch_size = stream, decode, batch_size
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        records = getattr(stream, "records", None)  # a manifest: a whole epoch of failures is enough to know
        self.max_consecutive_skips = len(records) + 1 if records is not None else max_consecutive_skips
        self.exhausted = False
        self._warned: Counter = Counter()

    @property
    def skipped(self) -> Counter:
        return self.stream.skipped

    def _try(self, record: Record) -> dict[str, Any] | str:
        try:
            return self.decode(record)
        except SkipSample as skip:
            return str(skip)

    def next_batch(self) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        misses = 0
        while len(batch) < self.batch_size and not self.exhausted:
            records = []
            for _ in range(self.batch_size - len(batch)):
                record = self.stream.next_record()
                if record is None:  # single-pass streams (cache building) end; training streams never do
                    self.exhausted = True
                    break
                records.append(record)
            results = list(self.pool.map(self._try, records)) if self.pool else [self._try(r) for r in records]
            for record, result in zip(records, results):
                if isinstance(result, str):
                    self.stream.skipped[result] += 1
                    misses += 1
                    if self._warned[result] < 3:
                        self._warned[result] += 1
                        logger.warning("skipping sample %s: %s", record.key, result)
                else:
                    batch.append(result)
            if misses >= self.max_consecutive_skips and not batch:
                raise IPAdapterError(f"no usable sample in {misses} tries ({describe_skips(self.stream.skipped)})")
        return batch

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False)


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings; SDXL's (original size, crop top-left) kept for `time_ids`."""
    out: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def sdxl_time_ids(original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]], resolution: int) -> torch.Tensor:
    """(B, 6): original (h, w), crop top-left (top, left), target (h, w) — SDXL's micro-conditioning."""
    return torch.tensor([[*o, *c, resolution, resolution] for o, c in zip(original_sizes, crops)], dtype=torch.float32)


def describe_skips(skipped: Counter) -> str:
    if not skipped:
        return "no samples skipped"
    total = sum(skipped.values())
    return f"skipped {total} sample(s): " + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
