"""The one grid helper: where each image lands, with and without titles."""

from PIL import Image

from ipadapter.evaluate.grid import image_grid


def _solid(rgb: tuple[int, int, int], side: int = 8) -> Image.Image:
    return Image.new("RGB", (side, side), rgb)


def test_without_titles_cell_c_r_is_at_c_times_cell_r_times_cell() -> None:
    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (9, 9, 9)]]
    grid = image_grid([("", [_solid(c) for c in column]) for column in colours], cell=16, title_lines=0)
    assert grid.size == (32, 32)
    for c, column in enumerate(colours):
        for r, rgb in enumerate(column):
            assert grid.getpixel((c * 16 + 8, r * 16 + 8)) == rgb


def test_titles_add_a_header_and_rows_caps_the_rows_shown() -> None:
    grid = image_grid([("a title", [_solid((255, 0, 0))] * 3)], cell=16, rows=2, title_lines=2)
    header = 4 + 12 * 2
    assert grid.size == (16, header + 2 * 16)
    assert grid.getpixel((8, header + 8)) == (255, 0, 0)
    assert grid.getpixel((15, 0)) == (255, 255, 255)
