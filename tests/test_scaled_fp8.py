"""`scaled_fp8.dequantized` against its closed form: each scaled weight is the stored fp8 value times its scale,
computed in float32 and put in the precision asked for; every other tensor as stored; markers and scales left out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ipadapter.errors import IPAdapterError
from ipadapter.scaled_fp8 import dequantized, is_scaled

FP8 = torch.float8_e4m3fn


def _file(tmp_path, layout: str, prefix: str = "") -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    weights = {"blocks.0.linear.weight": torch.randn(6, 4, generator=g), "blocks.0.norm.weight": torch.randn(4)}
    scale = torch.tensor(0.01)
    stored = {prefix + "blocks.0.linear.weight": (weights["blocks.0.linear.weight"] / scale).to(FP8),
              prefix + "blocks.0.norm.weight": weights["blocks.0.norm.weight"]}
    names = ("scale_weight", "scale_input") if layout == "older" else ("weight_scale", "input_scale")
    stored[f"{prefix}blocks.0.linear.{names[0]}"], stored[f"{prefix}blocks.0.linear.{names[1]}"] = scale, torch.ones(())
    if layout == "older":
        stored[prefix + "scaled_fp8"] = torch.zeros(0, dtype=FP8)
    else:
        stored[prefix + "blocks.0.linear.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                                     dtype=torch.uint8)
    path = str(tmp_path / f"{layout}.safetensors")
    save_file(stored, path)
    return path, stored


@pytest.mark.parametrize("layout", ["older", "newer"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_each_scaled_weight_is_its_value_times_its_scale(tmp_path, layout, prefix) -> None:
    path, stored = _file(tmp_path, layout, prefix)
    if prefix:  # a part beside the denoiser, which a transformer's loader never reads
        save_file({**stored, "text_encoders.t5xxl.transformer.shared.weight": torch.ones(2, 2)}, path)
    assert is_scaled(stored)
    out = dequantized(path, torch.bfloat16)
    linear, norm = prefix + "blocks.0.linear.weight", prefix + "blocks.0.norm.weight"
    assert out.keys() == {linear, norm}
    scale = stored[linear.removesuffix("weight") + ("scale_weight" if layout == "older" else "weight_scale")]
    assert out[linear].dtype == torch.bfloat16
    assert torch.equal(out[linear], (stored[linear].float() * scale).to(torch.bfloat16))
    assert torch.equal(out[norm], stored[norm])  # not scaled: as stored (the loader casts it)


def test_a_file_without_scales_is_read_as_stored(tmp_path) -> None:
    stored = {"a.weight": torch.ones(2, 2, dtype=FP8), "b.weight": torch.arange(4.0)}
    save_file(stored, str(tmp_path / "plain.safetensors"))
    assert not is_scaled(stored)
    out = dequantized(tmp_path / "plain.safetensors", torch.bfloat16)
    assert out.keys() == stored.keys() and all(torch.equal(out[k].float(), v.float()) for k, v in stored.items())
    assert out["a.weight"].dtype == FP8


def test_several_scales_for_one_weight_is_one_line(tmp_path) -> None:
    path, stored = _file(tmp_path, "older")
    save_file({**stored, "blocks.0.linear.scale_weight": torch.tensor([0.01, 0.02])}, path)
    with pytest.raises(IPAdapterError) as err:
        dequantized(path, torch.float32)
    assert str(err.value) == (f"{path}: blocks.0.linear.scale_weight holds 2 scales; ipadapter reads scaled fp8 files "
                              "with one scale per weight")


def test_the_newer_layouts_format_is_read_as_json_bytes(tmp_path) -> None:
    path, stored = _file(tmp_path, "newer")
    conf = json.dumps({"format": "float8_e5m2"}).encode()
    save_file({**stored, "blocks.0.linear.comfy_quant": torch.tensor(list(conf), dtype=torch.uint8)}, path)
    assert dequantized(path, torch.float32).keys() == {"blocks.0.linear.weight", "blocks.0.norm.weight"}
