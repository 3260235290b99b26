"""The jobs of a generation manifest: one JSON object per line, with the per-image options of `ipadapter generate`.

A job is identified by the digest of its settings (paths as the manifest gives them, defaults filled), never by its
line: a re-run of an edited or reordered manifest, started from any folder, still finds what it finished. A line
that cannot become a job is a `Failure` with a one-line reason; the others run. Jobs whose settings differ only in
what varies per batch row (references, prompts, seed, negative image) share a `group` and can share one UNet call.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipadapter.errors import IPAdapterError
from ipadapter.request import IMAGE_OPTIONS, MODIFIERS
from ipadapter.validation import MAX_SEED, check_image_file, generation_size, read_utf8, regular_file

# Manifest key → the `ipadapter generate` flag it replaces (the keys are the flags' names, "-" written "_").
OPTIONS = {
    "image": "--image", "prompt": "--prompt", "negative_prompt": "--negative-prompt", "scale": "--scale",
    "seed": "--seed", "num_images": "--num-images", "steps": "--steps", "guidance": "--guidance", "width": "--width",
    "height": "--height", "mask": "--mask", "start": "--start", "end": "--end", "preset": "--preset",
    "combine": "--combine", "image_weight": "--image-weight", "negative_image": "--negative-image", "noise": "--noise",
    "embeds_scaling": "--embeds-scaling", "crop": "--crop", "tiles": "--tiles", "lora_scale": "--lora-scale",
    "content_subtract": "--content-subtract", "content_strength": "--content-strength",
}
PATHS = ("image", "mask", "negative_image")
# Differ between the rows of one UNet batch: everything else must be equal for jobs to share a call.
PER_ROW = ("image", "prompt", "negative_prompt", "seed", "negative_image", "noise", "content_subtract",
           "content_strength")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Job:
    """One manifest line as settings; image k is written to `<id>-<k>.png` from seed `seed + k`."""

    line: int
    id: str
    key: str
    adapter: str | None
    settings: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [f"{self.id}-{k}.png" for k in range(self.settings["num_images"])]

    @property
    def seeds(self) -> list[int]:
        return [self.settings["seed"] + k for k in range(self.settings["num_images"])]

    @property
    def group(self) -> str:
        """Equal for jobs that can share a UNet batch; tiled jobs (a tile count per reference) never share."""
        shared = {k: v for k, v in self.settings.items() if k not in PER_ROW}
        shared.update(references=len(self.settings["image"]), adapter=self.adapter)
        if self.settings["tiles"]:
            shared["job"] = self.key
        return json.dumps(shared, sort_keys=True)


@dataclass(frozen=True)
class Failure:
    """A job that did not run, with the reason in one line (written to errors.jsonl)."""

    line: int
    id: str | None
    error: str

    def record(self) -> dict:
        return {"line": self.line, "id": self.id, "error": self.error}


@dataclass(frozen=True)
class Manifest:
    jobs: list[Job]
    failures: list[Failure]


def digest(settings: dict, adapter: str | None) -> str:
    text = json.dumps({"settings": settings, "adapter": adapter}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _number(value: Any, name: str, kind: type) -> Any:
    """`value` as `kind`; a whole float (64.0, as some JSON writers put every number) is a whole number."""
    whole = kind is int and isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not (whole or isinstance(value, (int, float) if kind is float else int)):
        raise IPAdapterError(f"{name} must be {'a number' if kind is float else 'a whole number'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise IPAdapterError(f"{name} must be a finite number, got {value!r}")
    return kind(value)


def _strings(value: Any, name: str) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise IPAdapterError(f"{name} must be a path or a list of paths")
    return value


def _whole(value: Any, name: str) -> int:
    return _number(value, name, int)


def _real(value: Any, name: str) -> float:
    return _number(value, name, float)


def _reals(value: Any, name: str) -> list[float]:
    if not isinstance(value, list):
        raise IPAdapterError(f"{name} must be a list of numbers, one per image")
    return [_real(v, name) for v in value]


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise IPAdapterError(f"{name} must be true or false, got {value!r}")
    return value


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise IPAdapterError(f"{name} must be a string, got {value!r}")
    return value


# How a manifest value is read as its flag's type; a key not listed is a string.
_READERS: dict[str, Callable[[Any, str], Any]] = {
    "image": _strings, "mask": _strings, "image_weight": _reals, "tiles": _boolean,
    **dict.fromkeys(("seed", "num_images", "steps", "width", "height"), _whole),
    **dict.fromkeys(("scale", "guidance", "start", "end", "lora_scale", "content_strength"), _real),
}


def _check(settings: dict, geometry: Callable[[], tuple[int, tuple[int, int]]]) -> dict:
    """The checks of `ipadapter generate` on one job's settings; files must exist and be images."""
    from ipadapter.conditioning.negatives import parse_noise
    from ipadapter.conditioning.schedules import check_window

    s = settings
    if not s["image"] and not s["prompt"]:
        raise IPAdapterError("give image, prompt, or both")
    for name in ("num_images", "steps"):
        if s[name] is not None and s[name] < 1:
            raise IPAdapterError(f"{name} must be at least 1, got {s[name]}")
    if not 0 <= s["seed"] or s["seed"] + s["num_images"] - 1 > MAX_SEED:
        raise IPAdapterError(f"seed + num_images - 1 must lie in 0 to 2**64-1, got seed {s['seed']}")
    for name in ("scale", "guidance", "content_strength"):
        if s[name] is not None and s[name] < 0:
            raise IPAdapterError(f"{name} must not be negative, got {s[name]}")
    check_window(s["start"], s["end"])
    if s["combine"] != "concat" and len(s["image"]) < 2:
        raise IPAdapterError(f"combine {s['combine']} merges several images; give at least two")
    if s["image_weight"] is not None and len(s["image_weight"]) != len(s["image"]):
        raise IPAdapterError(f"got {len(s['image_weight'])} image_weight for {len(s['image'])} image; give one per image")
    if s["mask"] and len(s["mask"]) != len(s["image"]):
        raise IPAdapterError(f"got {len(s['mask'])} mask(s) for {len(s['image'])} image(s); give one per image")
    if s["tiles"] and s["mask"]:
        raise IPAdapterError("tiles makes its own per-tile masks; do not combine it with mask")
    if s["negative_image"] and s["noise"]:
        raise IPAdapterError("give negative_image or noise, not both")
    if s["noise"]:
        parse_noise(s["noise"])
    if s["width"] is not None or s["height"] is not None:
        s["width"], s["height"] = generation_size(s["width"], s["height"], *geometry())
    for path in s["image"] + ([s["negative_image"]] if s["negative_image"] else []):
        check_image_file(path, "reference image")
    for path in s["mask"]:
        regular_file(path, "mask")
    return s


def parse_job(record: Any, line: int, root: Path, defaults: dict, adapters: Iterable[str],
              geometry: Callable[[], tuple[int, tuple[int, int]]]) -> Job:
    """One manifest object → a checked `Job` (IPAdapterError with the reason otherwise)."""
    if not isinstance(record, dict):
        raise IPAdapterError("not a JSON object")
    record = {k.replace("-", "_"): v for k, v in record.items()}
    unknown = sorted(set(record) - set(OPTIONS) - {"id", "adapter"})
    if unknown:
        raise IPAdapterError(f"unknown option {unknown[0]!r}; valid: id, adapter, {', '.join(OPTIONS)}")
    own = {k: _READERS.get(k, _string)(v, k) for k, v in record.items() if k in OPTIONS and v is not None}
    settings = {**defaults, **own}
    if not settings["image"]:  # the run's flags are every job's defaults: only the job's own keys can be its mistake
        for _, name, default in IMAGE_OPTIONS:
            if own.get(name, default) != default:
                raise IPAdapterError(f"{name} changes the image prompt, and this job has no image")
    for _, name, default, _, needed in MODIFIERS:
        if own.get(name, default) != default and not settings[needed]:
            raise IPAdapterError(f"{name} changes what {needed} does, and this job has none")
    # The job's key reads its paths as the manifest gives them (relative to its folder), so a rerun started from
    # another working directory finds the jobs it already finished; the job itself reads them joined to that folder.
    given = {name: settings[name] for name in PATHS}
    for name in PATHS:
        value = settings[name]
        if isinstance(value, list):
            settings[name] = [str(root / p) for p in value]
        elif value:
            settings[name] = str(root / value)
    adapter = record.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or adapter not in adapters):
        raise IPAdapterError(f"adapter {adapter!r} is not attached; attached (--adapter order): {', '.join(adapters)}")
    settings = _check(settings, geometry)
    key = digest({**settings, **given}, adapter)
    ident = record.get("id", key[:16])
    if not isinstance(ident, str) or not _ID.match(ident):
        raise IPAdapterError(f"id must be 1 to 100 letters, digits, '.', '_' or '-' (not first), got {ident!r}")
    return Job(line, ident, key, adapter, settings)


def read_jobs(path: str | Path, defaults: dict, adapters: Iterable[str],
              geometry: Callable[[], tuple[int, tuple[int, int]]]) -> Manifest:
    """Every line of the manifest as a job or a failure, in file order; an identical job listed twice runs once."""
    path = Path(regular_file(path, "manifest"))
    adapters = list(adapters)
    jobs: dict[str, Job] = {}
    failures = []
    lines = read_utf8(path, "manifest").splitlines()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            failures.append(Failure(number, None, f"not JSON ({err.msg} at column {err.colno})"))
            continue
        try:
            job = parse_job(record, number, path.parent, defaults, adapters, geometry)
        except IPAdapterError as err:
            ident = record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), str) else None
            failures.append(Failure(number, ident, str(err)))
            continue
        same = jobs.get(job.id)
        if same is not None and same.key != job.key:
            failures.append(Failure(number, job.id, f"id {job.id!r} already names the job of line {same.line}"))
        elif same is None:
            jobs[job.id] = job
    if not jobs and not failures:
        raise IPAdapterError(f"manifest {path} has no jobs")
    return Manifest(list(jobs.values()), failures)


def require_adapter_names(manifest: Manifest, adapters: Sequence[str]) -> Manifest:
    """With several adapters attached, a job with images fails unless its "adapter" key says which one they are for;
    a text-only job prompts no adapter and needs no name."""
    unnamed = [j for j in manifest.jobs if j.adapter is None and j.settings["image"]] if len(adapters) > 1 else []
    if not unnamed:
        return manifest
    why = (f"several adapters are attached ({', '.join(adapters)} in --adapter order): give this job an \"adapter\" "
           "key naming the one its images are for")
    failures = sorted([*manifest.failures, *(Failure(j.line, j.id, why) for j in unnamed)], key=lambda f: f.line)
    return Manifest([j for j in manifest.jobs if j not in unnamed], failures)


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs of one group, `size` at a time, groups in order of first appearance: fixed by the manifest and the batch
    size alone, so every process count computes the same batches (and so the same images)."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return [members[i : i + size] for members in groups.values() for i in range(0, len(members), size)]
