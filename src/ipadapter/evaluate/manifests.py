"""Manifests: JSONL of {"image_file", "text"} (paths relative to the manifest), and converters that write them.

Missing or unreadable references are listed and skipped (never a crash halfway through a long run); a manifest
with nothing usable is a user error.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ipadapter.atomic import write_text
from ipadapter.conditioning.images import load_image
from ipadapter.errors import IPAdapterError
from ipadapter.validation import read_utf8


@dataclass(frozen=True)
class Entry:
    """One reference: its image file, the caption or prompt, and optional known attributes (miniature world)."""

    index: int
    image_file: Path
    text: str
    attrs: dict[str, str] | None = None

    def image(self) -> Image.Image:
        return load_image(self.image_file)


@dataclass
class Manifest:
    path: Path
    entries: list[Entry]
    skipped: list[str] = field(default_factory=list)


def read_manifest(path: str | Path, limit: int | None = None) -> Manifest:
    """Entries whose image opens, in file order; the rest in `skipped`, by their line in the file (from 1, as an
    editor and `generate --manifest` number them). An entry's index counts the non-empty lines before it (from 0):
    its seeds stay the same when blank lines are added or removed."""
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"manifest not found: {path}")
    entries, skipped, index = [], [], -1
    for number, line in enumerate(read_utf8(path, "manifest").splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(entries) >= limit:
            break
        index += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            skipped.append(f"line {number}: not JSON ({err.msg} at column {err.colno})")
            continue
        problem = _not_a_reference(record)
        if problem:
            skipped.append(f"line {number}: {problem}")
            continue
        image_file = path.parent / record["image_file"]
        try:
            load_image(image_file)
        except IPAdapterError as err:
            skipped.append(f"line {number}: {err}")
            continue
        entries.append(Entry(index, image_file, str(record.get("text", "")), record.get("attrs")))
    if not entries:
        raise IPAdapterError(f"manifest {path} has no usable references ({len(skipped)} skipped, {index + 1} "
                             "non-empty lines)")
    return Manifest(path, entries, skipped)


def _not_a_reference(record: object) -> str | None:
    """What keeps a JSON value from being a reference record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "image_file" not in record:
        return "a JSON object without image_file"
    if not isinstance(record["image_file"], str):
        return f"image_file must be a path string, got {record['image_file']!r}"
    return None


def write_manifest(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records (image_file relative to the manifest's folder) one JSON object per line."""
    return write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def relative(image: Path, manifest: Path) -> str:
    return Path(os.path.relpath(image.resolve(), manifest.parent.resolve())).as_posix()


def _usable(out: Path, candidates: list[tuple[Path, dict]], skipped: list[tuple[str, str]]) -> Manifest:
    """Write the records whose image opens, and nothing when none does: the file then holds exactly the entries the
    caller reports, and the references left out are listed in the result's `skipped` (the same test `read_manifest`
    applies). `skipped` holds (reason, line) pairs, the reason without the file's name: when nothing is usable, the
    error shows the commonest reason, which is the one to fix first."""
    entries, records = [], []
    for image, record in candidates:
        try:
            load_image(image)
        except IPAdapterError as err:
            skipped.append((str(err).replace(str(image), ""), str(err)))
            continue
        entries.append(Entry(len(records), image, str(record.get("text", ""))))
        records.append({"image_file": relative(image, out), **record})
    if not records:
        raise IPAdapterError(f"no usable references for {out} ({_skips(skipped)}); nothing was written")
    try:
        write_manifest(out, records)
    except OSError as err:
        raise IPAdapterError(f"could not write {out} ({err.strerror or err}); nothing was written") from None
    return Manifest(out, entries, [line for _, line in skipped])


def _skips(skipped: list[tuple[str, str]]) -> str:
    """"N skipped", with the commonest reason's count and its first example."""
    if not skipped:
        return "0 skipped"
    reason, count = Counter(reason for reason, _ in skipped).most_common(1)[0]
    example = next(line for why, line in skipped if why == reason)
    share = "all" if count == len(skipped) else f"{count} of them"
    return f"{len(skipped)} skipped; {share} like this: {example}"


def _coco_json(captions_json: str | Path) -> tuple[list[dict], list[dict]]:
    """(images, annotations) of a COCO captions file, or one sentence saying what is wrong with it."""
    text = read_utf8(captions_json, "captions file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise IPAdapterError(f"captions file {captions_json} is not JSON (line {err.lineno}, column {err.colno}: "
                             f"{err.msg})") from None
    lists = [data.get(key) if isinstance(data, dict) else None for key in ("images", "annotations")]
    for key, value in zip(("images", "annotations"), lists):
        if not isinstance(value, list):
            raise IPAdapterError(f"captions file {captions_json} is not COCO captions JSON: it has no {key!r} list")
    return lists[0], lists[1]


def from_coco_captions(
    captions_json: str | Path, images_dir: str | Path, out: str | Path, limit: int | None = None
) -> Manifest:
    """COCO `captions_val2017.json` → one entry per image with its first caption (by annotation id), image id order.

    The first `limit` images by id are considered; those without a caption or whose file does not open are left out
    of the file and listed in the result's `skipped`. Everything is checked before the manifest is written."""
    if limit is not None and limit < 1:
        raise IPAdapterError(f"limit must be at least 1, got {limit}")
    if not Path(images_dir).is_dir():  # else every image would be "left out", each for its own reason
        raise IPAdapterError(f"COCO image folder {images_dir} is not a folder" if Path(images_dir).exists()
                             else f"COCO image folder not found: {images_dir}")
    images, annotations = _coco_json(captions_json)
    first: dict[int, tuple[int, str]] = {}
    try:
        for ann in annotations:
            current = first.get(ann["image_id"])
            if current is None or ann["id"] < current[0]:
                first[ann["image_id"]] = (ann["id"], ann["caption"].strip())
        images = sorted(images, key=lambda im: im["id"])[:limit]
        named = [(im["id"], Path(images_dir) / im["file_name"]) for im in images]
    except (KeyError, TypeError, AttributeError) as err:
        raise IPAdapterError(f"captions file {captions_json} is not COCO captions JSON: each image needs an id and a "
                             f"file_name, each annotation an id, an image_id and a caption text ({type(err).__name__}: "
                             f"{err})") from None
    out, skipped = Path(out), []
    candidates = []
    for image_id, image in named:
        if image_id in first:
            candidates.append((image, {"text": first[image_id][1]}))
        else:
            skipped.append(("no caption", f"{image}: image id {image_id} has no caption"))
    return _usable(out, candidates, skipped)


_CLASS_LINE = re.compile(r"^([\w-]+),([\w ]+)$")
_PROMPT = re.compile(r"'([^']*\{[01]\}[^']*)'")
LIVE_CLASSES = frozenset({"cat", "dog"})


def parse_dreambench(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """`prompts_and_classes.txt` of the DreamBooth dataset → (subject → class, object prompts, live-subject prompts)."""
    classes, sections, current = {}, {"object": [], "live": []}, "object"
    for line in text.splitlines():
        line = line.strip()
        if line.lower().startswith("live subject prompts"):
            current = "live"
        match = _CLASS_LINE.match(line)
        if match and match.group(1) != "subject_name":
            classes[match.group(1)] = match.group(2).strip()
        sections[current] += _PROMPT.findall(line)
    return classes, sections["object"], sections["live"]


def from_dreambench(folder: str | Path, out: str | Path, images_per_subject: int = 1) -> Manifest:
    """DreamBooth/DreamBench folder (one subfolder per subject + prompts_and_classes.txt) → subject × prompt entries.

    The image prompt carries the subject, so the text is the prompt with the unique token left out
    ("a {0} {1} in the jungle" → "a backpack in the jungle"); the first `images_per_subject` images are references.
    """
    if images_per_subject < 1:
        raise IPAdapterError(f"images_per_subject must be at least 1, got {images_per_subject}")
    folder, out = Path(folder), Path(out)
    spec = folder / "prompts_and_classes.txt"
    if not spec.is_file():
        raise IPAdapterError(f"{folder} is not a DreamBench folder: prompts_and_classes.txt not found")
    classes, object_prompts, live_prompts = parse_dreambench(read_utf8(spec, "DreamBench prompts file"))
    candidates = []
    for subject in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        cls = classes.get(subject, re.sub(r"\d+$", "", subject).replace("_", " "))
        prompts = live_prompts if cls in LIVE_CLASSES and live_prompts else object_prompts
        images = sorted(p for p in (folder / subject).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for image in images[:images_per_subject]:
            for prompt in prompts:
                text = " ".join(prompt.replace("{0}", "").replace("{1}", cls).split())
                candidates.append((image, {"text": text, "subject": subject}))
    if not candidates:
        raise IPAdapterError(f"no subjects with images and prompts found in {folder}")
    return _usable(out, candidates, [])
