"""Masks from the page: strokes painted in an editor or a picture uploaded into it, as the greyscale file the CLI reads.

Strokes win: where any layer is painted (whatever the colour) the reference acts, elsewhere it does not, so a user
can paint over the reference itself. With no strokes, an uploaded picture is the mask (white = acts). A mask of
another size than its reference is stretched to the reference's size, and the page says so; the attention
processor resizes every mask to each layer's token grid anyway, so only the aspect ratio of what was painted matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import reduce

from PIL import Image, ImageChops

from ipadapter.conditioning.images import load_image
from ipadapter.conditioning.masks import BLACK


def mask_from_editor(value: Mapping[str, object] | None) -> Image.Image | None:
    """An editor's value ({'background', 'layers', 'composite'} of PIL images) → an "L" mask, or None when empty."""
    if not value:
        return None
    strokes = [layer.getchannel("A") for layer in value.get("layers") or []
               if isinstance(layer, Image.Image) and layer.mode == "RGBA" and layer.getchannel("A").getbbox()]
    if strokes:
        return reduce(ImageChops.lighter, strokes)
    background = value.get("background")
    if not isinstance(background, Image.Image):
        return None
    return load_image(background, background=BLACK).convert("L")


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at the reference's (width, height), stretched (bilinear, soft edges stay soft) when it differs."""
    mask = mask.convert("L")
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def full_mask(size: tuple[int, int]) -> Image.Image:
    """The mask of a reference given none while another one has a mask: it acts everywhere."""
    return Image.new("L", size, 255)
