"""Upload limits: every file the page hands over is checked here, by its header, before it is decoded in full.

The web server caps the upload itself (Gradio's `max_file_size`, set from the same limit); these checks also hold
when the service is called directly, and they turn every refusal into one sentence naming the user's file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ipadapter.conditioning.images import load_image
from ipadapter.errors import FieldError, IPAdapterError
from ipadapter.validation import check_pixels

MB = 2**20


@dataclass(frozen=True)
class UploadLimits:
    """Caps on one uploaded image: bytes on disk and pixels per side (the encoder sees 224 px anyway)."""

    max_bytes: int = 20 * MB
    max_side: int = 4096

    def __post_init__(self) -> None:
        for name, value, unit in (("max_bytes", self.max_bytes, "byte"), ("max_side", self.max_side, "pixel")):
            if value < 1:
                raise FieldError(name, f"must be at least 1 {unit}, got {value}", owner="the upload limit")

    def check_size(self, width: int, height: int, what: str) -> None:
        if max(width, height) > self.max_side:
            raise IPAdapterError(f"{what} is {width}x{height} px; images are limited to {self.max_side} px per side")


def open_upload(path: str | os.PathLike, limits: UploadLimits, what: str) -> Image.Image:
    """The uploaded file as an upright RGB image, or an `IPAdapterError` naming `what` and the file's own name."""
    label = f"{what} ({Path(path).name})"
    try:
        size = os.path.getsize(path)
    except OSError:
        raise IPAdapterError(f"{label} is no longer on the server; upload it again") from None
    if size > limits.max_bytes:
        raise IPAdapterError(f"{label} is {size / MB:.1f} MB; uploads are limited to {limits.max_bytes / MB:g} MB")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        raise IPAdapterError(f"{label} declares more pixels than an image may have; upload a smaller image") from None
    except (OSError, ValueError, SyntaxError):
        raise IPAdapterError(f"{label} is not an image; upload a PNG, JPEG or WebP file") from None
    limits.check_size(width, height, label)
    check_pixels(width, height, label)
    try:
        return load_image(path)
    except IPAdapterError:
        raise IPAdapterError(f"{label} could not be decoded as an image; it may be damaged") from None
