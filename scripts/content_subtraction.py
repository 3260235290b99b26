"""InstantStyle's content subtraction on the bundled miniature model (base adapter, CPU), measured and pictured.

For each held-out scene of the miniature world, its picture is the image prompt three ways: as it is, minus the CLIP
text embedding of its object's words ("a large blue cross"), and minus its background's words ("on a cyan horizontal
striped background"), as `ipadapter generate --content-subtract WORDS` makes them. The miniature's judge classifier
reads each sample's object (shape and colour) and background (colour and pattern); the table gives how often each
still matches the reference's. Writes docs/images/content-subtraction.png (examples/reference.png, four seeds each)
and prints the table (docs/control.md holds the last one). About 5 minutes on two CPU cores.

    python scripts/content_subtraction.py [--scenes 48]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ipadapter.atomic import save_png
from ipadapter.bundled import judge_path
from ipadapter.evaluate.grid import image_grid
from ipadapter.loading import Loaded, load_prompter
from ipadapter.miniature.judge import Judge
from ipadapter.miniature.world import make_batch, partial_caption
from ipadapter.paired_text import paired_text_embeds
from ipadapter.request import GenerationRequest, build_prompt

ROOT = Path(__file__).resolve().parent.parent
OBJECT, BACKGROUND = ("size", "colour", "shape"), ("bg_colour", "pattern")
CONDITIONS = ("as it is", "minus the object's words", "minus the background's words")


def sample(loaded: Loaded, reference: Image.Image, words: str | None, seed: int) -> Image.Image:
    prompter = loaded.prompter
    request = GenerationRequest(images=[reference])
    if words:
        request.content_text_embeds = paired_text_embeds(prompter.pipe, prompter.encoder, words)
    prompt = build_prompt(prompter, request)
    return prompter.generate(prompt, steps=loaded.default_steps, guidance=loaded.default_guidance, seed=seed)[0]


def figure(loaded: Loaded) -> None:
    reference = Image.open(ROOT / "examples" / "reference.png").convert("RGB")
    caption = json.loads((ROOT / "examples" / "captions.json").read_text())["reference.png"]
    obj, background = caption.split(" at the ")[0], "on" + caption.split(" on", 1)[1]
    columns: list[tuple[str, list[Image.Image]]] = [("reference", [reference])]
    for label, words in (("image prompt", None), (f"minus '{obj}'", obj), (f"minus '{background}'", background)):
        columns.append((label, [sample(loaded, reference, words, seed) for seed in range(4)]))
    save_png(image_grid(columns, cell=112, title_lines=4), ROOT / "docs" / "images" / "content-subtraction.png")


def measure(loaded: Loaded, scenes: int) -> str:
    judge = Judge.load(judge_path())
    loaded.prompter.pipe.set_progress_bar_config(disable=True)  # one bar: the scenes
    pixels, attrs = make_batch(seed=7, n=scenes, split="heldout")
    kept = {c: {"object": [], "background": []} for c in CONDITIONS}
    for image, a in tqdm(list(zip(pixels, attrs)), desc="scenes"):
        reference = Image.fromarray(image)
        phrases = (None, partial_caption(a, set(OBJECT)), partial_caption(a, set(BACKGROUND)))
        for condition, words in zip(CONDITIONS, phrases):
            (seen,) = judge.predict([sample(loaded, reference, words, seed=0)])
            kept[condition]["object"].append(seen["shape"] == a.shape and seen["colour"] == a.colour)
            kept[condition]["background"].append(seen["bg_colour"] == a.bg_colour and seen["pattern"] == a.pattern)
    lines = ["| the image prompt | object kept (shape and colour) | background kept (colour and pattern) |", "|---|---|---|"]
    for condition in CONDITIONS:
        lines.append(f"| {condition} | {np.mean(kept[condition]['object']):.0%} | "
                     f"{np.mean(kept[condition]['background']):.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=48, help="held-out scenes measured (default 48)")
    args = parser.parse_args()
    loaded = load_prompter(adapters=["miniature"], device="cpu")
    figure(loaded)
    print(f"{args.scenes} held-out scenes, one sample each (seed 0), base adapter, content strength 1.0:\n")
    print(measure(loaded, args.scenes))


if __name__ == "__main__":
    main()
