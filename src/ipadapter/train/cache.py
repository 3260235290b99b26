"""The feature cache: the frozen models' outputs computed once, then training reads them instead of running them.

Per sample, for a UNet run: the VAE posterior (mean and std, so every step still draws a fresh latent as the
reference does), the text embeddings (+ SDXL's pooled embedding and size/crop `time_ids`), the image-encoder features
(global or patch) and the ID embedding (FaceID). For a FLUX or SD 3 run: what its family's `features` gives (the
latents, the text states and pooled embedding, the image features). Constants: the empty prompt's embeddings, and a
UNet run's image features of a dropped image (a transformer run's are zeros).
Files: `part-{rank}-{k}.safetensors` shards, `constants.safetensors`, and `index.json` written last (its presence
means the cache is complete) holding the fingerprint: what models and settings produced it. A cache is refused for a
run whose fingerprint differs, naming the first difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ipadapter.atomic import save_safetensors, write_text
from ipadapter.errors import IPAdapterError
from ipadapter.train.data import Record

logger = logging.getLogger("ipadapter.train")

FORMAT = "ipadapter-cache/1"
BEFORE_KEYS = {"denoiser": "unet"}  # what a cache built before a key was recorded had: UNet caches only
ROWS_PER_FILE = 1024


# ---- fingerprint ----------------------------------------------------------------------------------------------------
def _hash_file(path: Path, h: "hashlib._Hash", edge: int = 1 << 20) -> None:
    """Size plus the first and last MiB (the whole file when it is under 2 MiB): cheap for multi-GB weights,
    different for different weights."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(edge))
        if size > edge:
            fh.seek(max(edge, size - edge))
            h.update(fh.read(edge))


def folder_fingerprint(source: str, subfolders: list[str]) -> str:
    """A hash of the files of a model folder (or of a Hub id's locally cached snapshot, else of the id itself); of a
    single-file base, the file, which holds every part."""
    root = Path(source)
    if root.is_file():
        h = hashlib.sha256()
        _hash_file(root, h)
        return h.hexdigest()[:16]
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not cached / not a repo id: the id is the best identity available
            return hashlib.sha256(source.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for sub in subfolders:
        folder = root / sub if sub else root
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            _hash_file(path, h)
    return h.hexdigest()[:16]


def data_identity(data: str, data_root: str) -> str:
    from ipadapter.train.data import expand_shards, is_shard_pattern

    h = hashlib.sha256(f"{data_root}".encode())
    if Path(data).is_file() and not is_shard_pattern(data):
        h.update(Path(data).read_bytes())
    else:
        for shard in expand_shards(data):
            h.update(f"{Path(shard).name}:{Path(shard).stat().st_size}".encode())
    return h.hexdigest()[:16]


def fingerprint(*, config: Any, base_id: str, encoder_id: str, processor: Any, features: str, sdxl: bool,
                denoiser: str = "unet") -> dict[str, Any]:
    """What a cache depends on: the denoiser it is for ("unet", "flux", "sd3": what its rows hold), the frozen models,
    the preprocessing, the data, and the storage dtype."""
    proc = json.dumps(processor.to_dict(), sort_keys=True, default=str) if processor is not None else ""
    return {
        "format": FORMAT,
        "denoiser": denoiser,
        "base (VAE + text encoders)": base_id,
        "image encoder": encoder_id,
        "image processor": hashlib.sha256(proc.encode()).hexdigest()[:16],
        "features": features,
        "id_dim": config.id_dim if config.needs_id_embeds else 0,
        "resolution": config.resolution,
        "sdxl": sdxl,
        "cache_dtype": config.cache_dtype,
        "data": data_identity(config.data, config.data_root) if config.data else "",
    }


def check_fingerprint(cache_dir: Path, expected: dict[str, Any]) -> dict[str, Any]:
    index = read_index(cache_dir)
    found = index["fingerprint"]
    for key, value in expected.items():
        if key == "data" and not value:
            continue  # training from the cache alone: the data it was built from is what it holds
        built = found.get(key, BEFORE_KEYS.get(key))
        if built != value:
            raise IPAdapterError(
                f"the feature cache {cache_dir} was built with {key} = {built!r} but this run has {value!r}; "
                "use another --cache folder (or delete this one to rebuild it)"
            )
    return index


def read_index(cache_dir: Path) -> dict[str, Any]:
    path = Path(cache_dir) / "index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IPAdapterError(f"{cache_dir} is not a complete feature cache ({err})") from None


# ---- building -------------------------------------------------------------------------------------------------------
class CacheWriter:
    """Rows collected per process and flushed to safetensors shards."""

    def __init__(self, cache_dir: Path, rank: int, dtype: torch.dtype) -> None:
        self.dir, self.rank, self.dtype = cache_dir, rank, dtype
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.files: list[dict[str, Any]] = []

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        for k, v in batch.items():
            self.rows.setdefault(k, []).extend(v.detach().cpu().unbind(0))
        if len(next(iter(self.rows.values()))) >= ROWS_PER_FILE:
            self.flush()

    def flush(self) -> None:
        if not self.rows or not next(iter(self.rows.values())):
            return
        name = f"part-{self.rank:03d}-{len(self.files):05d}.safetensors"
        tensors = {k: torch.stack(v).to(self.dtype if v[0].is_floating_point() and k != "time_ids" else v[0].dtype)
                   for k, v in self.rows.items()}
        save_safetensors(tensors, self.dir / name)
        self.files.append({"file": name, "rows": len(next(iter(self.rows.values())))})
        self.rows = {}


CACHE_FILE = re.compile(r"(part-\d+-\d+\.safetensors|part-\d+\.json|constants\.safetensors|\..+\.tmp-\d+)")


def check_rebuildable(cache_dir: Path) -> None:
    """A build starts by removing the folder: refused unless it is absent, a file-less folder, or what a killed build
    left (shards, part records, constants, atomic writes' temporary files), so `--cache` naming any other folder (the
    data's, a home) never deletes a user's files."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise IPAdapterError(f"--cache {cache_dir} is a file, not a folder")
    foreign = sorted(p.name for p in cache_dir.iterdir() if not CACHE_FILE.fullmatch(p.name)) if cache_dir.is_dir() \
        else []
    if foreign:
        raise IPAdapterError(f"--cache {cache_dir} holds files that are not a feature cache's ({foreign[0]}); give a "
                             "new or empty folder for the cache")


def build_cache(
    cache_dir: Path, *, batches: Any, encode: Any, constants: dict[str, torch.Tensor], fp: dict[str, Any],
    accelerator: Any, dtype: torch.dtype,
) -> dict[str, Any]:
    """One pass over single-pass `batches`: `encode(examples) -> dict of (B, ...) tensors`, written as shards.

    Every process encodes its own share; the main process writes `index.json` last.
    """
    from tqdm.auto import tqdm

    rank = accelerator.process_index
    check_rebuildable(cache_dir)  # by every process, so that none waits below for a main process that refused
    if accelerator.is_main_process:
        if cache_dir.exists():
            shutil.rmtree(cache_dir)  # an incomplete build (no index.json): start again
        cache_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    writer = CacheWriter(cache_dir, rank, dtype)
    bar = tqdm(desc="caching features", unit="sample", disable=not accelerator.is_local_main_process)
    while not batches.exhausted:
        examples = batches.next_batch()
        if not examples:
            break
        writer.add(encode(examples))
        bar.update(len(examples))
    writer.flush()
    bar.close()
    part = {"files": writer.files, "skipped": dict(batches.skipped)}
    write_text(cache_dir / f"part-{rank:03d}.json", json.dumps(part))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_safetensors(constants, cache_dir / "constants.safetensors")
        files, skipped = [], Counter()
        for r in range(accelerator.num_processes):
            p = json.loads((cache_dir / f"part-{r:03d}.json").read_text())
            files += p["files"]
            skipped.update(p["skipped"])
        index = {"fingerprint": fp, "files": files, "rows": sum(f["rows"] for f in files), "skipped": dict(skipped)}
        if index["rows"] == 0:
            raise IPAdapterError(f"no usable sample to cache ({dict(skipped)})")
        write_text(cache_dir / "index.json", json.dumps(index, indent=1))
    accelerator.wait_for_everyone()
    return read_index(cache_dir)


# ---- reading --------------------------------------------------------------------------------------------------------
class CacheReader:
    """Rows of a complete cache as records; `__call__` turns a record into its float32 tensors."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)
        self.index = read_index(self.dir)
        self._handles: dict[int, Any] = {}
        with safe_open(str(self.dir / "constants.safetensors"), framework="pt") as f:
            self.constants = {k: f.get_tensor(k).float() for k in f.keys()}

    def records(self) -> list[Record]:
        return [Record(key=f"{f['file']}:{r}", text=None, image=None, row=(i, r))
                for i, f in enumerate(self.index["files"]) for r in range(f["rows"])]

    def __call__(self, record: Record) -> dict[str, Any]:
        file_index, row = record.row
        if file_index not in self._handles:
            self._handles[file_index] = safe_open(str(self.dir / self.index["files"][file_index]["file"]), framework="pt")
        f = self._handles[file_index]
        return {k: f.get_slice(k)[row : row + 1][0].float() for k in f.keys()}

    @property
    def size_bytes(self) -> int:
        return sum((self.dir / f["file"]).stat().st_size for f in self.index["files"])
