"""What the page sends for one generation: settings as values, uploaded files as their paths on the server.

Paths (not decoded images) travel here so the reproducing command can name the very files that were used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from ipadapter.errors import IPAdapterError
from ipadapter.request import MODIFIERS

MAX_IMAGES = 8
# The page's labels of the fields `request.MODIFIERS` relates (the rule itself lives there, for the CLI and manifests).
LABELS = {"content_strength": "Content strength", "content_subtract": "Take out content"}


@dataclass
class Form:
    """One generation as the page asks for it; `masks[i]` belongs to `references[i]` (None: no mask there)."""

    references: list[str] = field(default_factory=list)
    masks: list[Image.Image | None] = field(default_factory=list)
    prompt: str = ""
    negative_prompt: str = ""
    scale: float = 1.0
    preset: str | None = None
    start: float = 0.0
    end: float = 1.0
    combine: str = "concat"
    negative_image: str | None = None
    content_subtract: str = ""
    content_strength: float = 1.0
    seed: int = 0
    steps: int = 25
    num_images: int = 1

    def check(self) -> None:
        """The mistakes a user can make on the page itself, before any file is opened."""
        if not self.references and not self.prompt.strip():
            raise IPAdapterError("upload a reference image, type a prompt, or both")
        if self.steps < 1:
            raise IPAdapterError(f"steps must be at least 1, got {self.steps}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise IPAdapterError(f"the number of images must be between 1 and {MAX_IMAGES}, got {self.num_images}")
        if self.seed < 0:
            raise IPAdapterError(f"the seed must not be negative, got {self.seed}")
        if not 0 <= self.content_strength < float("inf"):
            raise IPAdapterError(f"the content strength must be a number from 0 up, got {self.content_strength}")
        for _, name, default, _, needed in MODIFIERS:  # a setting that would be silently ignored
            if getattr(self, name) != default and not str(getattr(self, needed) or "").strip():
                raise IPAdapterError(f"{LABELS[name]} acts on the words of {LABELS[needed]}: type them, or set "
                                     f"{LABELS[name]} back to {default:g}")
        extra = [i + 1 for i, m in enumerate(self.masks) if m is not None and i >= len(self.references)]
        if extra:
            n = extra[0]
            raise IPAdapterError(f"mask {n} has no reference image; upload reference {n} or clear the mask")
