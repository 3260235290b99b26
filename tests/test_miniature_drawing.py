"""The shapes world's pixels against their documented geometry (docs/miniature.md, "The world").

Every shape is described here a second way (vertices of a polygon, a union of rectangles, radii) and sampled at the
world's supersampled pixel centres; the world's mask must agree on every sample. The random jitter comes from a
stand-in generator that returns chosen points of each documented range, so each expected centre and size is known.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ipadapter.miniature import world

HALF_EXTENT = {"small": 6.0, "medium": 10.0, "large": 14.0}
CENTRES = {  # (x, y) of each position on the 3x3 grid of a 64 px image
    "top left": (16, 16), "top": (32, 16), "top right": (48, 16),
    "left": (16, 32), "center": (32, 32), "right": (48, 32),
    "bottom left": (16, 48), "bottom": (32, 48), "bottom right": (48, 48),
}
SIZE_JITTER, CENTRE_JITTER = 1.0, 2.0  # +- px


class Draws:
    """A stand-in for `np.random.Generator`: `uniform(lo, hi)` returns the next fraction of its range, and
    `integers(n)` the next given integer, so a test knows every value the world drew."""

    def __init__(self, fractions: tuple[float, ...] = (), integers: tuple[int, ...] = ()) -> None:
        self.fractions, self.ints = list(fractions), list(integers)

    def uniform(self, low: float, high: float) -> float:
        return low + self.fractions.pop(0) * (high - low)

    def integers(self, n: int) -> int:
        value = self.ints.pop(0)
        assert 0 <= value < n
        return value


def samples() -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the supersampled pixel centres: 128 x 128 points, half a pixel apart, the first at 0.25 px."""
    centres = (np.arange(2 * world.SIZE_PX) + 0.5) / 2
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return x, y


def in_convex_polygon(x: np.ndarray, y: np.ndarray, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Points on the inner side of every edge of a convex polygon (vertices in either winding)."""
    sides = []
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        sides.append((bx - ax) * (y - ay) - (by - ay) * (x - ax))
    sides = np.stack(sides)
    return np.all(sides >= 0, axis=0) | np.all(sides <= 0, axis=0)


def expected_shape(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Each shape from its description: circle radius r; square half-side 0.85 r; triangle with its apex r above the
    centre and its base 0.8 r below, 2 r wide; diamond half-diagonal 1.1 r; ring between radii 0.55 r and r; cross of
    two bars 2 r long and 0.66 r wide."""
    x, y = samples()
    distance = np.hypot(x - cx, y - cy)
    if shape == "circle":
        return distance <= r
    if shape == "ring":
        return (distance <= r) & (distance >= 0.55 * r)
    if shape == "square":
        h = 0.85 * r
        return in_convex_polygon(x, y, [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)])
    if shape == "diamond":
        h = 1.1 * r
        return in_convex_polygon(x, y, [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)])
    if shape == "triangle":
        return in_convex_polygon(x, y, [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)])
    assert shape == "cross"
    arm = 0.33 * r
    bar = lambda w, h: (np.abs(x - cx) <= w) & (np.abs(y - cy) <= h)  # noqa: E731
    return bar(arm, r) | bar(r, arm)


@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("size,position,fractions", [
    ("small", "top left", (0.5, 0.5, 0.503)),
    ("medium", "bottom", (0.137, 0.861, 0.293)),
    ("large", "right", (0.917, 0.071, 0.643)),
    ("large", "center", (0.031, 0.377, 0.979)),
])
def test_each_shape_is_its_documented_figure(shape, size, position, fractions):
    """Size and centre are drawn in that order, r from +-1 px and x then y from +-2 px; the mask equals the figure
    sampled at every supersampled pixel centre (the fractions keep every edge off the samples)."""
    attrs = world.Attrs(shape, "red", size, position, "blue", "plain")
    mask = world.shape_mask(attrs, Draws(fractions))
    r = HALF_EXTENT[size] + SIZE_JITTER * (2 * fractions[0] - 1)
    gx, gy = CENTRES[position]
    cx, cy = gx + CENTRE_JITTER * (2 * fractions[1] - 1), gy + CENTRE_JITTER * (2 * fractions[2] - 1)
    expected = expected_shape(shape, cx, cy, r)
    assert mask.dtype == np.float32 and mask.shape == expected.shape
    assert np.array_equal(mask, expected.astype(np.float32))


@pytest.mark.parametrize("shape,area", [
    ("circle", math.pi), ("ring", math.pi * (1 - 0.55**2)), ("square", 1.7**2), ("diamond", 2 * 1.1**2),
    ("triangle", 0.5 * 2 * 1.8), ("cross", 2 * (2 * 0.66) - 0.66**2),
])
def test_each_shapes_area_in_closed_form(shape, area):
    """The large shape's area in px^2 from the coverage (a second, sampling-free check of the figures above)."""
    image, coverage = world.draw_with_mask(world.Attrs(shape, "red", "large", "center", "blue", "plain"),
                                           Draws((0.5, 0.5, 0.5), (0,)))
    assert coverage.sum() == pytest.approx(area * 14.0**2, rel=0.03)


@pytest.mark.parametrize("colour,darker", [
    ("red", False), ("orange", True), ("yellow", True), ("green", False),
    ("cyan", True), ("blue", False), ("purple", False), ("white", True),
])
def test_shade_moves_35_percent_towards_black_or_white(colour, darker):
    """Light colours (Rec. 601 luma above 0.6: orange, yellow, cyan, white) get a darker shade, the rest a lighter
    one."""
    rgb = np.array(world.PALETTE[colour], dtype=np.float32)
    target = 0.0 if darker else 255.0
    np.testing.assert_allclose(world.shade(rgb), rgb + 0.35 * (target - rgb), rtol=1e-6)


def test_the_shade_turns_at_a_luma_of_six_tenths_of_full_scale():
    """Greys just above and below 0.6 x 255 = 153: the first darkens, the second lightens."""
    above, below = np.full(3, 153.3, np.float32), np.full(3, 152.7, np.float32)
    np.testing.assert_allclose(world.shade(above), 0.65 * above, rtol=1e-6)
    np.testing.assert_allclose(world.shade(below), below + 0.35 * (255 - below), rtol=1e-6)


def expected_background(pattern: str, phase: int, colour: str) -> np.ndarray:
    """The share of the shade at each pixel: stripes 4 px wide (period 8 px), checks 8 px, both shifted by `phase`
    px; the gradient runs from none at the top to all of it at the bottom, measured at the pixel's centre."""
    rows, cols = np.mgrid[0:64, 0:64]
    if pattern == "plain":
        weight = np.zeros((64, 64))
    elif pattern == "horizontal striped":
        weight = (rows + phase) // 4 % 2
    elif pattern == "vertical striped":
        weight = (cols + phase) // 4 % 2
    elif pattern == "checkered":
        weight = ((rows + phase) // 8 + (cols + phase) // 8) % 2
    else:
        weight = (rows + 0.5) / 64
    base = np.array(world.PALETTE[colour], dtype=np.float64)
    return base + weight[..., None] * (world.shade(base) - base)


@pytest.mark.parametrize("pattern", world.PATTERNS)
@pytest.mark.parametrize("phase,colour", [(0, "blue"), (3, "yellow"), (7, "green")])
def test_each_pattern_is_its_documented_layout(pattern, phase, colour):
    """The phase is one draw from 0..7, taken before the object's."""
    attrs = world.Attrs("circle", "red", "small", "center", colour, pattern)
    canvas = world.background(attrs, Draws(integers=(phase,)))
    assert canvas.shape == (64, 64, 3)
    np.testing.assert_allclose(canvas, expected_background(pattern, phase, colour), rtol=1e-5, atol=1e-3)


def test_the_phase_is_one_of_eight_shifts_alike():
    """Stripes repeat every 8 px and checks every 8 px along the diagonal, so the phases 0..7 give 8 pictures; real
    draws give each about an eighth of the time (2,000 draws: 250, one standard deviation 15)."""
    attrs = world.Attrs("circle", "red", "small", "center", "blue", "checkered")
    rng = np.random.default_rng(0)
    counts: dict[bytes, int] = {}
    for _ in range(2000):
        picture = world.background(attrs, rng).tobytes()
        counts[picture] = counts.get(picture, 0) + 1
    assert len(counts) == 8 and all(190 < n < 310 for n in counts.values())


def test_a_drawing_blends_the_object_over_the_background_by_its_coverage():
    """Pixels the object covers wholly are its colour, those it misses the background, edge pixels the mix by the
    share of the pixel's four samples inside; values are rounded to the nearest integer."""
    attrs = world.Attrs("diamond", "orange", "medium", "left", "purple", "checkered")
    draws = (0.3, 0.6, 0.2)
    image, coverage = world.draw_with_mask(attrs, Draws(draws, (5,)))
    figure = world.shape_mask(attrs, Draws(draws)).reshape(64, 2, 64, 2).mean(axis=(1, 3))
    np.testing.assert_array_equal(coverage, figure)
    assert set(np.unique(coverage)) <= {0.0, 0.25, 0.5, 0.75, 1.0} and 0 < (coverage % 1).sum()
    background = expected_background("checkered", 5, "purple")
    colour = np.array(world.PALETTE["orange"], dtype=np.float64)
    expected = background + coverage[..., None] * (colour - background)
    assert image.dtype == np.uint8
    assert np.abs(image - np.floor(expected + 0.5)).max() == 0


TWO_TONE_CASES = [  # (shape, position, size and centre draws)
    ("square", "center", (0.4, 0.5, 0.5)),
    ("circle", "top", (0.7, 0.2, 0.35)),
    ("triangle", "bottom right", (0.1, 0.9, 0.6)),
]


@pytest.mark.parametrize("shape,position,draws", TWO_TONE_CASES)
def test_two_tone_shades_the_lower_half_of_the_objects_rows(shape, position, draws):
    """The custom style: object rows below the middle of the object's row span take the colour's shade; a row whose
    centre is the middle itself keeps the colour (the cases cover a middle on a pixel's edge and on its centre)."""
    attrs = world.Attrs(shape, "green", "large", position, "white", "plain")
    plain, coverage = world.draw_with_mask(attrs, Draws(draws, (0,)), "plain")
    two_tone, same = world.draw_with_mask(attrs, Draws(draws, (0,)), "two-tone")
    np.testing.assert_array_equal(coverage, same)
    rows = np.flatnonzero(coverage.max(axis=1))
    middle = (rows[0] + rows[-1] + 1) / 2
    green = np.array(world.PALETTE["green"], dtype=np.float64)
    shaded = np.floor(world.shade(green) + 0.5)
    solid = coverage == 1
    for y in range(64):
        for x in np.flatnonzero(solid[y]):
            expected = shaded if y + 0.5 > middle else green
            assert tuple(two_tone[y, x]) == tuple(expected), (y, x)
    assert np.array_equal(two_tone[coverage == 0], plain[coverage == 0])
    assert (two_tone[solid] != plain[solid]).any() and (two_tone[solid] == plain[solid]).all(axis=1).any()


def test_the_two_tone_cases_cover_both_kinds_of_middle():
    """A middle on a pixel's centre (a half-integer) makes the strict "below" matter; one on an edge does not."""
    kinds = set()
    for shape, position, draws in TWO_TONE_CASES:
        attrs = world.Attrs(shape, "green", "large", position, "white", "plain")
        rows = np.flatnonzero(world.draw_with_mask(attrs, Draws(draws, (0,)))[1].max(axis=1))
        kinds.add((rows[0] + rows[-1] + 1) % 2)
    assert kinds == {0, 1}


def test_mask_image_is_white_on_black_in_eight_bits():
    mask = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 1.7], [-0.3, 0.002, 0.998]], dtype=np.float32)
    picture = world.mask_image(mask)
    assert picture.mode == "L"
    np.testing.assert_array_equal(np.asarray(picture), [[0, 64, 128], [191, 255, 255], [0, 1, 254]])


def test_the_held_out_triples_follow_their_rule():
    """Twelve triples, two per shape; every colour is an object colour in one of them and never its own
    background. Pinned: the shipped models were trained without exactly these, so changing them would make every
    published held-out number a measure of memorisation."""
    assert world.HELD_OUT == {
        ("circle", "red", "orange"), ("circle", "green", "blue"),
        ("square", "yellow", "cyan"), ("square", "blue", "red"),
        ("triangle", "cyan", "white"), ("triangle", "white", "green"),
        ("diamond", "purple", "yellow"), ("diamond", "orange", "purple"),
        ("ring", "red", "blue"), ("ring", "green", "orange"),
        ("cross", "yellow", "red"), ("cross", "blue", "cyan"),
    }
    shapes = [s for s, _, _ in world.HELD_OUT]
    assert all(shapes.count(s) == 2 for s in world.SHAPES)
    assert {c for _, c, _ in world.HELD_OUT} == set(world.COLOURS)
    assert all(c != b for _, c, b in world.HELD_OUT)
