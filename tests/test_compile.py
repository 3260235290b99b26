"""A torch.compile'd UNet with adapters attached: one graph, no graph break, and no recompilation when the scale,
per-layer weights, step window or references change; every output equal to the eager UNet's."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ipadapter import AdapterPrompt, Reference, attach
from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.projection import ProjectionConfig

CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def tiny() -> tuple[UNet2DConditionModel, IPAdapter]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    ).eval()
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=16, tokens=4))
    return unet, IPAdapter.for_unet(unet, config)


def test_compiled_unet_traces_once_and_follows_scale_weights_window_and_references(tiny) -> None:
    from torch._dynamo.utils import counters

    unet, adapter = tiny
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    att = attach(unet, adapter, scheduler=scheduler)
    tokens, uncond = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    prompts = [
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], scale=1.0),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], scale=0.5),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], scale=0.0),
        AdapterPrompt([Reference(cond=torch.randn(1, 4, 16), uncond=uncond, weight=0.3)], scale=0.7),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], layer_weights={CROSS: 2.0}),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], start=0.5, end=1.0),
    ]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager")
    outputs = []
    try:
        for prompt in prompts:
            att.set_prompts({"0": prompt}, rows=1)
            for t in scheduler.timesteps[:3:2]:  # progress 0 and 0.5: inside and outside the window of the last
                with torch.no_grad():
                    got = compiled(sample, t, encoder_hidden_states=text).sample
                    eager = unet(sample, t, encoder_hidden_states=text).sample
                torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
                outputs.append(got)
        assert counters["stats"]["unique_graphs"] == 1, "one graph, never recompiled"
        assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    finally:
        att.detach()
    first, half, zero, other, layered = outputs[0], outputs[2], outputs[4], outputs[6], outputs[8]
    for changed in (half, zero, other, layered):
        assert (first - changed).abs().max() > 1e-4, "each change must act on the compiled output"
    off, on = (outputs[10] - zero).abs().max(), (outputs[11] - outputs[5]).abs().max()  # vs scale 0 at each step
    assert off < 1e-6 < on, "the window: off at progress 0, on at 0.5"


def test_compiled_masked_references_equal_eager_and_new_images_do_not_recompile(tiny) -> None:
    from torch._dynamo.utils import counters

    unet, adapter = tiny
    att = attach(unet, adapter)
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager")
    try:
        for scale in (1.0, 0.4):
            a, b = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
            prompt = AdapterPrompt([Reference(cond=a, mask=mask), Reference(cond=b, mask=1 - mask)], scale=scale)
            att.set_prompts({"0": prompt}, rows=1)
            with torch.no_grad():
                got = compiled(sample, 500, encoder_hidden_states=text).sample
                eager = unet(sample, 500, encoder_hidden_states=text).sample
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        att.detach()


def test_the_simple_adapter_compiles_once_and_equals_eager(tiny) -> None:
    """The simple adapter (image tokens appended to the text's) has no K'/V' of its own: its compiled plan must not
    ask for them (it did, and crashed before the first step), and its weight is a log bias read from a tensor."""
    from torch._dynamo.utils import counters

    unet, _ = tiny
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=16, tokens=4), attention="concat")
    att = attach(unet, IPAdapter.for_unet(unet, config))
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager")
    outputs = []
    try:
        for scale in (1.0, 0.4, 0.0):
            att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(1, 4, 16))], scale=scale)}, rows=1)
            with torch.no_grad():
                got = compiled(sample, 500, encoder_hidden_states=text).sample
                eager = unet(sample, 500, encoder_hidden_states=text).sample
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
            outputs.append(got)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        att.detach()
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4


def test_an_adapter_attached_again_or_another_one_runs_in_the_same_compiled_graph(tiny) -> None:
    """A prompter per job (`with ImagePrompter(...)`) attaches and detaches each time: the new attachment's step
    factors are a new tensor, at a new address. The graph must not be bound to the old one's address, or every job
    would compile again; the same holds for another adapter of the same shape, with weights of its own."""
    from torch._dynamo.utils import counters

    unet, adapter = tiny
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    other = IPAdapter.for_unet(unet, adapter.config)
    with torch.no_grad():
        for weight in other.parameters():
            weight.add_(0.1 * torch.randn_like(weight))
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    reference = Reference(cond=torch.randn(1, 4, 16), uncond=torch.randn(1, 4, 16))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager")
    outputs = []
    for attached in (adapter, adapter, other):
        att = attach(unet, attached, scheduler=scheduler)
        try:
            att.set_prompts({"0": AdapterPrompt([reference])}, rows=1)
            with torch.no_grad():
                got = compiled(sample, scheduler.timesteps[1], encoder_hidden_states=text).sample
                eager = unet(sample, scheduler.timesteps[1], encoder_hidden_states=text).sample
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
            outputs.append(got)
        finally:
            att.detach()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert (outputs[0] - outputs[2]).abs().max() > 1e-4, "the other adapter's weights act"


def test_a_reference_of_weight_zero_is_left_out_when_compiled_too(tiny) -> None:
    """Two unmasked references share one softmax over their tokens: one of weight 0 (everywhere, or at a layer by
    its own layer weights, as the style and composition presets give) must be as if not given, compiled as eager.
    Its V' is zero, but its K' took a share of the softmax under `torch.compile` (a bug)."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    torch.manual_seed(3)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    a, b = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager")
    cases = [([Reference(cond=a), Reference(cond=b, weight=0.0)], [Reference(cond=a)]),
             ([Reference(cond=a), Reference(cond=b, layer_weights={CROSS: 0.0})], [Reference(cond=a)])]
    try:
        for given, alone in cases:
            with torch.no_grad():
                att.set_prompts({"0": AdapterPrompt(alone)}, rows=1)
                expected = unet(sample, 500, encoder_hidden_states=text).sample
                att.set_prompts({"0": AdapterPrompt(given)}, rows=1)
                eager = unet(sample, 500, encoder_hidden_states=text).sample
                got = compiled(sample, 500, encoder_hidden_states=text).sample
            torch.testing.assert_close(eager, expected, atol=0, rtol=0)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    finally:
        att.detach()


def test_every_tensor_the_compiled_graph_reads_keeps_its_address_across_generations(tiny) -> None:
    """CUDA graphs (`torch.compile(mode="reduce-overhead")`) replay a recording that reads its inputs where they
    were: the prepared K'/V', masks, weights and step factors are written in place from one generation to the next,
    so with the same latents and text every input of the graph is at the same address (and the outputs follow the
    new values: equal to eager)."""
    unet, adapter = tiny
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    att = attach(unet, adapter, scheduler=scheduler)
    sample, text, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(1, 4, 16)
    mask = torch.zeros(16, 16)
    mask[:, :5] = 1
    calls: list[list[int]] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args: object) -> object:
            calls.append([a.data_ptr() for a in args if isinstance(a, torch.Tensor)])
            return gm(*args)
        return run

    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=recording)
    try:
        for scale, masked in ((1.0, mask), (0.6, 1 - mask)):
            refs = [Reference(cond=torch.randn(1, 4, 16), uncond=uncond),
                    Reference(cond=torch.randn(1, 4, 16), mask=masked)]
            att.set_prompts({"0": AdapterPrompt(refs, scale=scale)}, rows=1)
            t = scheduler.timesteps[1]
            with torch.no_grad():
                got = compiled(sample, t, encoder_hidden_states=text).sample
                eager = unet(sample, t, encoder_hidden_states=text).sample
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    finally:
        att.detach()
    assert len(calls) == 2 and len(calls[0]) == len(calls[1])
    moved = [i for i, (a, b) in enumerate(zip(*calls)) if a != b]
    assert not moved, f"{len(moved)} of {len(calls[0])} graph inputs moved between generations"


def test_the_processors_are_prepared_once_per_generation_and_layout_not_at_every_step(tiny, monkeypatch) -> None:
    """The pre-call hook runs outside the graph at every compiled step; preparing every layer there again would
    cost host time at each step (SDXL: 70 layers) for the same result. A new generation, a new batch layout, an
    eager call in between or `clear_cache` prepares again; the step window still follows each step (eager outputs)."""
    from ipadapter.attention import IPAttnProcessor

    unet, adapter = tiny
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    att = attach(unet, adapter, scheduler=scheduler)
    prepared: list[int] = []
    real = IPAttnProcessor.prepare
    monkeypatch.setattr(IPAttnProcessor, "prepare", lambda self, *a: prepared.append(id(self)) or real(self, *a))
    layers = len(att._processors)
    text = torch.randn(2, 5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager")
    try:
        for scale in (1.0, 0.5):  # the second half of the steps in the window: each step's factor is read
            prompt = AdapterPrompt([Reference(cond=torch.randn(1, 4, 16))], scale=scale, start=0.5)
            att.set_prompts({"0": prompt}, rows=1)
            sample = torch.randn(2, 4, 8, 8)
            with torch.no_grad():  # eager first: the compiled steps after it prepare once
                expected = [unet(sample, t, encoder_hidden_states=text).sample for t in scheduler.timesteps]
                counts = len(prepared)
                for t, eager in zip(scheduler.timesteps, expected):
                    torch.testing.assert_close(compiled(sample, t, encoder_hidden_states=text).sample, eager,
                                               atol=1e-5, rtol=1e-5)
            assert len(prepared) - counts == layers, "prepared at the generation's first compiled step only"
        counts = len(prepared)
        with torch.no_grad():
            compiled(torch.randn(1, 4, 8, 8), scheduler.timesteps[0], encoder_hidden_states=text[:1])
            att.clear_cache()
            compiled(torch.randn(1, 4, 8, 8), scheduler.timesteps[1], encoder_hidden_states=text[:1])
        assert len(prepared) - counts == 2 * layers, "a new batch layout, then clear_cache, prepare again"
        assert sorted(set(prepared)) == sorted(id(p) for p in att._processors)
    finally:
        att.detach()
