"""Mask files: any mode, white = apply, counts checked against the references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.conditioning.masks import check_mask_count, load_mask, load_masks
from ipadapter.errors import IPAdapterError


def test_white_is_one_black_is_zero_grey_in_between(tmp_path) -> None:
    a = np.zeros((37, 91), dtype=np.uint8)
    a[:, :30], a[:, 30:60] = 255, 128
    path = tmp_path / "mask.png"
    Image.fromarray(a).save(path)
    m = load_mask(path)
    assert m.shape == (37, 91) and m.dtype == torch.float32
    assert m[:, :30].eq(1).all() and m[:, 60:].eq(0).all()
    assert m[0, 40].item() == pytest.approx(128 / 255)
    assert load_mask(path, threshold=0.5)[0, 40] == 1.0


def test_other_modes(tmp_path) -> None:
    rgba = Image.new("RGBA", (8, 4), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 4, 4))
    assert load_mask(rgba)[:, :4].eq(1).all() and load_mask(rgba)[:, 4:].eq(0).all(), "transparent = black"
    assert load_mask(Image.new("RGB", (3, 3), (255, 255, 255))).eq(1).all()
    assert load_mask(Image.new("1", (3, 3), 0)).eq(0).all()
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert load_mask(deep).eq(1).all()


def test_not_an_image(tmp_path) -> None:
    path = tmp_path / "mask.txt"
    path.write_text("white please")
    with pytest.raises(IPAdapterError, match="mask.txt"):
        load_mask(path)


def test_load_masks_reads_one_mask_per_reference(tmp_path) -> None:
    Image.new("L", (4, 2), 255).save(tmp_path / "white.png")
    masks = load_masks([tmp_path / "white.png", Image.new("L", (3, 3), 0)], 2)
    assert [tuple(m.shape) for m in masks] == [(2, 4), (3, 3)]
    assert masks[0].eq(1).all() and masks[1].eq(0).all()


def test_counts() -> None:
    check_mask_count([], 3)
    check_mask_count(["a", "b"], 2)
    with pytest.raises(IPAdapterError, match="got 1 mask\\(s\\) for 2 reference image\\(s\\)"):
        check_mask_count(["a"], 2)
    with pytest.raises(IPAdapterError, match="got 3 mask"):
        load_masks(["missing-1.png", "missing-2.png", "missing-3.png"], 2)
