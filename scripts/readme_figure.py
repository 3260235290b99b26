"""The README's picture: held-out references → image-only generations, and image + text, on the miniature model.

    python scripts/readme_figure.py docs/images/miniature.png
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from PIL import Image, ImageDraw

from ipadapter.loading import load_prompter
from ipadapter.miniature import world
from ipadapter.request import GenerationRequest, build_prompt

CELL = 128


def main(out: str = "docs/images/miniature.png", rows: int = 4, samples: int = 3) -> int:
    args = SimpleNamespace(base=None, adapter=None, weight_name=None, subfolder=None, image_encoder=None, device="cpu",
                           dtype=None, scheduler=None)
    loaded = load_prompter(args)
    images, attrs = world.make_batch(seed=1234, n=rows, split="heldout")
    text = "a small green cross at the bottom right"
    cols = 1 + samples + samples
    sheet = Image.new("RGB", (cols * CELL, rows * CELL + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for x, label in ((0, "reference"), (CELL, "image only (scale 1.0)"), ((1 + samples) * CELL, f'+ "{text}" (0.6)')):
        draw.text((x + 4, 6), label, fill="black")
    for r, (img, _) in enumerate(zip(images, attrs)):
        ref = Image.fromarray(img)
        y = 24 + r * CELL
        sheet.paste(ref.resize((CELL, CELL), Image.NEAREST), (0, y))
        for i, (prompt, scale) in enumerate((("", 1.0), (text, 0.6))):
            prompts = build_prompt(loaded.prompter, GenerationRequest(images=[ref], scale=scale))
            outs = loaded.prompter.generate(prompts, prompt=prompt, num_images=samples, steps=25, guidance=5.0, seed=r)
            for j, o in enumerate(outs):
                sheet.paste(o.resize((CELL, CELL), Image.NEAREST), ((1 + i * samples + j) * CELL, y))
    sheet.save(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
