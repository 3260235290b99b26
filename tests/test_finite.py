"""The NaN/Inf check at the file boundary against the element-wise definition (`torch.isfinite` on every element),
including the cases its fast sum-based path must not get wrong: infinities that cancel in a sum, NaN beside Inf,
and finite values whose sum overflows."""

from __future__ import annotations

import pytest
import torch

from ipadapter.finite import all_finite, non_finite

BIG32 = torch.finfo(torch.float32).max
CASES = {
    "zeros": torch.zeros(5),
    "normal": torch.randn(1000, generator=torch.Generator().manual_seed(0)),
    "nan": torch.tensor([1.0, float("nan"), 2.0]),
    "inf": torch.tensor([1.0, float("inf")]),
    "-inf": torch.tensor([-float("inf"), 0.5]),
    "inf and -inf (the sum is nan)": torch.tensor([float("inf"), -float("inf")]),
    "nan and inf": torch.tensor([float("nan"), float("inf")]),
    "fp32 sum overflows, every value finite": torch.tensor([BIG32, BIG32, 1.0]),
    "fp16 sum beyond fp16's range, every value finite": torch.full((4096,), 60000.0, dtype=torch.float16),
    "fp16 inf": torch.tensor([1.0, float("inf")], dtype=torch.float16),
    "bf16 nan": torch.tensor([float("nan")], dtype=torch.bfloat16),
    "fp64 beyond fp32's range, finite": torch.tensor([1e300, -1e300, 1e300], dtype=torch.float64),
    "fp64 inf": torch.tensor([1e300, float("inf")], dtype=torch.float64),
    "empty": torch.empty(0),
}
if hasattr(torch, "float8_e4m3fn"):  # no Inf in this format, only NaN; torch has no isfinite for it
    CASES["float8 e4m3fn nan"] = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    CASES["float8 e4m3fn finite"] = torch.tensor([1.0, 448.0]).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("case", list(CASES))
def test_all_finite_is_the_element_wise_definition(case: str) -> None:
    value = CASES[case]
    exact = value.float() if value.element_size() == 1 else value  # fp32 holds every float8 value exactly
    assert all_finite(value) == bool(torch.isfinite(exact).all())


def test_non_finite_names_the_first_bad_float_tensor_and_skips_integers() -> None:
    tensors = {"ints": torch.tensor([1, 2]), "ok": torch.ones(3), "bad": CASES["inf and -inf (the sum is nan)"],
               "later": CASES["nan"]}
    assert non_finite(tensors) == "bad"
    assert non_finite({"ok": torch.ones(3), "big": CASES["fp32 sum overflows, every value finite"]}) is None
