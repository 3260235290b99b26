"""File helpers of the evaluation: JSON written atomically, file-name-safe method names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ipadapter.atomic import write_text


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def slug(name: str) -> str:
    """A file-name-safe form of a method name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "method"
