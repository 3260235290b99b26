"""Fine-tune the bundled base adapter with references whose colours are shuffled against the target's: a share of the
recipe's training scenes get a reference drawn with the same shape, size, position and pattern but another object and
background colour (never a held-out triple), and a caption that names the target's colours. The question: does
breaking the tie between a shape and its colour pair carry shape to unseen combinations? docs/miniature.md, "Where
image prompts lose shape and pattern", has the answer; measure with scripts/miniature_splits.py --models OUT.

    python scripts/miniature_shuffled_refs.py runs/shuffled --share 0.5 --steps 3000
    python scripts/miniature_splits.py --models runs/shuffled --n 192 "IP-Adapter, image only"

`--share 0` is the control: the recipe's own scenes, the same fine-tuning. Rerunning resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ipadapter import bundled
from ipadapter.atomic import write_text
from ipadapter.miniature.adapters import DATA_SEED, DATA_SIZE, PARTIAL_CAPTIONS, training_config
from ipadapter.miniature.world import COLOURS, HELD_OUT, SLOTS, Attrs, draw, partial_caption, write_dataset


def shuffle_references(data: Path, share: float, seed: int = 4242) -> None:
    """Rewrites the manifest: a `share` of its scenes get `ref_image_file` (colours shuffled) and a caption naming
    the target's object and background colours (the image cannot give them), other slots kept at random."""
    rng = np.random.default_rng(seed)
    (data / "refs").mkdir(exist_ok=True)
    lines = []
    for i, line in enumerate((data / "manifest.jsonl").read_text().splitlines()):
        record = json.loads(line)
        attrs = Attrs(**record["attrs"])
        if rng.random() < share:
            while True:
                colour, bg = (str(c) for c in rng.choice(COLOURS, 2, replace=False))
                if (attrs.shape, colour, bg) not in HELD_OUT and (colour, bg) != (attrs.colour, attrs.bg_colour):
                    break
            record["ref_image_file"] = f"refs/{i:06d}.png"
            Image.fromarray(draw(replace(attrs, colour=colour, bg_colour=bg), rng)).save(data / record["ref_image_file"])
            keep = {"colour", "bg_colour"} | {s for s in SLOTS if rng.random() < 0.5}
            record["text"] = partial_caption(attrs, frozenset(keep))
        lines.append(json.dumps(record) + "\n")
    write_text(data / "manifest.jsonl", "".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the run folder (the models folder scripts/miniature_splits.py reads)")
    parser.add_argument("--share", type=float, default=0.5, help="share of scenes with shuffled colours (0: control)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.out / "adapter_data"
    if not (data / "shuffled.done").is_file():
        write_dataset(data, DATA_SIZE, DATA_SEED, partial=PARTIAL_CAPTIONS)
        shuffle_references(data, args.share)
        write_text(data / "shuffled.done", "")
    for name in ("pipeline", "clip"):
        if not (args.out / name).exists():
            (args.out / name).symlink_to(bundled.ASSETS_DIR / name)
    from ipadapter.train import train

    config = training_config(args.out, "base", args.steps, resume=(args.out / "adapter-base").is_dir())
    print(train(config.replace(init_from=str(bundled.ASSETS_DIR / "adapters" / "base.safetensors")).validate()).own)


if __name__ == "__main__":
    main()
