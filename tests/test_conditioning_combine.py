"""Combining several references' features, checked against the definitions written out independently here."""

from __future__ import annotations

import pytest
import torch

from ipadapter.conditioning.combine import COMBINE_MODES, combine, project_each
from ipadapter.errors import IPAdapterError


def feats(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


def expected(mode: str, e: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """Element by element, with plain Python loops over the images."""
    we = [wi * ei for wi, ei in zip(w, e)]
    if mode == "concat":
        if e[0].dim() == 2:
            return torch.stack([torch.stack([x[b] for x in we]) for b in range(e[0].shape[0])])
        return torch.cat(we, dim=1)
    if mode == "add":
        out = torch.zeros_like(e[0])
        for x in we:
            out = out + x
        return out
    if mode == "subtract":
        rest = torch.zeros_like(e[0])
        for x in we[1:]:
            rest = rest + x
        return we[0] - rest / (len(e) - 1)
    if mode == "average":
        out = torch.zeros_like(e[0])
        for x in we:
            out = out + x
        return out / sum(w)
    if mode == "norm average":
        direction, norm = torch.zeros_like(e[0]), torch.zeros_like(e[0][..., :1])
        for wi, x in zip(w, e):
            n = torch.sqrt((x * x).sum(-1, keepdim=True))
            direction, norm = direction + wi * x / n, norm + wi * n
        return direction / sum(w) * norm / sum(w)
    out = we[0].clone()
    for x in we[1:]:
        out = torch.maximum(out, x) if mode == "max" else torch.minimum(out, x)
    return out


@pytest.mark.parametrize("shape", [(2, 8), (2, 5, 8)], ids=["global", "patch"])
@pytest.mark.parametrize("mode", list(COMBINE_MODES))
@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0]])
def test_modes_match_their_definitions(mode: str, shape: tuple[int, ...], weights) -> None:
    e = feats(shape)
    got = combine(e, mode, weights)
    torch.testing.assert_close(got, expected(mode, e, weights or [1.0] * 3))


def test_shapes() -> None:
    assert combine(feats((2, 8)), "concat").shape == (2, 3, 8)
    assert combine(feats((2, 5, 8)), "concat").shape == (2, 15, 8)
    assert combine(feats((2, 5, 8)), "average").shape == (2, 5, 8)


def test_average_weights_are_relative_and_identical_images_stay_put() -> None:
    e = feats((1, 8))
    torch.testing.assert_close(combine(e, "average", [1, 2, 3]), combine(e, "average", [2, 4, 6]))
    same = [e[0]] * 3
    torch.testing.assert_close(combine(same, "norm average", [1, 2, 3]), e[0])
    torch.testing.assert_close(combine(same, "average"), e[0])


def test_project_each_equals_projecting_image_by_image() -> None:
    proj = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Unflatten(-1, (4, 3))).double()
    e = feats((2, 8))
    got = project_each(proj, combine(e, "concat"))
    for b in range(2):
        torch.testing.assert_close(got[b], torch.cat([proj(x[b : b + 1])[0] for x in e]))


@pytest.mark.parametrize("args,message", [
    (("blend",), "unknown combine mode 'blend'; valid: concat, add"),
    (("subtract",), "at least two images"),
    (("average", [1.0, -1.0]), "sum to 0"),
    (("add", [1.0]), "got 1 image weights for 2 images"),
    (("add", [1.0, float("nan")]), "finite"),
])
def test_errors(args, message: str) -> None:
    e = feats((1, 4), n=2) if args[0] != "subtract" else feats((1, 4), n=1)
    with pytest.raises(IPAdapterError, match=message):
        combine(e, *args)


def test_subtract_of_one_batch_row_is_the_first_minus_the_mean_of_the_others() -> None:
    a, b, c = (torch.randn(1, 4) for _ in range(3))
    torch.testing.assert_close(combine([a, b, c], "subtract", [2.0, 1.0, 3.0]), 2 * a - (b + 3 * c) / 2)
    torch.testing.assert_close(combine([a, b], "subtract"), a - b)
    with pytest.raises(IPAdapterError) as err:
        combine([a], "subtract")
    assert str(err.value) == "subtract needs at least two images: the first minus the mean of the others"


def test_mismatched_shapes() -> None:
    with pytest.raises(IPAdapterError, match="differ in shape"):
        combine([torch.zeros(1, 4), torch.zeros(1, 5)], "add")


def test_no_images_or_other_ranks_are_one_sentence() -> None:
    with pytest.raises(IPAdapterError) as err:
        combine([], "add")
    assert str(err.value) == "combine needs at least one image's features"
    with pytest.raises(IPAdapterError) as err:
        combine([torch.zeros(4)], "add")
    assert str(err.value) == "features must be (B, D) or (B, T, D), got shape (4,)"


def test_the_default_mode_is_concat_and_half_precision_stays_half() -> None:
    """concat is the default (the module docstring); weights take the features' dtype, so bf16 features give bf16
    and equal the float64 definition to bf16's precision."""
    e = feats((2, 3, 8), n=2)
    torch.testing.assert_close(combine(e), expected("concat", e, [1.0, 1.0]))
    half = [x.to(torch.bfloat16) for x in e]
    got = combine(half, "add", [0.3, 1.7])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected("add", [x.double() for x in half], [0.3, 1.7]),
                               atol=0.05, rtol=0.02)


def test_weights_follow_the_features_device() -> None:
    """The weights are made on the features' device: meta features combine into meta results of the right shape."""
    meta = [torch.empty(2, 5, 8, device="meta") for _ in range(3)]
    for mode in ("add", "concat", "max"):
        got = combine(meta, mode, [1.0, 2.0, 3.0])
        assert got.device.type == "meta" and got.shape == expected(mode, feats((2, 5, 8)), [1.0] * 3).shape


def test_norm_average_of_short_vectors_and_the_zero_sum_sentence() -> None:
    """Features with norms well below 1 follow the definition too; a zero weight sum is one exact sentence."""
    e = [0.01 * x for x in feats((2, 8))]
    w = [1.0, 0.5, 2.0]
    torch.testing.assert_close(combine(e, "norm average", w), expected("norm average", e, w))
    with pytest.raises(IPAdapterError) as err:
        combine(e[:2], "average", [1.0, -1.0])
    assert str(err.value) == "the image weights of an average sum to 0; give weights with a non-zero sum"
