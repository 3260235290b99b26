"""Atomic writes: a crash leaves either the old file or the new one, never half a PNG or half a JSON."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def slug(name: str) -> str:
    """A file-name-safe form of a method name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "method"
