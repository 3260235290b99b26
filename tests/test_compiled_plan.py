"""The compiled call's plan (`prepare`, then the branch that reads it), run without dynamo: what a compiled UNet
computes must equal the eager processor's output for every kind of prompt. tests/test_compile.py checks the same
under `torch.compile` (one graph, no recompilation); this file lets tools that wrap every function, such as the
mutation run (docs/testing.md), check the plan's arithmetic too."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from diffusers import DDIMScheduler

from ipadapter import AdapterPrompt, Reference, attach
from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.attention import IPAttnProcessor
from ipadapter.projection import ProjectionConfig
from tests.test_compile import CROSS, tiny  # noqa: F401  (the fixture)

UP = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"  # the tiny UNet's other cross-attention layer

ATTACH = importlib.import_module("ipadapter.attach")  # the package exports a function of that name


def _as_if_compiled(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Dynamo's two flags, as a `torch.compile(unet)` call sets them: inside the compiled module, tracing. A
    prepared call must never fall back to the eager processor (under dynamo, a graph break)."""
    if not on:
        monkeypatch.undo()
        return
    monkeypatch.setattr(ATTACH, "_in_compiled_module", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(IPAttnProcessor, "_uncompiled", _no_fallback)
    monkeypatch.setattr(IPAttnProcessor, "_terms_of", _no_terms_made)


def _planned_and_eager(
    monkeypatch: pytest.MonkeyPatch, unet: torch.nn.Module, sample: torch.Tensor, t: object, text: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's output through the prepared call (as `torch.compile(unet)` makes it), then through the eager one."""
    _as_if_compiled(monkeypatch, True)
    planned = unet(sample, t, encoder_hidden_states=text).sample
    _as_if_compiled(monkeypatch, False)
    return planned, unet(sample, t, encoder_hidden_states=text).sample


def _no_fallback(*args: object, **kwargs: object) -> None:
    raise AssertionError("a prepared compiled call fell back to the eager processor")


def _no_terms_made(*args: object, **kwargs: object) -> None:
    raise AssertionError("a prepared compiled call made K'/V' and masks inside the graph instead of reading prepare's")


def _prompts() -> list[AdapterPrompt]:
    torch.manual_seed(1)
    tokens, uncond = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    return [
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], scale=1.0),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], scale=0.5),
        AdapterPrompt([Reference(cond=torch.randn(1, 4, 16), uncond=uncond, weight=0.3)], scale=0.7),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], layer_weights={CROSS: 2.0}),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], start=0.5, end=1.0),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond)], scale=0.6, layer_weights={CROSS: 2.0},
                      uncond_layers=frozenset({CROSS})),
        AdapterPrompt([Reference(cond=tokens, mask=mask), Reference(cond=torch.randn(1, 4, 16), mask=1 - mask)],
                      scale=0.8),
        # A reference of weight 0 (here, or everywhere) takes no share of the softmax it would share with the others.
        AdapterPrompt([Reference(cond=tokens, uncond=uncond), Reference(cond=torch.randn(1, 4, 16), weight=0.0)]),
        AdapterPrompt([Reference(cond=tokens, uncond=uncond, layer_weights={CROSS: 1.0}),
                       Reference(cond=torch.randn(1, 4, 16), uncond=uncond, layer_weights={UP: 1.0})]),
        AdapterPrompt([Reference(cond=tokens, mask=mask), Reference(cond=torch.randn(1, 4, 16), mask=1 - mask),
                       Reference(cond=torch.randn(1, 4, 16), mask=mask, weight=0.0)]),
        # Outside "v" scaling each masked reference is an attention of its own: two terms at a layer, each with its
        # K'/V' and weight maps of the same shapes, none to be written over the other's.
        AdapterPrompt([Reference(cond=tokens, mask=mask), Reference(cond=torch.randn(1, 4, 16), mask=1 - mask)],
                      scaling="kv"),
    ]


@pytest.fixture(params=["decoupled", "concat", "lora"])
def attention(request, tiny) -> tuple:  # noqa: F811
    """The tiny UNet with a decoupled adapter, with the simple adapter (image tokens appended to the text's), or with
    a FaceID adapter whose LoRA deltas are not zero (a new LoRA's `up` is)."""
    unet, adapter = tiny
    head = ProjectionConfig("linear", in_dim=8, cross_dim=16, tokens=4)
    if request.param == "concat":
        adapter = IPAdapter.for_unet(unet, AdapterConfig("base", head, attention="concat"))
    if request.param == "lora":
        adapter = IPAdapter.for_unet(unet, AdapterConfig("faceid", head, lora_rank=4))
        with torch.no_grad():
            for name, param in adapter.named_parameters():
                if "_lora.up." in name:
                    param.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    return unet, adapter


def test_the_compiled_plan_computes_what_the_eager_processor_does(attention, monkeypatch) -> None:
    unet, adapter = attention
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    att = attach(unet, adapter, scheduler=scheduler)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    plain = unet(sample, scheduler.timesteps[0], encoder_hidden_states=text).sample  # before any prompt: no adapter
    try:
        for prompt in _prompts():
            att.set_prompts({"0": prompt}, rows=1)
            for t in scheduler.timesteps[:3:2]:  # progress 0 and 0.5: outside and inside the last prompt's window
                with torch.no_grad():
                    planned, eager = _planned_and_eager(monkeypatch, unet, sample, t, text)
                torch.testing.assert_close(planned, eager, atol=1e-5, rtol=1e-5)
                if prompt.scale:
                    assert (eager - plain).abs().max() > 1e-4 or prompt.start > 0
    finally:
        att.detach()


def test_two_adapters_keep_their_own_scale_and_lora_scale_in_the_compiled_plan(tiny, monkeypatch) -> None:  # noqa: F811
    """Two FaceID adapters (each with a LoRA whose deltas are not zero) at different scales and LoRA scales: each
    prepared weight is its own adapter's, so the planned call gives the eager output."""
    unet, _ = tiny
    head = ProjectionConfig("linear", in_dim=8, cross_dim=16, tokens=4)
    adapters = {}
    for name in ("a", "b"):
        adapters[name] = IPAdapter.for_unet(unet, AdapterConfig("faceid", head, lora_rank=4))
        with torch.no_grad():
            for key, param in adapters[name].named_parameters():
                param.normal_(std=0.2, generator=torch.Generator().manual_seed(len(key) + len(name)))
    att = attach(unet, adapters)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    try:
        att.set_prompts({"a": AdapterPrompt([Reference(cond=torch.randn(1, 4, 16))], scale=0.9, lora_scale=1.0),
                         "b": AdapterPrompt([Reference(cond=torch.randn(1, 4, 16))], scale=0.3, lora_scale=0.4)},
                        rows=1)
        with torch.no_grad():
            planned, eager = _planned_and_eager(monkeypatch, unet, sample, 500, text)
    finally:
        att.detach()
    torch.testing.assert_close(planned, eager, atol=1e-5, rtol=1e-5)


def test_without_cache_kv_the_compiled_plan_keeps_no_second_copy_of_k_and_v(tiny, monkeypatch) -> None:  # noqa: F811
    """`cache_kv` off (the default): the prepared terms hold K'/V' in their held tensors, and no cache keeps the
    projections they were copied from (twice the memory). With it on, the same call keeps them: the check can tell."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    kept = []
    try:
        for cache_kv in (False, True):
            att.runtime.cache_kv = cache_kv
            att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(1, 4, 16))])}, rows=1)
            _as_if_compiled(monkeypatch, True)
            with torch.no_grad():
                unet(sample, 500, encoder_hidden_states=text)
            _as_if_compiled(monkeypatch, False)
            kept.append(sum(len(p.kv._now) + len(p.kv._before) for p in att._processors))
    finally:
        att.detach()
    assert kept[0] == 0 < kept[1]


@pytest.mark.parametrize("before", ["nothing", "a compiled call, then an eager one", "clear_cache"])
def test_a_compiled_call_nothing_prepared_for_runs_the_eager_processor(
    tiny, monkeypatch, before: str,  # noqa: F811
) -> None:
    """`unet.compile()` compiles the module's forward but skips the attachment's hook: the processor sees no plan and
    runs the eager processor, the adapter acting. So too after `torch.compile(unet)` then the plain `unet` (what was
    prepared is forgotten), and after `clear_cache` between generations (not an empty plan that acts on nothing)."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    try:
        att.set_prompts({"0": _prompts()[1]}, rows=1)
        with torch.no_grad():
            if before == "a compiled call, then an eager one":
                _as_if_compiled(monkeypatch, True)
                unet(sample, 500, encoder_hidden_states=text)
                _as_if_compiled(monkeypatch, False)
            eager = unet(sample, 500, encoder_hidden_states=text).sample
            if before == "clear_cache":
                att.clear_cache()
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
            unprepared = unet(sample, 500, encoder_hidden_states=text).sample
        torch.testing.assert_close(unprepared, eager, atol=0, rtol=0)
    finally:
        att.detach()


@pytest.mark.parametrize("autograd", [True, False])
def test_the_compiled_plan_of_a_bf16_unet_computes_what_the_eager_processor_does(
    attention, monkeypatch, autograd: bool,
) -> None:
    """An fp32 adapter on a bf16 UNet, with masked references, one mask all ones: the trainer's setting (autograd on,
    the plan's tensors made anew) and inference's (off: written into the held tensors, which must take the UNet's
    dtype). The plan made for the UNet's dtype gives the eager output, in bf16."""
    unet, adapter = attention
    unet = copy.deepcopy(unet).to(torch.bfloat16)
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    refs = [Reference(cond=torch.randn(1, 4, 16), mask=m) for m in (mask, 1 - mask, torch.ones(16, 16))]
    att = attach(unet, adapter)
    sample, text = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.randn(2, 5, 16, dtype=torch.bfloat16)
    try:
        att.set_prompts({"0": AdapterPrompt(refs, scale=0.8)}, rows=1)
        with torch.set_grad_enabled(autograd):
            planned, eager = _planned_and_eager(monkeypatch, unet, sample, 500, text)
    finally:
        att.detach()
    assert planned.dtype == eager.dtype == torch.bfloat16 and planned.requires_grad == autograd
    torch.testing.assert_close(planned, eager, atol=0.05, rtol=0.05)  # bf16 roundings in two orders


def test_under_autograd_two_generations_before_one_backward_give_the_eager_gradients(attention, monkeypatch) -> None:
    """Without autograd the prepared K'/V', weights and LoRA scales are written in place from one generation to the
    next (fixed addresses for CUDA graphs); with it they are new tensors, or the second generation would overwrite
    what the first one's backward needs (gradient accumulation over two batches)."""
    unet, adapter = attention
    att = attach(unet, adapter)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    prompts = [AdapterPrompt([Reference(cond=torch.randn(1, 4, 16))], scale=s) for s in (1.0, 0.5)]
    grads = []
    try:
        for compiled in (True, False):
            unet.zero_grad()
            adapter.zero_grad()
            loss = 0
            for prompt in prompts:
                att.set_prompts({"0": prompt}, rows=1)
                _as_if_compiled(monkeypatch, compiled)
                loss = loss + unet(sample, 500, encoder_hidden_states=text).sample.square().mean()
                _as_if_compiled(monkeypatch, False)
            loss.backward()
            named = [*unet.named_parameters(), *(("adapter." + n, p) for n, p in adapter.named_parameters())]
            grads.append({n: p.grad.clone() for n, p in named if p.grad is not None})
    finally:
        att.detach()
        unet.zero_grad()
        adapter.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("adapter.") for n in grads[0]) or any("attn2.to_k" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_every_prepared_tensor_keeps_its_address_from_one_generation_to_the_next(tiny, monkeypatch) -> None:  # noqa: F811
    """What tests/test_compile.py checks of the compiled graph's inputs, here at the plan: without autograd each
    prepared K'/V', weight map, image weight and LoRA scale, and the step factors, is written in place from one
    generation to the next (other references and scale, same shapes), so CUDA graphs replay without copying them. The
    old tensors are kept alive, so an address cannot come back by reuse; the values are checked against the eager
    processor above."""
    unet, adapter = tiny
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    att = attach(unet, adapter)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    seen = []
    try:
        for scale in (0.8, 0.5):
            refs = [Reference(cond=torch.randn(1, 4, 16), mask=m) for m in (mask, 1 - mask)]
            att.set_prompts({"0": AdapterPrompt(refs, scale=scale, scaling="kv")}, rows=1)
            _as_if_compiled(monkeypatch, True)
            with torch.no_grad():
                unet(sample, 500, encoder_hidden_states=text)
            seen.append([att.runtime.step_tensor, *(t for p in att._processors for c in p._prepared for t in (
                c.image, c.lora, *(x for term in c.terms for x in (term.k, term.v, *(m for _, m in term.maps)))))])
            _as_if_compiled(monkeypatch, False)
    finally:
        att.detach()
    kinds = {t.dim() for t in seen[0]}
    assert kinds >= {0, 4} and len(seen[0]) == len(seen[1])  # scalars, K'/V', maps
    assert [t.data_ptr() for t in seen[0]] == [t.data_ptr() for t in seen[1]]


def test_a_new_batch_size_in_a_generation_is_planned_anew(tiny, monkeypatch) -> None:  # noqa: F811
    """The plan is made for a batch's layout: a UNet called with another batch size in the same generation (a
    dataset's short last batch; here each image has a reference of its own) gets a plan for that batch."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    tokens = torch.randn(2, 4, 16)  # a reference per image: repeated along a batch of 4
    calls = [(torch.randn(batch, 4, 8, 8), torch.randn(batch, 5, 16)) for batch in (2, 4)]
    outputs = []
    try:
        att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8)})
        for compiled in (True, False):  # the compiled calls one after the other: an eager call forgets the plan
            _as_if_compiled(monkeypatch, compiled)
            with torch.no_grad():
                outputs.append([unet(sample, 500, encoder_hidden_states=text).sample for sample, text in calls])
    finally:
        att.detach()
    for planned, eager in zip(*outputs):
        torch.testing.assert_close(planned, eager, atol=1e-5, rtol=1e-5)


def test_the_compiled_plan_keeps_its_structure_when_a_scale_or_layer_weight_is_zero(
    tiny, monkeypatch,  # noqa: F811
) -> None:
    """A compiled graph follows the plan's structure: an adapter at scale 0, or at weight 0 on a layer, must keep its
    place (its weight is a tensor read at run time), or setting the scale from 0 to 0.5 would compile anew."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    tokens = torch.randn(1, 4, 16)
    prompts = [AdapterPrompt([Reference(cond=tokens)], scale=0.5), AdapterPrompt([Reference(cond=tokens)], scale=0.0),
               AdapterPrompt([Reference(cond=tokens)], layer_weights={CROSS: 1.0})]
    structures = []
    try:
        for prompt in prompts:
            att.set_prompts({"0": prompt}, rows=1)
            _as_if_compiled(monkeypatch, True)
            with torch.no_grad():
                unet(sample, 500, encoder_hidden_states=text)
            _as_if_compiled(monkeypatch, False)
            structures.append([(c.plan.name, len(c.terms)) for p in att._processors for c in p._prepared])
    finally:
        att.detach()
    assert structures[0] == structures[1] == structures[2] and structures[0]


def test_prepare_makes_the_weights_on_the_device_asked_for(tiny) -> None:  # noqa: F811
    """`prepare` runs before the compiled UNet, on the UNet's device: the weights the graph reads must be made there
    (the CPU is torch's default device, so the meta device stands in for an accelerator). K'/V' come from the
    adapter's own weights, on its device."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    torch.manual_seed(2)
    meta = torch.device("meta")
    try:
        att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(1, 4, 16)) for _ in range(2)], scale=0.5)},
                        rows=1)
        att.runtime.latent_hw = (8, 8)
        tensors = []
        for processor in att._processors:
            processor.prepare(2, torch.float32, meta)
            for c in processor._prepared:
                tensors += [c.image, c.lora]
    finally:
        att.detach()
    assert tensors and all(t.device == meta for t in tensors)


@pytest.mark.parametrize("scaling", ["v", "kv"])
def test_prepared_weight_maps_are_on_the_device_and_in_the_dtype_asked_for(tiny, scaling: str) -> None:  # noqa: F811
    """The masks' weights on each token grid, as `prepare` makes them for the compiled graph: on the UNet's device
    (meta standing in for an accelerator, as above) and in its dtype, for masked references in one attention ("v")
    and each in its own ("kv")."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    meta = torch.device("meta")
    try:
        refs = [Reference(cond=torch.randn(1, 4, 16), mask=m) for m in (mask, 1 - mask)]
        att.set_prompts({"0": AdapterPrompt(refs, scaling=scaling)}, rows=1)
        att.runtime.latent_hw = (8, 8)
        maps = []
        for processor in att._processors:
            with torch.no_grad():
                processor.prepare(2, torch.bfloat16, meta)
            maps += [m for c in processor._prepared for term in c.terms for _, m in term.maps if m is not None]
    finally:
        att.detach()
    assert maps and all(m.device == meta and m.dtype == torch.bfloat16 for m in maps)


def test_prepared_k_and_v_take_the_dtype_asked_for_after_another(tiny) -> None:  # noqa: F811
    """A UNet cast between generations (float32, then bfloat16): the held K'/V' are made anew in the new dtype rather
    than written into the float32 ones, which would keep them at twice the memory the bf16 graph reads."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    try:
        att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(1, 4, 16))])}, rows=1)
        att.runtime.latent_hw = (8, 8)
        dtypes = []
        for dtype in (torch.float32, torch.bfloat16):
            for processor in att._processors:
                with torch.no_grad():  # inference: the tensors held from one generation to the next
                    processor.prepare(2, dtype, torch.device("cpu"))
            dtypes.append({t.dtype for p in att._processors for c in p._prepared for term in c.terms
                           for t in (term.k, term.v)})
    finally:
        att.detach()
    assert dtypes == [{torch.float32}, {torch.bfloat16}]


def test_the_compiled_plan_under_autocast_computes_what_the_eager_processor_does(
    tiny, monkeypatch,  # noqa: F811
) -> None:
    """Under autocast the UNet's input is float32, so `prepare` makes K'/V' in float32 while the queries come out of
    autocast's bf16 Linear: the prepared call must still compute what the eager call (K'/V' in the query's dtype)
    does."""
    unet, adapter = tiny
    att = attach(unet, adapter)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    try:
        for prompt in (_prompts()[0], _prompts()[6]):  # one reference; two masked ones in one attention
            att.set_prompts({"0": prompt}, rows=1)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                planned, eager = _planned_and_eager(monkeypatch, unet, sample, 500, text)
            torch.testing.assert_close(planned, eager, atol=1e-2, rtol=1e-2)
    finally:
        att.detach()
