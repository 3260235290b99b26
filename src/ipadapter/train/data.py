"""Training data: JSON/JSONL manifests (the authors' format) and WebDataset tar shards (img2dataset's layout).

Both are read as a resumable stream per process: a cursor (epoch, position) says exactly where the next sample
comes from, so `--resume` continues with the sample an uninterrupted run would have seen. Manifests are shuffled
per epoch by a seeded permutation; shards are shuffled at the shard level and, through a bounded shuffle buffer
(webdataset's `shuffle(n)`), at the sample level.
A sample that cannot be used (missing file, undecodable image, bad ID embedding, unreadable shard) is skipped,
counted by reason and reported; it never stops the run.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipadapter.encoders import decode_embedding
from ipadapter.errors import IPAdapterError
from ipadapter.train.buckets import grouped_order, nearest_bucket
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
    image: Path | bytes | None  # the target: what the UNet learns to denoise
    id_embeds: list[Path | tuple[str, bytes]] = field(default_factory=list)  # one per reference (FaceID)
    refs: list[Path | bytes] = field(default_factory=list)  # the condition images; none: the target itself
    row: tuple[int, int] | None = None  # (cache file, row) for cached features


# ---- sources --------------------------------------------------------------------------------------------------------
def _file_list(entry: dict[str, Any], name: str, root: Path, where: str) -> list[Path]:
    """A field holding one file name or a list of them, as paths under `root` (absent or empty: none)."""
    value = entry.get(name)
    if value in (None, "", []):
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise IPAdapterError(f"{where}: {name} must be a file name or a list of file names")
    return [root / v for v in items]


def reference_fields(face_id: bool) -> tuple[str, str]:
    """Where a manifest entry names its condition images, in order of precedence: FaceID variants read the face
    crop (`face_image_file`), the others `ref_image_file`; either field serves when the other is absent."""
    return ("face_image_file", "ref_image_file") if face_id else ("ref_image_file", "face_image_file")


def read_manifest(path: str | Path, data_root: str = "", *, need_id: bool = False, references: int = 1) -> list[Record]:
    """`{"image_file", "text"}` per entry (+ `"id_embed_file"` for FaceID), as a JSON list or JSON lines.

    `image_file` is the target. The condition is `ref_image_file` (or `face_image_file`; a name or a list of
    `references` names) when given, else the target itself; FaceID entries give one ID embedding per reference."""
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
        first, second = reference_fields(need_id)
        refs = _file_list(entry, first, root, where) or _file_list(entry, second, root, where)
        ids = _file_list(entry, "id_embed_file", root, where) if need_id else []
        count = len(refs) or 1
        if count != references or (need_id and len(ids) != references):
            given = f"{count} reference image(s)" + (f" and {len(ids)} ID embedding(s)" if need_id else "")
            raise IPAdapterError(
                f"{where} has {given}; this run conditions on {references} per sample (references: {references}; "
                f"give {first} as a list of {references})"
            )
        records.append(Record(key=str(entry.get("id", n)), text=entry["text"], image=root / entry["image_file"],
                              id_embeds=ids, refs=refs))
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
    elif "json" in group:  # img2dataset's metadata: {"caption": ...} (or "text")
        try:
            meta = json.loads(group["json"])
            caption = meta.get("caption") or meta.get("text")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            caption = None
        text = caption if isinstance(caption, str) else None
    ids = (_members(group, "", ID_EXTS) or _members(group, "id", ID_EXTS)) if need_id else []
    first, second = ("face", "ref") if need_id else ("ref", "face")
    refs = _members(group, first, IMAGE_EXTS) or _members(group, second, IMAGE_EXTS)
    return Record(key=key, text=text, image=image, id_embeds=ids, refs=[data for _, data in refs])


def _members(group: dict[str, bytes], stem: str, exts: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """`{key}.{stem}.{ext}` (one), else `{key}.{stem}0.{ext}`, `{key}.{stem}1.{ext}`, ... (several), as (ext, bytes).
    An empty stem is the bare `{key}.{ext}`."""
    def one(name: str) -> tuple[str, bytes] | None:
        prefix = f"{name}." if name else ""
        return next(((e, group[prefix + e]) for e in exts if prefix + e in group), None)

    single = one(stem)
    if single is not None or not stem:
        return [single] if single is not None else []
    found = []
    while (item := one(f"{stem}{len(found)}")) is not None:
        found.append(item)
    return found


# ---- resumable per-process streams ---------------------------------------------------------------------------------
def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class IndexedStream:
    """Records of an indexable list (manifest or cache rows); process `rank` of `world` takes perm[rank::world]."""

    def __init__(self, records: list[Record], *, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True,
                 single_pass: bool = False, groups: list[int] | None = None, batch_size: int = 1) -> None:
        if len(records) < world:
            raise IPAdapterError(f"{len(records)} training samples cannot be split over {world} processes")
        self.records, self.rank, self.world, self.seed, self.shuffle = records, rank, world, seed, shuffle
        self.groups, self.batch_size = groups, batch_size  # groups: batches of one group each (buckets)
        self.single_pass = single_pass
        self.epoch, self.pos = 0, 0
        self.skipped: Counter = Counter()
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            perm = epoch_permutation(len(self.records), self.seed, self.epoch) if self.shuffle else list(range(len(self.records)))
            self._order = perm[self.rank :: self.world]
            if self.groups is not None:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 7919 + self.rank)
                self._order = grouped_order(self._order, self.groups, self.batch_size, g)
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


def load_id_embed(source: Path | tuple[str, bytes], id_dim: int) -> torch.Tensor:
    if isinstance(source, Path):
        if not source.is_file():
            raise SkipSample("missing ID embedding file")
        ext, raw = source.suffix, source.read_bytes()
    else:
        ext, raw = source
    try:
        value = torch.as_tensor(decode_embedding(raw, ext), dtype=torch.float32)
    except Exception:  # numpy / torch raise many types for a broken file; all mean "unreadable"
        raise SkipSample("unreadable ID embedding") from None
    value = value.flatten()
    if value.numel() != id_dim or not bool(torch.isfinite(value).all()):
        raise SkipSample(f"ID embedding not {id_dim} finite values")
    return value


def center_crop(image: Any, resolution: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Scaled (bilinear) to cover `resolution` (a side, or (height, width)), centre crop; pixels in [-1, 1], plus
    SDXL's size/crop conditioning: original (h, w) and crop (top, left)."""
    from PIL import Image

    th, tw = (resolution, resolution) if isinstance(resolution, int) else resolution
    w, h = image.size
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    resized = image.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - th) // 2, (nw - tw) // 2
    crop = resized.crop((left, top, left + tw, top + th))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0  # (3, th, tw)
    return pixels, (h, w), (top, left)


@dataclass
class Decoder:
    """Record → example dict, or SkipSample. `processor` is the image encoder's CLIPImageProcessor (None: no CLIP).

    The target gives the VAE's pixels; the condition (CLIP pixels, ID embeddings) comes from the record's reference
    images when it names any, else from the target. With `references` > 1 the condition tensors get a reference
    axis (K, ...) after the sample's own; with one they keep the single-reference shapes."""

    resolution: int
    processor: Any = None
    id_dim: int = 0
    need_text: bool = True
    references: int = 1
    buckets: list[tuple[int, int]] | None = None  # (height, width) sizes; None: square `resolution` crops

    def __call__(self, record: Record, size: tuple[int, int] | None = None) -> dict[str, Any]:
        """`size` (height, width) forces the target's size (a batch's bucket); by default the record's own bucket."""
        if self.need_text and record.text is None:
            raise SkipSample("no caption")
        if record.refs and len(record.refs) != self.references:
            raise SkipSample(f"not {self.references} reference image(s)")
        if not record.refs and self.references != 1:
            raise SkipSample(f"no reference images ({self.references} needed)")
        out: dict[str, Any] = {"key": record.key, "text": record.text or ""}
        image = open_image(record.image)
        if size is None and self.buckets:
            size = nearest_bucket((image.height, image.width), self.buckets)
        out["pixels"], out["original_size"], out["crop"] = center_crop(image, size or self.resolution)
        if self.processor is not None:
            sources = [open_image(r, "reference image") for r in record.refs] or [image]
            # The reference script gives CLIP the uncropped image; its processor does its own resize and crop.
            out["clip"] = self._per_reference([self.processor(images=s, return_tensors="pt").pixel_values[0]
                                               for s in sources])
        if self.id_dim:
            if len(record.id_embeds) != self.references:
                raise SkipSample(f"not {self.references} ID embedding(s)")
            out["id"] = self._per_reference([load_id_embed(e, self.id_dim) for e in record.id_embeds])
        return out

    def _per_reference(self, values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values) if self.references > 1 else values[0]


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

    def _try(self, record: Record, size: tuple[int, int] | None = None) -> dict[str, Any] | str:
        try:
            return self.decode(record, size) if size is not None else self.decode(record)
        except SkipSample as skip:
            return str(skip)

    def _decode_all(self, records: list[Record], batch: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
        """Decoded in parallel; with buckets every example takes the size of the batch's first one."""
        if not getattr(self.decode, "buckets", None):
            return list(self.pool.map(self._try, records)) if self.pool else [self._try(r) for r in records]
        results: list[dict[str, Any] | str] = []
        while records and not batch and not any(isinstance(r, dict) for r in results):
            results.append(self._try(records.pop(0)))  # until a first example fixes the batch's size
        first = batch[0] if batch else next((r for r in results if isinstance(r, dict)), None)
        if first is None or not records:
            return results
        size = tuple(first["pixels"].shape[-2:])
        sized = functools.partial(self._try, size=size)
        return results + (list(self.pool.map(sized, records)) if self.pool else [sized(r) for r in records])

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
            results = self._decode_all(list(records), batch)
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


def sdxl_time_ids(original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]],
                  target: tuple[int, int]) -> torch.Tensor:
    """(B, 6): original (h, w), crop top-left (top, left), target (h, w) — SDXL's micro-conditioning."""
    return torch.tensor([[*o, *c, *target] for o, c in zip(original_sizes, crops)], dtype=torch.float32)


def describe_skips(skipped: Counter) -> str:
    if not skipped:
        return "no samples skipped"
    total = sum(skipped.values())
    return f"skipped {total} sample(s): " + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
