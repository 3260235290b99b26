"""Reference images: loaded robustly, prepared for the encoder, tiled, and tile features pooled (the "enhancer").

Loading decisions:
- Transparency (RGBA, LA, PA, P or L with a transparent colour) is composited on white by default: transparent
  references are mostly cut-outs, logos and product shots made to sit on a light page, and white is what a viewer
  sees; pass `background` to choose another colour (masks use black: transparent = no effect).
- High bit depth (I;16*, I, F) becomes 8-bit by range: I;16 is 16-bit; for I and F, values up to 1 (F only) are
  read as [0, 1], up to 255 as 8-bit, anything larger as 16-bit.
- CMYK and the other modes use Pillow's own conversion to RGB (no ICC colour management).
- The EXIF orientation is applied, so the encoder sees the picture the way photo viewers show it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from ipadapter.errors import IPAdapterError
from ipadapter.validation import check_pixels, regular_file

WHITE = (255, 255, 255)
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_POSITIONS = ("center", "top", "bottom", "left", "right")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode in _SIXTEEN_BIT or top > 255:
        values = values / 257.0
    elif image.mode == "F" and top <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))  # 2-D uint8 → L


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, transparency composited on `background`."""
    if image.mode in _SIXTEEN_BIT + ("I", "F"):
        image = _to_8bit(image)
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise IPAdapterError(f"cannot convert a {image.mode} image to RGB ({e}); save it as RGB") from None


def load_image(source: str | os.PathLike | Image.Image, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """An RGB image from a file or a Pillow image, upright; unreadable or empty files raise with the file name."""
    name = "the image" if isinstance(source, Image.Image) else str(source)
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            regular_file(source, "image file")
            image = Image.open(source)
            check_pixels(image.width, image.height, name)  # from the header, before the pixels are decoded
            image.load()
        image = ImageOps.exif_transpose(image)
    except IPAdapterError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise IPAdapterError(f"cannot read {name} as an image ({type(e).__name__}: {e})") from None
    if image.width == 0 or image.height == 0:
        raise IPAdapterError(f"{name} has no pixels ({image.width}x{image.height})")
    return to_rgb(image, background)


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int) else size
    if width <= 0 or height <= 0:
        raise IPAdapterError(f"the target size must be positive, got {width}x{height}")
    return width, height


def _crop_box(w: int, h: int, target_w: int, target_h: int, position: str) -> tuple[float, float, float, float]:
    """The largest box of the target's aspect inside (w, h), placed at `position`."""
    scale = min(w / target_w, h / target_h)
    cw, ch = target_w * scale, target_h * scale
    x = {"left": 0.0, "right": w - cw}.get(position, (w - cw) / 2)
    y = {"top": 0.0, "bottom": h - ch}.get(position, (h - ch) / 2)
    return x, y, x + cw, y + ch


def prepare_image(
    image: Image.Image, size: int | tuple[int, int] = 224, *, crop: str = "center", pad: bool = False,
    fill: tuple[int, int, int] = WHITE, sharpen: float = 0.0, resample: str = "lanczos",
) -> Image.Image:
    """Bring an RGB reference to `size` (int = square, or (width, height)) the way the user chose.

    crop: which part survives when the aspect differs; pad: keep all of it, letterboxed on `fill`, instead;
    sharpen: unsharp-mask amount (0 = none; 1 adds the full difference to a 1-px Gaussian blur), applied after
    resizing since downscaling to the encoder's 224 px is what softens the details.
    """
    if crop not in CROP_POSITIONS:
        raise IPAdapterError(f"unknown crop position {crop!r}; valid: {', '.join(CROP_POSITIONS)}")
    if resample not in RESAMPLING:
        raise IPAdapterError(f"unknown resampling filter {resample!r}; valid: {', '.join(RESAMPLING)}")
    if sharpen < 0:
        raise IPAdapterError(f"the sharpening amount must not be negative, got {sharpen}")
    target_w, target_h = _size(size)
    filt = RESAMPLING[resample]
    if pad:
        scale = min(target_w / image.width, target_h / image.height)
        inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        out = Image.new("RGB", (target_w, target_h), fill)
        out.paste(image.resize(inner, filt), ((target_w - inner[0]) // 2, (target_h - inner[1]) // 2))
    else:
        box = _crop_box(image.width, image.height, target_w, target_h, crop)
        out = image.resize((target_w, target_h), filt, box=box)
    if sharpen > 0:
        out = out.filter(ImageFilter.UnsharpMask(radius=1, percent=round(sharpen * 100), threshold=0))
    return out


@dataclass(frozen=True)
class Tile:
    """One tile of a reference: its pixels, its box (left, top, right, bottom) on the tiled image, and that grid."""

    image: Image.Image
    box: tuple[int, int, int, int]
    grid: tuple[int, int]

    def mask(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(H, W) region mask, 1 inside the tile: on the tiled image's grid, or scaled to `size` = (H, W).

        Pass it as `Reference.mask` so the tile acts on the matching region of a picture of the same aspect.
        """
        grid_h, grid_w = self.grid
        h, w = size or self.grid
        left, top, right, bottom = self.box
        mask = torch.zeros(h, w)
        rows = slice(math.floor(top * h / grid_h), math.ceil(bottom * h / grid_h))
        cols = slice(math.floor(left * w / grid_w), math.ceil(right * w / grid_w))
        mask[rows, cols] = 1.0
        return mask


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering `length`, evenly spread, neighbours sharing at least `overlap` pixels."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_image(image: Image.Image, tile: int = 256, overlap: int | None = None, *, fit: bool = True) -> list[Tile]:
    """Square tiles of `tile` px with at least `overlap` px (default tile/4) shared between neighbours.

    fit=True first scales the image so its shorter side is `tile`: a non-square reference becomes a row (or
    column) of overlapping squares and nothing is cropped away. fit=False tiles a large image at full scale.
    Row-major order.
    """
    overlap = tile // 4 if overlap is None else overlap
    if tile <= 0 or not 0 <= overlap < tile:
        raise IPAdapterError(f"tiles need a positive size and 0 <= overlap < size, got size {tile}, overlap {overlap}")
    if fit:
        scale = tile / min(image.size)
        image = image.resize((max(tile, round(image.width * scale)), max(tile, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    tiles = []
    for top in _starts(image.height, tile, overlap):
        for left in _starts(image.width, tile, overlap):
            box = (left, top, min(left + tile, image.width), min(top + tile, image.height))
            tiles.append(Tile(image.crop(box), box, (image.height, image.width)))
    return tiles


def grid_tiles(image: Image.Image, rows: int, cols: int) -> list[Image.Image]:
    """The image cut into a rows × cols grid without overlap, row-major: the enhancer's input."""
    if rows < 1 or cols < 1:
        raise IPAdapterError(f"the tile grid needs at least 1x1, got {rows}x{cols}")
    xs = [round(i * image.width / cols) for i in range(cols + 1)]
    ys = [round(j * image.height / rows) for j in range(rows + 1)]
    return [image.crop((xs[i], ys[j], xs[i + 1], ys[j + 1])) for j in range(rows) for i in range(cols)]


def enhance_features(
    whole: torch.Tensor, tiles: Sequence[torch.Tensor], grid: tuple[int, int], ratio: float = 0.5
) -> torch.Tensor:
    """The "vision enhancer": ratio · whole-image features + (1 − ratio) · tile-pooled features.

    Tiles are the encoder's features of `grid_tiles(image, rows, cols)`, each shaped like `whole`. Global (B, D):
    the pooled feature is the tiles' mean. Patch (B, [1 +] g², D): each tile's g × g patch map is laid in a
    (rows·g, cols·g) mosaic and average-pooled back to g × g, so every pooled patch summarises a finer view of its
    region than the whole-image pass; a class token, when present, is the tiles' mean.
    """
    rows, cols = grid
    if len(tiles) != rows * cols:
        raise IPAdapterError(f"a {rows}x{cols} grid needs {rows * cols} tile features, got {len(tiles)}")
    if any(t.shape != whole.shape for t in tiles):
        raise IPAdapterError("tile features must have the whole image's shape; encode tiles and image the same way")
    if not 0.0 <= ratio <= 1.0:
        raise IPAdapterError(f"the enhancer ratio must be between 0 and 1, got {ratio}")
    stack = torch.stack(list(tiles))  # (N, B, ...)
    if whole.dim() == 2:
        return ratio * whole + (1 - ratio) * stack.mean(0)
    tokens = whole.shape[1]
    head = 1 if tokens > 1 and math.isqrt(tokens - 1) ** 2 == tokens - 1 else 0  # one token is a 1 x 1 patch map
    g = math.isqrt(tokens - head)
    if g * g != tokens - head:
        raise IPAdapterError(f"{tokens} patch tokens do not form a square grid (with or without a class token)")
    n, b, _, d = stack.shape
    maps = stack[:, :, head:].reshape(rows, cols, b, g, g, d)
    mosaic = maps.permute(2, 5, 0, 3, 1, 4).reshape(b, d, rows * g, cols * g)  # (B, D, rows·g, cols·g)
    pooled = F.adaptive_avg_pool2d(mosaic, (g, g)).flatten(2).transpose(1, 2)  # (B, g², D)
    if head:
        pooled = torch.cat([stack[:, :, :1].mean(0), pooled], dim=1)
    return ratio * whole + (1 - ratio) * pooled
