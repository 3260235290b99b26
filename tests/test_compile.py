"""A torch.compile'd UNet keeps working with adapters attached, and a scale change takes effect without recompiling."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ipadapter import AdapterPrompt, Reference, attach
from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.projection import ProjectionConfig


def test_compiled_unet_scale_change_takes_effect_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    ).eval()
    adapter = IPAdapter.for_unet(unet, AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=16, tokens=4)))
    att = attach(unet, adapter)
    tokens, sample, text = torch.randn(1, 4, 16), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager")

    def run(scale: float) -> torch.Tensor:
        att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=scale)})
        with torch.no_grad():
            return compiled(sample, 500, encoder_hidden_states=text).sample

    first = run(1.0)
    graphs = counters["stats"]["unique_graphs"]
    half, zero = run(0.5), run(0.0)
    assert counters["stats"]["unique_graphs"] == graphs, "a scale change must not recompile"
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.5)})
    with torch.no_grad():
        eager = unet(sample, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(half, eager, atol=1e-5, rtol=1e-5)
    assert (first - half).abs().max() > 1e-4 and (half - zero).abs().max() > 1e-4
    att.detach()
