"""The training loop on tiny in-memory models: loss falls, exact resume, diffusers loads the result, refusals."""

from __future__ import annotations

import copy
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ipadapter import IPAdapterError, attach, load_adapter
from ipadapter.train import TrainConfig, train
from ipadapter.train.checkpoint import latest_checkpoint
from ipadapter.train.data import Decoder, collate, read_manifest
from ipadapter.train.models import encode_text
from ipadapter.train.trainer import adapter_config_for
from ipadapter import IPAdapter
from tests import factories


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _config(tmp_path, data, **kw) -> TrainConfig:
    base = dict(data=str(data), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=4, max_steps=4,
                save_every=1000, num_workers=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def eval_loss(models, encoder, adapter, manifest, draws: int = 6) -> float:
    """Epsilon MSE on the training images with fixed noise and timesteps (paired across adapters)."""
    from diffusers import DDPMScheduler

    examples = [Decoder(factories.RES, encoder.processor)(r) for r in read_manifest(manifest)]
    batch = collate([e for e in examples])
    vae, unet = models.vae, models.unet
    latents = vae.encode(batch["pixels"]).latent_dist.mean * vae.config.scaling_factor
    text, _ = encode_text(models, batch["text"], torch.device("cpu"))
    feats = encoder.encode_pixels(batch["clip"], "global")
    sched = DDPMScheduler.from_config(models.scheduler_config)
    g = torch.Generator().manual_seed(123)
    att = attach(unet, adapter)
    try:
        from ipadapter import AdapterPrompt, Reference

        att.set_prompts({"0": AdapterPrompt([Reference(cond=adapter.project(feats))])})
        total = 0.0
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
            pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
            total += float(torch.nn.functional.mse_loss(pred, noise))
    finally:
        att.detach()
    return total / draws


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One overfit run (no dropout; lr 1e-2 so that 30 steps show it) on 4 images plus a corrupt and a missing one."""
    tmp = tmp_path_factory.mktemp("overfit")
    manifest = factories.write_images(tmp / "data", 4, corrupt=1, missing=1)
    clean = factories.write_images(tmp / "data", 4, manifest="clean.jsonl")
    models, encoder = factories.in_memory()
    config = _config(tmp, manifest, max_steps=30, batch_size=4, learning_rate=1e-2, drop_image=0.0, drop_text=0.0,
                     drop_both=0.0)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    factories.reset_accelerate()
    return {"result": result, "models": models, "encoder": encoder, "clean": clean, "tmp": tmp}


def test_loss_falls_on_overfit_set(trained) -> None:
    models, encoder = trained["models"], trained["encoder"]
    torch.manual_seed(0)
    untrained = IPAdapter.for_unet(models.unet, adapter_config_for("base", cross_dim=factories.CROSS, embed_dim=24))
    before = eval_loss(models, encoder, untrained, trained["clean"])
    after = eval_loss(models, encoder, trained["result"].adapter, trained["clean"])
    # paired, fixed-noise evaluation: the adapter alone (UNet frozen) must lower the loss clearly
    assert after < 0.92 * before, (before, after)  # measured: 1.12 → 0.95
    assert all(np.isfinite(trained["result"].losses))


def test_bad_samples_skipped_and_counted(trained) -> None:
    skipped = trained["result"].skipped
    # 30 steps × 4 good samples = 30 epochs of the 6 entries: each bad entry comes up once per epoch, counted each time
    assert skipped == {"undecodable image": 30, "missing image file": 30}
    assert set(skipped) == {"undecodable image", "missing image file"}


def test_published_adapter_loads_in_diffusers_and_changes_output(trained) -> None:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    models, encoder, result = trained["models"], trained["encoder"], trained["result"]
    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0],
        unet=copy.deepcopy(models.unet), scheduler=__import__("diffusers").DDIMScheduler.from_config(models.scheduler_config),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    reference = Image.open(trained["tmp"] / "data" / "img0.png")

    def run(**kw):
        return pipe(prompt="a red square", num_inference_steps=2, height=factories.RES, width=factories.RES, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kw).images

    plain = run()
    pipe.load_ip_adapter(str(result.output), subfolder="", weight_name=result.published.name, image_encoder_folder=None)
    pipe.image_encoder, pipe.feature_extractor = encoder.model, encoder.processor
    with_adapter = run(ip_adapter_image=reference)
    pipe.set_ip_adapter_scale(0.0)
    scale0 = run(ip_adapter_image=reference)
    assert np.abs(with_adapter - plain).max() > 1e-3
    np.testing.assert_allclose(scale0, plain, atol=1e-5)
    # and our own loader reads both files to the same weights
    ours = load_adapter(result.own, models.unet)
    published = load_adapter(result.published, models.unet)
    for (k, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(published.state_dict().items())):
        assert torch.equal(a, b), k


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_weights(path_a, path_b) -> None:
    a, b = _weights(path_a), _weights(path_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Killed(Exception):
    pass


def _train_killed_at_step_3(config: TrainConfig, models, encoder) -> None:
    """A run killed during step 3: its last checkpoint is the one at step 2 (`save_every=2`)."""
    def kill(step, loss):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(config, models=models, image_encoder=encoder, log_with=None, on_step=kill)


@pytest.mark.parametrize("source", ["manifest", "shards"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, source) -> None:
    """Options on (grad accumulation, clipping, warm-up, EMA, noise offset, dropout): the state must carry them all.
    Shards: with a sample shuffle buffer smaller than an epoch, so the state holds a partly filled buffer."""
    if source == "manifest":
        manifest = factories.write_images(tmp_path / "data", 6, corrupt=1)
    else:
        manifest = factories.write_shards(tmp_path / "shards", 7, per_shard=2, corrupt_every=4)
    models, encoder = factories.in_memory()
    options = dict(max_steps=4, batch_size=2, save_every=2, grad_accum=2, max_grad_norm=0.5, warmup_steps=2,
                   ema_decay=0.9, noise_offset=0.05, learning_rate=1e-3, drop_image=0.2, drop_text=0.2, drop_both=0.2,
                   shuffle_buffer=4)
    full = train(_config(tmp_path / "a", manifest, **options), models=models, image_encoder=encoder, log_with=None)

    config = _config(tmp_path / "b", manifest, **options)
    _train_killed_at_step_3(config, models, encoder)
    state = json.loads((latest_checkpoint(config.output) / "trainer_state.json").read_text())
    assert state["step"] == 2 and (source == "manifest" or state["data"][0]["buffer"])
    resumed = train(config.replace(resume="latest"), models=models, image_encoder=encoder, log_with=None)
    assert resumed.step == 4
    _assert_same_weights(full.published, resumed.published)
    assert full.losses[2:] == resumed.losses
    assert full.skipped == resumed.skipped


def test_resume_refuses_other_variant_and_base(tmp_path) -> None:
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    config = _config(tmp_path, manifest, max_steps=1, batch_size=2)
    train(config, models=models, image_encoder=encoder, log_with=None)
    processors = dict(models.unet.attn_processors)
    with pytest.raises(IPAdapterError, match="variant 'base'.*'plus'"):
        train(config.replace(variant="plus", resume=config.output, max_steps=2), models=models,
              image_encoder=encoder, log_with=None)
    assert dict(models.unet.attn_processors) == processors, "a refused run leaves the caller's UNet as it was"
    other, _ = factories.in_memory()
    other.unet, other.name = factories.unet(seed=99), ""  # models in memory without a name
    theirs = dict(other.unet.attn_processors)
    with pytest.raises(IPAdapterError) as caught:
        train(config.replace(resume=config.output, max_steps=2), models=other, image_encoder=encoder, log_with=None)
    assert dict(other.unet.attn_processors) == theirs, "refused after the adapter was attached: detached again"
    assert str(caught.value) == (f"cannot resume from {latest_checkpoint(config.output)}: it was trained on base "
                                 "'tiny', this run uses 'in-memory base' (a different UNet)")


def test_a_checkpoints_state_names_its_base_and_the_sum_of_its_weights(tmp_path) -> None:
    """The state file says which base it trained (the name a refusal gives) and each replica's sum of the trained
    weights (replicas must agree): here one process, whose sum is that of the checkpoint's adapter file."""
    from safetensors.torch import load_file

    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    train(_config(tmp_path, manifest, max_steps=2, batch_size=2, save_every=1, keep_checkpoints=2, learning_rate=1e-2),
          models=models, image_encoder=encoder, log_with=None)
    for saved in ("state-00000001", "state-00000002"):
        folder = tmp_path / "out" / "checkpoints" / saved
        state = json.loads((folder / "trainer_state.json").read_text())
        weights = load_file(str(folder / "adapter.safetensors"))
        assert state["base"] == "tiny" and state["num_processes"] == 1
        assert state["weight_checksums"] == [pytest.approx(sum(float(t.double().sum()) for t in weights.values()),
                                                           rel=1e-12, abs=1e-9)]
    first, second = (json.loads((tmp_path / "out" / "checkpoints" / s / "trainer_state.json").read_text())
                     for s in ("state-00000001", "state-00000002"))
    assert first["weight_checksums"] != second["weight_checksums"], "a step changed the weights"


def test_train_refuses_a_flux_variant_models_without_an_image_encoder_and_a_file_for_output(tmp_path) -> None:
    manifest = factories.write_images(tmp_path / "data", 2)
    models, encoder = factories.in_memory()
    from ipadapter.train.trainer import train as train_unet

    with pytest.raises(IPAdapterError) as caught:
        train_unet(_config(tmp_path, manifest, variant="flux", resolution=16), log_with=None)
    assert str(caught.value) == "variant 'flux' is trained by ipadapter.train.transformer.train_transformer, not here"
    with pytest.raises(IPAdapterError) as caught:  # the entry point for every family takes a UNet run's options
        train(_config(tmp_path, manifest, variant="flux", resolution=16), models=models, log_with=None)
    assert str(caught.value) == "a 'flux' run takes on_step and log_with only, not models"
    with pytest.raises(IPAdapterError) as caught:
        train(_config(tmp_path, manifest, variant="plus"), models=models, log_with=None)
    assert str(caught.value) == "variant 'plus' needs an image encoder"
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(IPAdapterError) as caught:
        train(_config(tmp_path, manifest, output=str(tmp_path / "taken" / "run")), models=models,
              image_encoder=encoder, log_with=None)
    assert str(caught.value) == f"--output {tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is a file, not a folder"


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    from accelerate import Accelerator

    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    real = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    config = _config(tmp_path, manifest, max_steps=4, batch_size=2, save_every=2)
    with pytest.raises(IPAdapterError, match=r"disk is full.*state-00000002 is intact"):
        train(config, models=models, image_encoder=encoder, log_with=None)
    good = latest_checkpoint(config.output)
    assert good.name == "state-00000002" and (good / "adapter.safetensors").is_file()
    assert not list((good.parent).glob(".tmp-*"))


def test_a_step_saved_again_replaces_its_checkpoint_whole(tmp_path) -> None:
    """Resuming from an older state saves a step that exists: the new folder takes its place, nothing is left aside."""
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    config = _config(tmp_path, manifest, max_steps=4, batch_size=2, save_every=2, keep_checkpoints=2)
    train(config, models=models, image_encoder=encoder, log_with=None)
    root = latest_checkpoint(config.output).parent
    first = (root / "state-00000004").stat().st_ino
    train(config.replace(resume=str(root / "state-00000002")), models=models, image_encoder=encoder, log_with=None)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["state-00000002", "state-00000004"]
    assert (root / "state-00000004").stat().st_ino != first, "the step was saved again, not skipped"
    assert latest_checkpoint(config.output).name == "state-00000004"


def test_sdxl_v_prediction_bf16_checkpointing_trains(tmp_path) -> None:
    """SDXL conditioning (two text encoders, pooled, time_ids), v-prediction, bf16 autocast, gradient checkpointing."""
    manifest = factories.write_images(tmp_path / "data", 4, size=(20, 28))
    models, encoder = factories.in_memory(sdxl=True, prediction_type="v_prediction")
    config = _config(tmp_path, manifest, variant="plus", max_steps=2, batch_size=2, mixed_precision="bf16",
                     gradient_checkpointing=True, validate_every=2, validation_steps=2)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    assert result.step == 2 and all(np.isfinite(result.losses))
    assert (result.output / "validation" / "step-00000002.png").is_file()
    assert result.adapter.config.projection.cross_dim == 2 * factories.CROSS


def test_simple_adapter_ablation_trains_only_the_projection(tmp_path) -> None:
    """attention="concat": the UNet's frozen to_k/to_v read the image tokens; the projection is all that learns."""
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    before = copy.deepcopy(models.unet.state_dict())
    config = _config(tmp_path, manifest, attention="concat", max_steps=2, batch_size=2, learning_rate=1e-2)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    assert result.published is None  # no published layout exists for it
    own = load_adapter(result.own, models.unet)
    assert own.config.attention == "concat" and not any(k.startswith("layers.") for k in own.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in models.unet.state_dict().items())
    with pytest.raises(IPAdapterError, match="'concat' attention, this run 'decoupled'"):
        train(config.replace(attention="decoupled", resume=config.output, max_steps=3), models=models,
              image_encoder=encoder, log_with=None)
    assert train(config.replace(resume=config.output, max_steps=3), models=models, image_encoder=encoder,
                 log_with=None).step == 3, "the same attention resumes"
    with pytest.raises(IPAdapterError, match="base variant"):
        config.replace(variant="plus").validate()


def test_num_tokens_sets_the_image_tokens_of_a_new_adapter(tmp_path) -> None:
    """The base variant's projection makes `num_tokens` tokens: the published image_proj.proj is (tokens · cross
    attention width, CLIP embedding width)."""
    from safetensors.torch import load_file

    manifest = factories.write_images(tmp_path / "data", 2)
    models, encoder = factories.in_memory()
    result = train(_config(tmp_path, manifest, max_steps=1, batch_size=2, num_tokens=2), models=models,
                   image_encoder=encoder, log_with=None)
    weight = load_file(str(result.published))["image_proj.proj.weight"]
    assert tuple(weight.shape) == (2 * factories.CROSS, encoder.global_dim)


@pytest.mark.parametrize("variant", ["plus", "full", "faceid", "faceid-plus", "faceid-plusv2"])
def test_other_variants_train_reload_and_fine_tune(tmp_path, variant) -> None:
    manifest = factories.write_images(tmp_path / "data", 4, id_dim=8)
    models, encoder = factories.in_memory()
    config = _config(tmp_path / "a", manifest, variant=variant, max_steps=1, batch_size=2, id_dim=8, lora_rank=4)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    loaded = load_adapter(result.published, models.unet)
    assert loaded.config.projection.head == result.adapter.config.projection.head
    assert (loaded.config.lora_rank == 4) == variant.startswith("faceid")
    own = load_adapter(result.own, models.unet)
    assert own.config.variant == variant
    factories.reset_accelerate()
    # --init-from the published file: one more step at lr ~ 0 starts from, and keeps, exactly those weights
    again = train(config.replace(output=str(tmp_path / "b"), init_from=str(result.published), learning_rate=1e-12,
                                 weight_decay=0.0), models=models, image_encoder=encoder, log_with=None)
    start, after = _weights(result.published), _weights(again.published)
    assert start.keys() == after.keys() and all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)


def test_init_from_a_published_checkpoint(tmp_path) -> None:
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    first = train(_config(tmp_path / "a", manifest, max_steps=1, batch_size=2, learning_rate=1e-2), models=models,
                  image_encoder=encoder, log_with=None)
    factories.reset_accelerate()
    start = _weights(first.published)
    # lr ~ 0: one more step leaves the loaded weights where they were
    again = train(_config(tmp_path / "b", manifest, max_steps=1, batch_size=2, learning_rate=1e-12, weight_decay=0.0,
                          init_from=str(first.published)), models=models, image_encoder=encoder, log_with=None)
    after = _weights(again.published)
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)
    factories.reset_accelerate()
    with pytest.raises(IPAdapterError, match="is a 'base' adapter; this run trains 'plus'"):
        train(_config(tmp_path / "c", manifest, variant="plus", max_steps=1, init_from=str(first.published)),
              models=models, image_encoder=encoder, log_with=None)


def test_trains_from_webdataset_shards(tmp_path) -> None:
    pattern = factories.write_shards(tmp_path / "shards", 6, per_shard=3, corrupt_every=4)
    models, encoder = factories.in_memory()
    result = train(_config(tmp_path, pattern, max_steps=2, batch_size=2), models=models, image_encoder=encoder,
                   log_with=None)
    assert result.step == 2 and result.skipped == {"undecodable image": 1}


def test_a_state_saved_with_accelerates_pickles_resumes_exactly(tmp_path, monkeypatch) -> None:
    """States written before `ema.safetensors` and `rng-<rank>.safetensors` kept the EMA in accelerate's
    `custom_checkpoint_0.pkl` and the RNG in its `random_states_0.pkl`, and had no count of non-finite steps: such a
    state verifies, resumes to the uninterrupted run's weights (counting from 0), and one whose EMA pickle holds no
    EMA is refused by name."""
    from ipadapter.train import checkpoint, rng_state
    from ipadapter.train.checkpoint import STATE_FILE, file_manifest

    manifest = factories.write_images(tmp_path / "data", 6)
    models, encoder = factories.in_memory()
    options = dict(max_steps=4, batch_size=2, save_every=2, ema_decay=0.9, learning_rate=1e-3, drop_image=0.3,
                   drop_text=0.3, drop_both=0.1)
    full = train(_config(tmp_path / "a", manifest, **options), models=models, image_encoder=encoder, log_with=None)

    kept = tmp_path / "accelerate-rng"
    kept.mkdir()
    real_save = rng_state.save

    def save_keeping_accelerates_file(folder, rank):  # the pickle accelerate wrote, before the trainer removes it
        copy_file = Path(folder) / f"random_states_{rank}.pkl"
        (kept / copy_file.name).write_bytes(copy_file.read_bytes())
        return real_save(folder, rank)

    monkeypatch.setattr(checkpoint.rng_state, "save", save_keeping_accelerates_file)

    config = _config(tmp_path / "b", manifest, **options)
    _train_killed_at_step_3(config, models, encoder)
    monkeypatch.undo()
    state_dir = latest_checkpoint(config.output)
    shadow = _weights(state_dir / "ema.safetensors")
    torch.save({"decay": 0.9, "shadow": [shadow[f"shadow.{i}"] for i in range(len(shadow))]},
               state_dir / "custom_checkpoint_0.pkl")
    (state_dir / "ema.safetensors").unlink()
    (state_dir / "rng-0.safetensors").unlink()
    (state_dir / "random_states_0.pkl").write_bytes((kept / "random_states_0.pkl").read_bytes())
    state = {k: v for k, v in json.loads((state_dir / STATE_FILE).read_text()).items() if k != "nonfinite_steps"}
    (state_dir / STATE_FILE).write_text(json.dumps({**state, "files": file_manifest(state_dir)}))

    bad = shutil.copytree(state_dir, tmp_path / "bad" / state_dir.name)
    torch.save({"decay": 0.9, "shadow": "not tensors"}, bad / "custom_checkpoint_0.pkl")
    (bad / STATE_FILE).write_text(json.dumps({**state, "files": file_manifest(bad)}))

    resumed = train(config.replace(resume="latest"), models=models, image_encoder=encoder, log_with=None)
    _assert_same_weights(full.published, resumed.published)
    assert resumed.nonfinite_steps == 0
    with pytest.raises(IPAdapterError, match="custom_checkpoint_0.pkl is not an EMA state"):
        train(config.replace(resume=str(bad)), models=models, image_encoder=encoder, log_with=None)


def test_sdxl_validation_images_are_what_users_generate(tmp_path) -> None:
    """A validation sample of an SDXL run is the image a user gets from diffusers' own SDXL pipeline, built here from
    the same parts (each text encoder and tokenizer in its place), with the finished adapter through `ImagePrompter`;
    the sample is the second validation's, drawn from the prompt and reference the first encoded."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from PIL import Image

    from ipadapter.prompter import ImagePrompter

    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory(sdxl=True)
    reference = tmp_path / "data" / "img1.png"
    config = _config(tmp_path, manifest, max_steps=2, batch_size=2, validate_every=1, validation_steps=2,
                     validation_prompts=["a red square"], validation_images=[str(reference)])
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    res = config.resolution
    grid = Image.open(result.output / "validation" / "step-00000002.png").convert("RGB")
    shown = grid.crop((res, 0, 2 * res, res))
    pipe = StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
        tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=models.unet,
        scheduler=DDIMScheduler.from_config(models.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    with ImagePrompter(pipe, {"0": result.adapter}, encoder) as prompter:
        refs = prompter.references([Image.open(reference).convert("RGB")])
        expected = prompter.generate({"0": refs}, prompt="a red square", steps=2, guidance=config.validation_guidance,
                                     seed=config.seed, width=res, height=res)[0]
    assert np.array_equal(np.asarray(shown), np.asarray(expected.convert("RGB")))
    swapped = StableDiffusionXLPipeline(**{**pipe.components, "text_encoder": models.text_encoders[1]})
    swapped.set_progress_bar_config(disable=True)
    with ImagePrompter(swapped, {"0": result.adapter}, encoder) as prompter:
        other = prompter.generate({"0": prompter.references([Image.open(reference).convert("RGB")])},
                                  prompt="a red square", steps=2, guidance=config.validation_guidance,
                                  seed=config.seed, width=res, height=res)[0]
    assert not np.array_equal(np.asarray(other.convert("RGB")), np.asarray(expected.convert("RGB"))), \
        "the check can tell the text encoders apart"


def test_faceid_validation_images_are_what_users_generate_from_the_samples_id_embedding(tmp_path) -> None:
    """A FaceID-Plus run's validation references are the data's first samples with their own ID embeddings (no face
    is detected): its second validation's sample, drawn from the first's encoding, is what a user gets from
    diffusers' SD 1.5 pipeline with the finished adapter, that image and that embedding; another embedding differs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    from ipadapter.prompter import ImagePrompter

    manifest = factories.write_images(tmp_path / "data", 4, id_dim=8)
    models, encoder = factories.in_memory()
    config = _config(tmp_path, manifest, max_steps=2, batch_size=2, validate_every=1, validation_steps=2,
                     validation_prompts=["a face"], variant="faceid-plus", id_dim=8, lora_rank=4)
    result = train(config, models=models, image_encoder=encoder, log_with=None)
    res = config.resolution
    shown = Image.open(result.output / "validation" / "step-00000002.png").convert("RGB").crop((res, 0, 2 * res, res))
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0],
                                   unet=models.unet, scheduler=DDIMScheduler.from_config(models.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(tmp_path / "data" / "img0.png").convert("RGB")

    def drawn(ids: torch.Tensor) -> np.ndarray:
        with ImagePrompter(pipe, {"0": result.adapter}, encoder) as prompter:
            refs = prompter.references([image], face_embeds=ids)
            return np.asarray(prompter.generate({"0": refs}, prompt="a face", steps=2, seed=config.seed, width=res,
                                                height=res, guidance=config.validation_guidance)[0].convert("RGB"))

    own = torch.from_numpy(np.load(tmp_path / "data" / "id0.npy"))[None]
    assert np.array_equal(np.asarray(shown), drawn(own))
    assert not np.array_equal(np.asarray(shown), drawn(torch.from_numpy(np.load(tmp_path / "data" / "id1.npy"))[None]))


@pytest.mark.parametrize("handlers", [True, False])
def test_a_finished_run_says_where_its_adapter_is_once(tmp_path, caplog, capsys, monkeypatch, handlers) -> None:
    """Through logging when the application set it up, else printed once (a library call without logging)."""
    import logging

    from ipadapter.train import trainer

    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    monkeypatch.setattr(trainer.logger, "hasHandlers", lambda: handlers)
    with caplog.at_level(logging.INFO, logger="ipadapter.train"):
        result = train(_config(tmp_path, manifest, max_steps=1, batch_size=2), models=models, image_encoder=encoder,
                       log_with=None)
    line = f"done at step 1: no samples skipped, 0 non-finite step(s) skipped; adapter written to {result.published}"
    assert result.published == tmp_path / "out" / "ip-adapter.safetensors"
    assert line in caplog.messages
    assert (line in capsys.readouterr().out) != handlers


def test_a_final_adapter_that_cannot_be_written_names_the_intact_state(tmp_path, monkeypatch) -> None:
    """The disk fills while the final files are written (here at the model card, after the weights)."""
    from ipadapter.train import model_folder

    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()

    def full(*args, **kwargs):
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(model_folder, "write_model_card", full)
    with pytest.raises(IPAdapterError) as caught:
        train(_config(tmp_path, manifest, max_steps=2, batch_size=2, save_every=1), models=models,
              image_encoder=encoder, log_with=None)
    out = tmp_path / "out"
    assert str(caught.value) == (
        f"could not write the final adapter to {out} ([Errno 28] No space left on device); the training state "
        f"{out / 'checkpoints' / 'state-00000002'} is intact: free space and run again with --resume latest")
    assert not any(type(p).__module__.startswith("ipadapter") for p in models.unet.attn_processors.values())


def test_init_from_keeps_fp32_master_weights_and_takes_the_variant_being_trained(tmp_path) -> None:
    """A FaceID-Plus file saved in fp16 read for a FaceID-PlusV2 run (the same weights; V2 adds the face shortcut):
    the adapter is the V2 variant, in fp32 although the UNet is fp16; read for a FaceID-Plus run, the same in fp32."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from ipadapter.train.trainer import _init_from

    unet = factories.unet(3)
    state = factories.published(unet, "faceid-plus", factories.CROSS)
    flat = {f"{group}.{k}": v.half() for group, part in state.items() for k, v in part.items()}
    save_file(flat, str(tmp_path / "faceid-plus.safetensors"))
    half = unet.half()
    adapter = _init_from(SimpleNamespace(init_from=str(tmp_path / "faceid-plus.safetensors"),
                                         variant="faceid-plusv2"), half)
    assert adapter.config.variant == "faceid-plusv2"
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    plain = _init_from(SimpleNamespace(init_from=str(tmp_path / "faceid-plus.safetensors"), variant="faceid-plus"),
                       half)
    assert plain.config.variant == "faceid-plus" and {p.dtype for p in plain.parameters()} == {torch.float32}


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_a_steps_logged_loss_is_the_mean_of_its_micro_batches(tmp_path, monkeypatch, grad_accum: int) -> None:
    """What the bar, losses.csv and the result report for a step: the mean of the losses its micro-batches
    back-propagated (each recorded as the loss function returned it)."""
    from ipadapter.train import trainer
    from ipadapter.train.model_folder import read_losses

    real, returned = trainer.diffusion_loss, []

    def recording(*args):
        loss = real(*args)
        returned.append(float(loss))
        return loss

    monkeypatch.setattr(trainer, "diffusion_loss", recording)
    manifest = factories.write_images(tmp_path / "data", 4)
    models, encoder = factories.in_memory()
    result = train(_config(tmp_path, manifest, max_steps=3, batch_size=2, grad_accum=grad_accum), models=models,
                   image_encoder=encoder, log_with=None)
    assert len(returned) == 3 * grad_accum
    means = [float(np.mean(returned[i:i + grad_accum])) for i in range(0, len(returned), grad_accum)]
    assert result.losses == pytest.approx(means, rel=1e-6)
    assert [step for step, _ in read_losses(result.output)] == [1, 2, 3]
    assert [loss for _, loss in read_losses(result.output)] == result.losses
