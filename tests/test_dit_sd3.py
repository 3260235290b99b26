"""SD 3 / 3.5 IP-Adapters (InstantX layout) against diffusers' SD3IPAdapterJointAttnProcessor2_0 on identical
weights; per-block weights, several adapters and the step window, which diffusers lacks for SD 3, against their
closed forms."""

from __future__ import annotations

import copy

import pytest
import torch

from ipadapter.checkpoint import save_adapter
from ipadapter.dit.attach import attach_dit
from ipadapter.dit.checkpoint import dit_adapter_from_state_dict, load_dit_adapter
from ipadapter.errors import IPAdapterError
from ipadapter.runtime import AdapterPrompt, Reference
from tests import dit_factories as df

TOL = 1e-4
PATCHES = 9


def inputs(batch: int, t: float = 500.0, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 6, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
            "pooled_projections": torch.randn(batch, 64, generator=g), "timestep": torch.full((batch,), t)}


def features(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, PATCHES, df.SIGLIP_DIM, generator=torch.Generator().manual_seed(seed))


def run(model, x: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, **extra).sample


def oracle(model, state: dict, scales: list[float]):
    """diffusers' processors on a copy of the model, one scale per block (its API sets one for all)."""
    ref = copy.deepcopy(model)
    ref._load_ip_adapter_weights(copy.deepcopy(state), low_cpu_mem_usage=False)
    for proc, scale in zip(ref.attn_processors.values(), scales):
        proc.scale = scale
    return ref


def prompt(adapter, feats: torch.Tensor, **kwargs) -> AdapterPrompt:
    uncond = torch.zeros(1, PATCHES, df.SIGLIP_DIM)  # the SD 3 pipeline's negative: zero features
    return AdapterPrompt([Reference(cond=adapter.project(feats), uncond=uncond)], **kwargs)


@pytest.mark.parametrize("cfg", [False, True])
def test_transformer_equals_diffusers(cfg: bool) -> None:
    """Without CFG one reference per row; with CFG the batch is [negative; positive] and the negative rows get zero
    features, as the pipeline hands diffusers' processor."""
    model = df.sd3_transformer()
    state = df.instantx_state()
    adapter = dit_adapter_from_state_dict(state, model, name="ip-adapter.bin")
    assert (adapter.config.variant, adapter.config.tokens, adapter.config.projection.depth) == ("sd3", 8, 4)
    batch, feats = 2, features(1 if cfg else 2)
    x = inputs(batch)
    ref = oracle(model, state, [0.7, 0.7])
    embeds = torch.cat([torch.zeros_like(feats), feats]) if cfg else feats
    expected = run(ref, x, joint_attention_kwargs={"ip_adapter_image_embeds": embeds})
    base = run(model, x)
    attachment = attach_dit(model, adapter)
    attachment.set_prompts({"0": prompt(adapter, feats, scale=0.7)}, rows=1 if cfg else 2)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(run(model, x), expected, atol=TOL, rtol=0)


def test_sd35_medium_blocks_with_a_second_attention_equal_diffusers_processor() -> None:
    """SD 3.5 Medium (MMDiT-X): its first blocks add a second attention over the image tokens alone (`attn2`), which
    InstantX's design leaves without an image branch. diffusers' `load_ip_adapter` counts those attentions as blocks
    (the weights of block i land on the i-th processor of any kind), so the oracle is diffusers' own processor and
    image projection placed on each block's joint attention by hand."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    model = df.sd3_transformer(layers=3, dual=(0, 1))
    assert [name for name in model.attn_processors if "attn2" in name] == [
        "transformer_blocks.0.attn2.processor", "transformer_blocks.1.attn2.processor"]
    state = df.instantx_state(blocks=3)
    adapter = dit_adapter_from_state_dict(state, model, name="ip-adapter.bin")
    ref = copy.deepcopy(model)
    processors, config = dict(ref.attn_processors), ref.config
    width = config.attention_head_dim * config.num_attention_heads
    for i in range(config.num_layers):
        processor = SD3IPAdapterJointAttnProcessor2_0(
            hidden_size=width, ip_hidden_states_dim=width, head_dim=config.attention_head_dim,
            timesteps_emb_dim=state["ip_adapter"]["0.norm_ip.linear.weight"].shape[1])
        processor.load_state_dict({k.split(".", 1)[1]: v for k, v in state["ip_adapter"].items()
                                   if k.split(".", 1)[0] == str(i)})
        processor.scale = 0.7
        processors[f"transformer_blocks.{i}.attn.processor"] = processor
    ref.set_attn_processor(processors)
    ref.image_proj = ref._convert_ip_adapter_image_proj_to_diffusers(copy.deepcopy(state["image_proj"]),
                                                                     low_cpu_mem_usage=False)
    feats, x = features(2), inputs(2)
    expected = run(ref, x, joint_attention_kwargs={"ip_adapter_image_embeds": feats})
    base = run(model, x)
    attachment = attach_dit(model, adapter)
    attachment.set_prompts({"0": prompt(adapter, feats, scale=0.7)}, rows=2)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(run(model, x), expected, atol=TOL, rtol=0)
    attachment.detach()
    assert torch.equal(run(model, x), base)


def test_block_weights_equal_per_block_scales() -> None:
    model = df.sd3_transformer()
    state = df.instantx_state()
    adapter = dit_adapter_from_state_dict(state, model)
    feats, x = features(2), inputs(2)
    expected = run(oracle(model, state, [0.0, 0.9 * 0.5]), x, joint_attention_kwargs={"ip_adapter_image_embeds": feats})
    attachment = attach_dit(model, adapter)
    attachment.set_prompts({"0": prompt(adapter, feats, scale=0.5, layer_weights={
        "transformer_blocks.0.attn": 0.0, "transformer_blocks.1.attn": 0.9})}, rows=2)
    torch.testing.assert_close(run(model, x), expected, atol=TOL, rtol=0)


def test_two_adapters_add_their_branches() -> None:
    """The image branch is added before the linear `to_out`, so two adapters' effects on a block's attention output
    are the sum of each alone (closed form; diffusers has one SD 3 adapter)."""
    model = df.sd3_transformer()
    adapters = {"a": dit_adapter_from_state_dict(df.instantx_state(seed=1), model),
                "b": dit_adapter_from_state_dict(df.instantx_state(seed=2), model)}
    attachment = attach_dit(model, adapters)
    captured = []
    handle = model.transformer_blocks[0].attn.register_forward_hook(lambda m, a, out: captured.append(out[0]))
    feats, x = {"a": features(2, 0), "b": features(2, 1)}, inputs(2)
    for chosen in ((), ("a",), ("b",), ("a", "b")):
        attachment.set_prompts({n: prompt(adapters[n], feats[n], scale=0.8) for n in chosen}, rows=2)
        run(model, x)
    handle.remove()
    base, a, b, both = captured
    torch.testing.assert_close(both - base, (a - base) + (b - base), atol=1e-5, rtol=0)
    assert (a - base).abs().max() > 1e-3 and (b - base).abs().max() > 1e-3


def test_scale_zero_window_and_detach() -> None:
    """Outside [start, end) and at scale 0 the output is bitwise the base; inside, the adapter's; after detach the
    original processors are back and the output is bitwise the base."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = df.sd3_transformer()
    originals = dict(model.attn_processors)
    adapter = dit_adapter_from_state_dict(df.instantx_state(), model)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    feats = features(2)
    steps = [inputs(2, float(t)) for t in scheduler.timesteps]
    base = [run(model, x) for x in steps]
    attachment = attach_dit(model, adapter, scheduler=scheduler)
    attachment.set_prompts({"0": prompt(adapter, feats)}, rows=2)
    full = [run(model, x) for x in steps]
    attachment.set_prompts({"0": prompt(adapter, feats, scale=0.0)}, rows=2)
    assert all(torch.equal(run(model, x), b) for x, b in zip(steps, base))
    attachment.set_prompts({"0": prompt(adapter, feats, start=0.5, end=1.0)}, rows=2)
    windowed = [run(model, x) for x in steps]
    assert torch.equal(windowed[0], base[0]) and torch.equal(windowed[1], base[1])
    for got, want, b in zip(windowed[2:], full[2:], base[2:]):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        assert (got - b).abs().max() > 1e-3
    attachment.detach()
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(run(model, steps[0]), base[0])


def _rows_2_to_6() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(8, 6)
    mask[2:6, :] = 1.0
    return mask, mask.flatten()


def _square_left_half() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(6, 6)
    mask[:, :3] = 1.0
    return mask, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).repeat(8)


@pytest.mark.parametrize("make", [_rows_2_to_6, _square_left_half])
def test_mask_weights_the_branch_on_the_latent_grid(make) -> None:
    """The masked branch is the unmasked one times the mask on the patch grid, which is the latents' (8 × 6 here),
    not a guess from the mask's aspect: the left half of a square mask (whose aspect would suggest 6 × 8) is exactly
    the grid's three left columns."""
    model = df.sd3_transformer()
    adapter = dit_adapter_from_state_dict(df.instantx_state(), model)
    attachment = attach_dit(model, adapter)
    captured = []
    handle = model.transformer_blocks[0].attn.register_forward_hook(lambda m, a, out: captured.append(out[0]))
    mask, on_grid = make()
    for m, scale in ((None, 0.0), (None, 1.0), (mask, 1.0)):
        p = prompt(adapter, features(2), scale=scale)
        p.references[0].mask = m
        attachment.set_prompts({"0": p}, rows=2)
        run(model, inputs(2))
    handle.remove()
    base, plain, masked = captured
    torch.testing.assert_close(masked - base, (plain - base) * on_grid[None, :, None], atol=1e-5, rtol=0)


def test_own_format_round_trip_and_wrong_base(tmp_path) -> None:
    model = df.sd3_transformer()
    adapter = dit_adapter_from_state_dict(df.instantx_state(), model)
    again = load_dit_adapter(save_adapter(adapter, tmp_path / "own.safetensors"), model)
    assert again.config == adapter.config
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), again.state_dict().values()))
    with pytest.raises(IPAdapterError, match="for an SD 3 / 3.5 transformer but this base is a FLUX transformer"):
        dit_adapter_from_state_dict(df.instantx_state(), df.flux_transformer())
    with pytest.raises(IPAdapterError, match="has weights for 3 blocks but this transformer has 2"):
        dit_adapter_from_state_dict(df.instantx_state(blocks=3), model)


def test_cfg_batches_of_several_prompts_equal_diffusers() -> None:
    """Two prompts under CFG (batch 4: two negative rows, then two positive): diffusers gets zero features for the
    negative rows. Without `rows`, `cfg=True` says the same."""
    model = df.sd3_transformer()
    state = df.instantx_state()
    adapter = dit_adapter_from_state_dict(state, model)
    feats, x = features(2), inputs(4)
    expected = run(oracle(model, state, [0.7, 0.7]), x,
                   joint_attention_kwargs={"ip_adapter_image_embeds": torch.cat([torch.zeros_like(feats), feats])})
    attachment = attach_dit(model, adapter)
    attachment.set_prompts({"0": prompt(adapter, feats, scale=0.7)}, rows=2)
    torch.testing.assert_close(run(model, x), expected, atol=TOL, rtol=0)
    feats, x = features(1), inputs(2)
    expected = run(oracle(model, state, [0.7, 0.7]), x,
                   joint_attention_kwargs={"ip_adapter_image_embeds": torch.cat([torch.zeros_like(feats), feats])})
    attachment.set_prompts({"0": prompt(adapter, feats, scale=0.7)}, cfg=True)
    torch.testing.assert_close(run(model, x), expected, atol=TOL, rtol=0)


def test_negative_rows_take_the_unconditional_features() -> None:
    """Under CFG each row is an independent sample: the negative row equals a run of that row alone with the
    unconditional features as its reference, the positive row one with the reference's own."""
    model = df.sd3_transformer()
    adapter = dit_adapter_from_state_dict(df.instantx_state(), model)
    attachment = attach_dit(model, adapter)
    cond, uncond, x = features(1, 0), features(1, 1), inputs(2)
    attachment.set_prompts({"0": AdapterPrompt([Reference(cond=cond, uncond=uncond)])}, rows=1)
    both = run(model, x)
    rows = []
    for i, reference in enumerate((uncond, cond)):
        attachment.set_prompts({"0": AdapterPrompt([Reference(cond=reference)])}, rows=1)
        rows.append(run(model, {k: v[i : i + 1] for k, v in x.items()}))
    torch.testing.assert_close(both, torch.cat(rows), atol=1e-5, rtol=0)


def test_one_timestep_for_the_batch_and_the_resampler_runs_only_when_needed() -> None:
    """A single timestep for the whole batch acts as the same timestep per row, with one reference or several. The
    timestep-aware resampler runs once per transformer call, and not at all outside the step window; an adapter at
    scale 0, or given no reference, acts nowhere and leaves the others as they are."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = df.sd3_transformer()
    adapters = {"a": dit_adapter_from_state_dict(df.instantx_state(seed=1), model),
                "b": dit_adapter_from_state_dict(df.instantx_state(seed=2), model)}
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    attachment = attach_dit(model, adapters, scheduler=scheduler)
    t_in, t_out = float(scheduler.timesteps[1]), float(scheduler.timesteps[0])
    two = AdapterPrompt([Reference(cond=features(2, 0)), Reference(cond=features(2, 1), weight=0.5)], start=0.5)
    attachment.set_prompts({"b": two}, rows=2)
    per_row = run(model, inputs(2, t_in))
    attachment.set_prompts({"b": two}, rows=2)
    torch.testing.assert_close(run(model, {**inputs(2, t_in), "timestep": torch.full((1,), t_in)}), per_row,
                               atol=1e-6, rtol=0)
    calls = []
    handle = adapters["b"].image_proj.register_forward_hook(lambda *a: calls.append(1))
    for idle in (prompt(adapters["a"], features(2, 2), scale=0.0), AdapterPrompt([])):
        attachment.set_prompts({"a": idle, "b": two}, rows=2)
        torch.testing.assert_close(run(model, inputs(2, t_in)), per_row, atol=1e-6, rtol=0)
        outside = run(model, inputs(2, t_out))
    handle.remove()
    assert len(calls) == 2
    attachment.set_prompts({}, rows=2)
    assert torch.equal(run(model, inputs(2, t_out)), outside)
    assert not torch.equal(run(model, inputs(2, t_in)), per_row)


def test_positional_call_reads_the_latents_and_timestep() -> None:
    """Called with positional arguments the transformer acts as with keywords: the latents give the patch grid (the
    mask's), the timestep the resampler's time."""
    model = df.sd3_transformer()
    adapter = dit_adapter_from_state_dict(df.instantx_state(), model)
    attachment = attach_dit(model, adapter)
    mask = torch.zeros(6, 6)
    mask[:, :3] = 1.0
    p = prompt(adapter, features(2))
    p.references[0].mask = mask
    x = inputs(2)
    attachment.set_prompts({"0": p}, rows=2)
    keywords = run(model, x)
    attachment.set_prompts({"0": p}, rows=2)
    with torch.no_grad():
        positional = model(*(x[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                             "timestep"))).sample
    torch.testing.assert_close(positional, keywords, atol=1e-6, rtol=0)


def test_bfloat16_model_gets_a_bfloat16_adapter_and_equals_diffusers() -> None:
    """A bfloat16 transformer (how SD 3.5 is run) gets the adapter in its dtype; float32 features are cast, and the
    output under CFG stays within bfloat16 rounding of diffusers' SD 3 IP-Adapter in bfloat16."""
    model = df.sd3_transformer().to(torch.bfloat16)
    state = df.instantx_state()
    adapter = dit_adapter_from_state_dict(state, model)
    assert {t.dtype for t in adapter.state_dict().values()} == {torch.bfloat16}
    feats = features(1)
    x = {k: v.to(torch.bfloat16) for k, v in inputs(2).items()}
    ref = oracle(model, state, [0.7, 0.7]).to(torch.bfloat16)
    embeds = torch.cat([torch.zeros_like(feats), feats]).to(torch.bfloat16)
    expected = run(ref, x, joint_attention_kwargs={"ip_adapter_image_embeds": embeds}).float()
    base = run(model, x).float()
    attachment = attach_dit(model, adapter)
    as_given = AdapterPrompt([Reference(cond=feats, uncond=torch.zeros_like(feats))], scale=0.7)  # float32
    attachment.set_prompts({"0": as_given}, rows=1)
    ours = run(model, x).float()
    assert (expected - base).abs().max() > 0.05
    torch.testing.assert_close(ours, expected, atol=0.015, rtol=0)  # effect: 0.086; bfloat16 steps near 1: 0.008
    attachment.detach()
    exact = dit_adapter_from_state_dict(state, model, dtype=torch.float32)  # an adapter kept in float32 works too
    attachment = attach_dit(model, exact)
    attachment.set_prompts({"0": as_given}, rows=1)
    torch.testing.assert_close(run(model, x).float(), expected, atol=0.015, rtol=0)


def test_block_norms_are_diffusers_own() -> None:
    """The image branch's AdaNorm and RMS norms compute what diffusers' SD 3 IP processor's do on the same weights,
    also on inputs small enough that each norm's epsilon decides the result."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    model = df.sd3_transformer()
    adapter = dit_adapter_from_state_dict(df.instantx_state(), model)
    ours = adapter.layer("transformer_blocks.0.attn")
    theirs = SD3IPAdapterJointAttnProcessor2_0(df.SD3_WIDTH, df.SD3_WIDTH, df.SD3_WIDTH // 4, timesteps_emb_dim=64)
    theirs.load_state_dict(ours.state_dict())
    assert (ours.to_k_ip.bias, ours.to_v_ip.bias) == (None, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for magnitude in (1.0, 1e-3):
            heads = torch.randn(2, 4, 9, 8, generator=g) * magnitude
            for norm in ("norm_q", "norm_k", "norm_ip_k"):
                mine, diffusers_own = getattr(ours, norm), getattr(theirs, norm)
                torch.testing.assert_close(mine(heads), diffusers_own(heads), atol=1e-5, rtol=1e-5)
            tokens, temb = torch.randn(2, 9, df.SD3_WIDTH, generator=g) * magnitude, torch.randn(2, 64, generator=g)
            torch.testing.assert_close(ours.norm_ip(tokens, temb), theirs.norm_ip(tokens, temb=temb), atol=1e-5,
                                       rtol=1e-5)


def sd3_branch(attn, weights, hidden: torch.Tensor, normed: list[torch.Tensor], factors: list[float], w: float,
               mode: str) -> torch.Tensor:
    """InstantX's SD 3 image branch as published, added to the block's attention output: the image query and keys
    (the adapter's RMS norms) attend jointly over [image keys; IP keys] with values [image values; IP values], IP
    keys RMS-normed per head, each reference's values times its weight, the result through `to_out`'s weight."""
    from tests.test_dit_flux import embeds_scaled

    heads = attn.heads
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = weights.norm_q(split(attn.to_q(hidden))), weights.norm_k(split(attn.to_k(hidden))), split(attn.to_v(hidden))
    ip_k = weights.norm_ip_k(split(torch.cat([weights.to_k_ip(n) for n in normed], dim=1)))
    ip_v = split(torch.cat([weights.to_v_ip(n) * f for n, f in zip(normed, factors)], dim=1))
    ip_k, ip_v, factor = embeds_scaled(ip_k, ip_v, w, mode, df.SD3_WIDTH)
    o = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, ip_k], dim=2), torch.cat([v, ip_v], dim=2))
    return factor * o.transpose(1, 2).flatten(2) @ attn.to_out[0].weight.T


@pytest.mark.parametrize("mode", ["v", "kv", "kv_penalty", "k_mean_v"])
def test_weighted_references_and_scaling_modes_follow_the_published_branch(mode: str) -> None:
    """Two references (the second at weight 2) under each embeds-scaling mode: the block's attention output is the
    base one plus the published branch, computed here from the AdaNorm'd IP tokens the block received."""
    model = df.sd3_transformer()
    adapter = dit_adapter_from_state_dict(df.instantx_state(), model)
    attachment = attach_dit(model, adapter)
    attn, weights = model.transformer_blocks[0].attn, adapter.layer("transformer_blocks.0.attn")
    seen, normed = [], []
    hooks = [attn.register_forward_hook(lambda m, a, kw, out: seen.append((out[0], kw["hidden_states"])),
                                        with_kwargs=True),
             weights.norm_ip.register_forward_hook(lambda m, a, out: normed.append(out))]
    refs = AdapterPrompt([Reference(cond=features(2, 0)), Reference(cond=features(2, 1), weight=2.0)], scale=0.6,
                         scaling=mode)
    for prompts in ({}, {"0": refs}):
        attachment.set_prompts(prompts, rows=2)
        run(model, inputs(2))
    for h in hooks:
        h.remove()
    (base, hidden), (got, _) = seen
    with torch.no_grad():
        expected = base + sd3_branch(attn, weights, hidden, normed, [1.0, 2.0], 0.6, mode)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---- through the pipeline ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("sd3")
    folder = df.save_sd3_base(root)
    state = df.instantx_state()
    torch.save(state, root / "ip-adapter.bin")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "ref.png")
    return root, folder, state


def test_pipeline_images_equal_diffusers(sd3_base) -> None:
    """StableDiffusion3Pipeline under CFG: our adapter's final image equals diffusers' SD 3 IP-Adapter fed the same
    SigLIP features (its negative: zero features, as ours)."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    import ipadapter

    root, folder, state = sd3_base
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    reference = Image.open(root / "ref.png")
    prompter = ipadapter.load(pipe, str(root / "ip-adapter.bin"))
    feats = prompter.encoder.encode([reference], "patch")
    common = dict(num_inference_steps=2, width=16, height=16, guidance_scale=4.0, max_sequence_length=8,
                  output_type="np")
    ours = prompter.generate(reference, prompt="a cat", scale=0.6, seed=1, steps=2, guidance=4.0, width=16,
                             height=16, max_sequence_length=8, output_type="np")
    prompter.detach()
    plain = pipe(prompt="a cat", generator=torch.Generator().manual_seed(1), **common).images
    ref = copy.deepcopy(pipe)
    ref.transformer._load_ip_adapter_weights(copy.deepcopy(state), low_cpu_mem_usage=False)
    ref.set_ip_adapter_scale(0.6)
    expected = ref(prompt="a cat", ip_adapter_image_embeds=torch.cat([torch.zeros_like(feats), feats]),
                   generator=torch.Generator().manual_seed(1), **common).images
    assert np.abs(expected - plain).max() > 1e-3
    np.testing.assert_allclose(np.asarray(ours[0]), expected[0], atol=TOL, rtol=0)


def test_cli_generate_on_an_sd3_pipeline(sd3_base, tmp_path, capsys) -> None:
    from PIL import Image

    from ipadapter.cli.main import main

    root, folder, _ = sd3_base
    out = tmp_path / "x.png"
    argv = ["generate", "--base", str(folder), "--adapter", str(root / "ip-adapter.bin"), "--image",
            str(root / "ref.png"), "--out", str(out), "--steps", "2", "--width", "16", "--height", "16"]
    assert main(argv) == 0
    assert Image.open(out).size == (16, 16)
    capsys.readouterr()
    for extra, message in ((["--preset", "style transfer"], "per-block weights"), (["--true-cfg", "4"], "FLUX's option")):
        assert main([*argv, *extra]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
