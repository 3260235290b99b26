"""Core behaviours that realistic one-line bugs broke without failing any other test, each checked here against
independent truth: diffusers' IP-Adapter on identical weights, a closed form, or the plain UNet.

Through public entry points only (`load_adapter`, `attach`, `AdapterPrompt`, `Reference`, `preset`, the CLI), so the
tests survive changes of internal names. docs/testing.md lists which bug each test was seen to catch.
"""

from __future__ import annotations

import copy
import pathlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ipadapter import AdapterConfig, AdapterPrompt, IPAdapter, IPAdapterError, Reference, attach, load_adapter
from ipadapter.conditioning.presets import preset
from ipadapter.layers import attention_layers
from ipadapter.projection.detect import ProjectionConfig
from tests import factories
from tests.test_parity_diffusers import diffusers_unet, features, our_inputs, run_unet

CROSS = factories.SD15_CROSS
# Ten steps; timestep 499 is step 5, progress 0.5.
SCHEDULER = SimpleNamespace(timesteps=torch.arange(999, -1, -100))


def _saved(tmp_path, state: dict, name: str) -> pathlib.Path:
    torch.save(state, tmp_path / name)
    return tmp_path / name


def _diffusers_scale(unet, scale) -> None:
    """diffusers' per-adapter scale (a number, or one per mask), set on a copy of each processor."""
    unet.set_attn_processor({k: copy.copy(v) for k, v in unet.attn_processors.items()})
    for proc in unet.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [scale]


def _set_s_scale(adapter: IPAdapter, s_scale: float) -> None:
    """Where FaceID-PlusV2's shortcut scale is set on an adapter (what `ipadapter generate --s-scale` sets)."""
    adapter.image_proj.s_scale = s_scale


# FaceID-PlusV2's shortcut scale: out = id_tokens + s_scale · perceiver(id_tokens, patches).


@pytest.mark.parametrize("s_scale", [0.5, 2.0])
def test_faceid_plusv2_s_scale_equals_diffusers_shortcut_scale(s_scale: float, tmp_path) -> None:
    unet = factories.sd15_unet()
    state = factories.published(unet, "faceid-plusv2", CROSS)
    adapter = load_adapter(_saved(tmp_path, state, "ip-adapter-faceid-plusv2_sd15.bin"), unet)  # fresh per value
    _set_s_scale(adapter, s_scale)
    f = features("faceid-plusv2", batch=2)
    ref, embeds = diffusers_unet(unet, [state], ["faceid-plusv2"], [f])
    ref.encoder_hid_proj.image_projection_layers[0].shortcut_scale = s_scale
    expected = run_unet(ref, "sd15", 2, added_cond_kwargs={"image_embeds": embeds})
    ref.encoder_hid_proj.image_projection_layers[0].shortcut_scale = 1.0
    at_one = run_unet(ref, "sd15", 2, added_cond_kwargs={"image_embeds": embeds})

    att = attach(unet, adapter)
    with torch.no_grad():
        tokens = adapter.project(*our_inputs("faceid-plusv2", f, 0))
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)])})
    got = run_unet(unet, "sd15", 2)
    att.detach()
    assert (expected - at_one).abs().max() > 1e-3, "the shortcut scale must matter on these weights"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_faceid_plusv2_tokens_are_id_tokens_plus_s_scale_times_the_perceiver(tmp_path) -> None:
    """Closed form: at s_scale 0 the tokens are LayerNorm(MLP(id)) written out here; at any s they are linear in s."""
    unet = factories.sd15_unet()
    state = factories.published(unet, "faceid-plusv2", CROSS)
    path = _saved(tmp_path, state, "ip-adapter-faceid-plusv2_sd15.bin")
    f = features("faceid-plusv2", batch=2)
    ids, patches = f["id"][:, 0], f["patch"][:, 0]
    p = state["image_proj"]
    hidden = F.gelu(F.linear(ids, p["proj.0.weight"], p["proj.0.bias"]))
    id_tokens = F.layer_norm(F.linear(hidden, p["proj.2.weight"], p["proj.2.bias"]).reshape(2, -1, CROSS), (CROSS,),
                             p["norm.weight"], p["norm.bias"])

    def tokens(s_scale: float) -> torch.Tensor:
        adapter = load_adapter(path, unet)  # a fresh adapter per value
        _set_s_scale(adapter, s_scale)
        with torch.no_grad():
            return adapter.project(ids, patches)

    at_one = tokens(1.0)
    torch.testing.assert_close(tokens(0.0), id_tokens, atol=1e-5, rtol=1e-5)
    assert (at_one - id_tokens).abs().max() > 1e-2, "the perceiver must add something on these weights"
    for s in (0.5, 2.0):
        torch.testing.assert_close(tokens(s), id_tokens + s * (at_one - id_tokens), atol=1e-5, rtol=1e-5)


# Masks on a non-square latent, and masked references under an adapter scale.


@pytest.mark.parametrize("latent_hw,scale", [((16, 24), 1.0), ((24, 16), 1.0), ((16, 16), 0.6), ((16, 24), 1.7)],
                         ids=["wide", "tall", "square-scale-0.6", "wide-scale-1.7"])
def test_masks_on_any_latent_equal_diffusers(latent_hw: tuple[int, int], scale: float, tmp_path) -> None:
    """diffusers' `ip_adapter_masks` with masks of the latent's aspect ratio (4x its size) — a left band and a top
    band, so a grid read with height and width swapped puts them elsewhere. Band edges fall on multiples of 16 mask
    pixels, where bicubic resizing to every layer's grid is exact, so diffusers' unclamped resize equals ours."""
    unet = factories.sd15_unet()
    state = factories.published(unet, "base", CROSS)
    f = features("base", batch=2, images=2)
    h, w = 4 * latent_hw[0], 4 * latent_hw[1]
    masks = torch.zeros(2, h, w)
    masks[0, :, :32] = 1
    masks[1, :32, :] = 1
    weights = (0.8, 0.5)
    ref, embeds = diffusers_unet(unet, [state], ["base"], [f])
    _diffusers_scale(ref, [scale * wt for wt in weights])
    g = torch.Generator().manual_seed(7)
    sample, text = torch.randn(2, 4, *latent_hw, generator=g), torch.randn(2, 6, CROSS, generator=g)
    with torch.no_grad():
        expected = ref(sample, 500, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds},
                       cross_attention_kwargs={"ip_adapter_masks": [masks[None]]}).sample

    adapter = load_adapter(_saved(tmp_path, state, "a.bin"), unet)
    att = attach(unet, adapter)
    with torch.no_grad():
        refs = [Reference(cond=adapter.project(f["global"][:, i]), mask=masks[i], weight=wt)
                for i, wt in enumerate(weights)]
        att.set_prompts({"0": AdapterPrompt(refs, scale=scale)})
        got = unet(sample, 500, encoder_hidden_states=text).sample
    att.detach()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# Checkpoint loading refuses a file whose keys or shapes do not match, naming what is wrong.


def _base_state(unet) -> dict:
    return factories.published(unet, "base", CROSS)


def _drop(group: str, key: str):
    return lambda s: s[group].pop(key)


def _put(group: str, key: str, shape_of: str | None = None, grow: int = 0):
    def change(s: dict) -> None:
        like = s[group][shape_of or key]
        s[group][key] = torch.zeros(like.shape[0] + grow, *like.shape[1:])
    return change


BROKEN_FILES = {
    "missing K' weight": (_drop("ip_adapter", "1.to_k_ip.weight"), "missing"),
    "missing V' weight of the last layer": (_drop("ip_adapter", "31.to_v_ip.weight"), "missing"),
    "missing projection bias": (_drop("image_proj", "norm.bias"), "missing"),
    "extra layer weight": (_put("ip_adapter", "1.to_x_ip.weight", "1.to_k_ip.weight"), "unexpected"),
    "extra projection weight": (_put("image_proj", "extra.weight", "norm.weight"), "unexpected"),
    "wrong K' shape": (_put("ip_adapter", "3.to_k_ip.weight", grow=1), "shape"),
    "wrong V' shape": (_put("ip_adapter", "1.to_v_ip.weight", grow=2), "shape"),
    "wrong projection shape": (_put("image_proj", "norm.bias", grow=3), "shape"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_published_file_with_a_missing_extra_or_misshapen_key_is_refused(sd15_unet, case: str, tmp_path) -> None:
    change, word = BROKEN_FILES[case]
    state = _base_state(sd15_unet)
    assert load_adapter(_saved(tmp_path, state, "good.bin"), sd15_unet).config.variant == "base"  # unbroken: loads
    change(state)
    with pytest.raises(IPAdapterError, match=word):
        load_adapter(_saved(tmp_path, state, "bad.bin"), sd15_unet)


@pytest.mark.parametrize("change", ["drop", "add", "reshape"])
def test_own_format_file_with_a_missing_extra_or_misshapen_key_is_refused(sd15_unet, change: str, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ipadapter import save_adapter

    adapter = load_adapter(_saved(tmp_path, _base_state(sd15_unet), "a.bin"), sd15_unet)
    good = save_adapter(adapter, tmp_path / "own.safetensors")
    with safe_open(str(good), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    layer_key = next(k for k in tensors if k.startswith("layers.") and k.endswith("to_v_ip.weight"))
    if change == "drop":
        del tensors[layer_key]
    elif change == "add":
        tensors[layer_key.replace("to_v_ip", "to_x_ip")] = tensors[layer_key].clone()
    else:
        tensors[layer_key] = torch.zeros(tensors[layer_key].shape[0] + 1, tensors[layer_key].shape[1])
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(IPAdapterError, match={"drop": "missing", "add": "unexpected", "reshape": "shape"}[change]):
        load_adapter(tmp_path / "bad.safetensors", sd15_unet)


# K'/V' carried over between generations must follow a reference's weight.


def test_changed_reference_weight_between_generations_equals_diffusers(tmp_path) -> None:
    unet = factories.sd15_unet()
    state = factories.published(unet, "base", CROSS)
    f = features("base", batch=2)
    ref, embeds = diffusers_unet(unet, [state], ["base"], [f])
    adapter = load_adapter(_saved(tmp_path, state, "a.bin"), unet)
    with torch.no_grad():
        tokens = adapter.project(f["global"][:, 0])
    att = attach(unet, adapter)
    for weight in (1.0, 0.5, 2.0, 0.5):  # same tokens every generation, only the weight changes
        _diffusers_scale(ref, weight)
        expected = run_unet(ref, "sd15", 2, added_cond_kwargs={"image_embeds": embeds})
        att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens.clone(), weight=weight)])})
        got = run_unet(unet, "sd15", 2)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"reference weight {weight}")
    att.detach()


def _prompter_and_diffusers(tmp_path, cache_kv: bool = True) -> tuple[Any, Any]:
    """One random base adapter file on the tiny SD 1.5 pipeline, attached by an `ImagePrompter` and by diffusers'
    `load_ip_adapter` (the oracle) to a second copy of the pipeline; both read the same image encoder."""
    from ipadapter.encoders import ImageEncoder
    from ipadapter.prompter import ImagePrompter

    encoder, processor = factories.tiny_image_encoder()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    weight_file = _saved(tmp_path, factories.published(pipe.unet, "base", CROSS), "base.bin")
    diffusers_pipe = factories.tiny_sd15_pipeline(tmp_path)
    diffusers_pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="base.bin", image_encoder_folder=None)
    diffusers_pipe.image_encoder, diffusers_pipe.feature_extractor = encoder, processor
    prompter = ImagePrompter(pipe, load_adapter(weight_file, pipe.unet), ImageEncoder(encoder, processor),
                             cache_kv=cache_kv)
    return prompter, diffusers_pipe


def test_changed_reference_weight_between_generations_of_a_prompter_equals_diffusers(tmp_path) -> None:
    """The UI case: the same image generated again with another weight, against diffusers' pipeline at that scale."""
    prompter, diffusers_pipe = _prompter_and_diffusers(tmp_path)
    image = factories.reference_image()
    gen = dict(height=32, width=32, output_type="np")
    for weight in (1.0, 0.4):
        diffusers_pipe.set_ip_adapter_scale(weight)
        expected = diffusers_pipe(prompt="a red", ip_adapter_image=image, num_inference_steps=2, guidance_scale=6.0,
                                  generator=torch.Generator().manual_seed(0), **gen).images
        refs = prompter.references([image], weights=[weight])
        got = prompter.generate(refs, prompt="a red", seed=0, steps=2, guidance=6.0, **gen)
        torch.testing.assert_close(torch.from_numpy(got[0]), torch.from_numpy(expected[0]), atol=1e-4, rtol=0,
                                   msg=f"reference weight {weight}")
    prompter.detach()


# Per-prompt references with several images per prompt: row b of each CFG half belongs to prompt b // images.


def _random_adapter(unet) -> IPAdapter:
    torch.manual_seed(4)
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=24, cross_dim=CROSS, tokens=4))
    return IPAdapter.for_unet(unet, config, init_from_unet=False)


@pytest.mark.parametrize("attention", ["decoupled", "concat"])
def test_per_prompt_references_with_several_images_per_prompt_equal_each_prompt_alone(attention: str) -> None:
    """Closed form: a UNet batch is its rows run apart. Diffusers' pipelines lay a CFG batch out as [uncond; cond],
    each half prompt by prompt with that prompt's images together (p0, p0, p1, p1 for 2 prompts × 2 images)."""
    unet = factories.sd15_unet()
    if attention == "decoupled":
        adapter = _random_adapter(unet)
    else:
        config = AdapterConfig("base", ProjectionConfig("linear", in_dim=24, cross_dim=CROSS, tokens=4),
                               attention="concat")
        adapter = IPAdapter(config, attention_layers(unet))
    prompts, images = 2, 2
    g = torch.Generator().manual_seed(5)
    refs = [Reference(cond=torch.randn(prompts, 4, CROSS, generator=g),
                      uncond=torch.randn(prompts, 4, CROSS, generator=g), weight=wt) for wt in (1.0, 0.7)]
    rows = 2 * prompts * images
    sample, text = torch.randn(rows, 4, 16, 16, generator=g), torch.randn(rows, 6, CROSS, generator=g)
    att = attach(unet, adapter)
    with torch.no_grad():
        att.set_prompts({"0": AdapterPrompt(refs, scale=0.9)}, cfg=True)
        together = unet(sample, 500, encoder_hidden_states=text).sample
        for p in range(prompts):
            mine = [p * images + i for i in range(images)]
            mine += [prompts * images + r for r in mine]  # the same prompt's rows in the conditional half
            alone = [Reference(cond=r.cond[p : p + 1], uncond=r.uncond[p : p + 1], weight=r.weight) for r in refs]
            att.set_prompts({"0": AdapterPrompt(alone, scale=0.9)}, cfg=True)
            expected = unet(sample[mine], 500, encoder_hidden_states=text[mine]).sample
            torch.testing.assert_close(together[mine], expected, atol=1e-5, rtol=1e-5, msg=f"prompt {p}")
        att.set_prompts({"0": AdapterPrompt([Reference(cond=r.cond[:1], uncond=r.uncond[:1]) for r in refs])}, cfg=True)
        first_prompt_everywhere = unet(sample, 500, encoder_hidden_states=text).sample
    att.detach()
    assert (together - first_prompt_everywhere).abs().max() > 1e-3, "the two prompts' references must differ"


# "Precise" presets follow the step window and schedule like every other layer.


def _precise_prompt(p, tokens: torch.Tensor, **window) -> dict[str, AdapterPrompt]:
    return {"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8, layer_weights=p.layer_weights[0],
                               uncond_layers=p.uncond_layers, **window)}


def _run_cfg(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 6, CROSS, generator=g)
    with torch.no_grad():
        return unet(sample, 499, encoder_hidden_states=text).sample  # progress 0.5 under SCHEDULER


@pytest.mark.parametrize("name", ["style transfer precise", "composition precise"])
def test_precise_preset_outside_its_window_is_the_plain_unet(name: str) -> None:
    unet = factories.sd15_unet()
    adapter = _random_adapter(unet)
    tokens = torch.randn(1, 4, CROSS, generator=torch.Generator().manual_seed(8))
    p = preset(name, unet)
    plain = _run_cfg(unet)
    att = attach(unet, adapter, scheduler=SCHEDULER)
    att.set_prompts(_precise_prompt(p, tokens), cfg=True)
    full = _run_cfg(unet)
    outside = {}
    for window in [(0.6, 0.9), (0.0, 0.5), (0.3, 0.3)]:
        att.set_prompts(_precise_prompt(p, tokens, start=window[0], end=window[1]), cfg=True)
        outside[window] = _run_cfg(unet)
    att.set_prompts(_precise_prompt(p, tokens, start=0.4, end=0.6), cfg=True)
    inside = _run_cfg(unet)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8, layer_weights=p.layer_weights[0])},
                    cfg=True)
    kept_layers_only = _run_cfg(unet)
    att.detach()
    assert (full[0] - kept_layers_only[0]).abs().max() > 1e-4, "the precise layers must act inside the window"
    for window, out in outside.items():
        torch.testing.assert_close(out, plain, atol=1e-6, rtol=0, msg=f"window {window}")
    torch.testing.assert_close(inside, full, atol=1e-6, rtol=0)


def test_precise_layers_follow_the_schedule_as_a_scale_factor() -> None:
    """Closed form: inside the window a schedule value c acts as scale·c, on the precise layers as on the others."""
    unet = factories.sd15_unet()
    adapter = _random_adapter(unet)
    tokens = torch.randn(1, 4, CROSS, generator=torch.Generator().manual_seed(8))
    p = preset("style transfer precise", unet)
    att = attach(unet, adapter, scheduler=SCHEDULER)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8 * 0.25, layer_weights=p.layer_weights[0],
                                        uncond_layers=p.uncond_layers)}, cfg=True)
    expected = _run_cfg(unet)
    att.set_prompts(_precise_prompt(p, tokens, schedule=lambda progress: 0.25), cfg=True)
    got = _run_cfg(unet)
    att.set_prompts(_precise_prompt(p, tokens), cfg=True)
    unscheduled = _run_cfg(unet)
    att.detach()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (unscheduled - got).abs().max() > 1e-4


# The step window at the ends of what the scheduler says.


@pytest.mark.parametrize("timesteps", [[999], []], ids=["one step", "no steps set yet"])
def test_a_window_at_a_one_step_run_and_before_the_scheduler_is_set(timesteps: list[int]) -> None:
    """Progress is the step's index over the step count: a one-step run is all at progress 0, so a window starting at
    0.5 leaves the UNet plain. A scheduler with no timesteps yet gives no progress, and the window is then open: the
    adapter acts as without one."""
    unet = factories.sd15_unet()
    adapter = _random_adapter(unet)
    tokens = torch.randn(1, 4, CROSS, generator=torch.Generator().manual_seed(8))
    plain = _run_cfg(unet)
    att = attach(unet, adapter, scheduler=SimpleNamespace(timesteps=torch.tensor(timesteps, dtype=torch.long)))
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8)}, cfg=True)
    unwindowed = _run_cfg(unet)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8, start=0.5)}, cfg=True)
    late = _run_cfg(unet)
    att.detach()
    assert (unwindowed - plain).abs().max() > 1e-4
    torch.testing.assert_close(late, plain if timesteps else unwindowed, atol=0, rtol=0)


def test_a_fractional_timestep_is_at_the_nearest_step() -> None:
    """Progress is the index of the scheduler's timestep nearest in value: 948.7 is nearer 999 than 898 (step 0 of
    2, before a window that starts at 0.5: the plain UNet), 948.3 nearer 898 (step 1, progress 0.5: inside)."""
    unet = factories.sd15_unet()
    adapter = _random_adapter(unet)
    tokens = torch.randn(1, 4, CROSS, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(7)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 6, CROSS, generator=g)

    def run(t: float) -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, torch.tensor(t), encoder_hidden_states=text).sample

    plain = {t: run(t) for t in (948.7, 948.3)}
    att = attach(unet, adapter, scheduler=SimpleNamespace(timesteps=torch.tensor([999, 898])))
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)], scale=0.8, start=0.5)}, cfg=True)
    late, inside = run(948.7), run(948.3)
    att.detach()
    torch.testing.assert_close(late, plain[948.7], atol=0, rtol=0)
    assert (inside - plain[948.3]).abs().max() > 1e-4


def test_a_unet_called_with_keywords_reads_sample_and_timestep_as_positionally() -> None:
    """The hook reads the latents (the mask's grid: a 1 × 2 mask on a square grid, whose aspect alone would suggest
    another grid) and the timestep (the window) wherever the call puts them: by position, by keyword, or mixed."""
    unet = factories.sd15_unet()
    adapter = _random_adapter(unet)
    tokens = torch.randn(1, 4, CROSS, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(7)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 6, CROSS, generator=g)
    mask = torch.zeros(8, 16)
    mask[:, :8] = 1.0
    att = attach(unet, adapter, scheduler=SimpleNamespace(timesteps=torch.tensor([999, 499])))
    calls = {"positional": lambda t: unet(sample, t, encoder_hidden_states=text),
             "keywords": lambda t: unet(sample=sample, timestep=t, encoder_hidden_states=text),
             "mixed": lambda t: unet(sample, timestep=t, encoder_hidden_states=text)}
    outputs = {}
    for style, call in calls.items():
        for t in (999, 499):
            att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens, mask=mask)], scale=0.8, end=0.5)}, cfg=True)
            with torch.no_grad():
                outputs[style, t] = call(torch.tensor(t)).sample
    att.detach()
    with torch.no_grad():
        plain = unet(sample, torch.tensor(499), encoder_hidden_states=text).sample
    for style in ("keywords", "mixed"):
        for t in (999, 499):
            torch.testing.assert_close(outputs[style, t], outputs["positional", t], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs["positional", 499], plain, atol=0, rtol=0)
    assert (outputs["positional", 999] - plain).abs().max() > 1e-4


# FaceID LoRA on `to_out`, alone.


def test_faceid_lora_on_to_out_alone_equals_its_merged_weight(tmp_path) -> None:
    """Closed form: with only the `to_out` LoRA non-zero and no image tokens acting, the UNet equals the plain UNet
    whose every attention output projection is W + s · up @ down."""
    unet = factories.sd15_unet()
    state = factories.published(unet, "faceid", CROSS, lora_rank=4)
    for key in state["ip_adapter"]:
        if key.endswith(("to_q_lora.up.weight", "to_k_lora.up.weight", "to_v_lora.up.weight")):
            state["ip_adapter"][key] = torch.zeros_like(state["ip_adapter"][key])
    s = 0.7
    merged = copy.deepcopy(unet)
    for layer in attention_layers(merged):
        out = merged.get_submodule(layer.name).to_out[0]
        ip = state["ip_adapter"]
        out.weight.data += s * ip[f"{layer.index}.to_out_lora.up.weight"] @ ip[f"{layer.index}.to_out_lora.down.weight"]
    expected, plain = run_unet(merged, "sd15", 2), run_unet(unet, "sd15", 2)

    adapter = load_adapter(_saved(tmp_path, state, "faceid.bin"), unet)
    att = attach(unet, adapter)
    att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.zeros(1, 4, CROSS))], scale=0.0, lora_scale=s)})
    got = run_unet(unet, "sd15", 2)
    att.detach()
    assert (expected - plain).abs().max() > 1e-3, "the to_out LoRA must matter on these weights"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# A pickle that runs code is refused before it runs, through the command line too.


class _Touch:
    """Unpickling this creates a file: the trace of code run by a checkpoint."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_cli_refuses_a_bin_whose_pickle_runs_code_and_runs_none_of_it(tmp_path, capsys) -> None:
    from ipadapter.cli.main import main

    folder = factories.save_tiny_sd15_pipeline(tmp_path, adapters=())
    factories.reference_image().save(tmp_path / "ref.png")
    marker = tmp_path / "code-ran"
    state = _base_state(factories.sd15_unet())
    state["ip_adapter"]["1.to_k_ip.weight"] = _Touch(marker)
    torch.save(state, tmp_path / "evil.bin")
    capsys.readouterr()
    code = main(["generate", "--base", str(folder), "--adapter", str(tmp_path / "evil.bin"), "--image",
                 str(tmp_path / "ref.png"), "--out", str(tmp_path / "out.png"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err and "refusing" in err.splitlines()[-1]
    assert not marker.exists(), "unpickling ran the file's code"
    assert not (tmp_path / "out.png").exists()


# Per-generation state: what a prompt accepts, how tokens are laid out on the batch, and what is carried over.


WINDOW = "the step window must satisfy 0 <= start <= end <= 1, got "
BAD_PROMPTS = {
    "nan scale": (dict(scale=float("nan")), "the adapter scale must be a finite number, got nan"),
    "infinite scale": (dict(scale=float("inf")), "the adapter scale must be a finite number, got inf"),
    "start below 0": (dict(start=-0.1), WINDOW + "start=-0.1, end=1.0"),
    "end above 1": (dict(start=0.2, end=1.5), WINDOW + "start=0.2, end=1.5"),
    "start after end": (dict(start=0.8, end=0.2), WINDOW + "start=0.8, end=0.2"),
    "unknown scaling": (dict(scaling="vk"), "unknown embeds scaling 'vk'; valid: v, kv, kv_penalty, k_mean_v"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_adapter_prompt_refuses_bad_values_with_a_sentence(case: str) -> None:
    import re

    values, message = BAD_PROMPTS[case]
    with pytest.raises(IPAdapterError, match=f"^{re.escape(message)}$"):
        AdapterPrompt([Reference(cond=torch.zeros(1, 4, CROSS))], **values)


def test_a_batch_the_references_cannot_be_laid_on_is_refused_with_a_sentence(sd15_unet) -> None:
    import re

    adapter = _random_adapter(sd15_unet)
    att = attach(sd15_unet, adapter)
    try:
        cases = [(3, True, 1, "a classifier-free-guidance batch must be even, got 3"),
                 (2, False, 3, "3 image prompts cannot be spread over a batch of 2; give one per prompt")]
        for batch, cfg, rows, message in cases:
            att.set_prompts({"0": AdapterPrompt([Reference(cond=torch.randn(rows, 4, CROSS))])}, cfg=cfg)
            with pytest.raises(IPAdapterError, match=f"^{re.escape(message)}$"):
                run_unet(sd15_unet, "sd15", batch)
    finally:
        att.detach()


def test_carried_over_k_v_follow_changed_negative_tokens_and_reassigned_references(tmp_path) -> None:
    """Under CFG, generation after generation on one attachment keeping K'/V': a new negative with the same positive,
    then the same Reference object given other positive, then other negative tokens. Each equals diffusers with the
    image embeddings of that generation ([negative; positive] rows)."""
    unet = factories.sd15_unet()
    state = factories.published(unet, "base", CROSS)
    g = torch.Generator().manual_seed(9)
    pos = [torch.randn(1, 1, 24, generator=g) for _ in range(2)]
    neg = [torch.randn(1, 1, 24, generator=g) for _ in range(2)]
    ref_unet = diffusers_unet(unet, [state], ["base"], [features("base", batch=2)])[0]
    adapter = load_adapter(_saved(tmp_path, state, "a.bin"), unet)
    with torch.no_grad():
        tokens = {id(f): adapter.project(f[:, 0]) for f in pos + neg}
    att = attach(unet, adapter)
    att.runtime.cache_kv = True  # K'/V' carried over from one generation to the next (`cache_kv`, off by default)
    reference = Reference(cond=tokens[id(pos[0])], uncond=tokens[id(neg[0])])
    steps = [(pos[0], neg[0], reference)]
    reference = Reference(cond=tokens[id(pos[0])], uncond=tokens[id(neg[1])])
    steps.append((pos[0], neg[1], reference))
    steps.append((pos[1], neg[1], reference))  # the same object, its fields reassigned below
    steps.append((pos[1], neg[0], reference))
    for i, (p, n, r) in enumerate(steps):
        r.cond, r.uncond = tokens[id(p)], tokens[id(n)]
        expected = run_unet(ref_unet, "sd15", 2, added_cond_kwargs={"image_embeds": [torch.cat([n, p])]})
        att.set_prompts({"0": AdapterPrompt([r])}, cfg=True)
        got = run_unet(unet, "sd15", 2)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"generation {i}")
    att.detach()


def test_changed_masks_between_generations_equal_diffusers(tmp_path) -> None:
    unet = factories.sd15_unet()
    state = factories.published(unet, "base", CROSS)
    f = features("base", batch=2, images=2)
    ref, embeds = diffusers_unet(unet, [state], ["base"], [f])
    adapter = load_adapter(_saved(tmp_path, state, "a.bin"), unet)
    with torch.no_grad():
        tokens = [adapter.project(f["global"][:, i]) for i in range(2)]
    att = attach(unet, adapter)
    left, top = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :32], top[:32] = 1, 1
    for masks in [(left, top), (1 - left, 1 - top), (left, 1 - left)]:
        expected = run_unet(ref, "sd15", 2, added_cond_kwargs={"image_embeds": embeds},
                            cross_attention_kwargs={"ip_adapter_masks": [torch.stack(masks)[None]]})
        att.set_prompts({"0": AdapterPrompt([Reference(cond=t, mask=m) for t, m in zip(tokens, masks)])})
        got = run_unet(unet, "sd15", 2)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    att.detach()


# The K'/V' cache is a speed choice only: without it, K'/V' are projected at every call and the images do not change.


@pytest.mark.parametrize("cache_kv", [True, False])
def test_masked_references_with_and_without_the_kv_cache_equal_diffusers(cache_kv: bool, tmp_path) -> None:
    prompter, diffusers_pipe = _prompter_and_diffusers(tmp_path, cache_kv)
    calls = []
    prompter.adapter().named_layers()[0][1].to_k_ip.register_forward_hook(lambda *_: calls.append(1))
    images = [factories.reference_image(i) for i in range(2)]
    side = 8 * (32 // prompter.pipe.vae_scale_factor)  # 8 px per latent, as SD's images: no bicubic overshoot at the edge
    left = torch.zeros(side, side)
    left[:, : side // 2] = 1
    masks = [left, 1 - left]
    gen = dict(height=32, width=32, output_type="np", num_inference_steps=3, guidance_scale=6.0)
    expected = diffusers_pipe(prompt="a red", ip_adapter_image=[images], generator=torch.Generator().manual_seed(0),
                              cross_attention_kwargs={"ip_adapter_masks": [torch.stack(masks)[None]]}, **gen).images
    refs = prompter.references(images, masks=masks)
    got = prompter.generate(refs, prompt="a red", seed=0, steps=3, guidance=6.0, height=32, width=32,
                            output_type="np")
    prompter.detach()
    torch.testing.assert_close(torch.from_numpy(got[0]), torch.from_numpy(expected[0]), atol=1e-4, rtol=0)
    assert len(calls) == (1 if cache_kv else 3), "K'/V' once per generation with the cache, at every step without"


def test_clear_cache_drops_the_kept_kv_and_the_next_generation_projects_them_again(tmp_path) -> None:
    """`Attachment.clear_cache` (free the K'/V' a repeated reference would reuse): the same reference generated again
    reuses K'/V' (no projection), after `clear_cache` projects them once more, and the image still equals diffusers'."""
    prompter, diffusers_pipe = _prompter_and_diffusers(tmp_path)
    calls = []
    prompter.adapter().named_layers()[0][1].to_k_ip.register_forward_hook(lambda *_: calls.append(1))
    image = factories.reference_image()
    gen = dict(height=32, width=32, output_type="np")
    expected = diffusers_pipe(prompt="a red", ip_adapter_image=image, num_inference_steps=2, guidance_scale=6.0,
                              generator=torch.Generator().manual_seed(0), **gen).images
    refs = prompter.references([image])
    counts = []
    for clear in (False, False, True):
        if clear:
            prompter.attachment.clear_cache()
        got = prompter.generate(refs, prompt="a red", seed=0, steps=2, guidance=6.0, **gen)
        torch.testing.assert_close(torch.from_numpy(got[0]), torch.from_numpy(expected[0]), atol=1e-4, rtol=0)
        counts.append(len(calls))
    prompter.detach()
    assert counts == [1, 1, 2], "K'/V' made once, reused by the repeat, made again after clear_cache"
