"""FLUX IP-Adapters (XLabs layout, v1 4 tokens and v2 16 tokens) against diffusers' own FLUX IP-Adapter on identical
weights, plus the guarantees diffusers has no oracle for (window, masks, detach) against their closed forms."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ipadapter.checkpoint import save_adapter
from ipadapter.dit.attach import attach_dit
from ipadapter.dit.checkpoint import dit_adapter_from_state_dict, load_dit_adapter
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt, Reference
from tests import dit_factories as df
from tests import factories

TOL = 1e-4
BATCH, H, W, TEXT = 2, 4, 6, 5


def inputs(joint: int = df.FLUX_JOINT, seed: int = 5, h: int = H, w: int = W) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return {"hidden_states": torch.randn(BATCH, h * w, 4, generator=g),
            "encoder_hidden_states": torch.randn(BATCH, TEXT, joint, generator=g),
            "pooled_projections": torch.randn(BATCH, 32, generator=g), "timestep": torch.full((BATCH,), 0.5),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(TEXT, 3)}


def run(model, x: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, **extra).sample


def oracle(model, states: list[dict], embeds: list[torch.Tensor], scales: list[float | list[float]]) -> torch.Tensor:
    """diffusers' FluxIPAdapterAttnProcessor on a copy of the model: per adapter a scale, or a list per block."""
    ref = copy.deepcopy(model)
    ref._load_ip_adapter_weights([df.xlabs_as_diffusers(s) for s in states], low_cpu_mem_usage=False)
    blocks = [p for name, p in ref.attn_processors.items() if name.startswith("transformer_blocks.")]
    for b, proc in enumerate(blocks):
        proc.scale = [s[b] if isinstance(s, list) else s for s in scales]
    return ref, [e[:, None] for e in embeds]


def our_prompt(adapter, embeds: torch.Tensor, **kwargs) -> AdapterPrompt:
    cond = adapter.project(embeds)
    uncond = adapter.project(torch.zeros(1, embeds.shape[1]))
    return AdapterPrompt([Reference(cond=cond, uncond=uncond)], **kwargs)


def embeds_for(seed: int, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, df.CLIP_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tokens,joint,variant", [(4, df.FLUX_JOINT, "flux"), (16, 4096, "flux-v2")])
def test_transformer_equals_diffusers(tokens: int, joint: int, variant: str) -> None:
    """v1 (4 tokens) and v2 (16 tokens; diffusers recognises v2 only by 16 × 4096 projection rows, hence the
    4096-wide tokens here) on identical weights: equal outputs, token count read from the file."""
    model = df.flux_transformer(joint=joint)
    state = df.xlabs_state(tokens=tokens, cross=joint)
    adapter = dit_adapter_from_state_dict(state, model, name="ip_adapter.safetensors")
    assert (adapter.config.variant, adapter.config.tokens) == (variant, tokens)
    x, embeds = inputs(joint), embeds_for(0)
    ref, ref_embeds = oracle(model, [state], [embeds], [0.8])
    expected = run(ref, x, joint_attention_kwargs={"ip_adapter_image_embeds": ref_embeds})
    base = run(model, x)
    attachment = attach_dit(model, adapter)
    attachment.set_prompts({"0": our_prompt(adapter, embeds, scale=0.8)}, rows=BATCH)
    ours = run(model, x)
    assert (expected - base).abs().max() > 1e-2  # the adapter acts
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


def test_two_adapters_and_block_weights_equal_diffusers() -> None:
    """Two adapters at once, the second with per-block weights: diffusers' per-adapter, per-block scale lists."""
    model = df.flux_transformer()
    states = [df.xlabs_state(seed=1), df.xlabs_state(seed=2)]
    adapters = {str(i): dit_adapter_from_state_dict(s, model) for i, s in enumerate(states)}
    embeds = [embeds_for(0), embeds_for(1)]
    block_weights = {"transformer_blocks.0.attn": 0.0, "transformer_blocks.1.attn": 1.5}
    ref, ref_embeds = oracle(model, states, embeds, [0.6, [0.0, 0.5 * 1.5]])
    x = inputs()
    expected = run(ref, x, joint_attention_kwargs={"ip_adapter_image_embeds": ref_embeds})
    attachment = attach_dit(model, adapters)
    attachment.set_prompts({"0": our_prompt(adapters["0"], embeds[0], scale=0.6),
                            "1": our_prompt(adapters["1"], embeds[1], scale=0.5, layer_weights=block_weights)},
                           rows=BATCH)
    torch.testing.assert_close(run(model, x), expected, atol=TOL, rtol=0)


def test_scale_zero_and_detach_are_bitwise_the_base() -> None:
    model = df.flux_transformer()
    originals = dict(model.attn_processors)
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    x = inputs()
    base = run(model, x)
    attachment = attach_dit(model, adapter)
    attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0), scale=0.0)}, rows=BATCH)
    assert torch.equal(run(model, x), base)
    attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0))}, rows=BATCH)
    assert not torch.equal(run(model, x), base)
    attachment.detach()
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(run(model, x), base)


def test_step_window_and_schedule_follow_the_closed_form() -> None:
    """Inside [start, end) the output is the adapter's at the schedule's weight, outside it is bitwise the base;
    the progress is the call's position in the scheduler's timesteps (FLUX passes t / 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    embeds = embeds_for(0)
    attachment = attach_dit(model, adapter, scheduler=scheduler)
    outputs = {}
    for weight in (0.0, 0.5, 1.0):
        attachment.set_prompts({"0": our_prompt(adapter, embeds, scale=weight)}, rows=BATCH)
        outputs[weight] = [run(model, {**inputs(), "timestep": torch.full((BATCH,), float(t) / 1000)})
                           for t in scheduler.timesteps]
    attachment.set_prompts({"0": our_prompt(adapter, embeds, start=0.25, end=0.75,
                                            schedule=lambda p: 1.0 if p < 0.5 else 0.5)}, rows=BATCH)
    windowed = [run(model, {**inputs(), "timestep": torch.full((BATCH,), float(t) / 1000)}) for t in scheduler.timesteps]
    expected = [outputs[0.0][0], outputs[1.0][1], outputs[0.5][2], outputs[0.0][3]]  # progress 0, .25, .5, .75
    assert torch.equal(windowed[0], expected[0]) and torch.equal(windowed[3], expected[3])
    for got, want in zip(windowed[1:3], expected[1:3]):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_mask_weights_the_image_branch_per_token() -> None:
    """The block's image-branch output with a mask is the unmasked one times the mask on the (H, W) token grid, which
    the hook reads from FLUX's position ids; an all-ones mask changes nothing."""
    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    attachment = attach_dit(model, adapter)
    cond = adapter.project(embeds_for(0))
    mask = torch.zeros(H, W)
    mask[:, : W // 2] = 1.0
    prompts = [{"0": AdapterPrompt([Reference(cond=cond, mask=m)])} for m in (None, torch.ones(H, W), mask)]
    (plain, _), (ones, _), (masked, _) = image_branch(model, attachment, prompts, inputs())
    torch.testing.assert_close(ones, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(masked, plain * mask.flatten()[None, :, None], atol=1e-6, rtol=0)


def test_own_format_round_trip(tmp_path) -> None:
    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(tokens=16), model)
    path = save_adapter(adapter, tmp_path / "own.safetensors")
    again = load_dit_adapter(path, model)
    assert again.config == adapter.config
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), again.state_dict().values()))


def test_wrong_files_are_one_sentence(tmp_path) -> None:
    model = df.flux_transformer()
    with pytest.raises(IPAdapterError, match="has weights for 3 blocks but this transformer has 2"):
        dit_adapter_from_state_dict(df.xlabs_state(blocks=3), model)
    with pytest.raises(IPAdapterError, match="32 wide|another model size"):
        dit_adapter_from_state_dict(df.xlabs_state(width=64), model)
    unet_file = factories.published(factories.sd15_unet(), "base", factories.SD15_CROSS)
    with pytest.raises(IPAdapterError, match=r"for a UNet .* but this base is a FLUX transformer"):
        dit_adapter_from_state_dict(unet_file, model)
    from ipadapter.checkpoint import adapter_from_state_dict

    for metadata in (None, {"format": "pt"}):  # the published safetensors carry {"format": "pt"}
        with pytest.raises(IPAdapterError, match="is an IP-Adapter for a FLUX transformer, not for this UNet"):
            adapter_from_state_dict(df.xlabs_state(), factories.sd15_unet(), metadata=metadata)
    assert dit_adapter_from_state_dict(df.xlabs_state(), model, metadata={"format": "pt"}).config.variant == "flux"


def image_branch(model, attachment, prompts: list[dict], x: dict, block: int = 1) -> list[tuple]:
    """Per prompt set: (the block's image-branch output (B, L, width), the attention module's hidden_states input)."""
    attn = model.transformer_blocks[block].attn
    seen = []
    handle = attn.register_forward_hook(lambda m, a, kw, out: seen.append((out[2], kw["hidden_states"])),
                                        with_kwargs=True)
    for prompts_now in prompts:
        attachment.set_prompts(prompts_now, rows=BATCH)
        run(model, x)
    handle.remove()
    return seen


def embeds_scaled(k: torch.Tensor, v: torch.Tensor, w: float, mode: str, width: int) -> tuple:
    """ComfyUI's embeds scaling, written out from its definition: (K', V', factor on the output). "v": the output
    times w; "kv": K' and V' times w; "kv_penalty": both times w·width/1280; "k_mean_v": K' times that, and only V''s
    mean over the tokens."""
    penalty = w * width / 1280
    if mode == "v":
        return k, v, w
    if mode == "kv":
        return k * w, v * w, 1.0
    if mode == "kv_penalty":
        return k * penalty, v * penalty, 1.0
    mean = v.mean(dim=-2, keepdim=True)
    return k * penalty, v - mean + mean * penalty, 1.0


def closed_form(attn, weights, hidden: torch.Tensor, refs: list[tuple[torch.Tensor, float]], w: float,
                mode: str = "v") -> torch.Tensor:
    """The published FLUX image branch: w · softmax(Q K'ᵀ/√d) V' with Q the image stream's query after QK-norm (no
    rotary), K'/V' the biased projections of every reference's tokens concatenated, each V' times its weight."""
    heads = attn.heads
    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (heads, -1))).transpose(1, 2)
    layout = lambda t: t.expand(hidden.shape[0], -1, -1).unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    k = torch.cat([layout(weights.to_k_ip(t)) for t, _ in refs], dim=2)
    v = torch.cat([layout(weights.to_v_ip(t)) * f for t, f in refs], dim=2)
    k, v, factor = embeds_scaled(k, v, w, mode, attn.to_q.out_features)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return factor * o.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("mode", ["kv", "kv_penalty", "k_mean_v"])
def test_embeds_scaling_modes_follow_their_definitions(mode: str) -> None:
    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    attachment = attach_dit(model, adapter)
    a = adapter.project(embeds_for(0, 1))
    (got, hidden), = image_branch(model, attachment, [{"0": AdapterPrompt([Reference(cond=a)], scale=0.7,
                                                                           scaling=mode)}], inputs())
    attn, weights = model.transformer_blocks[1].attn, adapter.layer("transformer_blocks.1.attn")
    with torch.no_grad():
        torch.testing.assert_close(got, closed_form(attn, weights, hidden, [(a, 1.0)], 0.7, mode), atol=1e-5, rtol=0)


def test_several_weighted_references_are_one_attention_over_their_tokens() -> None:
    """Unmasked references of one adapter are attended together: their K'/V' concatenated, each V' times the
    reference's weight; a reference whose own block weight is 0 leaves that block's softmax. With QKV fused (diffusers'
    `fuse_qkv_projections`) the query is the fused projection's, which the block itself runs: the branch is the same
    even when the unfused `to_q` left beside it no longer agrees."""
    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    attachment = attach_dit(model, adapter)
    a, b = adapter.project(embeds_for(0, 1)), adapter.project(embeds_for(1, 1))
    both = AdapterPrompt([Reference(cond=a), Reference(cond=b, weight=2.0)], scale=0.8)
    only_block_0 = {"transformer_blocks.0.attn": 1.0, "transformer_blocks.1.attn": 0.0}
    b_elsewhere = AdapterPrompt([Reference(cond=a), Reference(cond=b, weight=2.0, layer_weights=only_block_0)],
                                scale=0.8)
    x = inputs()
    (got, hidden), (without_b, _) = image_branch(model, attachment, [{"0": both}, {"0": b_elsewhere}], x)
    attn, weights = model.transformer_blocks[1].attn, adapter.layer("transformer_blocks.1.attn")
    with torch.no_grad():
        expected = closed_form(attn, weights, hidden, [(a, 1.0), (b, 2.0)], 0.8)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(without_b, closed_form(attn, weights, hidden, [(a, 1.0)], 0.8), atol=1e-5, rtol=0)
    model.fuse_qkv_projections()
    with torch.no_grad():
        attn.to_q.weight.zero_()
    (fused, _), = image_branch(model, attachment, [{"0": both}], x)
    torch.testing.assert_close(fused, got, atol=1e-5, rtol=0)


def test_masks_live_on_the_grid_of_the_position_ids() -> None:
    """Each masked reference is its own attention, weighted by its mask resized to the image-token grid that FLUX's
    position ids give (6 × 4 here; a square mask's aspect alone would suggest 4 × 6). Left / right halves of a
    square mask are exactly the grid's two left / right columns."""
    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    attachment = attach_dit(model, adapter)
    a, b = adapter.project(embeds_for(0, 1)), adapter.project(embeds_for(1, 1))
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    right = 1.0 - left
    x = inputs(h=6, w=4)
    prompts = [{"0": AdapterPrompt([Reference(cond=a)])}, {"0": AdapterPrompt([Reference(cond=b)])},
               {"0": AdapterPrompt([Reference(cond=a, mask=left), Reference(cond=b, mask=right)])}]
    (plain_a, _), (plain_b, _), (masked, _) = image_branch(model, attachment, prompts, x)
    on_grid = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(6)[None, :, None]
    torch.testing.assert_close(masked, plain_a * on_grid + plain_b * (1 - on_grid), atol=1e-5, rtol=0)


def test_positional_call_reads_timestep_and_position_ids() -> None:
    """The transformer called with positional arguments acts as with keywords: the timestep places the step window,
    the position ids give the mask's grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    attachment = attach_dit(model, adapter, scheduler=scheduler)
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1.0
    prompt = our_prompt(adapter, embeds_for(0), start=0.0, end=0.5)
    prompt.references[0].mask = mask
    order = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
    for t, acts in zip(scheduler.timesteps, (True, False)):
        x = {**inputs(h=6, w=4), "timestep": torch.full((BATCH,), float(t) / 1000)}
        attachment.set_prompts({"0": prompt}, rows=BATCH)
        keywords = run(model, x)
        for n in (3, 4, 5, 6):  # the first n arguments by position, the rest by keyword
            attachment.set_prompts({"0": prompt}, rows=BATCH)
            with torch.no_grad():
                mixed = model(*(x[k] for k in order[:n]), **{k: x[k] for k in order[n:]}).sample
            torch.testing.assert_close(mixed, keywords, atol=1e-6, rtol=0)
        attachment.set_prompts({"0": prompt}, rows=BATCH)
        batched_ids = run(model, {**x, "img_ids": x["img_ids"][None], "txt_ids": x["txt_ids"][None]})  # the old form
        torch.testing.assert_close(batched_ids, keywords, atol=1e-6, rtol=0)
        attachment.set_prompts({}, rows=BATCH)
        assert torch.equal(run(model, x), keywords) != acts


def test_negative_call_without_unconditional_tokens_uses_zeros() -> None:
    """FLUX true CFG calls the transformer twice at a timestep; the second call is the negative prompt's and takes
    the references' unconditional tokens, zero tokens where a reference has none."""
    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    attachment = attach_dit(model, adapter)
    cond = adapter.project(embeds_for(0, 1))
    x = inputs()
    attachment.set_prompts({"0": AdapterPrompt([Reference(cond=cond)])}, rows=BATCH)
    positive, negative = run(model, x), run(model, x)
    attachment.set_prompts({"0": AdapterPrompt([Reference(cond=torch.zeros_like(cond))])}, rows=BATCH)
    torch.testing.assert_close(negative, run(model, x), atol=0, rtol=0)
    assert not torch.equal(positive, negative)


def test_kv_are_projected_once_per_generation() -> None:
    """With `cache_kv`, K'/V' of a block are made at the generation's first call and reused at its next calls (the
    negative call of true CFG has its own); a new generation, or `clear_cache`, makes them again. By default they are
    made at every call."""
    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    attachment = attach_dit(model, adapter)
    attachment.runtime.cache_kv = True
    calls = []
    handle = adapter.layer("transformer_blocks.0.attn").to_k_ip.register_forward_hook(lambda *a: calls.append(1))
    for t in (0.9, 0.6, 0.3):
        if t == 0.9:
            attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0))}, rows=BATCH)
        run(model, {**inputs(), "timestep": torch.full((BATCH,), t)})
    assert len(calls) == 1
    attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0, 1))}, rows=BATCH)
    x = inputs()
    run(model, x), run(model, x)  # a step and its negative call
    assert len(calls) == 3
    attachment.clear_cache()
    run(model, {**x, "timestep": torch.full((BATCH,), 0.2)})
    assert len(calls) == 4
    handle.remove()
    single = {k: v[:1] if k.endswith("states") or k.startswith(("pooled", "timestep")) else v for k, v in x.items()}
    in_the_same_generation = run(model, single)  # another batch size: its own K'/V'
    attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0, 1))}, rows=1)
    torch.testing.assert_close(in_the_same_generation, run(model, single), atol=1e-6, rtol=0)
    attachment.runtime.cache_kv = False
    attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0, 1))}, rows=BATCH)
    handle = adapter.layer("transformer_blocks.0.attn").to_k_ip.register_forward_hook(lambda *a: calls.append(1))
    for t in (0.9, 0.6):  # two steps, without autograd as pipelines run
        run(model, {**x, "timestep": torch.full((BATCH,), t)})
    handle.remove()
    assert len(calls) == 6


def test_bfloat16_model_gets_a_bfloat16_adapter_and_equals_diffusers() -> None:
    """A bfloat16 transformer (how FLUX is run) gets the adapter in its dtype, and the output stays within bfloat16
    rounding of diffusers' FLUX IP-Adapter in bfloat16 on the same weights."""
    model = df.flux_transformer().to(torch.bfloat16)
    state = df.xlabs_state()
    adapter = dit_adapter_from_state_dict(state, model)
    assert {t.dtype for t in adapter.state_dict().values()} == {torch.bfloat16}
    x = {k: v if k.endswith("_ids") else v.to(torch.bfloat16) for k, v in inputs().items()}
    embeds = embeds_for(0)
    ref, ref_embeds = oracle(model, [state], [embeds.to(torch.bfloat16)], [0.8])
    ref.to(torch.bfloat16)  # diffusers builds the projection in float32
    expected = run(ref, x, joint_attention_kwargs={"ip_adapter_image_embeds": ref_embeds}).float()
    base = run(model, x).float()
    attachment = attach_dit(model, adapter)
    attachment.set_prompts({"0": our_prompt(adapter, embeds, scale=0.8)}, rows=BATCH)
    ours = run(model, x).float()
    assert (expected - base).abs().max() > 0.5
    torch.testing.assert_close(ours, expected, atol=0.02, rtol=0)  # bfloat16 steps near 1: 0.008
    attachment.detach()
    exact = dit_adapter_from_state_dict(state, model, dtype=torch.float32)  # an adapter kept in float32 works too,
    attachment = attach_dit(model, exact)  # also on tokens in another dtype (projected in bfloat16 here)
    attachment.set_prompts({"0": our_prompt(adapter, embeds, scale=0.8)}, rows=BATCH)
    torch.testing.assert_close(run(model, x).float(), expected, atol=0.03, rtol=0)


def test_a_masks_weights_are_made_in_the_models_dtype() -> None:
    """On a bfloat16 transformer a mask's weights on the token grid are bfloat16 too: float32 weights would carry the
    image branch into float32 (twice its memory and time on a GPU)."""
    model = df.flux_transformer().to(torch.bfloat16)
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    attachment = attach_dit(model, adapter)
    mask = torch.zeros(H, W)
    mask[:, : W // 2] = 1.0
    cond = adapter.project(embeds_for(0).to(torch.bfloat16))
    attachment.set_prompts({"0": AdapterPrompt([Reference(cond=cond, mask=mask)])}, rows=BATCH)
    run(model, {k: v if k.endswith("_ids") else v.to(torch.bfloat16) for k, v in inputs().items()})
    maps = [m for p in attachment._processors for key, m in p.state.cache.items() if key[0] == "mask"]
    attachment.detach()
    assert maps and {m.dtype for m in maps} == {torch.bfloat16}


def test_invalid_calls_fail_as_diffusers_fails() -> None:
    """A call FLUX itself refuses (no position ids, no timestep) gets diffusers' own error with an adapter attached:
    the pre-call hook does not fail first."""
    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    x = inputs()
    invalid = [{k: v for k, v in x.items() if k != "img_ids"}, {**x, "timestep": None}]
    plain = []
    for call in invalid:
        with pytest.raises(Exception) as error:
            run(model, call)
        plain.append(error.value)
    attachment = attach_dit(model, adapter)
    for call, expected in zip(invalid, plain):
        attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0))}, rows=BATCH)
        with pytest.raises(type(expected)) as error:
            run(model, call)
        assert str(error.value) == str(expected)


# ---- through the pipeline ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    folder = df.save_flux_base(root)
    from safetensors.torch import save_file

    save_file(df.xlabs_state(), str(root / "ip_adapter.safetensors"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "ref.png")
    return root, folder


@pytest.mark.parametrize("true_cfg", [1.0, 3.0])
def test_pipeline_images_equal_diffusers(flux_base, true_cfg: float) -> None:
    """The final image of FluxPipeline with our adapter equals diffusers' FLUX IP-Adapter on the same weights and
    CLIP embedding; with true CFG (v1's documented setting) the negative call gets the unconditional tokens, which
    diffusers computes from our zero embedding."""
    import ipadapter
    from diffusers import FluxPipeline

    root, folder = flux_base
    pipe = FluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    reference = Image.open(root / "ref.png")
    prompter = ipadapter.load(pipe, str(root / "ip_adapter.safetensors"))
    embeds = prompter.encoder.encode([reference], "global")
    negative = "blurry" if true_cfg > 1 else None
    common = dict(prompt="a cat", true_cfg_scale=true_cfg, max_sequence_length=8, output_type="np")
    ours = prompter.generate(reference, scale=0.7, seed=1, steps=2, guidance=3.5, width=16, height=16,
                             negative_prompt=negative or "", **common)
    prompter.detach()
    common.update(num_inference_steps=2, guidance_scale=3.5, width=16, height=16, negative_prompt=negative)
    plain = pipe(**common, generator=torch.Generator().manual_seed(1)).images
    ref = copy.deepcopy(pipe)
    ref.transformer._load_ip_adapter_weights([df.xlabs_as_diffusers(load_file(str(root / "ip_adapter.safetensors")))],
                                             low_cpu_mem_usage=False)
    ref.set_ip_adapter_scale(0.7)
    expected = ref(**common, ip_adapter_image_embeds=[embeds[None]],
                   negative_ip_adapter_image_embeds=[torch.zeros_like(embeds)[None]],
                   generator=torch.Generator().manual_seed(1)).images
    assert np.abs(expected - plain).max() > 1e-3
    np.testing.assert_allclose(np.asarray(ours[0]), expected[0], atol=TOL, rtol=0)


def test_the_flux_pipeline_says_which_step_each_transformer_call_is(flux_base) -> None:
    """What the GPU path relies on (tests/test_device_reads.py), checked against diffusers' own FluxPipeline: at
    every transformer call, true CFG's negative call included, `current_timestep` is a view into the scheduler's
    timesteps at the call's step. Through the prompter the transformer's own timestep (t / 1000, a new tensor: a
    wait for the GPU) is then never read. (diffusers' other FLUX pipelines, img2img and inpainting, do not set
    `current_timestep`: there it is read at each call, as before.)"""
    import ipadapter
    from diffusers import FluxPipeline

    from ipadapter.attach import view_index

    root, folder = flux_base
    pipe = FluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    found = []

    def record(module, args, kwargs) -> None:  # noqa: ANN001
        t, timesteps = pipe.current_timestep, pipe.scheduler.timesteps
        found.append((view_index(t, timesteps), int((timesteps == t).nonzero()[0, 0])))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    pipe(prompt="a cat", negative_prompt="blurry", true_cfg_scale=3.0, max_sequence_length=8, num_inference_steps=4,
         width=16, height=16, output_type="latent")
    hook.remove()
    assert all(view == position for view, position in found), found
    assert found[::2] == found[1::2] == [(i, i) for i in range(4)], "a step's two calls, at the steps in order"

    prompter = ipadapter.load(pipe, str(root / "ip_adapter.safetensors"))
    reads = []
    read = prompter.attachment._timestep_value
    prompter.attachment._timestep_value = lambda t: reads.append(t) or read(t)
    prompter.generate(Image.open(root / "ref.png"), seed=1, steps=3, guidance=3.5, width=16, height=16,
                      prompt="a cat", negative_prompt="blurry", true_cfg_scale=3.0, max_sequence_length=8)
    prompter.detach()
    assert reads == []


def test_flux_img2img_calls_are_placed_by_the_schedulers_own_position(flux_base) -> None:
    """FluxImg2ImgPipeline sets no `current_timestep` (nor do FLUX's inpainting, ControlNet and Fill pipelines). The
    scheduler's position, a Python int, places each call instead: `begin_index` (where img2img starts the schedule)
    before the first step, `step_index` after. At every call, true CFG's negative one included, it gives the
    timestep diffusers passes (as t / 1000), and the transformer's own timestep is never read."""
    import ipadapter
    from diffusers import FluxImg2ImgPipeline

    root, folder = flux_base
    pipe = FluxImg2ImgPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert not hasattr(pipe, "current_timestep")
    prompter = ipadapter.load(pipe, str(root / "ip_adapter.safetensors"))
    attachment = prompter.attachment
    found = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: found.append((attachment._loop_timestep(), 1000 * float(kwargs["timestep"][0]))),
        with_kwargs=True)
    reads = []
    read = attachment._timestep_value
    attachment._timestep_value = lambda t: reads.append(t) or read(t)
    reference = Image.open(root / "ref.png")
    prompter.generate(reference, image=reference.resize((16, 16)), strength=0.6, seed=1, steps=5, guidance=3.5,
                      width=16, height=16, prompt="a cat", negative_prompt="blurry", true_cfg_scale=3.0,
                      max_sequence_length=8)
    hook.remove()
    prompter.detach()
    assert len(found) == 2 * 3, "strength 0.6 of 5 steps: the last 3, two calls each"
    assert all(ours is not None and ours == pytest.approx(theirs, rel=1e-6) for ours, theirs in found), found
    assert found[0][1] == pytest.approx(float(pipe.scheduler.timesteps[2]), rel=1e-6), "img2img starts at step 2"
    assert reads == []


def test_a_manifest_takes_true_cfg_for_every_job_as_generate_does(flux_base, tmp_path) -> None:
    """`--true-cfg` with `--manifest` applies to every job: each job's image is the one-shot command's with the same
    seed and settings (which equals diffusers', test above), and true CFG changes it. A job's own width is checked
    against the FLUX base's sizes: multiples of the VAE's downscale times the 2 × 2 packing (here 4, where a UNet base
    takes multiples of 8); its height is the flag's."""
    from ipadapter.cli.main import main

    root, folder = flux_base
    jobs = [{"id": f"j{seed}", "image": str(root / "ref.png"), "prompt": "a cat", "seed": seed} for seed in (1, 2)]
    jobs.append({"id": "narrow", "image": str(root / "ref.png"), "width": 12})
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    common = ["generate", "--base", str(folder), "--adapter", str(root / "ip_adapter.safetensors"), "--steps", "2",
              "--width", "16", "--height", "16"]
    for cfg in ("1", "4"):
        assert main([*common, "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / cfg),
                     "--true-cfg", cfg]) == 0
    for seed in (1, 2):
        one = tmp_path / f"one-{seed}.png"
        assert main([*common, "--image", str(root / "ref.png"), "--prompt", "a cat", "--seed", str(seed),
                     "--true-cfg", "4", "--out", str(one)]) == 0
        batch, plain = (np.asarray(Image.open(tmp_path / cfg / f"j{seed}-0.png")) for cfg in ("4", "1"))
        assert np.array_equal(batch, np.asarray(Image.open(one)))
        assert not np.array_equal(batch, plain)
    with Image.open(tmp_path / "4" / "narrow-0.png") as narrow:
        assert narrow.size == (12, 16)


def test_cli_generate_on_a_flux_pipeline(flux_base, tmp_path, capsys) -> None:
    from ipadapter.cli.main import main

    root, folder = flux_base
    out = tmp_path / "x.png"
    argv = ["generate", "--base", str(folder), "--adapter", str(root / "ip_adapter.safetensors"), "--image",
            str(root / "ref.png"), "--out", str(out), "--steps", "2", "--width", "16", "--height", "16"]
    assert main(argv) == 0
    assert Image.open(out).size == (16, 16)
    assert main([*argv, "--true-cfg", "4", "--out", str(tmp_path / "cfg.png")]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "cfg.png")))
    capsys.readouterr()
    unet_file = tmp_path / "sd15.bin"
    torch.save(factories.published(factories.sd15_unet(), "base", factories.SD15_CROSS), unet_file)
    assert main([*argv[:3], "--adapter", str(unet_file), *argv[5:]]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "for a UNet" in err[0] and "FLUX" in err[0]


def test_a_new_generation_sets_no_module_attribute_on_the_block_processors(monkeypatch) -> None:
    """Each block renews its plan at a generation's first call: in a plain object, not through
    `nn.Module.__setattr__` (microseconds each, paid by all 57 blocks of FLUX at every generation)."""
    from ipadapter.dit.plan import BlockProcessor

    model = df.flux_transformer()
    adapter = dit_adapter_from_state_dict(df.xlabs_state(), model)
    attachment = attach_dit(model, adapter)
    x = inputs()
    attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0))}, rows=BATCH)
    run(model, x)
    set_on: list[str] = []
    real = torch.nn.Module.__setattr__
    monkeypatch.setattr(torch.nn.Module, "__setattr__",
                        lambda self, name, value: (isinstance(self, BlockProcessor) and set_on.append(name))
                        or real(self, name, value))
    attachment.set_prompts({"0": our_prompt(adapter, embeds_for(0, 1))}, rows=BATCH)
    run(model, x)
    monkeypatch.undo()
    assert set_on == []
    assert any(p.state.plan for p in attachment._processors), "the blocks planned (else this test shows nothing)"
