"""Manifests: JSONL of {"image_file", "text"} (paths relative to the manifest), and converters that write them.

Missing or unreadable references are listed and skipped (never a crash halfway through a long run); a manifest
with nothing usable is a user error.
"""

from __future__ import annotations

import json
import os
import re
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
    """Entries whose image opens, in file order (index = line position, stable across reruns); the rest in `skipped`."""
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"manifest not found: {path}")
    entries, skipped = [], []
    lines = [line for line in read_utf8(path, "manifest").splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(entries) >= limit:
            break
        try:
            record = json.loads(line)
            image_file, text = path.parent / record["image_file"], str(record.get("text", ""))
        except (json.JSONDecodeError, KeyError, TypeError):
            skipped.append(f"line {number}: not a JSON object with image_file")
            continue
        try:
            load_image(image_file)
        except IPAdapterError as err:
            skipped.append(f"line {number}: {err}")
            continue
        entries.append(Entry(number - 1, image_file, text, record.get("attrs")))
    if not entries:
        raise IPAdapterError(f"manifest {path} has no usable references ({len(skipped)} skipped, {len(lines)} lines)")
    return Manifest(path, entries, skipped)


def write_manifest(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records (image_file relative to the manifest's folder) one JSON object per line."""
    return write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def relative(image: Path, manifest: Path) -> str:
    return Path(os.path.relpath(image.resolve(), manifest.parent.resolve())).as_posix()


def from_coco_captions(
    captions_json: str | Path, images_dir: str | Path, out: str | Path, limit: int | None = None
) -> Path:
    """COCO `captions_val2017.json` → one entry per image with its first caption (by annotation id), image id order."""
    data = json.loads(Path(captions_json).read_text(encoding="utf-8"))
    first: dict[int, tuple[int, str]] = {}
    for ann in data["annotations"]:
        current = first.get(ann["image_id"])
        if current is None or ann["id"] < current[0]:
            first[ann["image_id"]] = (ann["id"], ann["caption"].strip())
    images = sorted(data["images"], key=lambda im: im["id"])[:limit]
    out = Path(out)
    records = [{"image_file": relative(Path(images_dir) / im["file_name"], out), "text": first[im["id"]][1]}
               for im in images if im["id"] in first]
    return write_manifest(out, records)


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


def from_dreambench(folder: str | Path, out: str | Path, images_per_subject: int = 1) -> Path:
    """DreamBooth/DreamBench folder (one subfolder per subject + prompts_and_classes.txt) → subject × prompt entries.

    The image prompt carries the subject, so the text is the prompt with the unique token left out
    ("a {0} {1} in the jungle" → "a backpack in the jungle"); the first `images_per_subject` images are references.
    """
    folder, out = Path(folder), Path(out)
    spec = folder / "prompts_and_classes.txt"
    if not spec.is_file():
        raise IPAdapterError(f"{folder} is not a DreamBench folder: prompts_and_classes.txt not found")
    classes, object_prompts, live_prompts = parse_dreambench(spec.read_text(encoding="utf-8"))
    records = []
    for subject in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        cls = classes.get(subject, re.sub(r"\d+$", "", subject).replace("_", " "))
        prompts = live_prompts if cls in LIVE_CLASSES and live_prompts else object_prompts
        images = sorted(p for p in (folder / subject).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for image in images[:images_per_subject]:
            for prompt in prompts:
                text = " ".join(prompt.replace("{0}", "").replace("{1}", cls).split())
                records.append({"image_file": relative(image, out), "text": text, "subject": subject})
    if not records:
        raise IPAdapterError(f"no subjects with images and prompts found in {folder}")
    return write_manifest(out, records)
