"""The processor's math against independent truth: merged LoRA weights, diffusers' masks, CFG row layout."""

from __future__ import annotations

import copy

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


def test_cfg_rows_get_uncond_then_cond_tokens(sd15_unet) -> None:
    """Under CFG the first half of the batch sees the unconditional tokens: equal to running the halves apart."""
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.projection import ProjectionConfig

    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SD15_CROSS, tokens=4))
    adapter = IPAdapter.for_unet(sd15_unet, config)
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
    from ipadapter.adapter import AdapterConfig, IPAdapter
    from ipadapter.projection import ProjectionConfig

    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SD15_CROSS, tokens=4))
    adapter = IPAdapter.for_unet(sd15_unet, config)
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
