"""The `miniature` protocol of `ipadapter evaluate`: its references (from the shapes world) and its judges.

Each reference is a held-out scene (a (shape, colour, background colour) triple no model saw in training); the
text asks for the reference's object on another background. So CLIP-I rewards copying the reference, CLIP-T
rewards following the text, and the scale sweep shows the trade-off between the two.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter.atomic import save_png
from ipadapter.evaluate.judges import AttributeJudge, ClipJudge
from ipadapter.evaluate.manifests import write_manifest
from ipadapter.miniature.world import COLOURS, PATTERNS, Attrs, caption, make_batch

REFERENCE_SEED = 4242


def other_background(attrs: Attrs, rng: np.random.Generator) -> Attrs:
    """The same object on a background of another colour (never the object's) and another pattern."""
    colours = [c for c in COLOURS if c not in (attrs.colour, attrs.bg_colour)]
    patterns = [p for p in PATTERNS if p != attrs.pattern]
    return replace(attrs, bg_colour=colours[rng.integers(len(colours))], pattern=patterns[rng.integers(len(patterns))])


def miniature_manifest(out_dir: str | Path, n: int, seed: int = REFERENCE_SEED) -> Path:
    """Write `n` held-out reference PNGs and manifest.jsonl; `attrs` are the asked-for scene (object + new background)."""
    out = Path(out_dir)
    images, attrs = make_batch(seed, n, "heldout")
    rng = np.random.default_rng(seed + 1)
    records = []
    for i, (image, scene) in enumerate(zip(images, attrs)):
        target = other_background(scene, rng)
        name = f"images/heldout_{i:04d}.png"
        save_png(Image.fromarray(image), out / name)
        records.append({"image_file": name, "text": caption(target), "attrs": asdict(target),
                        "reference_text": caption(scene)})
    return write_manifest(out / "manifest.jsonl", records)


def clip_judge(judge_dir: str | Path | None = None) -> ClipJudge:
    """The judge CLIP of the bundled judge (or of `judge_dir`): CLIP-I / CLIP-T under `ipadapter evaluate`."""
    from ipadapter.bundled import judge_path
    from ipadapter.miniature.tiny_clip import image_processor

    return ClipJudge.load(Path(judge_dir or judge_path()) / "clip", processor=image_processor())


def attribute_judge(judge_dir: str | Path | None = None) -> AttributeJudge:
    """The bundled judge's attribute classifier (or `judge_dir`'s): per-attribute agreement."""
    from ipadapter.bundled import judge_path
    from ipadapter.miniature.judge import Judge

    return Judge.load(judge_dir or judge_path())
