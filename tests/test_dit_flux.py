"""FLUX IP-Adapters (XLabs layout, v1 4 tokens and v2 16 tokens) against diffusers' own FLUX IP-Adapter on identical
weights, plus the guarantees diffusers has no oracle for (window, masks, detach) against their closed forms."""

from __future__ import annotations

import copy

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


def inputs(joint: int = df.FLUX_JOINT, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(H, W, 3)
    ids[..., 1] = torch.arange(H)[:, None]
    ids[..., 2] = torch.arange(W)[None]
    return {"hidden_states": torch.randn(BATCH, H * W, 4, generator=g),
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
    captured = []
    handle = model.transformer_blocks[1].attn.register_forward_hook(lambda m, a, out: captured.append(out[2]))
    embeds = embeds_for(0)
    mask = torch.zeros(H, W)
    mask[:, : W // 2] = 1.0
    for m in (None, torch.ones(H, W), mask):
        prompt = our_prompt(adapter, embeds)
        prompt.references[0].mask = m
        attachment.set_prompts({"0": prompt}, rows=BATCH)
        run(model, inputs())
    handle.remove()
    plain, ones, masked = captured
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
