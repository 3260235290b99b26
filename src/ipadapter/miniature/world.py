"""The miniature "shapes world": one object on a patterned background, drawn with numpy, captioned with a fixed grammar.

Caption grammar (every caption has exactly this word order, so each attribute sits at a fixed slot):

    a {size} {colour} {shape} at the {position} on a {bg_colour} {pattern} background

with `pattern` one of "plain", "horizontal striped", "vertical striped", "checkered", "gradient" and `position`
one of "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right".
Example: "a large red circle at the top left on a blue horizontal striped background".

A fixed set of (shape, colour, bg_colour) triples, `HELD_OUT`, never appears in the training split, so a model's
accuracy on them measures composition rather than memorisation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter.atomic import write_text

SIZE_PX = 64
SUPERSAMPLE = 2

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 165, 50),
    "cyan": (40, 205, 215),
    "blue": (35, 60, 215),
    "purple": (135, 45, 175),
    "white": (245, 245, 245),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "medium", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
PATTERNS = ("plain", "horizontal striped", "vertical striped", "checkered", "gradient")
# Rendering styles. "two-tone" draws the lower half of the object (of its bounding box) in the 35% shade the
# background patterns use: the custom style a custom model is fine-tuned on. The scene and every attribute stay
# those of "plain", the original world. Finer styles (outlines, hatching) are erased by the 16x16x4 VAE and are
# beyond the base UNet, which draws objects as blobs (docs/miniature.md, "Custom model").
STYLES = ("plain", "two-tone")

# Attribute name -> its values; the order is the order of the judge's classification heads.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "bg_colour": COLOURS,
    "pattern": PATTERNS,
}

_HALF_EXTENT = {"small": 6.0, "medium": 10.0, "large": 14.0}
_GRID = (16.0, 32.0, 48.0)


def _held_out_triples() -> frozenset[tuple[str, str, str]]:
    """Two triples per shape, spread over all colours; the background offset is never 0 so colour != bg colour."""
    triples = set()
    for s, shape in enumerate(SHAPES):
        for k in range(2):
            c = (2 * s + 3 * k) % len(COLOURS)
            b = (c + 1 + s + k) % len(COLOURS)
            triples.add((shape, COLOURS[c], COLOURS[b]))
    return frozenset(triples)


HELD_OUT: frozenset[tuple[str, str, str]] = _held_out_triples()


@dataclass(frozen=True)
class Attrs:
    """One scene: the six attributes a caption names and the judge classifies."""

    shape: str
    colour: str
    size: str
    position: str
    bg_colour: str
    pattern: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.bg_colour)

    def label(self) -> list[int]:
        """Class indices in `ATTRIBUTES` order (targets of the judge's heads)."""
        return [ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES]


def attrs_from_label(label: list[int]) -> Attrs:
    """The inverse of `Attrs.label`."""
    return Attrs(**{name: values[i] for (name, values), i in zip(ATTRIBUTES.items(), label)})


def caption(attrs: Attrs) -> str:
    """The one caption of a scene, in the grammar documented at the top of this module."""
    return (
        f"a {attrs.size} {attrs.colour} {attrs.shape} at the {attrs.position} "
        f"on a {attrs.bg_colour} {attrs.pattern} background"
    )


SLOTS = tuple(ATTRIBUTES)


def partial_caption(attrs: Attrs, keep: frozenset[str] | set[str]) -> str:
    """The caption naming only the slots in `keep`, in the grammar's order; "" when nothing is kept.

    The object phrase appears when any object slot is kept, with "object" standing in for an unnamed shape; the
    background phrase when its colour or pattern is kept. With every slot kept this is `caption(attrs)`. Examples:
    {colour, shape} -> "a red circle"; {bg_colour, pattern} -> "on a blue checkered background".
    """
    words: list[str] = []
    if keep & {"shape", "colour", "size", "position"}:
        words.append("a")
        words += [getattr(attrs, slot) for slot in ("size", "colour") if slot in keep]
        words.append(attrs.shape if "shape" in keep else "object")
        if "position" in keep:
            words += ["at", "the", attrs.position]
    if keep & {"bg_colour", "pattern"}:
        words += ["on", "a"] + [getattr(attrs, slot) for slot in ("bg_colour", "pattern") if slot in keep]
        words.append("background")
    return " ".join(words)


def random_slots(rng: np.random.Generator, full: float = 0.5) -> frozenset[str]:
    """Slots a training caption names: all of them with probability `full`, else a random non-empty subset
    (each slot kept with probability 1/2), so partial prompts are in the training distribution."""
    if rng.random() < full:
        return frozenset(SLOTS)
    while True:
        keep = frozenset(slot for slot in SLOTS if rng.random() < 0.5)
        if keep:
            return keep


def with_slot(attrs: Attrs, slot: str, rng: np.random.Generator) -> Attrs:
    """`attrs` with one slot changed to another value (object and background colours kept different)."""
    current = getattr(attrs, slot)
    forbidden = {current}
    if slot == "colour":
        forbidden.add(attrs.bg_colour)
    if slot == "bg_colour":
        forbidden.add(attrs.colour)
    choices = [v for v in ATTRIBUTES[slot] if v not in forbidden]
    return replace(attrs, **{slot: choices[rng.integers(len(choices))]})


def sample_attrs(rng: np.random.Generator, split: str = "train") -> Attrs:
    """Draw a scene; "train" rejects held-out triples, "heldout" draws only them."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    if split == "heldout":
        triples = sorted(HELD_OUT)
        shape, colour, bg = triples[rng.integers(len(triples))]
    else:
        while True:
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = COLOURS[rng.integers(len(COLOURS))]
            bg = COLOURS[rng.integers(len(COLOURS))]
            if bg != colour and (shape, colour, bg) not in HELD_OUT:
                break
    return Attrs(
        shape=shape,
        colour=colour,
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        bg_colour=bg,
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
    )


def shade(rgb: np.ndarray) -> np.ndarray:
    """A lighter (dark colours) or darker (light colours) shade, so patterns never hide the background colour."""
    luminance = float(rgb @ np.array([0.299, 0.587, 0.114])) / 255.0
    target = 0.0 if luminance > 0.6 else 255.0
    return rgb + 0.35 * (target - rgb)


def _grid(scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in 64-px units on a grid `scale` times finer."""
    yy, xx = np.mgrid[0 : SIZE_PX * scale, 0 : SIZE_PX * scale].astype(np.float32)
    return (yy + 0.5) / scale, (xx + 0.5) / scale


# Patterns are axis-aligned on whole pixels and need no anti-aliasing; shape edges are drawn 2x finer.
_BG_YY, _BG_XX = _grid(1)
_YY, _XX = _grid(SUPERSAMPLE)


def background(attrs: Attrs, rng: np.random.Generator) -> np.ndarray:
    base = np.array(PALETTE[attrs.bg_colour], dtype=np.float32)
    other = shade(base)
    period = 8.0
    phase = float(rng.integers(8))
    if attrs.pattern == "plain":
        weight = np.zeros((SIZE_PX, SIZE_PX), np.float32)
    elif attrs.pattern == "horizontal striped":
        weight = (((_BG_YY + phase) // (period / 2)) % 2).astype(np.float32)
    elif attrs.pattern == "vertical striped":
        weight = (((_BG_XX + phase) // (period / 2)) % 2).astype(np.float32)
    elif attrs.pattern == "checkered":
        weight = ((((_BG_XX + phase) // period) + ((_BG_YY + phase) // period)) % 2).astype(np.float32)
    else:
        weight = _BG_YY / SIZE_PX
    return base + weight[..., None] * (other - base)


def shape_mask(attrs: Attrs, rng: np.random.Generator) -> np.ndarray:
    r = _HALF_EXTENT[attrs.size] + float(rng.uniform(-1.0, 1.0))
    row, col = divmod(POSITIONS.index(attrs.position), 3)
    cx = _GRID[col] + float(rng.uniform(-2.0, 2.0))
    cy = _GRID[row] + float(rng.uniform(-2.0, 2.0))
    dx, dy = _XX - cx, _YY - cy
    ax, ay = np.abs(dx), np.abs(dy)
    if attrs.shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif attrs.shape == "square":
        mask = np.maximum(ax, ay) <= 0.85 * r
    elif attrs.shape == "triangle":
        mask = (dy <= 0.8 * r) & (ax <= (dy + r) / 1.8)
    elif attrs.shape == "diamond":
        mask = ax + ay <= 1.1 * r
    elif attrs.shape == "ring":
        d2 = dx * dx + dy * dy
        mask = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    else:
        arm = 0.33 * r
        mask = ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    return mask.astype(np.float32)


def draw_with_mask(attrs: Attrs, rng: np.random.Generator, style: str = "plain") -> tuple[np.ndarray, np.ndarray]:
    """The image of `draw` and the object's mask: float32 [64, 64] coverage in [0, 1] (fractional on the
    anti-aliased edge). Consumes `rng` exactly as `draw` does, so both give the same image for the same state;
    every style consumes it the same way, so a seed gives the same scene in each style."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
    canvas = background(attrs, rng)
    s = SUPERSAMPLE
    coverage = shape_mask(attrs, rng).reshape(SIZE_PX, s, SIZE_PX, s).mean(axis=(1, 3))
    colour = np.array(PALETTE[attrs.colour], dtype=np.float32)
    if style == "two-tone":
        rows = np.flatnonzero(coverage.max(axis=1) > 0)
        lower = (_BG_YY > (rows[0] + rows[-1] + 1) / 2).astype(np.float32)[..., None]
        colour = colour + lower * (shade(colour) - colour)
    image = canvas + coverage[..., None] * (colour - canvas)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), coverage


def draw(attrs: Attrs, rng: np.random.Generator, style: str = "plain") -> np.ndarray:
    """Render a scene as uint8 [64, 64, 3]; `rng` only jitters position, size and stripe phase."""
    return draw_with_mask(attrs, rng, style)[0]


def make_batch(seed: int, n: int, split: str = "train", style: str = "plain") -> tuple[np.ndarray, list[Attrs]]:
    """`n` scenes and their images [n, 64, 64, 3] uint8, a pure function of (seed, n, split, style); the scenes
    (attributes and jitter) do not depend on `style`."""
    images, _, attrs = make_masked_batch(seed, n, split, style)
    return images, attrs


def make_masked_batch(
    seed: int, n: int, split: str = "train", style: str = "plain"
) -> tuple[np.ndarray, np.ndarray, list[Attrs]]:
    """`make_batch` plus the object masks [n, 64, 64] float32 in [0, 1]; the same images for the same arguments."""
    rng = np.random.default_rng(seed)
    attrs = [sample_attrs(rng, split) for _ in range(n)]
    drawn = [draw_with_mask(a, rng, style) for a in attrs]
    return np.stack([d[0] for d in drawn]), np.stack([d[1] for d in drawn]), attrs


def mask_image(mask: np.ndarray) -> Image.Image:
    """A mask as the ControlNet's conditioning picture: white object on black, 8-bit greyscale."""
    return Image.fromarray((np.clip(mask, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")


def write_dataset(
    out_dir: str | Path, n: int, seed: int, split: str = "train", masks: bool = False, partial: float = 0.0
) -> Path:
    """Write `n` PNGs and `manifest.jsonl` (image_file relative to out_dir, text, attrs); returns the manifest path.
    The manifest is written last, whole, and an existing one is removed before the first image is overwritten, so an
    interrupted build leaves none (the adapter recipe reads an existing manifest as "scenes written").

    `masks` also writes each object's mask (`masks/*.png`, white object on black) and its `mask_file`, the
    control images of the miniature ControlNet; the images and other fields do not change. `partial` is the share of
    captions that name a random subset of the slots (`partial_caption`, the empty caption included), so a model
    trained on the manifest must take what the text leaves out from elsewhere (an adapter: from the image).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "manifest.jsonl").unlink(missing_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    images, object_masks, attrs = make_masked_batch(seed, n, split)
    rng = np.random.default_rng(seed + 1)
    lines = []
    for i, (image, mask, a) in enumerate(zip(images, object_masks, attrs)):
        name = f"images/{split}_{i:06d}.png"
        Image.fromarray(image).save(out / name)
        text = caption(a)
        if rng.random() < partial:
            text = partial_caption(a, frozenset(slot for slot in SLOTS if rng.random() < 0.5))
        record = {"image_file": name, "text": text, "attrs": asdict(a)}
        if masks:
            record["mask_file"] = f"masks/{split}_{i:06d}.png"
            mask_image(mask).save(out / record["mask_file"])
        lines.append(json.dumps(record) + "\n")
    manifest = write_text(out / "manifest.jsonl", "".join(lines))
    return manifest
