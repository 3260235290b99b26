"""Training an SD 3 / 3.5 adapter (InstantX's layout) on a tiny SD 3 pipeline with a tiny SigLIP. Independent sides:
diffusers' `IPAdapterTimeImageProjection` defaults (InstantX's published shapes), diffusers' logit-normal draw and
its flow-matching scheduler's shift, diffusers' SD 3 transformer with the written file loaded by its own loader (the
loss computed through it), and `ipadapter generate` reading the trained file as a user would."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.cli.main import main
from ipadapter.dit.attach import attach_dit
from ipadapter.dit.checkpoint import load_dit_adapter
from ipadapter.dit.flow import flow_matching_loss
from ipadapter.dit.train import encode, train_dit_adapter
from ipadapter.dit.train_sd3 import new_sd3_adapter, save_instantx, shifted_logit_normal
from ipadapter.projection.detect import detect_time_resampler, new_projection
from ipadapter.siglip import SiglipEncoder
from ipadapter.train.dropout import Drops
from tests import dit_factories as df

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # the run builds an Accelerator
COLOURS = [(230, 40, 40), (40, 200, 60), (40, 60, 230), (230, 220, 40)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved tiny SD 3 pipeline folder (SigLIP in image_encoder/), four flat colours captioned without their colour
    (only the image prompt can lower the loss) and their manifest."""
    root = tmp_path_factory.mktemp("sd3-train")
    folder = df.save_sd3_base(root)
    (root / "data" / "images").mkdir(parents=True)
    lines = []
    for i, colour in enumerate(COLOURS):
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(root / "data" / "images" / f"{i}.png")
        lines.append(json.dumps({"image_file": f"images/{i}.png", "text": "a square"}))
    (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root, folder


def _pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(root) -> list[Image.Image]:
    return [Image.open(root / "data" / "images" / f"{i}.png").convert("RGB") for i in range(len(COLOURS))]


def _fixed(batch) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.rand(4, generator=g) * 0.5 + 0.25, torch.randn(batch.latents.shape, generator=g)


def _our_loss(transformer, adapter, batch, sigma, noise, drops) -> float:
    attachment = attach_dit(transformer, adapter)
    with torch.no_grad():
        loss = float(flow_matching_loss(attachment, adapter, batch, sigma=sigma, noise=noise, drops=drops))
    attachment.detach()
    return loss


def test_a_new_head_has_instantx_shapes() -> None:
    """InstantX's SD 3.5 Large head is diffusers' `IPAdapterTimeImageProjection` with its defaults (SigLIP so400m's
    1152 → 2432, 64 queries): a new head for 2432-wide blocks and 1152-wide features reads the same from its keys."""
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    with torch.device("meta"):
        theirs = IPAdapterTimeImageProjection().state_dict()
    published = {}
    for key, value in theirs.items():  # diffusers' names back to the published ones (as dit_factories writes them)
        for ours, name in df._INSTANTX_NAMES:
            key = key.replace(f".{ours}.", f".{name}.")
        published[key] = value
    assert new_projection("time_resampler", cross_dim=2432, tokens=64, hidden_dim=1152) == \
        detect_time_resampler(published)


def test_a_new_adapter_starts_from_each_blocks_text_branch() -> None:
    """K'/V' are the block's text-stream key/value projections (the paper's initialisation), the norms the block's
    own RMS q/k norms (SD 3.5 has them), and the IP tokens' AdaNorm starts as a plain LayerNorm."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                  pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm")
    for block in model.transformer_blocks:
        for norm in (block.attn.norm_q, block.attn.norm_k, block.attn.norm_added_k):
            torch.nn.init.normal_(norm.weight)
    adapter = new_sd3_adapter(model, feature_dim=df.SIGLIP_DIM, tokens=8)
    for i, (name, weights) in enumerate(adapter.named_layers()):
        attn = model.transformer_blocks[i].attn
        assert name == f"transformer_blocks.{i}.attn"
        assert torch.equal(weights.to_k_ip.weight, attn.add_k_proj.weight)
        assert torch.equal(weights.to_v_ip.weight, attn.add_v_proj.weight)
        assert torch.equal(weights.norm_q.weight, attn.norm_q.weight)
        assert torch.equal(weights.norm_k.weight, attn.norm_k.weight)
        assert torch.equal(weights.norm_ip_k.weight, attn.norm_added_k.weight)
        x, temb = torch.randn(2, 8, 32), torch.randn(2, adapter.config.projection.dim)
        torch.testing.assert_close(weights.norm_ip(x, temb), torch.nn.functional.layer_norm(x, (32,), eps=1e-6))


def test_sigma_is_diffusers_logit_normal_draw_on_the_schedulers_shifted_schedule() -> None:
    """The σ of a step: diffusers' SD 3 training draw (`compute_density_for_timestep_sampling("logit_normal")`), put
    through the flow-matching scheduler's own shift (3.0, as SD 3.5's scheduler config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = shifted_logit_normal(type("Pipe", (), {"scheduler": scheduler})())(64, torch.Generator().manual_seed(3))
    u = compute_density_for_timestep_sampling("logit_normal", 64, 0.0, 1.0, generator=torch.Generator().manual_seed(3))
    scheduler.set_timesteps(sigmas=u.sort(descending=True).values.numpy())
    torch.testing.assert_close(ours.sort(descending=True).values, scheduler.sigmas[:-1], atol=1e-6, rtol=0)


def test_training_lowers_the_loss_and_diffusers_computes_the_same_loss_from_the_written_file(base, tmp_path) -> None:
    """The loss on a fixed batch, σ and noise falls; the adapter written in InstantX's layout, loaded by diffusers'
    SD 3 loader, gives diffusers' transformer the same loss, rows dropped as the recipe drops them: zero SigLIP
    features for the image, the empty prompt for the text, t = 1000·σ."""
    root, folder = base
    pipe = _pipe(folder)
    encoder = SiglipEncoder.from_pretrained(str(folder / "image_encoder"))
    images = _images(root)
    batch = encode(pipe, encoder, images, ["a square"] * 4, 16)
    sigma, noise = _fixed(batch)
    keep = Drops(image=torch.zeros(4, dtype=torch.bool), text=torch.zeros(4, dtype=torch.bool))
    torch.manual_seed(0)
    start = new_sd3_adapter(pipe.transformer, feature_dim=encoder.patch_dim, tokens=8)
    before = _our_loss(pipe.transformer, start, batch, sigma, noise, keep)
    trained, losses = train_dit_adapter(pipe, encoder, images, ["a square"] * 4, steps=40, size=16,
                                        adapter=start, lr=3e-3)
    assert len(losses) == 40
    assert _our_loss(pipe.transformer, trained, batch, sigma, noise, keep) < 0.9 * before

    path = save_instantx(trained, tmp_path / "run" / "ip-adapter.safetensors")
    drops = Drops(image=torch.tensor([True, False, False, True]), text=torch.tensor([False, True, False, True]))
    ours = _our_loss(pipe.transformer, load_dit_adapter(path, pipe.transformer), batch, sigma, noise, drops)

    pipe.load_ip_adapter(str(path.parent), weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)  # training runs the branch at full weight; diffusers' SD 3 default is 0.5
    empty_text, _, empty_pooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False)
    features = torch.where(drops.image[:, None, None], 0.0, batch.image)
    text = torch.where(drops.text[:, None, None], empty_text, batch.text)
    pooled = torch.where(drops.text[:, None], empty_pooled, batch.pooled)
    x_sigma = (1 - sigma[:, None, None, None]) * batch.latents + sigma[:, None, None, None] * noise
    with torch.no_grad():
        pred = pipe.transformer(hidden_states=x_sigma, timestep=1000 * sigma, encoder_hidden_states=text,
                                pooled_projections=pooled,
                                joint_attention_kwargs={"ip_adapter_image_embeds": features}).sample
    theirs = float(torch.nn.functional.mse_loss(pred, noise - batch.latents))
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_cli_trains_writes_the_model_folder_and_generate_reads_it(base, tmp_path, capsys) -> None:
    """`ipadapter train --variant sd3` as a user runs it, then `ipadapter generate` with the written file."""
    root, folder = base
    out = tmp_path / "run"
    code = main(["train", "--variant", "sd3", "--base", str(folder), "--image-encoder", str(folder / "image_encoder"),
                 "--data", str(root / "data" / "train.jsonl"), "--resolution", "16", "--max-steps", "3",
                 "--batch-size", "2", "--seed", "3", "--num-workers", "0", "--output", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"ip-adapter.safetensors", "adapter.ipadapter.safetensors", "README.md",
                                              "config.json", "loss.png", "logs"}
    assert len((out / "logs" / "losses.csv").read_text().splitlines()) == 3
    assert "InstantX's SD 3.5 layout (diffusers' `StableDiffusion3Pipeline.load_ip_adapter`)" in \
        (out / "README.md").read_text()
    published = load_dit_adapter(out / "ip-adapter.safetensors", _pipe(folder).transformer)
    own = load_dit_adapter(out / "adapter.ipadapter.safetensors", _pipe(folder).transformer)
    assert published.config.variant == own.config.variant == "sd3" and published.config.tokens == 64
    assert all(torch.equal(a, b) for a, b in zip(published.state_dict().values(), own.state_dict().values()))
    image = tmp_path / "x.png"
    assert main(["generate", "--base", str(folder), "--adapter", str(out / "ip-adapter.safetensors"),
                 "--image", str(root / "data" / "images" / "0.png"), "--prompt", "a square", "--out", str(image),
                 "--steps", "2", "--width", "16", "--height", "16"]) == 0
    assert Image.open(image).size == (16, 16)


def test_an_sd35_medium_base_trains_and_generates(base, tmp_path) -> None:
    """SD 3.5 Medium's kind of transformer (blocks with a second attention, `attn2`): a run trains one image branch
    per block, on the joint attention (`attn2` keeps its own processor), and `generate` reads the written file, the
    branch acting on the image."""
    from diffusers import StableDiffusion3Pipeline

    root, _ = base
    folder = df.save_sd3_base(tmp_path / "medium", dual=(0,))
    out = tmp_path / "run"
    assert main(["train", "--variant", "sd3", "--base", str(folder), "--image-encoder", str(folder / "image_encoder"),
                 "--data", str(root / "data" / "train.jsonl"), "--resolution", "16", "--max-steps", "2",
                 "--batch-size", "2", "--seed", "3", "--num-workers", "0", "--output", str(out)]) == 0
    transformer = StableDiffusion3Pipeline.from_pretrained(str(folder)).transformer
    trained = load_dit_adapter(out / "ip-adapter.safetensors", transformer)
    assert [name for name, _ in trained.named_layers()] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    images = []
    for scale in ("1.0", "0.0"):
        assert main(["generate", "--base", str(folder), "--adapter", str(out / "ip-adapter.safetensors"),
                     "--image", str(root / "data" / "images" / "0.png"), "--prompt", "a square", "--out",
                     str(tmp_path / f"{scale}.png"), "--steps", "2", "--width", "16", "--height", "16",
                     "--scale", scale, "--seed", "1"]) == 0
        images.append(np.asarray(Image.open(tmp_path / f"{scale}.png"), np.int16))
    assert np.abs(images[0] - images[1]).max() > 0


@pytest.mark.parametrize("flags, says", [
    (["--prediction-type", "epsilon"], "--prediction-type does not apply to SD 3 training: the transformer predicts"),
    (["--num-tokens", "16"], "--num-tokens does not apply to SD 3 training: the variant sets the tokens"),
    (["--mixed-precision", "fp16"], "--mixed-precision fp16 does not apply to SD 3 training: use bf16"),
    (["--snr-gamma", "5"], "--snr-gamma does not apply to SD 3 training"),
])
def test_options_an_sd3_run_does_not_have_are_refused(base, tmp_path, capsys, flags: list[str], says: str) -> None:
    root, folder = base
    code = main(["train", "--variant", "sd3", "--base", str(folder), "--image-encoder", str(folder / "image_encoder"),
                 "--data", str(root / "data" / "train.jsonl"), "--output", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and says in err[0]
    assert not (tmp_path / "run").exists()


def test_a_resolution_the_sd3_base_cannot_take_and_a_flux_adapter_to_start_from_are_refused(base, tmp_path,
                                                                                            capsys) -> None:
    root, folder = base
    common = ["train", "--variant", "sd3", "--base", str(folder), "--image-encoder", str(folder / "image_encoder"),
              "--data", str(root / "data" / "train.jsonl"), "--output", str(tmp_path / "run"), "--max-steps", "1"]
    step = _pipe(folder).vae_scale_factor  # × the transformer's patch size, 1 here
    assert main([*common, "--resolution", str(8 * step + 1)]) != 0
    assert capsys.readouterr().err.strip() == (
        f"ipadapter: error: --resolution {8 * step + 1} does not fit this SD 3 base: it must be a multiple of {step} "
        "(VAE downscale × the transformer's patch size)")
    pipe = _pipe(folder)  # the largest size: as many latent patches a side as diffusers' positions cover
    largest = pipe.transformer.config.pos_embed_max_size * pipe.transformer.config.patch_size * step
    with torch.no_grad():
        pipe.transformer(hidden_states=torch.zeros(1, 4, largest // step, 1), timestep=torch.ones(1),
                         encoder_hidden_states=torch.zeros(1, 1, 64), pooled_projections=torch.zeros(1, 64))
        with pytest.raises(ValueError, match="cannot be greater than"):
            pipe.transformer(hidden_states=torch.zeros(1, 4, largest // step + 1, 1), timestep=torch.ones(1),
                             encoder_hidden_states=torch.zeros(1, 1, 64), pooled_projections=torch.zeros(1, 64))
    assert main([*common, "--resolution", str(largest + step)]) != 0
    assert capsys.readouterr().err.strip() == (
        f"ipadapter: error: --resolution {largest + step} is larger than this SD 3 base takes ({largest} px)")
    flux_file = tmp_path / "flux.safetensors"
    from safetensors.torch import save_file

    save_file(df.xlabs_state(), str(flux_file))
    assert main([*common, "--resolution", "16", "--init-from", str(flux_file)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ipadapter: error: {flux_file} is an IP-Adapter for a FLUX transformer but this base is an "
                          "SD 3 / 3.5 transformer")


def test_an_image_dropped_from_every_sample_is_zero_features_the_head_cannot_learn_from(base, tmp_path) -> None:
    """Zero features (SD 3's unconditional image) give the head's input projection no gradient: with every image
    dropped and no weight decay it ends where it started; with none dropped it moves."""
    from ipadapter.train.config import TrainConfig
    from ipadapter.train.transformer import train_transformer

    root, folder = base
    start = tmp_path / "start.safetensors"
    torch.manual_seed(0)
    save_instantx(new_sd3_adapter(_pipe(folder).transformer, feature_dim=df.SIGLIP_DIM), start)
    config = dict(variant="sd3", base=str(folder), image_encoder=str(folder / "image_encoder"), init_from=str(start),
                  data=str(root / "data" / "train.jsonl"), resolution=16, max_steps=2, batch_size=2, num_workers=0,
                  weight_decay=0.0, drop_text=0.0, drop_both=0.0)
    runs = {drop: train_transformer(TrainConfig(**config, drop_image=drop, output=str(tmp_path / str(drop))))
            for drop in (1.0, 0.0)}
    weights = {drop: run.adapter.image_proj.proj_in.weight for drop, run in runs.items()}
    from safetensors.torch import load_file

    initial = load_file(str(start))["image_proj.proj_in.weight"]
    assert torch.equal(weights[1.0], initial) and not torch.equal(weights[0.0], initial)


def test_training_in_memory_takes_its_arguments_and_refuses_unpaired_data(base) -> None:
    """`train_dit_adapter`: a new adapter of the family's own variant when none is given, the batch size (4 unless
    given), the text length, the learning rate and the seed reach the loop; the result is frozen; images without one
    caption each are refused in one sentence."""
    from ipadapter.errors import IPAdapterError

    root, folder = base
    pipe = _pipe(folder)
    encoder = SiglipEncoder.from_pretrained(str(folder / "image_encoder"))
    images = _images(root) + _images(root)[:2]
    seen: list[tuple[int, int]] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape[0],
                                                  kwargs["encoder_hidden_states"].shape[1])), with_kwargs=True)
    text_length = pipe.encode_prompt(["a square"], None, None, do_classifier_free_guidance=False,
                                     max_sequence_length=8)[0].shape[1]
    torch.manual_seed(0)
    still, _ = train_dit_adapter(pipe, encoder, images, ["a square"] * 6, steps=2, size=16, lr=0.0,
                                 max_sequence_length=8)
    assert seen == [(4, text_length)] * 2
    assert (still.config.variant, still.config.tokens) == ("sd3", 64)
    assert not still.training and not any(p.requires_grad for p in still.parameters())
    torch.manual_seed(0)
    start = new_sd3_adapter(pipe.transformer, feature_dim=encoder.patch_dim)
    assert all(torch.equal(a, b) for a, b in zip(still.state_dict().values(), start.state_dict().values()))
    seen.clear()
    first = new_sd3_adapter(pipe.transformer, feature_dim=encoder.patch_dim, tokens=8)
    runs = [train_dit_adapter(pipe, encoder, images, ["a square"] * 6, steps=2, size=16, lr=1e-2, batch_size=3,
                              seed=seed, adapter=copy.deepcopy(first))[0] for seed in (1, 1, 2)]
    hook.remove()
    assert [rows for rows, _ in seen] == [3] * 6
    same = [all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), other.state_dict().values()))
            for other in (*runs[1:], first)]
    assert same == [True, False, False]
    with pytest.raises(IPAdapterError) as caught:
        train_dit_adapter(pipe, encoder, images, ["a square"] * 5, steps=1, size=16)
    assert str(caught.value) == "give one caption per image, got 6 images and 5 captions"


def test_validation_samples_are_what_the_user_gets_from_the_adapter_of_that_step(base, tmp_path) -> None:
    """`--validate-every`: a grid PNG per validation (row: the reference, then one sample per prompt) and the card's
    samples.png; each sample is the image `ipadapter.load(...).generate(...)` makes with the adapter of that step
    (here the last step's, the written file, in the second validation, which draws from the prompts and reference
    the first encoded) on the same pipeline, prompt, seed, steps, guidance and size."""
    import ipadapter
    from ipadapter.train.config import TrainConfig
    from ipadapter.train.transformer import train_transformer

    root, folder = base
    reference = root / "data" / "images" / "2.png"
    out = tmp_path / "run"
    result = train_transformer(TrainConfig(
        variant="sd3", base=str(folder), image_encoder=str(folder / "image_encoder"),
        data=str(root / "data" / "train.jsonl"), resolution=16, max_steps=2, batch_size=2, num_workers=0,
        learning_rate=1e-2, validate_every=1, validation_images=[str(reference)], validation_prompts=["", "a square"],
        validation_steps=2, validation_guidance=3.0, output=str(out)))
    grid = Image.open(out / "validation" / "step-00000002.png").convert("RGB")
    assert grid.size == (3 * 16, 16) and set(result.validation) == {1, 2}
    assert (out / "samples.png").read_bytes() == (out / "validation" / "step-00000002.png").read_bytes()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "train"))
    events.Reload()
    assert "validation" in events.Tags()["images"] and "train/loss" in events.Tags()["scalars"]
    pipe = _pipe(folder)
    prompter = ipadapter.load(pipe, str(out / "ip-adapter.safetensors"), image_encoder=str(folder / "image_encoder"))
    for column, prompt in enumerate(["", "a square"], start=1):
        expected = prompter.generate(Image.open(reference), prompt=prompt, steps=2, guidance=3.0, seed=42, width=16,
                                     height=16)[0]
        plain = prompter.generate(Image.open(reference), prompt=prompt, steps=2, guidance=3.0, seed=42, width=16,
                                  height=16, scale=0.0)[0]
        got = grid.crop((16 * column, 0, 16 * column + 16, 16))
        assert np.abs(np.asarray(got, np.int16) - np.asarray(expected, np.int16)).max() <= 1
        assert np.abs(np.asarray(plain, np.int16) - np.asarray(expected, np.int16)).max() > 8  # the adapter acts
