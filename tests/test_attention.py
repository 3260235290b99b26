"""The processor's math against independent truth: merged LoRA weights, diffusers' masks, CFG row layout."""

from __future__ import annotations

import copy

import pytest
import torch

from ipadapter import AdapterPrompt, Reference, attach, load_adapter
from tests import factories
from tests.test_parity_diffusers import diffusers_unet, features, our_inputs, run_unet


def _merge_lora(unet, state: dict, scale: float) -> None:
    """Closed form: W' = W + s · up @ down on every attention's q/k/v/out (the LoRA oracle)."""
    from ipadapter.layers import attention_layers

    for layer in attention_layers(unet):
        attn = unet.get_submodule(layer.name)
        for proj, module in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            down = state[f"{layer.index}.{proj}_lora.down.weight"]
            up = state[f"{layer.index}.{proj}_lora.up.weight"]
            module.weight.data += scale * up @ down


def test_faceid_lora_equals_merged_weights(sd15_unet, tmp_path) -> None:
    unet = factories.sd15_unet()
    state = factories.published(unet, "faceid", factories.SD15_CROSS, lora_rank=4)
    torch.save(state, tmp_path / "faceid.bin")
    adapter = load_adapter(tmp_path / "faceid.bin", unet)
    f = features("faceid", batch=2)
    merged = copy.deepcopy(unet)
    _merge_lora(merged, state["ip_adapter"], 0.6)
    no_lora = {"image_proj": state["image_proj"],
               "ip_adapter": {k: v for k, v in state["ip_adapter"].items() if "lora" not in k}}
    ref, embeds = diffusers_unet(merged, [no_lora], ["faceid"], [f])
    expected = run_unet(ref, "sd15", 2, added_cond_kwargs={"image_embeds": embeds})

    att = attach(unet, adapter)
    with torch.no_grad():
        tokens = adapter.project(*our_inputs("faceid", f, 0))
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], lora_scale=0.6)})
    got = run_unet(unet, "sd15", 2)
    att.detach()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_masks_equal_diffusers(tmp_path) -> None:
    """Two masked references of one adapter, as diffusers' `ip_adapter_masks` applies them."""
    unet = factories.sd15_unet()
    state = factories.published(unet, "base", factories.SD15_CROSS)
    f = features("base", batch=2, images=2)
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    ref, embeds = diffusers_unet(unet, [state], ["base"], [f])
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [[0.8, 0.5]]
    expected = run_unet(ref, "sd15", 2, added_cond_kwargs={"image_embeds": embeds},
                        cross_attention_kwargs={"ip_adapter_masks": [masks[None]]})

    torch.save(state, tmp_path / "a.bin")
    adapter = load_adapter(tmp_path / "a.bin", unet)
    att = attach(unet, adapter)
    with torch.no_grad():
        refs = [Reference(cond=adapter.project(f["global"][:, i]), mask=masks[i], weight=w)
                for i, w in enumerate((0.8, 0.5))]
    att.set_prompts({"0": AdapterPrompt(refs)})
    got = run_unet(unet, "sd15", 2)
    att.detach()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

def _base_adapter(unet):
    """A new random base adapter (linear head, 8-wide features, 4 tokens) for the tiny SD 1.5 UNet."""
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.projection import ProjectionConfig

    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SD15_CROSS, tokens=4))
    return IPAdapter.for_unet(unet, config)



def test_cfg_rows_get_uncond_then_cond_tokens(sd15_unet) -> None:
    """Under CFG the first half of the batch sees the unconditional tokens: equal to running the halves apart."""
    adapter = _base_adapter(sd15_unet)
    cond, uncond = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    att = attach(sd15_unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=cond, uncond=uncond)])}, rows=1)
    both = run_unet(sd15_unet, "sd15", 2)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=uncond)])}, rows=2)
    first = run_unet(sd15_unet, "sd15", 2)[:1]
    att.set_prompts({"0": AdapterPrompt([Reference(cond=cond)])}, rows=2)
    second = run_unet(sd15_unet, "sd15", 2)[1:]
    att.detach()
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_kv_cache_gives_same_output_and_is_invalidated(sd15_unet) -> None:
    adapter = _base_adapter(sd15_unet)
    att = attach(sd15_unet, adapter)
    a, b = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=a)])})
    first, cached = run_unet(sd15_unet, "sd15", 2), run_unet(sd15_unet, "sd15", 2)
    att.runtime.cache_kv = False
    uncached = run_unet(sd15_unet, "sd15", 2)
    att.runtime.cache_kv = True
    att.set_prompts({"0": AdapterPrompt([Reference(cond=b)])})
    other = run_unet(sd15_unet, "sd15", 2)
    att.detach()
    assert torch.equal(first, cached)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    assert (other - first).abs().max() > 1e-4


def test_clear_cache_inside_a_generation_leaves_kept_kv_working(sd15_unet) -> None:
    """`clear_cache` between two UNet calls of one generation with `cache_kv` on: the next call makes its K'/V' and
    terms again and gives the same output (nothing is left half-emptied)."""
    att = attach(sd15_unet, _base_adapter(sd15_unet))
    att.runtime.cache_kv = True
    att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(1, 4, 32))])})
    first = run_unet(sd15_unet, "sd15", 2)
    att.clear_cache()
    again = run_unet(sd15_unet, "sd15", 2)
    att.detach()
    assert torch.equal(first, again)


def test_cache_kv_makes_k_and_v_anew_while_autograd_records(sd15_unet) -> None:
    """`cache_kv` on with autograd recording (guidance by gradients, a training step): each call makes its own K'/V',
    so two forward and backward passes in one generation give the same gradients (reusing the first call's K'/V'
    would tie the second backward to the first graph, already freed)."""
    adapter = _base_adapter(sd15_unet)
    att = attach(sd15_unet, adapter)
    att.runtime.cache_kv = True
    att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(1, 4, 32))])})
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 6, factories.SD15_CROSS)
    grads = []
    try:
        for _ in range(2):
            adapter.zero_grad()
            sd15_unet(sample, 500, encoder_hidden_states=text).sample.square().mean().backward()
            grads.append([p.grad.clone() for p in adapter.parameters() if p.grad is not None])
    finally:
        att.detach()
        adapter.zero_grad()
        sd15_unet.zero_grad()
    assert grads[0] and all(torch.equal(a, b) for a, b in zip(*grads))


def _concat_adapter(unet):
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.layers import attention_layers
    from ipadapter.projection.detect import ProjectionConfig

    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=24, cross_dim=factories.SD15_CROSS, tokens=4),
                           attention="concat")
    return IPAdapter(config, attention_layers(unet))


def test_concat_mode_equals_plain_unet_on_concatenated_context() -> None:
    """The "simple adapter" ablation is, by definition, the frozen UNet reading [text tokens; image tokens]."""
    unet = factories.sd15_unet()
    adapter = _concat_adapter(unet)
    assert not any(p for n, p in adapter.named_parameters() if n.startswith("layers."))  # only the projection trains
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 4, factories.SD15_CROSS, generator=g), torch.randn(1, 4, factories.SD15_CROSS, generator=g)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 6, factories.SD15_CROSS, generator=g)
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=torch.cat([text, torch.cat([uncond, cond])], dim=1)).sample
        plain = unet(sample, 500, encoder_hidden_states=text).sample
    att = attach(unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=cond, uncond=uncond)])}, cfg=True)
    with torch.no_grad():
        got = unet(sample, 500, encoder_hidden_states=text).sample
        att.set_prompts({"0": AdapterPrompt([Reference(cond=cond, uncond=uncond)], scale=0.0)}, cfg=True)
        off = unet(sample, 500, encoder_hidden_states=text).sample
    att.detach()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(off, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_concat_weight_is_a_log_bias_on_image_columns(dtype: torch.dtype) -> None:
    """Closed form for one attention layer: weight w multiplies the image tokens' unnormalised attention by w. A bf16
    UNet gives it to bf16's precision, in bf16, from the fp32 tokens an fp32 projection makes."""
    unet = factories.sd15_unet()
    name = next(n for n, p in unet.attn_processors.items() if "attn2" in n).rsplit(".processor", 1)[0]
    attn = unet.get_submodule(name)
    adapter = _concat_adapter(unet)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 16, attn.to_q.in_features, generator=g)
    text = torch.randn(1, 6, factories.SD15_CROSS, generator=g)
    tokens = torch.randn(1, 4, factories.SD15_CROSS, generator=g)
    w = 0.3
    with torch.no_grad():
        q = attn.to_q(hidden).view(1, 16, attn.heads, -1).transpose(1, 2)
        ctx = torch.cat([text, tokens], dim=1)
        k = attn.to_k(ctx).view(1, 10, attn.heads, -1).transpose(1, 2)
        v = attn.to_v(ctx).view(1, 10, attn.heads, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).exp()
        scores[..., 6:] *= w
        probs = scores / scores.sum(-1, keepdim=True)
        expected = attn.to_out[0]((probs @ v).transpose(1, 2).reshape(1, 16, -1))
    unet.to(dtype)
    att = attach(unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=w)})
    with torch.no_grad():
        got = attn(hidden.to(dtype), encoder_hidden_states=text.to(dtype))
    att.detach()
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.03
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


def test_concat_adapter_round_trips_own_format_and_refuses_published(tmp_path) -> None:
    import pytest

    from ipadapter.checkpoint import save_adapter, save_published
    from ipadapter.errors import IPAdapterError

    unet = factories.sd15_unet()
    adapter = _concat_adapter(unet)
    save_adapter(adapter, tmp_path / "simple.safetensors")
    loaded = load_adapter(tmp_path / "simple.safetensors", unet)
    assert loaded.config.attention == "concat"
    for k, v in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(IPAdapterError, match="no published layout"):
        save_published(adapter, unet, tmp_path / "published.safetensors")


def _counting_kv(adapter) -> list[int]:
    calls: list[int] = []
    for _, layer in adapter.named_layers():
        if layer.has_ip:
            layer.to_k_ip.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_kv_carried_to_next_generation_only_while_tokens_and_weights_are_the_same(sd15_unet) -> None:
    adapter = _base_adapter(sd15_unet)
    calls = _counting_kv(adapter)
    att = attach(sd15_unet, adapter)
    att.runtime.cache_kv = True
    a = torch.randn(1, 4, 32)

    def generation(tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        before = len(calls)
        att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)])})
        out = run_unet(sd15_unet, "sd15", 2)
        return out, len(calls) - before

    first, computed = generation(a)
    assert computed == len([1 for _, l in adapter.named_layers() if l.has_ip])  # once per layer, not per call
    again, computed = generation(a.clone())  # equal tokens in another tensor: same K'/V'
    assert computed == 0 and torch.equal(again, first)
    with torch.no_grad():
        for _, layer in adapter.named_layers():
            layer.to_v_ip.weight.mul_(2)  # weights changed in place and said so: cached K'/V' must not be served
    adapter.weights_changed()
    changed, computed = generation(a)
    assert computed > 0 and (changed - first).abs().max() > 1e-4
    adapter.load_state_dict(adapter.state_dict())  # a load counts as a change by itself
    _, computed = generation(a)
    assert computed > 0
    changed, computed = generation(a)
    assert computed == 0 and (changed - first).abs().max() > 1e-4
    other, computed = generation(a + 1)
    assert computed > 0 and (other - changed).abs().max() > 1e-4
    att.runtime.cache_kv = False
    uncached, _ = generation(a)
    att.detach()
    torch.testing.assert_close(changed, uncached, atol=1e-5, rtol=1e-5)


ONE_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def _one_layer(adapters: tuple[str, ...] = ("a",)):
    """One diffusers cross-attention layer (width 64, 4 heads, 32-wide tokens) with our processor and a fresh random
    adapter layer per name; the runtime is the processor's."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from ipadapter.adapter import AdapterLayer
    from ipadapter.attention import IPAttnProcessor
    from ipadapter.layers import AttentionLayer
    from ipadapter.runtime import Runtime

    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    layer = AttentionLayer(ONE_LAYER, 0, True, 64, 32, "down", 0, 0, 0)
    runtime = Runtime()
    weights = {name: AdapterLayer(layer, 32) for name in adapters}
    return attn, runtime, IPAttnProcessor(layer, AttnProcessor2_0(), runtime, weights, heads=attn.heads)


@pytest.mark.parametrize("scaling", ["v", "kv"])
@pytest.mark.parametrize("masks", ["drawn", "all ones"])
def test_masked_references_together_equal_each_alone(masks: str, scaling: str) -> None:
    """Closed form: before `to_out` the image terms add up, so at one layer the output with references {A, B masked;
    C plain} equals out(A) + out(B) + out(C) − 2·out(none); under "v" scaling A and B take the one-call path, each
    alone the SDPA path; under "kv" each is an attention of its own, weighted by its own mask's map. A mask of ones is
    no mask at all (each alone: the plain attention), also when both masks of the one call are."""
    torch.manual_seed(0)
    cross, hw = 32, (6, 5)
    attn, runtime, proc = _one_layer()
    name = ONE_LAYER
    x, text = torch.randn(4, hw[0] * hw[1], 64), torch.randn(4, 7, cross)
    masks = ([torch.rand(12, 10), (torch.rand(12, 10) > 0.5).float()] if masks == "drawn"
             else [torch.ones(12, 10), torch.ones(9, 9)])
    refs = [Reference(cond=torch.randn(1, 3, cross), uncond=torch.randn(1, 3, cross), mask=masks[0], weight=0.7),
            Reference(cond=torch.randn(1, 3, cross), uncond=torch.randn(1, 3, cross), mask=masks[1]),
            Reference(cond=torch.randn(1, 3, cross), weight=1.3)]

    def run(chosen: list[Reference], uncond_layer: bool) -> torch.Tensor:
        uncond_layers = frozenset({name}) if uncond_layer else frozenset()
        runtime.set({"a": AdapterPrompt(chosen, scale=0.8, uncond_layers=uncond_layers, scaling=scaling)}
                    if chosen else {}, cfg=True)
        runtime.latent_hw = hw
        with torch.no_grad():
            return proc(attn, x, text)

    for uncond_layer in (False, True):
        together = run(refs, uncond_layer)
        alone = sum(run([r], uncond_layer) for r in refs) - 2 * run([], uncond_layer)
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        assert (together - run(refs[2:], uncond_layer)).abs().max() > 1e-3  # the masked references do act


def test_two_adapters_with_masked_references_each_keep_their_own_masks() -> None:
    """Closed form: two adapters, each with two masked references on the same token grid, add up at a layer:
    out(a and b) = out(a) + out(b) − out(none). Each adapter's references are weighted by its own masks."""
    torch.manual_seed(1)
    hw = (6, 5)
    attn, runtime, proc = _one_layer(("a", "b"))
    x, text = torch.randn(2, hw[0] * hw[1], 64), torch.randn(2, 7, 32)
    left = torch.zeros(12, 10)
    left[:, :5] = 1
    top = torch.zeros(12, 10)
    top[:6] = 1
    prompts = {name: AdapterPrompt([Reference(cond=torch.randn(1, 3, 32), mask=m) for m in (half, 1 - half)])
               for name, half in (("a", left), ("b", top))}

    def run(names: str) -> torch.Tensor:
        runtime.set({n: prompts[n] for n in names}, cfg=False)
        runtime.latent_hw = hw
        with torch.no_grad():
            return proc(attn, x, text)

    both = run("ab")
    torch.testing.assert_close(both, run("a") + run("b") - run(""), atol=1e-5, rtol=1e-5)


def test_masked_references_together_take_each_query_tokens_own_softmax() -> None:
    """Query tokens whose attention logits lie hundreds apart (one token 300 times the others): each token's softmax
    over a reference's tokens is its own, as torch's `softmax` (the autograd path) computes it, finite everywhere."""
    torch.manual_seed(2)
    hw = (6, 5)
    attn, runtime, proc = _one_layer()
    x, text = torch.randn(2, hw[0] * hw[1], 64), torch.randn(2, 7, 32)
    x[:, 0] *= 300
    left = torch.zeros(12, 10)
    left[:, :5] = 1
    runtime.set({"a": AdapterPrompt([Reference(cond=torch.randn(1, 3, 32), mask=m) for m in (left, 1 - left)])},
                cfg=False)
    runtime.latent_hw = hw
    with torch.no_grad():
        inference = proc(attn, x, text)
    with torch.enable_grad():
        tracked = proc(attn, x, text)
    assert torch.isfinite(inference).all()
    torch.testing.assert_close(inference, tracked.detach(), atol=1e-5, rtol=1e-5)


def test_grid_sizes_are_exactly_the_token_counts_token_grid_finds_by_halving() -> None:
    """The compiled path prepares mask weights for each of `grid_sizes(latent)`, the eager path resizes with
    `token_grid`: a count listed is found on the latent's halvings (rounding up, as the UNet's down-samplings), one
    not listed takes diffusers' estimate from the mask's aspect (`IPAdapterMaskProcessor.downsample`'s formula)."""
    import math

    from ipadapter.token_grids import grid_sizes, token_grid

    def estimate(n: int, mask_hw: tuple[int, int]) -> tuple[int, int]:
        gh = int(math.sqrt(n / (mask_hw[1] / mask_hw[0])))
        gh += int(n % gh != 0)
        return gh, n // gh

    tall = (3, 1)
    for latent in [(512, 512), (300, 97), (6, 5)]:
        sizes = grid_sizes(latent)
        h, w = latent
        halvings = []
        for _ in range(12):
            if (h, w) not in halvings:
                halvings.append((h, w))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        assert set(sizes) <= {gh * gw for gh, gw in halvings} and len(set(sizes)) == len(sizes)
        for gh, gw in halvings:
            expected = (gh, gw) if gh * gw in sizes else estimate(gh * gw, tall)
            assert token_grid(gh * gw, latent, tall) == expected, (latent, gh, gw)
    assert grid_sizes(None) == ()


def test_a_mask_on_a_token_grid_is_none_where_all_ones_else_weights_in_the_layers_dtype() -> None:
    """`on_grid`'s contract: an all-ones mask (any size) is no weighting at all (None); any other becomes (1, 1, L, 1)
    weights in the dtype asked for, the values of `resize_mask` (bicubic, clamped to [0, 1])."""
    from ipadapter.token_grids import on_grid, resize_mask

    cpu = torch.device("cpu")
    assert on_grid(torch.ones(7, 9), 30, (6, 5), torch.bfloat16, cpu) is None
    left = torch.zeros(12, 10)
    left[:, :5] = 1
    weights = on_grid(left, 30, (6, 5), torch.bfloat16, cpu)
    assert weights.dtype == torch.bfloat16 and weights.shape == (1, 1, 30, 1)
    assert torch.equal(weights[0, 0], resize_mask(left, 30, (6, 5)).bfloat16())


def _two_masked_references(tmp_path):
    """A tiny SD 1.5 UNet, a base adapter loaded from its published file, a prompt of two references masked left and
    right, and the list every attn2 call appends its query token count to."""
    unet = factories.sd15_unet()
    state = factories.published(unet, "base", factories.SD15_CROSS)
    torch.save(state, tmp_path / "base.bin")
    adapter = load_adapter(tmp_path / "base.bin", unet)
    f = features("base", batch=2, images=2)
    with torch.no_grad():
        tokens = [adapter.project(f["global"][:, i]) for i in range(2)]
    grids: list[int] = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.register_forward_pre_hook(lambda _, args: grids.append(args[0].shape[1]))
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    prompt = AdapterPrompt([Reference(cond=t, mask=m) for t, m in zip(tokens, (left, 1 - left))])
    return unet, adapter, prompt, grids


def test_each_mask_is_resized_once_per_token_grid_and_generation(monkeypatch, tmp_path) -> None:
    """What is the same at every layer is decided once: a mask on a token grid is made once per grid size and
    generation (diffusers resizes it at every call), and made again for the next generation."""
    import ipadapter.token_grids as token_grids

    unet, adapter, prompt, grids = _two_masked_references(tmp_path)
    resized: list[int] = []
    real = token_grids.resize_mask
    monkeypatch.setattr(token_grids, "resize_mask", lambda m, n, hw: resized.append(n) or real(m, n, hw))
    att = attach(unet, adapter)
    for generation in range(2):
        att.set_prompts({"0": prompt})
        for _ in range(2):  # two denoising steps
            run_unet(unet, "sd15", 2)
        sizes = set(grids)
        assert len(grids) > len(sizes), "several layers share a grid size (else this test shows nothing)"
        assert sorted(resized) == sorted(2 * list(sizes)), f"generation {generation}: each mask once per grid size"
        grids.clear(), resized.clear()
    att.detach()


def test_masked_references_attended_together_keep_only_their_stacked_weights(tmp_path) -> None:
    """Through a generation only what the calls read is kept: for two masked references attended together, their
    weights side by side on each token grid, (1, 1, L, 2, 1). Each mask alone on a grid is made for the stack and
    dropped (it would be held through the denoising loop for nothing)."""
    unet, adapter, prompt, grids = _two_masked_references(tmp_path)
    att = attach(unet, adapter)
    att.set_prompts({"0": prompt})
    run_unet(unet, "sd15", 2)
    held: dict[int, int] = {}
    tensors = [v for v in att.runtime._shared.values() if isinstance(v, torch.Tensor)]
    for processor in att._processors:
        tensors += [m for m in processor.state.resolved.maps.values() if m is not None]
        tensors += [m for terms in processor.state.resolved.terms.values() for term in terms for _, m in term.maps
                    if m is not None]
    for t in tensors:
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    att.detach()
    assert sum(held.values()) == sum(n * 2 * 4 for n in set(grids)), "two fp32 weights per token, one stack per grid"


def test_concat_mode_keeps_the_text_attention_mask_and_opens_the_image_columns() -> None:
    """A text mask (`encoder_attention_mask`) still hides the padded text tokens; the appended image tokens are never
    masked: the same as the plain UNet reading [text; image] with the mask extended by ones."""
    unet = factories.sd15_unet()
    adapter = _concat_adapter(unet)
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(1, 4, factories.SD15_CROSS, generator=g)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 6, factories.SD15_CROSS, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1]])
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=torch.cat([text, cond], dim=1),
                        encoder_attention_mask=torch.cat([mask, torch.ones(1, 4, dtype=mask.dtype)], dim=1)).sample
        unmasked = unet(sample, 500, encoder_hidden_states=torch.cat([text, cond], dim=1)).sample
    att = attach(unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=cond)])})
    with torch.no_grad():
        got = unet(sample, 500, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    att.detach()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (unmasked - expected).abs().max() > 1e-4  # the mask acts


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_concat_mode_takes_a_boolean_mask_on_one_layer(weight: float) -> None:
    """A boolean mask (True = attend) as an Attention module takes it, called directly: the image columns open,
    multiplied by the reference's weight as in the closed form above."""
    unet = factories.sd15_unet()
    name = next(n for n in unet.attn_processors if "attn2" in n).rsplit(".processor", 1)[0]
    attn = unet.get_submodule(name)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    text = torch.randn(2, 6, factories.SD15_CROSS, generator=g)
    tokens = torch.randn(1, 4, factories.SD15_CROSS, generator=g)
    keep = torch.tensor([True, True, False, True, False, True])
    with torch.no_grad():
        q = attn.to_q(hidden).view(2, 16, attn.heads, -1).transpose(1, 2)
        ctx = torch.cat([text, tokens.expand(2, -1, -1)], dim=1)
        k = attn.to_k(ctx).view(2, 10, attn.heads, -1).transpose(1, 2)
        v = attn.to_v(ctx).view(2, 10, attn.heads, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).exp()
        scores[..., :6] *= keep
        scores[..., 6:] *= weight
        probs = scores / scores.sum(-1, keepdim=True)
        expected = attn.to_out[0]((probs @ v).transpose(1, 2).reshape(2, 16, -1))
    att = attach(unet, _concat_adapter(unet))
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=weight)})
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=text, attention_mask=keep.expand(2, 1, 6))
    att.detach()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_masked_references_under_autograd_and_in_bf16_equal_the_inference_path(tmp_path) -> None:
    """Masked references: inference computes their softmaxes in place (the diffusers-parity tests check that
    path); with autograd on (training, guidance by gradients) the same attention runs out of place and must give the
    same output, and a bf16 UNet must give it too, to bf16's precision, with autograd off and on. One mask is all
    ones (no weighting, as the second reference alone would be)."""
    unet = factories.sd15_unet()
    torch.save(factories.published(unet, "base", factories.SD15_CROSS), tmp_path / "a.bin")
    adapter = load_adapter(tmp_path / "a.bin", unet)
    with torch.no_grad():
        a, b, c = (adapter.project(t) for t in torch.randn(3, 1, 24, generator=torch.Generator().manual_seed(8)))
    left = torch.zeros(24, 40)  # not square: the masks follow the latent's 16 x 16 grid all the same
    left[:, :20] = 1
    prompt = AdapterPrompt([Reference(cond=a, mask=left), Reference(cond=b, mask=1 - left),
                            Reference(cond=c, mask=torch.ones(24, 40))], scale=0.7)
    att = attach(unet, adapter)
    att.set_prompts({"0": prompt})
    try:
        inference = run_unet(unet, "sd15", 1)
        g = torch.Generator().manual_seed(7)
        sample, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 6, factories.SD15_CROSS, generator=g)
        with torch.enable_grad():
            tracked = unet(sample.requires_grad_(), 500, encoder_hidden_states=text).sample
        att.detach()
        unet.to(torch.bfloat16)
        att = attach(unet, adapter)
        att.set_prompts({"0": prompt})
        with torch.no_grad():
            half = unet(sample.detach().bfloat16(), 500, encoder_hidden_states=text.bfloat16()).sample
        with torch.enable_grad():
            half_tracked = unet(sample.detach().bfloat16(), 500, encoder_hidden_states=text.bfloat16()).sample
    finally:
        att.detach()
    plain = run_unet(factories.sd15_unet(), "sd15", 1)
    assert tracked.requires_grad and (inference - plain).abs().max() > 1e-3
    torch.testing.assert_close(tracked.detach(), inference, atol=1e-5, rtol=1e-5)
    for got in (half, half_tracked.detach()):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), inference, atol=0.05, rtol=0.05)


def test_a_new_lora_starts_as_diffusers_lora_layer_does() -> None:
    """The FaceID LoRA is diffusers' `LoRALinearLayer` (the authors' code uses that class): no biases, `up` zero, so
    a new LoRA changes nothing, and `down` drawn with std 1/rank. The std is compared with diffusers' own draw."""
    import warnings

    from diffusers.models.lora import LoRALinearLayer

    from ipadapter.adapter import LoRA

    torch.manual_seed(0)
    ours = LoRA(320, 640, rank=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated there in favour of PEFT
        theirs = LoRALinearLayer(320, 640, rank=8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert not ours.up.weight.any()
    assert abs(ours.down.weight.std().item() / theirs.down.weight.std().item() - 1) < 0.05  # 2,560 draws each
    x = torch.randn(2, 320)
    half = LoRA(320, 640, rank=8).to(torch.bfloat16)
    assert half(x).dtype == torch.bfloat16  # fp32 activations into a bf16 LoRA: cast, not an error


def test_tensors_are_made_on_the_layers_device_whatever_the_default_device() -> None:
    """Mask weights (an all-ones mask's too, and an unconditional layer's row factors) are made on the device of the
    layer's inputs, eager and prepared for the compiled call, not on torch's default device: with the default set
    elsewhere (`with torch.device(...)`, here the meta device, which stands in for an accelerator on a CPU machine),
    the output is the same."""
    torch.manual_seed(3)
    hw = (6, 5)
    attn, runtime, proc = _one_layer()
    proc.heads = attn.heads
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    left = torch.zeros(12, 10)
    left[:, :5] = 1
    refs = [Reference(cond=torch.randn(1, 3, 32), uncond=torch.randn(1, 3, 32), mask=m)
            for m in (left, 1 - left, torch.ones(12, 10), None)]
    for uncond_layers in (frozenset(), frozenset({ONE_LAYER})):
        def start() -> None:
            proc.clear_cache()
            runtime.set({"a": AdapterPrompt(refs, scale=0.8, uncond_layers=uncond_layers)}, cfg=True)
            runtime.latent_hw = hw

        start()
        with torch.no_grad():
            expected = proc(attn, x, text)
            start()
            with torch.device("meta"):
                got = proc(attn, x, text)
                start()
                proc.prepare(2, torch.float32, torch.device("cpu"))
        torch.testing.assert_close(got, expected)
        maps = [m for c in proc._prepared for term in c.terms for _, m in term.maps if m is not None]
        assert maps and all(m.device.type == "cpu" for m in maps)
        proc.prepare(2, torch.bfloat16, torch.device("cpu"))  # and in the layer's dtype
        maps = [m for c in proc._prepared for term in c.terms for _, m in term.maps if m is not None]
        assert maps and all(m.dtype == torch.bfloat16 for m in maps)


def test_a_black_mask_on_an_unconditional_layer_leaves_the_layer_plain() -> None:
    """On a layer that takes the image in the unconditional rows, the mask still applies: a black mask (0 everywhere)
    gives the layer's output without any reference, bit for bit."""
    torch.manual_seed(4)
    attn, runtime, proc = _one_layer()
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    outputs = []
    for refs in ([Reference(cond=torch.randn(1, 3, 32), uncond=torch.randn(1, 3, 32), mask=torch.zeros(12, 10))], []):
        runtime.set({"a": AdapterPrompt(refs, uncond_layers=frozenset({ONE_LAYER}))} if refs else {}, cfg=True)
        runtime.latent_hw = (6, 5)
        with torch.no_grad():
            outputs.append(proc(attn, x, text))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)


def test_terms_are_made_once_per_generation_and_layout(sd15_unet, monkeypatch) -> None:
    """K'/V' and mask weights are laid out at a generation's first call of each batch layout and read at the later
    steps (the class's contract): three UNet calls, one build per attached layer."""
    from ipadapter.attention import IPAttnProcessor

    adapter = _base_adapter(sd15_unet)
    builds = []
    build = IPAttnProcessor._build
    monkeypatch.setattr(IPAttnProcessor, "_build", lambda self, *a, **k: builds.append(1) or build(self, *a, **k))
    att = attach(sd15_unet, adapter)
    att.runtime.cache_kv = True
    att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(1, 4, 32))])}, rows=2)
    try:
        for _ in range(3):
            run_unet(sd15_unet, "sd15", 2)
    finally:
        att.detach()
    assert len(builds) == len(adapter.named_layers())


def test_terms_without_kv_are_made_once_per_generation_for_the_layers_that_agree(monkeypatch) -> None:
    """Without `cache_kv` a layer's terms hold no K'/V', only the references' token rows (and mask weights, made per
    token grid where a reference is masked): without masks every layer with the same references and factors shares
    one set, whatever its grid, made at the generation's first call (not once per layer or grid); a layer where a
    reference's own weight differs gets its own, and the outputs are the same as each layer making its own."""
    from ipadapter.attention import IPAttnProcessor

    unet = factories.sd15_unet()
    adapter = _base_adapter(unet)
    grids: list[int] = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.register_forward_pre_hook(lambda _, args: grids.append(args[0].shape[1]))
    builds: list[str] = []
    build = IPAttnProcessor._build
    monkeypatch.setattr(IPAttnProcessor, "_build",
                        lambda self, *a, **k: builds.append(self.layer.name) or build(self, *a, **k))
    names = [name for name, _ in adapter.named_layers()]
    cond = torch.randn(1, 4, factories.SD15_CROSS)
    odd = {name: 1.0 for name in names} | {names[0]: 0.5}
    att = attach(unet, adapter)
    outputs = []
    try:
        for ref in (Reference(cond=cond), Reference(cond=cond, layer_weights=odd)):
            att.set_prompts({"0": AdapterPrompt([ref])}, rows=1)
            builds.clear(), grids.clear()
            for _ in range(3):
                outputs.append(run_unet(unet, "sd15", 2))
            assert len(set(grids)) > 1, "the layers have several token grids (else this test shows nothing)"
            assert len(builds) == 1 + (ref.layer_weights is not None), builds
        att.set_prompts({"0": AdapterPrompt([Reference(cond=cond, layer_weights=odd)])}, rows=1)
        monkeypatch.setattr(att.runtime, "shared", lambda key, make: make())  # every layer its own
        alone = run_unet(unet, "sd15", 2)
    finally:
        att.detach()
    assert torch.equal(alone, outputs[-1])
    assert not torch.equal(outputs[0], outputs[-1])


def test_a_plan_is_resolved_once_for_the_layers_that_agree_on_it(tmp_path, monkeypatch) -> None:
    """A generation resolves one plan per distinct layer signature, not one per layer: one for all cross-attention
    layers of a prompt without per-layer weights, one more where a layer's weight, a reference's own weight there or
    an unconditional layer differs, and FaceID's LoRA-only self-attention layers their own. The outputs are those of
    every layer resolving its own."""
    from ipadapter.attention import IPAttnProcessor

    unet = factories.sd15_unet()
    torch.save(factories.published(unet, "faceid", factories.SD15_CROSS, lora_rank=4), tmp_path / "faceid.bin")
    adapter = load_adapter(tmp_path / "faceid.bin", unet)
    resolved: list[str] = []
    resolve = IPAttnProcessor._resolve
    monkeypatch.setattr(IPAttnProcessor, "_resolve",
                        lambda self, every: resolved.append(self.layer.name) or resolve(self, every))
    names = [name for name, layer in adapter.named_layers() if layer.has_ip]
    assert len(names) > 2 and len(adapter.named_layers()) > len(names), "cross and LoRA-only self-attention layers"
    cond = torch.randn(1, 4, factories.SD15_CROSS)
    prompts = {
        "uniform": (AdapterPrompt([Reference(cond=cond)]), 2),
        "a layer weighted": (AdapterPrompt([Reference(cond=cond)], layer_weights={n: 1.0 for n in names[1:]}), 3),
        "a reference weighted": (AdapterPrompt([Reference(cond=cond, layer_weights={n: 1.0 for n in names[1:]})]), 3),
        "an uncond layer": (AdapterPrompt([Reference(cond=cond)], uncond_layers=frozenset(names[:1])), 3),
    }
    att = attach(unet, adapter)
    try:
        for what, (prompt, plans) in prompts.items():
            att.set_prompts({"0": prompt}, rows=1)
            resolved.clear()
            shared = run_unet(unet, "sd15", 2)
            assert len(resolved) == plans, (what, resolved)
            with monkeypatch.context() as m:
                m.setattr(att.runtime, "shared", lambda key, make: make())  # every layer its own
                att.set_prompts({"0": prompt}, rows=1)
                assert torch.equal(run_unet(unet, "sd15", 2), shared), what
    finally:
        att.detach()


def test_a_new_generation_sets_no_module_attribute_on_the_processors(sd15_unet, monkeypatch) -> None:
    """Each layer takes its generation's plan at the first call: into a plain object, not through
    `nn.Module.__setattr__` (microseconds each, paid by every layer at every generation: SDXL has 70)."""
    from ipadapter.attention import IPAttnProcessor

    adapter = _base_adapter(sd15_unet)
    att = attach(sd15_unet, adapter)
    cond = torch.randn(1, 4, factories.SD15_CROSS)
    try:
        att.set_prompts({"0": AdapterPrompt([Reference(cond=cond)])}, rows=1)
        run_unet(sd15_unet, "sd15", 2)
        set_on: list[str] = []
        real = torch.nn.Module.__setattr__
        monkeypatch.setattr(torch.nn.Module, "__setattr__",
                            lambda self, name, value: (isinstance(self, IPAttnProcessor) and set_on.append(name))
                            or real(self, name, value))
        att.set_prompts({"0": AdapterPrompt([Reference(cond=cond * 2)])}, rows=1)
        run_unet(sd15_unet, "sd15", 2)
        monkeypatch.undo()
        assert set_on == []
        assert all(p.state.generation == att.runtime.generation for p in att._processors), "every layer planned"
    finally:
        att.detach()


def test_what_acts_at_a_layer_is_decided_once_while_the_step_factors_stay(sd15_unet, monkeypatch) -> None:
    """Which adapters act and with what weight is decided at the generation's first call, once for the layers that
    share a plan, and kept while the step factors and the CFG layout stay; a step window decides again where it opens
    or closes, and the outputs are those of deciding at every call."""
    import ipadapter.attention as attention

    adapter = _base_adapter(sd15_unet)
    sorted_: list[int] = []
    real = attention.sort_acts
    monkeypatch.setattr(attention, "sort_acts", lambda acts, cfg: sorted_.append(1) or real(acts, cfg))
    att = attach(sd15_unet, adapter)
    layers = len(adapter.named_layers())
    cond = torch.randn(1, 4, 32)
    timesteps = [900, 700, 500, 300]

    g = torch.Generator().manual_seed(7)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 6, 32, generator=g)

    def generation(prompt: AdapterPrompt) -> list[torch.Tensor]:
        att.set_prompts({"0": prompt}, rows=1)
        with torch.no_grad():
            return [sd15_unet(sample, t, encoder_hidden_states=text).sample for t in timesteps]

    try:
        from diffusers import DDIMScheduler

        att.scheduler = DDIMScheduler()
        att.scheduler.set_timesteps(4)
        att.scheduler.timesteps = torch.tensor(timesteps)
        kept = generation(AdapterPrompt([Reference(cond=cond)]))
        assert layers > 1 and len(sorted_) == 1, "once for all the layers, for the whole generation"
        sorted_.clear()
        windowed = generation(AdapterPrompt([Reference(cond=cond)], start=0.25, end=0.75))
        assert len(sorted_) == 3, "the first step (off), the window opening (on), its closing (off)"
        monkeypatch.setattr(attention.Runtime, "step_factors",
                            lambda self: {n: p.step_factor(self.progress) for n, p in self.prompts.items()})
        assert all(torch.equal(a, b) for a, b in zip(kept, generation(AdapterPrompt([Reference(cond=cond)]))))
        again = generation(AdapterPrompt([Reference(cond=cond)], start=0.25, end=0.75))
        assert all(torch.equal(a, b) for a, b in zip(windowed, again))
    finally:
        att.detach()
    assert torch.equal(windowed[1], kept[1]) and torch.equal(windowed[2], kept[2])  # inside the window
    assert not torch.equal(windowed[0], kept[0]) and not torch.equal(windowed[3], kept[3])


def test_kv_made_once_per_generation_across_latent_sizes_and_carried_over(sd15_unet) -> None:
    """K'/V' depend on the reference tokens and the batch layout, not on the latent size: one generation run at two
    sizes projects them once per layer, the next generation with the same tokens reuses them at both sizes, and a
    new batch layout (no CFG) afterwards projects once more; every output equals the uncached one."""
    adapter = _base_adapter(sd15_unet)
    att = attach(sd15_unet, adapter)
    att.runtime.cache_kv = True
    layers = [m for n, m in adapter.named_modules() if n.endswith("to_k_ip")]
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in layers]
    torch.manual_seed(5)
    text = torch.randn(2, 6, factories.SD15_CROSS)
    samples = [torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8)]
    prompt = AdapterPrompt([Reference(cond=torch.randn(1, 4, 32), uncond=torch.randn(1, 4, 32))])

    def run(sample: torch.Tensor, batch: int = 2) -> torch.Tensor:
        with torch.no_grad():
            return sd15_unet(sample[:batch], 500, encoder_hidden_states=text[:batch]).sample

    try:
        counts, outputs = [], []
        for _ in range(2):  # two generations, the same tokens
            att.set_prompts({"0": prompt}, rows=1)
            for sample in samples:
                outputs.append(run(sample))
                counts.append(len(calls))
        outputs.append(run(samples[0], batch=1))
        counts.append(len(calls))
        att.runtime.cache_kv = False
        att.set_prompts({"0": prompt}, rows=1)
        expected = [run(s) for s in samples] * 2 + [run(samples[0], batch=1)]
    finally:
        for hook in hooks:
            hook.remove()
        att.detach()
    n = len(layers)
    assert counts == [n, n, n, n, 2 * n], "once per layer, reused at the second size and generation; again for batch 1"
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_image_attention(sd15_unet) -> None:
    """Training: with autograd on, the image attention is added out of place (SDPA's backward may read its own output),
    so backward runs, and its output equals the inference one."""
    adapter = _base_adapter(sd15_unet)
    att = attach(sd15_unet, adapter)
    torch.manual_seed(6)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 6, factories.SD15_CROSS)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(1, 4, 32))], scale=0.7)}, rows=2)
    try:
        with torch.no_grad():
            inference = sd15_unet(sample, 500, encoder_hidden_states=text).sample
        tracked = sd15_unet(sample, 500, encoder_hidden_states=text).sample
        tracked.square().mean().backward()
    finally:
        att.detach()
    torch.testing.assert_close(tracked.detach(), inference, atol=1e-5, rtol=1e-5)
    grads = [p.grad for n, p in adapter.named_parameters() if "to_k_ip" in n or "to_v_ip" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


def test_a_references_own_layer_weight_is_its_weight_at_that_layer() -> None:
    """`Reference.layer_weights` (what the style and composition presets give each image): a factor of 0.5 at this
    layer is the same as the reference's weight 0.5 here."""
    torch.manual_seed(5)
    attn, runtime, proc = _one_layer()
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    cond, uncond = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    outputs = []
    for ref in (Reference(cond=cond, uncond=uncond, layer_weights={ONE_LAYER: 0.5}),
                Reference(cond=cond, uncond=uncond, weight=0.5), Reference(cond=cond, uncond=uncond)):
        runtime.set({"a": AdapterPrompt([ref, Reference(cond=torch.ones(1, 3, 32))])}, cfg=True)
        runtime.latent_hw = (6, 5)
        with torch.no_grad():
            outputs.append(proc(attn, x, text))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-4


def test_a_new_generation_frees_the_kv_the_last_one_made_and_did_not_reuse(sd15_unet) -> None:
    """Memory: K'/V' are kept for one generation after the one that made them (a repeated reference reuses them), and
    once a generation has made its own, those of the previous generation it did not reuse are dropped."""
    adapter = _base_adapter(sd15_unet)
    att = attach(sd15_unet, adapter)
    att.runtime.cache_kv = True
    torch.manual_seed(7)
    a, b = torch.randn(1, 4, 32), torch.randn(1, 4, 32)

    def kept() -> set:
        return {ref for proc in att._processors for k in (*proc.kv._now, *proc.kv._before) for ref in k.refs}

    try:
        att.set_prompts({"0": AdapterPrompt([Reference(cond=a)])}, rows=2)
        run_unet(sd15_unet, "sd15", 2)
        first = kept()
        att.set_prompts({"0": AdapterPrompt([Reference(cond=b)])}, rows=2)
        run_unet(sd15_unet, "sd15", 2)
        second = kept()
        att.runtime.cache_kv = False
        att.set_prompts({"0": AdapterPrompt([Reference(cond=a)])}, rows=2)
        run_unet(sd15_unet, "sd15", 2)
        uncached = kept()
    finally:
        att.detach()
    assert len(first) == len(second) == 1 and first != second, "only the current generation's K'/V' are kept"
    assert not uncached, "cache_kv=False keeps nothing"


def test_kv_laid_out_for_each_batch_size_of_one_generation(sd15_unet) -> None:
    """K'/V' are laid out on the batch: per-prompt references for two prompts, one generation run at one image per
    prompt and then three (no CFG either time), must give each batch what the uncached processor gives it."""
    adapter = _base_adapter(sd15_unet)
    att = attach(sd15_unet, adapter)
    torch.manual_seed(8)
    sample, text = torch.randn(6, 4, 8, 8), torch.randn(6, 6, factories.SD15_CROSS)
    prompt = AdapterPrompt([Reference(cond=torch.randn(2, 4, 32))])  # one row per prompt
    outputs = {}
    try:
        for cache in (True, False):
            att.runtime.cache_kv = cache
            att.set_prompts({"0": prompt}, rows=2)
            with torch.no_grad():
                outputs[cache] = [sd15_unet(sample[:n], 500, encoder_hidden_states=text[:n]).sample for n in (2, 6)]
    finally:
        att.detach()
    for got, want in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_unconditional_layer_reads_the_cond_tokens_only() -> None:
    """A layer in `uncond_layers` puts the image into the unconditional rows, from the reference's cond tokens: its
    uncond tokens (the negative image) play no part there."""
    torch.manual_seed(9)
    attn, runtime, proc = _one_layer()
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    cond = torch.randn(1, 3, 32)
    outputs = []
    for uncond in (torch.randn(1, 3, 32), torch.randn(1, 3, 32), None):
        runtime.set({"a": AdapterPrompt([Reference(cond=cond, uncond=uncond)], uncond_layers=frozenset({ONE_LAYER}))},
                    cfg=True)
        with torch.no_grad():
            outputs.append(proc(attn, x, text))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    torch.testing.assert_close(outputs[0], outputs[2], atol=0, rtol=0)
    runtime.set({}, cfg=True)
    with torch.no_grad():
        plain = proc(attn, x, text)
    assert (outputs[0][:1] - plain[:1]).abs().max() > 1e-4, "the unconditional row takes the image"


def test_kept_kv_are_not_reused_under_another_layout_or_dtype(sd15_unet) -> None:
    """The next generation reuses K'/V' only for the same layout: the same tokens on layers that then are
    unconditional ones, then without CFG (a batch of the same size), then with the UNet in bf16 (fp32 tokens into a
    bf16 adapter): each output equals what the uncached processor gives."""
    import copy

    unet = copy.deepcopy(sd15_unet)
    adapter = _base_adapter(unet)
    att = attach(unet, adapter)
    torch.manual_seed(10)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 6, factories.SD15_CROSS)
    ref = Reference(cond=torch.randn(1, 4, 32), uncond=torch.randn(1, 4, 32))
    layers = frozenset(name for name, _ in adapter.named_layers())
    plain, uncond = AdapterPrompt([ref]), AdapterPrompt([ref], uncond_layers=layers)
    steps = [(plain, 1, torch.float32), (uncond, 1, torch.float32), (plain, 2, torch.float32),
             (plain, 1, torch.float32), (plain, 1, torch.bfloat16)]  # each generation after one that kept K'/V'
    saved = copy.deepcopy(unet.state_dict())  # the adapter's layers too: they hang in the processors
    outputs = {}
    try:
        for cache in (True, False):
            att.runtime.cache_kv = cache
            unet.float().load_state_dict(saved)
            outputs[cache] = []
            for prompt, rows, dtype in steps:
                unet.to(dtype)
                att.set_prompts({"0": prompt}, rows=rows)
                with torch.no_grad():
                    outputs[cache].append(unet(sample.to(dtype), 500, encoder_hidden_states=text.to(dtype)).sample)
    finally:
        att.detach()
    for got, want in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def _diffusers_twin(ours):
    """diffusers' `IPAdapterAttnProcessor2_0` (width 64, 32-wide tokens, 3 of them, scale 0.8) with our K'/V'."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    theirs = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=32, num_tokens=(3,), scale=0.8)
    with torch.no_grad():
        theirs.to_k_ip[0].weight.copy_(ours.to_k_ip.weight)
        theirs.to_v_ip[0].weight.copy_(ours.to_v_ip.weight)
    return theirs


def test_a_layer_with_spatial_norm_and_a_residual_connection_equals_diffusers() -> None:
    """The processor follows diffusers' attention pre- and post-processing on any `Attention` it is set on: a spatial
    norm (conditioned on `temb`) and a residual connection on 4-D input, against diffusers' own
    `IPAdapterAttnProcessor2_0` with the same K'/V' weights and scale."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from ipadapter.adapter import AdapterLayer
    from ipadapter.attention import IPAttnProcessor
    from ipadapter.layers import AttentionLayer
    from ipadapter.runtime import Runtime

    torch.manual_seed(11)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16, spatial_norm_dim=8,
                     residual_connection=True, rescale_output_factor=2.0).eval()
    layer = AttentionLayer(ONE_LAYER, 0, True, 64, 32, "down", 0, 0, 0)
    ours = AdapterLayer(layer, 32)
    runtime = Runtime()
    proc = IPAttnProcessor(layer, AttnProcessor2_0(), runtime, {"a": ours})
    theirs = _diffusers_twin(ours)
    x, text, temb = torch.randn(2, 64, 6, 5), torch.randn(2, 7, 32), torch.randn(2, 8, 3, 3)
    tokens = torch.randn(1, 3, 32)
    runtime.set({"a": AdapterPrompt([Reference(cond=tokens)], scale=0.8)}, cfg=False)
    runtime.latent_hw = (6, 5)
    with torch.no_grad():
        got = proc(attn, x, text, temb=temb)
        expected = theirs(attn, x, (text, [tokens.expand(2, -1, -1)]), temb=temb)
        plain = AttnProcessor2_0()(attn, x, text, temb=temb)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def _processor_on(attn, cross_dim: int, **layer_kwargs):
    """Our processor on one diffusers `Attention`, with one adapter "a" whose K'/V' weights it returns too."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ipadapter.adapter import AdapterLayer
    from ipadapter.attention import IPAttnProcessor
    from ipadapter.layers import AttentionLayer
    from ipadapter.runtime import Runtime

    layer = AttentionLayer(ONE_LAYER, 0, True, attn.inner_dim, cross_dim, "down", 0, 0, 0)
    ours = AdapterLayer(layer, cross_dim, **layer_kwargs)
    runtime = Runtime()
    return IPAttnProcessor(layer, AttnProcessor2_0(), runtime, {"a": ours}, heads=attn.heads), ours, runtime


def test_a_layer_with_group_norm_cross_norm_and_a_per_query_mask_equals_diffusers() -> None:
    """The rest of diffusers' pre-processing: a group norm on the hidden states, a layer norm on the text
    (`cross_attention_norm`), and an attention mask given per query token (B, L, S), against diffusers' own
    `IPAdapterAttnProcessor2_0` with the same K'/V' weights and scale."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(12)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16, norm_num_groups=8,
                     cross_attention_norm="layer_norm").eval()
    with torch.no_grad():  # norms that are not the identity, so that leaving one out shows
        for norm in (attn.group_norm, attn.norm_cross):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    proc, ours, runtime = _processor_on(attn, 32)
    theirs = _diffusers_twin(ours)
    x, text, tokens = torch.randn(2, 30, 64), torch.randn(2, 7, 32), torch.randn(1, 3, 32)
    mask = torch.where(torch.rand(2, 30, 7) < 0.3, -10000.0, 0.0)
    runtime.set({"a": AdapterPrompt([Reference(cond=tokens)], scale=0.8)}, cfg=False)
    runtime.latent_hw = (6, 5)
    with torch.no_grad():
        got = proc(attn, x, text, attention_mask=mask)
        expected = theirs(attn, x, (text, [tokens.expand(2, -1, -1)]), attention_mask=mask)
        plain = AttnProcessor2_0()(attn, x, text, attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_a_layer_with_query_and_key_norms_applies_them_to_the_text_attention() -> None:
    """`qk_norm` (which diffusers' IP-Adapter processor does not read): with the image values zero the image
    attention adds exactly nothing, so the output is diffusers' plain `AttnProcessor2_0`, which applies the norms."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(13)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16, qk_norm="layer_norm").eval()
    with torch.no_grad():
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    proc, ours, runtime = _processor_on(attn, 32)
    with torch.no_grad():
        ours.to_v_ip.weight.zero_()
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    runtime.set({"a": AdapterPrompt([Reference(cond=torch.randn(1, 3, 32))], scale=0.8)}, cfg=False)
    runtime.latent_hw = (6, 5)
    with torch.no_grad():
        got = proc(attn, x, text)
        expected = AttnProcessor2_0()(attn, x, text)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("after", ["training dropout", "another module"])
def test_the_layer_after_the_output_projection_runs_as_diffusers_runs_it(after: str) -> None:
    """`to_out[1]` is called as diffusers calls it: a Dropout that is training drops (the same entries, from the same
    seed), and a module of another kind runs in eval mode too; only an evaluating Dropout, the identity, is skipped.
    Against diffusers' own `IPAdapterAttnProcessor2_0` with the same K'/V' weights and scale."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(15)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16, dropout=0.5)
    if after == "another module":
        attn.to_out[1] = torch.nn.Linear(64, 64)
        attn.eval()
    proc, ours, runtime = _processor_on(attn, 32)
    theirs = _diffusers_twin(ours)
    x, text, tokens = torch.randn(2, 30, 64), torch.randn(2, 7, 32), torch.randn(1, 3, 32)
    runtime.set({"a": AdapterPrompt([Reference(cond=tokens)], scale=0.8)}, cfg=False)
    runtime.latent_hw = (6, 5)
    with torch.no_grad():
        torch.manual_seed(16)
        got = proc(attn, x, text)
        torch.manual_seed(16)
        expected = theirs(attn, x, (text, [tokens.expand(2, -1, -1)]))
        attn.to_out[1] = torch.nn.Identity()
        skipped = theirs(attn, x, (text, [tokens.expand(2, -1, -1)]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - skipped).abs().max() > 1e-3  # the layer after the projection does change the output


def test_a_part_of_an_adapter_at_zero_runs_none_of_its_layers() -> None:
    """What a call can skip is decided once: a FaceID adapter whose LoRA scale is 0 runs none of its LoRA layers while
    its image attention acts, and outside its step window (image weight 0) it projects no K'/V' while its LoRA acts.
    Counted by the adapter's own layers' calls; each part's values are checked against diffusers elsewhere."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(17)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    proc, ours, runtime = _processor_on(attn, 32, lora_rank=4)
    calls = {"lora": 0, "image": 0}
    for module, part in ((ours.to_q_lora, "lora"), (ours.to_k_lora, "lora"), (ours.to_v_lora, "lora"),
                         (ours.to_out_lora, "lora"), (ours.to_k_ip, "image"), (ours.to_v_ip, "image")):
        module.register_forward_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
    x, text, tokens = torch.randn(2, 30, 64), torch.randn(2, 7, 32), torch.randn(1, 3, 32)

    def run(progress: float, **prompt: float) -> dict[str, int]:
        calls.update(lora=0, image=0)
        runtime.set({"a": AdapterPrompt([Reference(cond=tokens)], start=0.5, end=1.0, **prompt)}, cfg=False,
                    weights={"a": "w"})
        runtime.latent_hw, runtime.progress = (6, 5), progress
        with torch.no_grad():
            proc(attn, x, text)
        return dict(calls)

    assert run(0.7) == {"lora": 4, "image": 2}  # both parts act inside the window
    assert run(0.7, lora_scale=0.0) == {"lora": 0, "image": 2}
    assert run(0.2) == {"lora": 4, "image": 0}


@pytest.mark.parametrize("cache_kv", [True, False])
def test_a_call_under_autograd_after_one_without_in_the_same_generation_has_every_gradient(cache_kv: bool) -> None:
    """Terms kept by an inference call of a generation (K'/V', or the laid-out tokens without `cache_kv`) are made
    without autograd: a later call of the same generation that records (guidance by gradients after a plain pass)
    must make its own, or the K'/V' weights and the reference tokens get no gradient. Against the same call in a
    generation that made nothing before it."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(19)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    proc, ours, runtime = _processor_on(attn, 32)
    runtime.cache_kv = cache_kv
    x, text, tokens = torch.randn(2, 30, 64), torch.randn(2, 7, 32), torch.randn(1, 3, 32)

    def grads(after_inference: bool) -> list[torch.Tensor]:
        ours.zero_grad()
        cond = tokens.clone().requires_grad_()
        runtime.set({"a": AdapterPrompt([Reference(cond=cond)], scale=0.8)}, cfg=False, weights={"a": "w"})
        runtime.latent_hw = (6, 5)
        if after_inference:
            with torch.no_grad():
                proc(attn, x, text)
        proc(attn, x, text).square().sum().backward()
        return [ours.to_k_ip.weight.grad, ours.to_v_ip.weight.grad, cond.grad]

    expected = grads(after_inference=False)
    assert all(g is not None and g.abs().max() > 0 for g in expected)
    for got, want in zip(grads(after_inference=True), expected):
        assert got is not None
        torch.testing.assert_close(got, want)


def test_two_adapters_both_reuse_their_k_and_v_in_the_next_generation() -> None:
    """`cache_kv`: a generation with the same references reuses the K'/V' the last one made, for every adapter at the
    layer; the last generation's are let go only once each adapter has taken its own (the first adapter's terms must
    not drop the second's). Counted by the adapters' projection calls."""
    attn, runtime, proc = _one_layer(("a", "b"))
    runtime.cache_kv = True
    projected = []
    for name in ("a", "b"):
        proc._weights[name].to_k_ip.register_forward_hook(lambda *_, name=name: projected.append(name))
    torch.manual_seed(20)
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    prompts = {name: AdapterPrompt([Reference(cond=torch.randn(1, 3, 32))]) for name in ("a", "b")}
    counts = []
    for _ in range(2):
        projected.clear()
        runtime.set(prompts, cfg=False, weights={"a": "wa", "b": "wb"})
        runtime.latent_hw = (6, 5)
        with torch.no_grad():
            proc(attn, x, text)
        counts.append(sorted(projected))
    assert counts == [["a", "b"], []]


def test_kept_k_and_v_are_not_reused_for_other_unconditional_tokens() -> None:
    """`cache_kv` reuses K'/V' across generations for equal tokens: a new generation with the same cond tokens but
    other unconditional ones (a new negative image) must give what a fresh processor gives for it, under CFG."""
    torch.manual_seed(22)
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    cond, first, second = torch.randn(1, 3, 32), torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    outputs = []
    for unconds in ((first, second), (second,)):  # kept from the first generation; fresh
        torch.manual_seed(23)  # the same layer and adapter weights both times
        attn, runtime, proc = _one_layer(("a",))
        runtime.cache_kv = True
        for uncond in unconds:
            runtime.set({"a": AdapterPrompt([Reference(cond=cond, uncond=uncond)])}, cfg=True, weights={"a": "wa"})
            runtime.latent_hw = (6, 5)
            with torch.no_grad():
                out = proc(attn, x, text)
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


def test_one_of_two_attached_adapters_prompted_with_per_layer_weights() -> None:
    """Two adapters attached, one prompted, with a weight for this layer: the other, without a prompt, takes no part
    in the layer's plan. Closed form: a per-layer weight w at scale 1 is scale w without per-layer weights."""
    attn, runtime, proc = _one_layer(("a", "b"))
    torch.manual_seed(21)
    x, text, tokens = torch.randn(2, 30, 64), torch.randn(2, 7, 32), torch.randn(1, 3, 32)
    outputs = []
    for prompt in (AdapterPrompt([Reference(cond=tokens)], layer_weights={ONE_LAYER: 0.5}),
                   AdapterPrompt([Reference(cond=tokens)], scale=0.5)):
        runtime.set({"a": prompt}, cfg=False)
        runtime.latent_hw = (6, 5)
        with torch.no_grad():
            outputs.append(proc(attn, x, text))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


def test_the_last_generations_k_and_v_are_let_go_beside_an_adapter_at_scale_zero() -> None:
    """Memory, `cache_kv`: once every adapter acting at a layer has taken its K'/V' for a generation, the previous
    generation's that it did not reuse are dropped; an adapter at scale 0 makes none and must not hold them up."""
    attn, runtime, proc = _one_layer(("a", "b"))
    runtime.cache_kv = True
    torch.manual_seed(22)
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    zero = AdapterPrompt([Reference(cond=torch.randn(1, 3, 32))], scale=0.0)
    kept = []
    for tokens in (torch.randn(1, 3, 32), torch.randn(1, 3, 32)):
        runtime.set({"a": AdapterPrompt([Reference(cond=tokens)]), "b": zero}, cfg=False,
                    weights={"a": "wa", "b": "wb"})
        runtime.latent_hw = (6, 5)
        with torch.no_grad():
            proc(attn, x, text)
        kept.append({(key.adapter, key.refs) for key in (*proc.kv._now, *proc.kv._before)})
    assert len(kept[0]) == len(kept[1]) == 1 and kept[0] != kept[1]


def test_the_simple_adapters_bias_from_a_tensor_weight_is_in_the_keys_dtype() -> None:
    """On the compiled path the simple adapter's weight is a float32 tensor; the bias it becomes on the image columns
    is made in the keys' dtype (bf16 here), as the eager path's bias from a float is. Closed form: 0 on the text
    columns, log(w) on the image's."""
    import math

    from diffusers.models.attention_processor import Attention

    from ipadapter.plan import Act

    torch.manual_seed(18)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).eval().to(torch.bfloat16)
    proc, _, runtime = _processor_on(attn, 32, concat=True)
    runtime.set({"a": AdapterPrompt([Reference(cond=torch.randn(1, 3, 32))], scale=0.8)}, cfg=False)
    act = Act(proc.plan()[0], torch.tensor(0.8), torch.tensor(0.0), ())
    key = value = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        _, _, bias = proc._concat(attn, [act], key, value, None, 2)
    expected = torch.tensor([0.0] * 7 + [math.log(0.8)] * 3, dtype=torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    torch.testing.assert_close(bias.flatten(), expected, atol=0, rtol=0)


@pytest.mark.parametrize("attention", ["decoupled", "concat"])
def test_a_call_without_text_is_plain_self_attention(attention: str) -> None:
    """A cross-attention layer called without encoder states attends to its own hidden states (diffusers'
    convention): no image tokens take part, and a mask given for the call applies to the hidden states."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(14)
    attn = Attention(64, heads=4, dim_head=16).eval()
    proc, _, runtime = _processor_on(attn, 64, concat=attention == "concat")
    x = torch.randn(2, 30, 64)
    mask = torch.where(torch.rand(2, 30) < 0.3, -10000.0, 0.0)
    runtime.set({"a": AdapterPrompt([Reference(cond=torch.randn(1, 3, 64))], scale=0.8)}, cfg=False)
    runtime.latent_hw = (6, 5)
    with torch.no_grad():
        got = proc(attn, x, None, attention_mask=mask)
        expected = AttnProcessor2_0()(attn, x, None, attention_mask=mask)
        with_text = proc(attn, x, x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (with_text - AttnProcessor2_0()(attn, x, x)).abs().max() > 1e-3, "the reference acts when text is given"


def test_a_simple_adapter_with_lora_at_image_weight_zero_leaves_the_image_columns_out() -> None:
    """A "concat" adapter that carries LoRA still acts at image weight 0 (its LoRA does): its image columns are
    then left out, not given log(0). With the LoRA's `up` at its initial zeros the output is the plain layer's."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(15)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    proc, _, runtime = _processor_on(attn, 32, lora_rank=4, concat=True)
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    runtime.set({"a": AdapterPrompt([Reference(cond=torch.randn(1, 3, 32))], scale=0.0)}, cfg=False)
    runtime.latent_hw = (6, 5)
    with torch.no_grad():
        got = proc(attn, x, text)
        expected = AttnProcessor2_0()(attn, x, text)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_a_simple_adapter_before_a_decoupled_one_leaves_it_acting() -> None:
    """Closed form: a "concat" adapter acts through the text keys, a decoupled one through its own image term, and
    before `to_out` (affine) they add up: out(a, b) = out(a) + out(b) − out(none), with the simple adapter first."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from ipadapter.adapter import AdapterLayer
    from ipadapter.attention import IPAttnProcessor
    from ipadapter.layers import AttentionLayer
    from ipadapter.runtime import Runtime

    torch.manual_seed(16)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    layer = AttentionLayer(ONE_LAYER, 0, True, 64, 32, "down", 0, 0, 0)
    runtime = Runtime()
    weights = {"a": AdapterLayer(layer, 32, concat=True), "b": AdapterLayer(layer, 32)}
    proc = IPAttnProcessor(layer, AttnProcessor2_0(), runtime, weights)
    x, text = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    prompts = {"a": AdapterPrompt([Reference(cond=torch.randn(1, 3, 32))], scale=0.6),
               "b": AdapterPrompt([Reference(cond=torch.randn(1, 3, 32))], scale=0.8)}

    def run(*names: str) -> torch.Tensor:
        runtime.set({name: prompts[name] for name in names}, cfg=False)
        runtime.latent_hw = (6, 5)
        with torch.no_grad():
            return proc(attn, x, text)

    both, none = run("a", "b"), run()
    torch.testing.assert_close(both, run("a") + run("b") - none, atol=1e-5, rtol=1e-5)
    assert min((run(name) - none).abs().max() for name in "ab") > 1e-3


class _Recording:
    """An original processor that records what it is handed and returns a marker: a user's own processor (set
    before attaching) must get every argument of a call that nothing of ours acts on, unchanged."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.out = torch.zeros(1)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.out


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled, nothing prepared"])
@pytest.mark.parametrize("case", ["no prompt", "uncond layer without CFG", "layer weight 0", "LoRA only, at scale 0"])
def test_a_call_nothing_acts_on_goes_to_the_original_processor_with_every_argument(
    case: str, compiled: bool, monkeypatch,
) -> None:
    """Nothing acts (no prompt; the prompt's unconditional-only layer without CFG; layer weight 0; an adapter with
    only LoRA here, at LoRA scale 0): the original processor gets the very call, positional and keyword extras
    included. A compiled call nothing prepared for (the attachment's hook skipped, as `unet.compile()` does) takes
    the same way."""
    from ipadapter.adapter import AdapterLayer
    from ipadapter.attention import IPAttnProcessor
    from ipadapter.layers import AttentionLayer
    from ipadapter.runtime import Runtime

    layer = AttentionLayer(ONE_LAYER, 0, True, 64, 32, "down", 0, 0, 0)
    runtime, original = Runtime(), _Recording()
    lora_only = case == "LoRA only, at scale 0"
    weights = AdapterLayer(layer, 32, lora_rank=4 if lora_only else 0, image_branch=not lora_only)
    proc = IPAttnProcessor(layer, original, runtime, {"a": weights})
    ref = Reference(cond=torch.randn(1, 3, 32))
    prompts = {"no prompt": {},
               "uncond layer without CFG": {"a": AdapterPrompt([ref], uncond_layers=frozenset({ONE_LAYER}))},
               "layer weight 0": {"a": AdapterPrompt([ref], layer_weights={ONE_LAYER: 0.0})},
               "LoRA only, at scale 0": {"a": AdapterPrompt([ref], lora_scale=0.0)}}
    runtime.set(prompts[case], cfg=False)
    runtime.latent_hw = (6, 5)
    if compiled:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    attn, x, text, mask, temb = object(), torch.randn(2, 30, 64), torch.randn(2, 7, 32), torch.zeros(2, 1, 7), object()
    out = proc(attn, x, text, mask, temb, "extra", scale=0.5)
    assert out is original.out
    assert len(original.calls) == 1
    args, kwargs = original.calls[0]
    assert args[0] is attn and args[1] is x and args[2] is text and args[3] is mask and args[4] is temb
    assert args[5:] == ("extra",) and kwargs == {"scale": 0.5}


def test_a_prepared_compiled_call_reads_the_attention_mask_and_temb(monkeypatch) -> None:
    """The compiled call's plan, on a layer with a spatial norm (conditioned on `temb`) and with a text attention
    mask, computes what the eager processor does with both."""
    from diffusers.models.attention_processor import Attention

    from ipadapter.attention import IPAttnProcessor

    torch.manual_seed(17)
    attn = Attention(64, cross_attention_dim=32, heads=4, dim_head=16, spatial_norm_dim=8).eval()
    proc, _, runtime = _processor_on(attn, 32)
    x, text, temb = torch.randn(2, 64, 6, 5), torch.randn(2, 7, 32), torch.randn(2, 8, 3, 3)
    mask = torch.where(torch.rand(2, 7) < 0.4, -10000.0, 0.0)
    mask[:, 0] = 0.0
    runtime.set({"a": AdapterPrompt([Reference(cond=torch.randn(1, 3, 32))], scale=0.8)}, cfg=False)
    runtime.latent_hw = (6, 5)
    with torch.no_grad():
        eager = proc(attn, x, text, attention_mask=mask, temb=temb)
        others = [proc(attn, x, text, temb=temb), proc(attn, x, text, attention_mask=mask, temb=temb.flip(0))]
        runtime.refresh_step_tensor(x.device)
        proc.prepare(2, x.dtype, x.device)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        monkeypatch.setattr(IPAttnProcessor, "_uncompiled", lambda *a, **k: pytest.fail("the plan was not used"))
        planned = proc(attn, x, text, attention_mask=mask, temb=temb)
    torch.testing.assert_close(planned, eager, atol=1e-5, rtol=1e-5)
    assert min((eager - other).abs().max() for other in others) > 1e-3
