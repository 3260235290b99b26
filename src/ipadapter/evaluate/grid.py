"""One image grid for every report: titled columns of equal-sized cells, one row per item."""

from __future__ import annotations

from collections.abc import Sequence
from textwrap import wrap

from PIL import Image, ImageDraw


def image_grid(columns: Sequence[tuple[str, Sequence[Image.Image]]], *, rows: int | None = None, cell: int = 128,
               title_lines: int = 1) -> Image.Image:
    """Column c shows `columns[c]`'s images top to bottom under its title (wrapped to `title_lines` lines); `rows`
    caps the rows shown; `title_lines=0` leaves no header, so cell (c, r) is at (c·cell, r·cell). Cells are resized to
    `cell` pixels (nearest when enlarging, so small images stay crisp)."""
    shown = max((len(images) for _, images in columns), default=0)
    shown = shown if rows is None else min(rows, shown)
    header = 4 + 12 * title_lines if title_lines else 0
    grid = Image.new("RGB", (cell * len(columns), header + cell * shown), "white")
    draw = ImageDraw.Draw(grid)
    for c, (title, images) in enumerate(columns):
        for line, text in enumerate(wrap(title, max(8, cell // 6))[:title_lines]):
            draw.text((c * cell + 2, 2 + 12 * line), text, fill="black")
        for r, image in enumerate(images[:shown]):
            resample = Image.NEAREST if image.width < cell else Image.BICUBIC
            grid.paste(image.convert("RGB").resize((cell, cell), resample), (c * cell, header + r * cell))
    return grid
