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


@pytest.mark.parametrize("mask_hw", [(48, 80), (80, 48), (30, 30)])
@pytest.mark.parametrize("seq_len", [60, 61, 15, 240, 7])
def test_a_mask_without_the_latent_size_is_resized_as_diffusers_does(mask_hw, seq_len: int) -> None:
    """Without the latent size the token grid is diffusers' estimate from the mask's aspect (h = floor(sqrt(L /
    aspect)), one more when it does not divide L; w = L // h), bicubic, zero-padded or cut to L tokens: equal to
    diffusers' own `IPAdapterMaskProcessor.downsample`, which this project clamps to [0, 1] (bicubic overshoots)."""
    import warnings

    from diffusers.image_processor import IPAdapterMaskProcessor

    from ipadapter.token_grids import resize_mask

    yy, xx = torch.meshgrid(torch.linspace(0, 1, mask_hw[0]), torch.linspace(0, 1, mask_hw[1]), indexing="ij")
    mask = ((xx + 0.5 * yy) > 0.6).float()  # an edge both across and down the grid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # diffusers warns when it pads or cuts
        theirs = IPAdapterMaskProcessor.downsample(mask[None], 1, seq_len, 1)[0].clamp(0, 1)
    ours = resize_mask(mask, seq_len, None)
    assert ours.shape == (seq_len, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_threshold_bounds_are_inclusive_and_values_at_the_threshold_count(tmp_path) -> None:
    """`value >= threshold → 1` with threshold in [0, 1]: 0 keeps everything, 1 keeps pure white only."""
    grey = Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8))
    assert load_mask(grey, threshold=0.0).tolist() == [[1.0, 1.0, 1.0]]
    assert load_mask(grey, threshold=1.0).tolist() == [[0.0, 0.0, 1.0]]
    for bad in (1.5, -0.25):
        with pytest.raises(IPAdapterError) as caught:
            load_mask(grey, threshold=bad)
        assert str(caught.value) == f"the mask threshold must be between 0 and 1, got {bad}"
