"""Loading references in any mode, preparing them, tiling them, and the tile-pooling enhancer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ipadapter.conditioning.images import (
    _to_8bit, enhance_features, grid_tiles, load_image, prepare_image, tile_image, to_rgb,
)
from ipadapter.errors import IPAdapterError


def pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


MODES = {
    "RGBA half-transparent red": (Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (255, 127, 127)),
    "LA transparent": (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    "L": (Image.new("L", (4, 4), 77), (77, 77, 77)),
    "1": (Image.new("1", (4, 4), 1), (255, 255, 255)),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    "YCbCr": (Image.new("RGB", (4, 4), (10, 200, 30)).convert("YCbCr"), None),
    "I;16": (Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)), (128, 128, 128)),
    "I 16-bit": (Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)), (255, 255, 255)),
    "I 8-bit range": (Image.fromarray(np.full((4, 4), 200, dtype=np.int32)), (200, 200, 200)),
    "F unit": (Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), (128, 128, 128)),
    "F 8-bit range": (Image.fromarray(np.full((4, 4), 100.0, dtype=np.float32)), (100, 100, 100)),
}


@pytest.mark.parametrize("case", list(MODES))
def test_any_mode_becomes_rgb(case: str) -> None:
    image, rgb = MODES[case]
    got = load_image(image)
    assert got.size == (4, 4)
    if rgb is None:
        assert all(abs(a - b) <= 3 for a, b in zip(pixel(got), (10, 200, 30)))
    else:
        assert all(abs(a - b) <= 1 for a, b in zip(pixel(got), rgb)), pixel(got)


def test_palette_with_transparency_and_black_background(tmp_path) -> None:
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 1
    path = tmp_path / "palette.png"
    p.save(path)
    assert pixel(load_image(path)) == (255, 255, 255)
    assert pixel(load_image(path, background=(0, 0, 0))) == (0, 0, 0)


def test_sixteen_bit_png_file(tmp_path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((3, 5), 65535, dtype=np.uint16)).save(path)
    assert pixel(load_image(path)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    got = load_image(path)
    assert got.size == (20, 40)
    assert pixel(got, (10, 5))[2] > 200  # the blue half is now on top


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n broken"])
def test_unreadable_files_name_the_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "reference-42.png"
    path.write_bytes(content)
    with pytest.raises(IPAdapterError, match="reference-42.png"):
        load_image(path)


def test_missing_file_and_folder(tmp_path) -> None:
    with pytest.raises(IPAdapterError, match="not found: .*nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    with pytest.raises(IPAdapterError, match="is a folder"):
        load_image(tmp_path)


def test_zero_size_image() -> None:
    with pytest.raises(IPAdapterError, match="no pixels"):
        load_image(Image.new("RGB", (0, 5)))


def halves(size=(200, 100), vertical=False) -> Image.Image:
    """Red first half, blue second half (left/right, or top/bottom)."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]) if not vertical else (0, 0, size[0], size[1] // 2))
    return image


@pytest.mark.parametrize("crop,colour", [("left", (255, 0, 0)), ("right", (0, 0, 255))])
def test_crop_position_wide(crop: str, colour) -> None:
    got = prepare_image(halves(), 32, crop=crop, resample="nearest")
    assert got.size == (32, 32) and pixel(got, (16, 16)) == colour


@pytest.mark.parametrize("crop,colour", [("top", (255, 0, 0)), ("bottom", (0, 0, 255))])
def test_crop_position_tall(crop: str, colour) -> None:
    got = prepare_image(halves((100, 200), vertical=True), 32, crop=crop, resample="nearest")
    assert pixel(got, (16, 16)) == colour


def test_center_crop_keeps_both_halves() -> None:
    got = prepare_image(halves(), 32, crop="center", resample="nearest")
    assert pixel(got, (2, 16)) == (255, 0, 0) and pixel(got, (29, 16)) == (0, 0, 255)


def test_pad_to_square_keeps_everything() -> None:
    got = prepare_image(halves(), 64, pad=True, fill=(0, 255, 0), resample="nearest")
    assert got.size == (64, 64)
    assert pixel(got, (32, 2)) == (0, 255, 0) and pixel(got, (32, 61)) == (0, 255, 0)
    assert pixel(got, (2, 32)) == (255, 0, 0) and pixel(got, (61, 32)) == (0, 0, 255)


def test_target_width_height_and_filters() -> None:
    assert prepare_image(halves(), (48, 24)).size == (48, 24)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 90, 3), dtype=np.uint8))
    a, b = prepare_image(noisy, 32, resample="nearest"), prepare_image(noisy, 32, resample="bilinear")
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(IPAdapterError, match="valid: nearest, bilinear, bicubic, lanczos"):
        prepare_image(noisy, 32, resample="area")
    with pytest.raises(IPAdapterError, match="valid: center, top, bottom, left, right"):
        prepare_image(noisy, 32, crop="middle")


def test_sharpening_raises_edge_contrast() -> None:
    soft = prepare_image(halves(), 32, resample="bilinear")
    sharp = prepare_image(halves(), 32, resample="bilinear", sharpen=1.0)
    assert np.array_equal(np.asarray(soft), np.asarray(prepare_image(halves(), 32, resample="bilinear", sharpen=0.0)))
    edge = lambda im: np.abs(np.diff(np.asarray(im, dtype=np.float64)[:, :, 0], axis=1)).max()  # noqa: E731
    assert edge(sharp) > edge(soft)


def test_tiles_of_a_wide_reference() -> None:
    tiles = tile_image(halves((512, 256)), 256, 64)
    assert [t.box for t in tiles] == [(0, 0, 256, 256), (128, 0, 384, 256), (256, 0, 512, 256)]
    masks = [t.mask() for t in tiles]
    assert all(m.shape == (256, 512) for m in masks)
    assert masks[1][:, 128:384].eq(1).all() and masks[1].sum() == 256 * 256
    assert torch.stack(masks).amax(0).eq(1).all(), "the tiles cover the picture"
    assert tiles[0].image.size == (256, 256)
    small = tiles[1].mask((32, 64))
    assert small.shape == (32, 64) and small[:, 16:48].eq(1).all() and small.sum() == 32 * 32


def test_fit_scales_the_short_side_to_the_tile() -> None:
    tiles = tile_image(halves((1000, 400)), 200, 50)
    assert {t.grid for t in tiles} == {(200, 500)}
    assert all(t.image.size == (200, 200) for t in tiles)


def test_full_scale_tiles_of_a_large_image() -> None:
    tiles = tile_image(halves((600, 300)), 256, 32, fit=False)
    lefts, tops = sorted({t.box[0] for t in tiles}), sorted({t.box[1] for t in tiles})
    assert lefts == [0, 172, 344] and tops == [0, 44]
    assert all(b - a <= 256 - 32 for a, b in zip(lefts, lefts[1:]))
    assert len(tiles) == 6 and all(t.grid == (300, 600) for t in tiles)


def test_bad_tiles() -> None:
    with pytest.raises(IPAdapterError, match="overlap"):
        tile_image(halves(), 64, 64)


def test_grid_tiles() -> None:
    parts = grid_tiles(halves((10, 6)), 2, 3)
    assert [p.size for p in parts] == [(3, 3), (4, 3), (3, 3)] * 2
    assert [p.size for p in grid_tiles(halves((10, 6)), 1, 1)] == [(10, 6)]
    assert [p.size for p in grid_tiles(halves((10, 6)), 1, 2)] == [(5, 6)] * 2
    assert [p.size for p in grid_tiles(halves((10, 6)), 2, 1)] == [(10, 3)] * 2
    for rows, cols in ((0, 2), (2, 0)):
        with pytest.raises(IPAdapterError, match=f"the tile grid needs at least 1x1, got {rows}x{cols}"):
            grid_tiles(halves((10, 6)), rows, cols)


@pytest.mark.parametrize("size", [None, (8, 16), (6, 12), (5, 7)])
def test_tile_mask_covers_every_pixel_its_box_overlaps(size) -> None:
    """Closed form: a pixel (y, x) of an (H, W) mask spans [y, y + 1) × [x, x + 1) in mask units; it is 1 exactly when
    that square overlaps the tile's box scaled from the grid to (H, W)."""
    from ipadapter.conditioning.images import Tile

    tile = Tile(Image.new("RGB", (4, 2)), box=(2, 1, 6, 3), grid=(4, 8))
    h, w = size or (4, 8)
    top, bottom, left, right = 1 * h / 4, 3 * h / 4, 2 * w / 8, 6 * w / 8
    expected = torch.tensor([[float(y + 1 > top and y < bottom and x + 1 > left and x < right) for x in range(w)]
                             for y in range(h)])
    torch.testing.assert_close(tile.mask(size), expected)


def test_enhancer_on_global_features() -> None:
    whole, tiles = torch.randn(2, 8), [torch.randn(2, 8) for _ in range(4)]
    expected = 0.3 * whole + 0.7 * (tiles[0] + tiles[1] + tiles[2] + tiles[3]) / 4
    torch.testing.assert_close(enhance_features(whole, tiles, (2, 2), 0.3), expected)


@pytest.mark.parametrize("g", [2, 3])
@pytest.mark.parametrize("class_token", [True, False])
def test_enhancer_pools_a_mosaic_of_tile_patches(class_token: bool, g: int) -> None:
    rows, cols, d, b = 2, 3, 5, 1
    head = int(class_token)
    whole = torch.randn(b, head + g * g, d)
    tiles = [torch.randn(b, head + g * g, d) for _ in range(rows * cols)]
    got = enhance_features(whole, tiles, (rows, cols), ratio=0.0)
    # Mosaic pixel (Y, X) comes from tile (Y // g, X // g), patch (Y % g, X % g); pooled cell (i, j) averages the
    # mosaic rows [i·rows, (i+1)·rows) and columns [j·cols, (j+1)·cols).
    for i in range(g):
        for j in range(g):
            cells = [tiles[(y // g) * cols + x // g][0, head + (y % g) * g + x % g]
                     for y in range(i * rows, (i + 1) * rows) for x in range(j * cols, (j + 1) * cols)]
            torch.testing.assert_close(got[0, head + i * g + j], torch.stack(cells).mean(0))
    if class_token:
        torch.testing.assert_close(got[0, 0], torch.stack([t[0, 0] for t in tiles]).mean(0))
    torch.testing.assert_close(enhance_features(whole, tiles, (rows, cols), ratio=1.0), whole)


def test_enhancer_errors() -> None:
    with pytest.raises(IPAdapterError, match="needs 4 tile features, got 3"):
        enhance_features(torch.randn(1, 8), [torch.randn(1, 8)] * 3, (2, 2))


def coordinates(width: int, height: int) -> Image.Image:
    """Each pixel holds its own position: red = x, green = y (sides up to 256)."""
    ys, xs = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8))


@pytest.mark.parametrize("size,target,crop,origin,step", [
    ((240, 120), 40, "left", (0, 0), 3), ((240, 120), 40, "center", (60, 0), 3), ((240, 120), 40, "right", (120, 0), 3),
    ((120, 240), 40, "top", (0, 0), 3), ((120, 240), 40, "center", (0, 60), 3), ((120, 240), 40, "bottom", (0, 120), 3),
    ((240, 120), (60, 20), "top", (0, 0), 4), ((240, 120), (60, 20), "center", (0, 20), 4),
    ((240, 120), (60, 20), "bottom", (0, 40), 4),
])
def test_crop_is_the_largest_box_of_the_target_aspect_at_its_position(size, target, crop, origin, step) -> None:
    """Closed form: the box is the target's aspect scaled by min(w / tw, h / th) (here `step`), at x0 = 0, (w - cw)/2
    or w - cw (likewise y0); nearest sampling at pixel centres reads source pixel x0 + step·i + step // 2."""
    got = np.asarray(prepare_image(coordinates(*size), target, crop=crop, resample="nearest")).astype(int)
    rows, cols = np.mgrid[0:got.shape[0], 0:got.shape[1]]
    assert np.array_equal(got[..., 0], origin[0] + step * cols + step // 2)
    assert np.array_equal(got[..., 1], origin[1] + step * rows + step // 2)


@pytest.mark.parametrize("size", [0, (0, 10), (10, 0), (-4, 4)])
def test_a_target_size_must_be_positive(size) -> None:
    width, height = (size, size) if isinstance(size, int) else size
    with pytest.raises(IPAdapterError) as caught:
        prepare_image(halves(), size)
    assert str(caught.value) == f"the target size must be positive, got {width}x{height}"
    assert prepare_image(halves(), (1, 1)).size == (1, 1)


@pytest.mark.parametrize("mode,values,expected", [
    ("I;16", [0, 255, 257, 12850, 65535], [0, 1, 1, 50, 255]),  # 16-bit: / 257, even when every value is under 256
    ("I", [0, 100, 255], [0, 100, 255]),  # 32-bit integers in 8-bit range: as they are
    ("I", [0, 256, 2570, 100000], [0, 1, 10, 255]),  # above it: / 257, clipped
    ("I", [0, 128, 256], [0, 0, 1]),  # 256 is above it
    ("I", [-10, 0, 200], [0, 0, 200]),  # negatives clip to 0
    ("F", [0.0, 0.6, 1.0], [0, 153, 255]),  # unit floats (max <= 1): x 255, rounded
    ("F", [0.0, 1.5, 2.0], [0, 2, 2]),  # floats above 1 in 8-bit range: as they are
])
def test_high_depth_and_float_pixels_map_to_8_bit(mode: str, values: list, expected: list) -> None:
    """The loading rules (conditioning/images.py's docstring): I;16 is 16-bit (/ 257); for I and F, values up to 1
    (F only) are [0, 1], up to 255 8-bit, anything larger 16-bit; then clipped to [0, 255] and rounded."""
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    got = np.asarray(load_image(image))
    assert np.array_equal(got[0, :, 0], expected) and np.array_equal(got[..., 0], got[..., 2])


@pytest.mark.parametrize("size,target,inner,offset", [
    ((240, 120), 60, (60, 30), (0, 15)), ((120, 240), 60, (30, 60), (15, 0)), ((240, 120), (30, 60), (30, 15), (0, 22)),
])
def test_pad_is_the_whole_image_scaled_to_fit_and_centred(size, target, inner, offset) -> None:
    """Closed form: scale = min(tw / w, th / h), the image resized to round(w·scale) x round(h·scale) and pasted at
    ((tw − iw) // 2, (th − ih) // 2) on the fill; nearest sampling reads source pixel step·i + step // 2."""
    got = np.asarray(prepare_image(coordinates(*size), target, pad=True, fill=(0, 0, 255), resample="nearest"))
    (ox, oy), (iw, ih) = offset, inner
    step = size[0] // iw
    rows, cols = np.mgrid[0:ih, 0:iw]
    inside = got[oy:oy + ih, ox:ox + iw].astype(int)
    assert np.array_equal(inside[..., 0], step * cols + step // 2)
    assert np.array_equal(inside[..., 1], step * rows + step // 2)
    outside = np.ones(got.shape[:2], bool)
    outside[oy:oy + ih, ox:ox + iw] = False
    assert (got[outside] == (0, 0, 255)).all()


@pytest.mark.parametrize("tall", [False, True])
def test_a_sliver_pads_to_at_least_one_pixel(tall: bool) -> None:
    size = (2, 200) if tall else (200, 2)
    got = np.asarray(prepare_image(Image.new("RGB", size, (255, 0, 0)), 50, pad=True, fill=(0, 0, 255),
                                   resample="nearest"))
    line = got[25] if tall else got[:, 25]
    assert (line == (255, 0, 0)).all(axis=1).sum() == 1  # round(2 * 0.25) = 0 pixels would lose the image


@pytest.mark.parametrize("amount", [0.4, 1.5])
def test_sharpening_is_pil_unsharp_mask_after_resizing(amount: float) -> None:
    """The documented sharpening: Pillow's UnsharpMask of radius 1, percent 100·amount, threshold 0, after resizing."""
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 90, 3), dtype=np.uint8))
    plain = prepare_image(noisy, 32, resample="bilinear")
    expected = plain.filter(ImageFilter.UnsharpMask(radius=1, percent=round(amount * 100), threshold=0))
    assert np.array_equal(np.asarray(prepare_image(noisy, 32, resample="bilinear", sharpen=amount)),
                          np.asarray(expected))


def test_the_default_size_is_the_encoders_224_and_negative_sharpening_is_one_sentence() -> None:
    assert prepare_image(halves()).size == (224, 224)
    with pytest.raises(IPAdapterError) as caught:
        prepare_image(halves(), 32, sharpen=-0.5)
    assert str(caught.value) == "the sharpening amount must not be negative, got -0.5"


def test_load_errors_are_exact_sentences_naming_the_source(tmp_path, monkeypatch) -> None:
    """The sentences of ipadapter.validation (file checks, pixel limit) and load_image, with Pillow's own error."""
    with pytest.raises(IPAdapterError) as caught:
        load_image(Image.new("RGB", (0, 5)))
    assert str(caught.value) == "the image has no pixels (0x5)"
    path = tmp_path / "reference-42.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(OSError) as pillow:
        Image.open(path)
    with pytest.raises(IPAdapterError) as caught:
        load_image(path)
    assert str(caught.value) == f"cannot read {path} as an image ({type(pillow.value).__name__}: {pillow.value})"
    with pytest.raises(IPAdapterError) as caught:
        load_image(tmp_path / "nowhere.png")
    assert str(caught.value) == f"image file not found: {tmp_path / 'nowhere.png'}"
    with pytest.raises(IPAdapterError) as caught:
        load_image(tmp_path)
    assert str(caught.value) == f"image file {tmp_path} is a folder, not a file"
    big = tmp_path / "big.png"
    Image.new("RGB", (6, 4)).save(big)
    monkeypatch.setenv("IPADAPTER_MAX_PIXELS", "23")
    with pytest.raises(IPAdapterError) as caught:
        load_image(big)
    assert str(caught.value) == (f"{big} is 6x4 px (24 pixels); the limit is 23 pixels "
                                 "(set IPADAPTER_MAX_PIXELS to allow more)")


def test_empty_deep_images_convert_and_deep_images_become_8_bit_grey() -> None:
    """An empty I / F / I;16 image converts like Pillow converts an empty image; the 8-bit step gives mode L, uint8."""
    for mode in ("I", "F", "I;16"):
        got = to_rgb(Image.new(mode, (5, 0)))
        assert got.mode == "RGB" and got.size == Image.new("L", (5, 0)).convert("RGB").size
    grey = _to_8bit(Image.fromarray(np.array([[0, 300, 65535]], dtype=np.int32)))
    assert grey.mode == "L" and np.asarray(grey).dtype == np.uint8


def fewest_even_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Brute force: the fewest evenly spread offsets (first 0, last length - tile) whose neighbours share at least
    `overlap` pixels, i.e. whose spacing is at most tile - overlap."""
    if length <= tile:
        return [0]
    n = 2
    while (length - tile) / (n - 1) > tile - overlap:
        n += 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@pytest.mark.parametrize("width,height,tile", [(833, 256, None), (34, 10, 10), (34, 12, 10)])
def test_default_tiles_are_the_fewest_sharing_a_quarter_tile(width: int, height: int, tile) -> None:
    """The default tile is 256 px and the default overlap tile // 4 whole pixels (2 for 10-px tiles)."""
    size = 256 if tile is None else tile
    got = tile_image(coordinates(width, height) if width <= 256 else Image.new("RGB", (width, height)),
                     *(() if tile is None else (tile,)), fit=False)
    expected = [(left, top) for top in fewest_even_starts(height, size, size // 4)
                for left in fewest_even_starts(width, size, size // 4)]
    assert [t.box[:2] for t in got] == expected
    assert all(t.image.size == (size, size) and t.box[2:] == (t.box[0] + size, t.box[1] + size) for t in got)


def test_one_pixel_tiles_without_overlap_are_the_pixels() -> None:
    """tile 1, overlap 0 is valid (a positive size, 0 <= overlap < size): every tile is one pixel, row-major."""
    tiles = tile_image(coordinates(3, 2), 1, 0, fit=False)
    assert [t.box for t in tiles] == [(x, y, x + 1, y + 1) for y in range(2) for x in range(3)]
    assert [t.image.getpixel((0, 0)) for t in tiles] == [(x, y, 0) for y in range(2) for x in range(3)]
    assert len(tile_image(coordinates(30, 10), 10, 0, fit=False)) == 3


def test_fitting_resizes_with_pillow_lanczos() -> None:
    """fit=True is Pillow's LANCZOS resize of the short side to the tile, then plain crops."""
    noisy = Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    fitted = noisy.resize((48, 32), Image.Resampling.LANCZOS)
    tiles = tile_image(noisy, 32, 8)
    assert all(np.array_equal(np.asarray(t.image), np.asarray(fitted.crop(t.box))) for t in tiles)


def test_enhancer_default_ratio_and_error_sentences() -> None:
    """The default ratio is one half; errors are the sentences of enhance_features."""
    whole, tiles = torch.randn(1, 8), [torch.randn(1, 8) for _ in range(2)]
    torch.testing.assert_close(enhance_features(whole, tiles, (1, 2)), 0.5 * whole + 0.5 * (tiles[0] + tiles[1]) / 2)
    cases = [
        ((whole, [torch.randn(1, 9)] * 2, (1, 2)),
         "tile features must have the whole image's shape; encode tiles and image the same way"),
        ((whole, tiles, (1, 2), 1.5), "the enhancer ratio must be between 0 and 1, got 1.5"),
        ((whole, tiles, (1, 2), -0.1), "the enhancer ratio must be between 0 and 1, got -0.1"),
        ((torch.randn(1, 7, 4), [torch.randn(1, 7, 4)] * 2, (1, 2)),
         "7 patch tokens do not form a square grid (with or without a class token)"),
    ]
    for args, message in cases:
        with pytest.raises(IPAdapterError) as caught:
            enhance_features(*args)
        assert str(caught.value) == message


@pytest.mark.parametrize("mode", ["1", "P", "I", "F"])
def test_without_sharpening_any_mode_is_just_pillows_resize(mode: str) -> None:
    """sharpen=0 means no filter at all: a square image to a square size is Pillow's own resize, in any mode Pillow
    resizes (including the modes Pillow's UnsharpMask refuses)."""
    noisy = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 40), dtype=np.uint8)).convert(mode)
    got = prepare_image(noisy, 20, resample="nearest")
    assert got.mode == mode
    assert np.array_equal(np.asarray(got), np.asarray(noisy.resize((20, 20), Image.Resampling.NEAREST)))


def test_a_mode_pillow_cannot_make_rgba_of_is_one_sentence() -> None:
    """Pillow's "La" (L with premultiplied alpha) counts as transparent but has no conversion to RGBA: the one
    sentence every other unconvertible mode gets, not Pillow's ValueError."""
    with pytest.raises(ValueError):
        Image.new("La", (2, 2)).convert("RGBA")
    with pytest.raises(IPAdapterError, match=r"^cannot convert a La image to RGB \(.*\); save it as RGB$"):
        load_image(Image.new("La", (2, 2)))


@pytest.mark.parametrize("tokens", [1, 2])
def test_one_patch_token_is_a_one_by_one_map(tokens: int) -> None:
    """One token is a 1 x 1 patch map (two: a class token and one patch), whose mosaic pools to the tiles' mean: the
    enhancer is ratio · whole + (1 − ratio) · mean(tiles), the global closed form, token by token."""
    torch.manual_seed(0)
    whole = torch.randn(2, tokens, 4)
    tiles = [torch.randn(2, tokens, 4) for _ in range(6)]
    got = enhance_features(whole, tiles, (2, 3), ratio=0.25)
    torch.testing.assert_close(got, 0.25 * whole + 0.75 * torch.stack(tiles).mean(0))
