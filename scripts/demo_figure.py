"""The README's demo picture from `bash scripts/demo.sh`'s outputs: the reference, then the image-only samples, then
the samples with the text prompt. Run after the demo: `python scripts/demo_figure.py` -> docs/images/demo.png."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ipadapter.atomic import save_png
from ipadapter.evaluate.grid import image_grid

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    reference = Image.open(ROOT / "examples" / "reference.png")
    image_only = [Image.open(ROOT / "out" / f"demo-{k}.png") for k in range(4)]
    with_text = [Image.open(ROOT / "out" / f"demo-text-{k}.png") for k in range(4)]
    text = "+ 'a small green cross at the bottom right'"
    columns = [("reference", [reference]),
               *((f"image only, sample {k + 1}", [image]) for k, image in enumerate(image_only)),
               *((f"{text}, sample {k + 1}", [image]) for k, image in enumerate(with_text))]
    save_png(image_grid(columns, cell=128, title_lines=3), ROOT / "docs" / "images" / "demo.png")


if __name__ == "__main__":
    main()
