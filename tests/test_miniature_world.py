"""Fast checks of the miniature world, its tokenizer, and a 2-step smoke run of every training function."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.miniature import base_model, judge, recipes, tiny_clip, world
from ipadapter.miniature import tokenizer as tok

TINY_CLIP = tiny_clip.ClipSize(hidden=32, layers=1, heads=2, projection=32)


def test_world_is_deterministic_from_seed():
    a_images, a_attrs = world.make_batch(5, 16)
    b_images, b_attrs = world.make_batch(5, 16)
    c_images, _ = world.make_batch(6, 16)
    assert a_images.shape == (16, 64, 64, 3) and a_images.dtype == np.uint8
    assert np.array_equal(a_images, b_images) and a_attrs == b_attrs
    assert not np.array_equal(a_images, c_images)


def test_held_out_triples_never_in_train_split():
    _, attrs = world.make_batch(0, 3000, "train")
    assert not {a.triple for a in attrs} & world.HELD_OUT
    assert all(a.colour != a.bg_colour for a in attrs)
    _, held = world.make_batch(0, 200, "heldout")
    assert {a.triple for a in held} <= world.HELD_OUT
    assert {s for s, _, _ in world.HELD_OUT} == set(world.SHAPES)


def test_caption_names_every_attribute_in_grammar_order():
    _, attrs = world.make_batch(1, 50)
    for a in attrs:
        text = world.caption(a)
        assert text == (
            f"a {a.size} {a.colour} {a.shape} at the {a.position} on a {a.bg_colour} {a.pattern} background"
        )
        assert text.index(a.colour) < text.index(" on a ") < text.rindex(a.bg_colour)


def test_object_and_background_colours_are_drawn():
    attrs = world.Attrs("square", "red", "large", "center", "blue", "plain")
    image = world.draw(attrs, np.random.default_rng(0))
    assert tuple(image[32, 32]) == world.PALETTE["red"]
    assert tuple(image[2, 2]) == world.PALETTE["blue"]


def test_tokenizer_round_trip_through_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    tok.save_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.model_max_length == tok.MAX_LENGTH
    _, attrs = world.make_batch(2, 100)
    for a in attrs:
        text = world.caption(a)
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2, "every word must be exactly one token"
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    word_ids = {tokenizer(w).input_ids[1] for w in tok.vocabulary_words()}
    assert len(word_ids) == len(tok.vocabulary_words())


def test_dataset_writer(tmp_path):
    manifest = world.write_dataset(tmp_path, 4, seed=0, split="heldout")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert (tmp_path / r["image_file"]).is_file()
        assert r["text"] == world.caption(world.Attrs(**r["attrs"]))


def _saves_then_dies(monkeypatch, n: int) -> list:
    """Let `n` images be saved, then interrupt the next save as a killed process would; returns the saved paths."""
    real, saved = Image.Image.save, []

    def save(image, path, *args, **kwargs):
        if len(saved) == n:
            raise KeyboardInterrupt
        saved.append(path)
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    return saved


def test_an_interrupted_dataset_has_no_manifest(tmp_path, monkeypatch):
    """The adapter recipe writes its scenes only when the manifest is missing: a build killed after some images must
    not leave a manifest of those few, which the next run would train on."""
    saved = _saves_then_dies(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        world.write_dataset(tmp_path, 4, seed=0)
    assert len(saved) == 2 and not (tmp_path / "manifest.jsonl").exists()


def test_a_killed_rebuild_leaves_no_stale_manifest(tmp_path, monkeypatch):
    """Rebuilding over a finished dataset with another seed: once an image is overwritten the old manifest would
    describe scenes that are no longer there, so it must be gone before the first image is written."""
    world.write_dataset(tmp_path, 4, seed=0)
    saved = _saves_then_dies(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        world.write_dataset(tmp_path, 4, seed=1)
    assert len(saved) == 1 and not (tmp_path / "manifest.jsonl").exists()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Every training function for 2 steps at tiny sizes, chained as the recipes chain them."""
    out = tmp_path_factory.mktemp("miniature")
    torch.set_num_threads(1)
    tiny_clip.train_clip(out, name="clip", steps=2, size=TINY_CLIP, batch=8)
    tiny_clip.train_clip(out, name="judge_clip", steps=2, seed=10, size=TINY_CLIP, batch=8)
    tiny_clip.train_image_encoder(out, out / "clip", steps=2, batch=4, patch=16)
    judge.train_classifier(out, steps=2, batch=8)
    base_model.train_vae(out, steps=2, batch=2, eval_n=8)
    base_model.train_vae_decoder(out, steps=2, batch=2)
    cache = base_model.build_cache(out, out / "vae", n=8)
    base_model.train_unet(out, cache, out / "clip", steps=2, batch=4, widths=(32, 32, 32))
    pipe = base_model.assemble_pipeline(out / "vae_decoder", out / "clip", out / "unet")
    base_model.save_pipeline(pipe, out / "pipeline")
    return out


def test_image_encoder_reads_in_the_text_towers_space(smoke_run):
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(smoke_run / "image_encoder")
    out = encoder(pixel_values=tiny_clip.pixels(world.make_batch(0, 2)[0]), output_hidden_states=True)
    assert out.image_embeds.shape == (2, TINY_CLIP.projection)
    assert out.hidden_states[-2].shape == (2, 1 + (64 // 16) ** 2, TINY_CLIP.hidden)


def test_pipeline_takes_the_trained_image_encoder_when_given(smoke_run):
    from transformers import CLIPVisionModelWithProjection

    pipe = base_model.assemble_pipeline(smoke_run / "vae", smoke_run / "clip", smoke_run / "unet", smoke_run / "image_encoder")
    saved = CLIPVisionModelWithProjection.from_pretrained(smoke_run / "image_encoder")
    pixels = tiny_clip.pixels(world.make_batch(1, 2)[0])
    assert torch.equal(pipe.image_encoder(pixel_values=pixels).image_embeds, saved(pixel_values=pixels).image_embeds)
    assert pipe.image_encoder.config.patch_size == 16 != base_model.assemble_pipeline(
        smoke_run / "vae", smoke_run / "clip", smoke_run / "unet").image_encoder.config.patch_size



def test_assemble_prefers_the_tuned_decoder_and_trained_encoder_and_checks_only_with_a_judge(smoke_run, tmp_path,
                                                                                             monkeypatch):
    """`recipes.assemble`: the pipeline folder from the run's CLIP, UNet and VAE, with the decoder-tuned VAE and the
    trained image encoder once they exist (else the plain VAE and the CLIP's own vision tower), and the base model's
    check only when a judge was trained."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection

    checked = []
    monkeypatch.setattr(recipes, "evaluate_base", lambda out: checked.append(out))
    out = tmp_path / "run"
    out.mkdir()
    for name in ("clip", "vae", "unet"):
        (out / name).symlink_to(smoke_run / name)

    def saved(folder: Path) -> dict:
        return AutoencoderKL.from_pretrained(folder).state_dict()

    recipes.assemble(out)
    plain, trained = saved(out / "pipeline" / "vae"), saved(smoke_run / "vae")
    assert all(torch.equal(v, trained[k]) for k, v in plain.items())
    own_tower = CLIPVisionModelWithProjection.from_pretrained(out / "pipeline" / "image_encoder")
    assert own_tower.config.patch_size != 16 and checked == []
    for name in ("vae_decoder", "image_encoder", "judge"):
        (out / name).symlink_to(smoke_run / name)
    recipes.assemble(out)
    tuned, decoder = saved(out / "pipeline" / "vae"), saved(smoke_run / "vae_decoder")
    assert all(torch.equal(v, decoder[k]) for k, v in tuned.items()) and any(
        not torch.equal(v, trained[k]) for k, v in tuned.items())
    assert CLIPVisionModelWithProjection.from_pretrained(out / "pipeline" / "image_encoder").config.patch_size == 16
    assert checked == [out]

def test_training_resumes_from_checkpoint(smoke_run):
    tiny_clip.train_clip(smoke_run, name="clip", steps=3, size=TINY_CLIP, batch=8, resume=True)
    assert "resumed from" in (smoke_run / "clip.log").read_text()


def test_pipeline_folder_loads_and_generates(smoke_run):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(smoke_run / "pipeline", torch_dtype=torch.float32)
    images = base_model.sample(pipe, ["a small red circle at the center on a blue plain background"], steps=2)
    assert images.shape == (1, 64, 64, 3)
    encoder = CLIPVisionModelWithProjection.from_pretrained(smoke_run / "pipeline" / "image_encoder")
    out = encoder(pixel_values=torch.zeros(1, 3, 64, 64), output_hidden_states=True)
    assert out.image_embeds.shape == (1, TINY_CLIP.projection)
    assert out.hidden_states[-2].shape == (1, 65, TINY_CLIP.hidden)


def test_export_is_fp16_and_loads_in_fp32(smoke_run, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from transformers import CLIPModel

    from ipadapter.miniature.models import Loaded, Models

    sizes = recipes.export(smoke_run, assets_dir=tmp_path)
    assert set(sizes) == {"pipeline", "clip", "judge"}
    exported = Loaded(Models.from_folder(tmp_path)).clip
    trained = CLIPModel.from_pretrained(smoke_run / "clip")
    ids = tiny_clip.tokenize(tok.load_tokenizer(tmp_path / "clip"), ["a red circle"])
    torch.testing.assert_close(tiny_clip.embed(exported, ids=ids), tiny_clip.embed(trained, ids=ids), atol=2e-3, rtol=0)
    kept = tmp_path / "kept"
    (kept / "judge").mkdir(parents=True)
    (kept / "judge" / "marker").write_text("shipped judge")
    no_judge = tmp_path / "run_without_judge"
    no_judge.mkdir()
    (no_judge / "pipeline").symlink_to(smoke_run / "pipeline")
    assert set(recipes.export(no_judge, assets_dir=kept)) == {"pipeline"}, "nor does it write a CLIP it has not got"
    assert (kept / "judge" / "marker").read_text() == "shipped judge", "a run without a judge keeps the shipped one"
    with safe_open(tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", torch_dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and pipe.image_encoder is not None
    scorer = judge.Judge.load(tmp_path / "judge")
    images, attrs = world.make_batch(0, 4, "heldout")
    report = scorer.accuracy(images, attrs)
    assert set(report) == set(world.ATTRIBUTES) | {"all"}
    assert scorer.text_score(images, [world.caption(a) for a in attrs]).shape == (4,)



def test_export_writes_the_runs_controlnet_and_lora_with_the_rest(smoke_run, tmp_path):
    """A run folder that trained a ControlNet and a custom LoRA exports both beside the pipeline, each whole and in
    fp16 (here the shipped ones stand in for trained ones), and reports their sizes."""
    from safetensors.torch import load_file

    from ipadapter import bundled

    run = tmp_path / "run"
    run.mkdir()
    for name in ("pipeline", "clip"):
        (run / name).symlink_to(smoke_run / name)
    (run / "controlnet").symlink_to(bundled.CONTROLNET_DIR)
    (run / "custom_lora").symlink_to(bundled.CUSTOM_LORA_DIR)
    assets = tmp_path / "assets"
    sizes = recipes.export(run, assets_dir=assets)
    assert set(sizes) == {"pipeline", "clip", "controlnet", "custom_lora"}
    for name, weights in (("controlnet", "diffusion_pytorch_model.safetensors"),
                          ("custom_lora", "pytorch_lora_weights.safetensors")):
        written, source = load_file(assets / name / weights), load_file(run / name / weights)
        assert written.keys() == source.keys() and all(torch.equal(written[k], source[k].half()) for k in source)
        assert sizes[name] == pytest.approx(sum(f.stat().st_size for f in (assets / name).iterdir()) / 2**20)
    assert sizes["pipeline"] == pytest.approx(
        sum(f.stat().st_size for f in (assets / "pipeline").rglob("*") if f.is_file()) / 2**20)

def test_partial_caption_names_exactly_the_kept_slots():
    a = world.Attrs("circle", "red", "large", "top left", "blue", "checkered")
    assert world.partial_caption(a, frozenset(world.SLOTS)) == world.caption(a)
    assert world.partial_caption(a, {"colour", "shape"}) == "a red circle"
    assert world.partial_caption(a, {"bg_colour", "pattern"}) == "on a blue checkered background"
    assert world.partial_caption(a, {"position"}) == "a object at the top left"
    assert world.partial_caption(a, set()) == ""
    words = set(tok.vocabulary_words())
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = world.partial_caption(a, world.random_slots(rng))
        assert set(text.split()) <= words and len(text.split()) + 2 <= tok.MAX_LENGTH


def test_with_slot_changes_one_slot_and_keeps_colours_apart():
    rng = np.random.default_rng(1)
    _, attrs = world.make_batch(3, 50)
    for a in attrs:
        for slot in world.SLOTS:
            b = world.with_slot(a, slot, rng)
            changed = [s for s in world.SLOTS if getattr(a, s) != getattr(b, s)]
            assert changed == [slot] and b.colour != b.bg_colour
        assert world.attrs_from_label(a.label()) == a


def test_the_learning_rate_warms_up_linearly_then_follows_a_cosine_to_its_floor():
    from ipadapter.miniature.runloop import cosine_lr

    peak, total, warmup, floor = 2e-3, 1050, 50, 0.1
    assert cosine_lr(0, total, peak) == pytest.approx(peak / warmup)
    assert cosine_lr(24, total, peak) == pytest.approx(peak * 25 / warmup)
    assert cosine_lr(warmup - 1, total, peak) == pytest.approx(peak)
    assert cosine_lr(warmup, total, peak) == pytest.approx(peak)  # the decay's start: cos 0
    assert cosine_lr(warmup + 500, total, peak) == pytest.approx(peak * (floor + (1 - floor) / 2))  # half way: cos π/2
    assert cosine_lr(warmup + 250, total, peak) == pytest.approx(peak * (floor + (1 - floor) * (1 + 2**-0.5) / 2))
    assert cosine_lr(total, total, peak) == pytest.approx(peak * floor)
    assert cosine_lr(total + 100, total, peak) == pytest.approx(peak * floor)  # past the end: held at the floor
    assert cosine_lr(10, 1000, 1.0, warmup=20, floor=0.5) == pytest.approx(11 / 20)
    assert cosine_lr(1000, 1000, 1.0, warmup=20, floor=0.5) == pytest.approx(0.5)
    assert cosine_lr(21, 21, 1.0, warmup=20, floor=0.5) == pytest.approx(0.5)  # one step of decay: at its end


def _toy_run(folder, steps: int, stop: int | None = None, resume: bool = False) -> torch.nn.Module:
    """A toy regression trained with `TrainRun` the way the miniature recipes train (batches a function of the step),
    checkpointing after every step; `stop`: the process dies after that many steps."""
    from ipadapter.miniature.runloop import TrainRun

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    run = TrainRun(folder, "toy", steps, {"model": model}, torch.optim.AdamW(model.parameters(), lr=1e-2),
                   resume=resume, checkpoint_every_s=0.0, log_every=2)
    for step in range(run.start_step, stop if stop is not None else steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        run.optimize(step, loss, 1e-2)
        run.step_done(step + 1, loss.item())
    return model


def test_a_killed_miniature_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    whole = _toy_run(tmp_path / "whole", 60)
    _toy_run(tmp_path / "cut", 60, stop=37)
    resumed = _toy_run(tmp_path / "cut", 60, resume=True)
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
    assert "resumed from" in (tmp_path / "cut" / "toy.log").read_text()
    assert not [p.name for p in (tmp_path / "cut").iterdir() if ".tmp" in p.name]


def test_the_logged_loss_is_the_mean_since_the_last_line(tmp_path):
    from ipadapter.miniature.runloop import TrainRun

    model = torch.nn.Linear(1, 1)
    run = TrainRun(tmp_path, "toy", 5, {"model": model}, torch.optim.SGD(model.parameters(), lr=0.1), log_every=2)
    for step, loss in enumerate((1.0, 2.0, 4.0, 8.0, 16.0), start=1):
        run.step_done(step, loss)
        if step == 2:
            assert run.last_loss == 1.5
        if step == 4:
            assert run.last_loss == 6.0
    assert run.last_loss == 16.0  # the last step is logged whatever log_every says
    lines = (tmp_path / "toy.log").read_text().splitlines()
    assert [line.split(" loss ")[1].split()[0] for line in lines if " loss " in line] == ["1.5000", "6.0000", "16.0000"]
    assert (tmp_path / "toy.ckpt.pt").exists(), "the last step is checkpointed whatever the timer says"


def test_the_log_line_gives_the_rate_and_time_left_and_the_timer_checkpoints(tmp_path, monkeypatch):
    """With the clock stood in for: a run resumed at step 2 of 10 logs, at step 4, 2 steps done in 6 s (3.00 s/step)
    and 6 steps left (0.3 min); it checkpoints once more than `checkpoint_every_s` has passed since the last save."""
    from ipadapter.miniature import runloop

    now = [100.0]
    monkeypatch.setattr(runloop.time, "monotonic", lambda: now[0])
    model = torch.nn.Linear(1, 1)
    run = runloop.TrainRun(tmp_path, "toy", 10, {"model": model}, torch.optim.SGD(model.parameters(), lr=0.1))
    run.save(2)
    resumed = runloop.TrainRun(tmp_path, "toy", 10, {"model": model}, torch.optim.SGD(model.parameters(), lr=0.1),
                               resume=True, checkpoint_every_s=10.0, log_every=2)
    assert resumed.start_step == 2
    now[0] = 103.0
    resumed.step_done(3, 1.0)
    now[0] = 106.0
    resumed.step_done(4, 2.0)
    assert resumed.elapsed_s() == 6.0
    lines = (tmp_path / "toy.log").read_text().splitlines()
    assert lines[-2].endswith(f"toy: resumed from {tmp_path / 'toy.ckpt.pt'} at step 2")
    assert lines[-1].endswith("toy step 4/10 loss 1.5000 lr 1.00e-01 3.00s/step eta 0.3min")
    saved = lambda: torch.load(tmp_path / "toy.ckpt.pt", weights_only=True)["step"]  # noqa: E731
    assert saved() == 2, "6 s since the last save: no checkpoint yet"
    now[0] = 110.0
    resumed.step_done(5, 1.0)
    assert saved() == 2, "exactly 10 s: not more than checkpoint_every_s"
    now[0] = 110.5
    resumed.step_done(6, 1.0)
    assert saved() == 6


def test_a_runs_defaults_folder_log_format_and_sizes(tmp_path, monkeypatch):
    """A run makes its folder, ignores an earlier checkpoint unless resuming, logs every 10 steps with the time of day
    first, checkpoints every 3 minutes, and reports sizes in MiB of a file or of every file under a folder."""
    import re

    from ipadapter.miniature import runloop

    now = [0.0]
    monkeypatch.setattr(runloop.time, "monotonic", lambda: now[0])
    model = torch.nn.Linear(1, 1)
    folder = tmp_path / "a" / "b"
    runloop.TrainRun(folder, "toy", 100, {"model": model}, torch.optim.SGD(model.parameters(), lr=0.1)).save(40)
    run = runloop.TrainRun(folder, "toy", 100, {"model": model}, torch.optim.SGD(model.parameters(), lr=0.1))
    assert run.start_step == 0 and math.isnan(run.last_loss)
    for step in range(1, 12):
        run.step_done(step, 1.0)
    lines = (folder / "toy.log").read_text().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"\d\d:\d\d:\d\d toy step 10/100 loss 1\.0000 .*", lines[0])
    now[0] = 180.0
    run.step_done(12, 1.0)
    assert torch.load(folder / "toy.ckpt.pt", weights_only=True)["step"] == 40
    now[0] = 180.5
    run.step_done(13, 1.0)
    assert torch.load(folder / "toy.ckpt.pt", weights_only=True)["step"] == 13
    (tmp_path / "sizes" / "sub").mkdir(parents=True)
    (tmp_path / "sizes" / "one").write_bytes(b"x" * 2**19)
    (tmp_path / "sizes" / "sub" / "two").write_bytes(b"x" * 2**20)
    assert runloop.size_mb(tmp_path / "sizes" / "one") == 0.5
    assert runloop.size_mb(tmp_path / "sizes") == 1.5


def test_a_resume_without_a_checkpoint_starts_at_step_zero_and_says_so(tmp_path):
    from ipadapter.miniature.runloop import TrainRun

    model = torch.nn.Linear(1, 1)
    run = TrainRun(tmp_path, "toy", 10, {"model": model}, torch.optim.SGD(model.parameters(), lr=0.1), resume=True)
    assert run.start_step == 0 and run.rewarm_from is None
    assert (tmp_path / "toy.log").read_text().splitlines()[-1].endswith(
        f"toy: no checkpoint at {tmp_path / 'toy.ckpt.pt'}, starting from step 0")


def test_an_optimizer_step_cuts_the_gradient_norm_to_one_and_leaves_parameters_without_one(tmp_path):
    """SGD at learning rate 1 moves the clipped parameter by its gradient cut to norm 1; a parameter the loss no
    longer reaches keeps no stale zero gradient (set to None), so AdamW's decay and moments do not move it."""
    from ipadapter.miniature.runloop import TrainRun

    used, unused = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.ones(2))
    run = TrainRun(tmp_path, "toy", 100, {}, torch.optim.SGD([used], lr=1.0))
    run.set_lr = lambda step, peak: None  # the learning rate as given
    run.optimize(0, (used * torch.tensor([30.0, 40.0])).sum(), 1.0, clip=[used])
    assert torch.allclose(used.detach(), torch.tensor([-0.6, -0.8]))
    decayed = TrainRun(tmp_path, "toy2", 100, {}, torch.optim.AdamW([used, unused], lr=0.1, weight_decay=0.5))
    decayed.optimize(60, used.sum() + unused.sum(), 0.1)  # both reached once
    after_first = unused.detach().clone()
    decayed.optimize(61, used.sum(), 0.1)
    assert unused.grad is None and torch.equal(unused.detach(), after_first)


def test_snapshot_resume_restores_fp16_weights_and_rewarms(tmp_path):
    from ipadapter.miniature.runloop import REWARM_STEPS, TrainRun, cosine_lr, write_snapshot

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    run = TrainRun(tmp_path, "toy", 1000, {"model": model}, torch.optim.AdamW(model.parameters(), lr=1e-3))
    run.save(500)
    write_snapshot(tmp_path / "toy.ckpt.pt", tmp_path / "toy.state.safetensors")
    (tmp_path / "toy.ckpt.pt").unlink()
    fresh = torch.nn.Linear(4, 3)
    resumed = TrainRun(tmp_path, "toy", 1000, {"model": fresh}, torch.optim.AdamW(fresh.parameters(), lr=1e-3),
                       resume=True)
    assert resumed.start_step == 500
    assert torch.equal(fresh.weight, model.weight.half().float())
    resumed.set_lr(500, 1e-3)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(500, 1000, 1e-3) / REWARM_STEPS)
    resumed.set_lr(500 + REWARM_STEPS, 1e-3)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(500 + REWARM_STEPS, 1000, 1e-3))


def test_a_snapshot_keeps_nested_names_and_integer_buffers_and_says_what_it_resumed(tmp_path):
    """Nested modules (`model.0.weight`) come back under their own module, an integer buffer (BatchNorm's count)
    stays an integer, and the log says where the run resumed from."""
    from ipadapter.miniature.runloop import TrainRun, write_snapshot

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))

    torch.manual_seed(0)
    model = make()
    model(torch.randn(5, 4))  # BatchNorm counts a batch: num_batches_tracked 1
    TrainRun(tmp_path, "toy", 1000, {"model": model}, torch.optim.AdamW(model.parameters())).save(300)
    snapshot = tmp_path / "toy.state.safetensors"
    assert write_snapshot(tmp_path / "toy.ckpt.pt", snapshot) == 300
    (tmp_path / "toy.ckpt.pt").unlink()
    from safetensors import safe_open

    with safe_open(snapshot, framework="pt") as f:
        assert f.get_tensor("model.1.num_batches_tracked").dtype == torch.int64
        assert f.get_tensor("model.0.weight").dtype == torch.float16
    fresh = make()
    TrainRun(tmp_path, "toy", 1000, {"model": fresh}, torch.optim.AdamW(fresh.parameters()), resume=True)
    assert torch.equal(fresh[0].weight, model[0].weight.half().float())
    assert torch.equal(fresh[1].running_mean, model[1].running_mean.half().float())
    assert int(fresh[1].num_batches_tracked) == 1
    assert f"toy: resumed from snapshot {snapshot} at step 300 (fresh optimizer moments)\n" in (
        tmp_path / "toy.log").read_text()


def test_a_checkpoint_holding_code_is_refused_not_unpickled(tmp_path):
    import pickle

    from ipadapter.miniature.runloop import TrainRun, write_snapshot

    torch.save({"step": 1, "modules": {}, "hook": Path}, tmp_path / "evil.ckpt.pt")
    with pytest.raises(pickle.UnpicklingError):
        write_snapshot(tmp_path / "evil.ckpt.pt", tmp_path / "evil.state.safetensors")
    assert not (tmp_path / "evil.state.safetensors").exists()
    model = torch.nn.Linear(1, 1)
    with pytest.raises(pickle.UnpicklingError):
        TrainRun(tmp_path, "evil", 10, {"model": model}, torch.optim.SGD(model.parameters(), lr=0.1), resume=True)


@pytest.mark.parametrize("from_snapshot", [False, True])
def test_a_stage_that_adds_modules_resumes_the_rest_and_restarts_the_optimizer(tmp_path, from_snapshot):
    """The encoder's third stage adds per-patch heads: the encoder must come back exactly, the new heads keep their
    fresh weights, and the optimizer (whose parameter list changed) starts again with a re-warmed learning rate."""
    from ipadapter.miniature.runloop import TrainRun, write_snapshot

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    TrainRun(tmp_path, "toy", 1000, {"model": model}, optimizer).save(500)
    if from_snapshot:
        write_snapshot(tmp_path / "toy.ckpt.pt", tmp_path / "toy.state.safetensors")
        (tmp_path / "toy.ckpt.pt").unlink()
    fresh, heads = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    heads_before = heads.weight.clone()
    new_optimizer = torch.optim.AdamW([*fresh.parameters(), *heads.parameters()], lr=1e-3)
    resumed = TrainRun(tmp_path, "toy", 1000, {"model": fresh, "heads": heads}, new_optimizer, resume=True)
    assert resumed.start_step == 500 and resumed.rewarm_from == 500
    expected = model.weight.half().float() if from_snapshot else model.weight
    assert torch.equal(fresh.weight, expected)
    assert torch.equal(heads.weight, heads_before)
    assert new_optimizer.state_dict()["state"] == {}
    said = (f"toy: resumed from snapshot {tmp_path / 'toy.state.safetensors'} at step 500 (fresh optimizer moments; "
            "heads start fresh)" if from_snapshot else f"toy: resumed from {tmp_path / 'toy.ckpt.pt'} at step 500; the "
            "modules differ (heads start fresh), and so does the optimizer")
    assert said + "\n" in (tmp_path / "toy.log").read_text()


def test_an_earlier_stage_resumes_from_a_later_stages_checkpoint(tmp_path):
    """`train image-encoder --resume` runs every stage; during the third the checkpoint holds the per-patch heads,
    which the first two stages do not have: they load what they share and skip the optimizer state."""
    from ipadapter.miniature.runloop import TrainRun

    model, heads = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=1e-3)
    (model(torch.ones(1, 4)).sum() + heads(torch.ones(1, 3)).sum()).backward()
    optimizer.step()
    TrainRun(tmp_path, "toy", 1000, {"model": model, "heads": heads}, optimizer).save(700)
    earlier = torch.nn.Linear(4, 3)
    resumed = TrainRun(tmp_path, "toy", 500, {"model": earlier}, torch.optim.AdamW(earlier.parameters(), lr=1e-3),
                       resume=True)
    assert resumed.start_step == 700 and torch.equal(earlier.weight, model.weight)
    assert resumed.optimizer.state_dict()["state"] == {}


def test_patch_heads_targets_follow_the_encoders_token_order():
    """Per-patch targets (object cover, row, column) must index the tokens the way the CLIP vision tower lays them
    out; checked against the tower's own patch embedding: a single changed patch moves exactly one token."""
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(tiny_clip.vision_config(TINY_CLIP, 16)).eval()
    grid, row, col = 4, 1, 2
    image = torch.zeros(1, 3, 64, 64)
    changed = image.clone()
    changed[:, :, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = 1.0
    with torch.no_grad():
        before = encoder.vision_model.embeddings(image)[0, 1:]
        after = encoder.vision_model.embeddings(changed)[0, 1:]
    moved = (before - after).abs().sum(-1).nonzero().flatten().tolist()
    assert moved == [row * grid + col]

    heads = tiny_clip.PatchHeads(TINY_CLIP.hidden, grid)
    mask = torch.zeros(1, 64, 64)
    mask[:, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = 1.0
    cover = torch.nn.functional.avg_pool2d(mask.unsqueeze(1), 64 // grid).flatten(1)
    assert cover[0].nonzero().flatten().tolist() == moved
    seen = []
    heads.scene.loss = lambda rows, labels: seen.append((rows, labels)) or rows.sum() * 0
    tokens = torch.randn(1, grid * grid, TINY_CLIP.hidden)
    full = tiny_clip.labels(world.make_batch(0, 1)[1])
    heads.loss(tokens, mask, full)
    rows, labels = seen[0]
    assert torch.equal(rows, tokens[0, moved]) and torch.equal(labels, full)



def test_the_per_patch_loss_is_objectness_plus_half_the_cell_read_outs_plus_the_scene_on_the_object():
    """`PatchHeads.loss` term by term: binary cross-entropy of each patch against the share of it the object covers,
    half the cross-entropies of each patch's row and column (row-major patches), and the scene's slots read from the
    patches the object covers more than a quarter of."""
    import torch.nn.functional as F

    grid, dim = 4, 8
    torch.manual_seed(2)
    heads = tiny_clip.PatchHeads(dim, grid)
    tokens = torch.randn(2, grid * grid, dim)
    masks = torch.zeros(2, 64, 64)
    masks[0, 0:24, 0:24] = 1.0  # patches (0,0) whole, (0,1), (1,0) half, (1,1) a quarter
    masks[1, 40:64, 48:64] = 1.0
    full = tiny_clip.labels(world.make_batch(3, 2)[1])
    cover = torch.stack([masks[:, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].mean(dim=(1, 2))
                         for r in range(grid) for c in range(grid)], dim=1)
    objectness = F.binary_cross_entropy_with_logits(heads.mask(tokens).squeeze(-1), cover)
    rows = torch.tensor([r for r in range(grid) for _ in range(grid)] * 2)
    cols = torch.tensor(list(range(grid)) * grid * 2)
    where = F.cross_entropy(heads.row(tokens).reshape(-1, grid), rows) + F.cross_entropy(
        heads.col(tokens).reshape(-1, grid), cols)
    on = [(i, p) for i in range(2) for p in range(grid * grid) if cover[i, p] > 0.25]
    assert [p for i, p in on if i == 0] == [0, 1, 4]  # the quarter-covered patch is not on the object
    scene = heads.scene.loss(torch.stack([tokens[i, p] for i, p in on]), torch.stack([full[i] for i, _ in on]))
    expected = objectness + 0.5 * where + scene
    torch.testing.assert_close(heads.loss(tokens, masks, full), expected, rtol=1e-6, atol=1e-6)

def test_the_contrastive_loss_is_symmetric_infonce_with_each_images_own_negatives():
    """Against the definition written one row at a time: image i's logits are its cosines with every caption of the
    batch and with its own k negatives (none of the other images'), caption j's with every image; each term is the
    cross-entropy of the matching pair, the loss the mean of the two directions' means; the scale is capped at 100."""
    import math

    g = torch.Generator().manual_seed(0)
    n, k, dim = 3, 2, 5
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(n + n * k, dim, generator=g), dim=-1)

    def by_rows(scale: float) -> float:
        captions, negatives = texts[:n], texts[n:].view(n, k, dim)
        per_image = []
        for i in range(n):
            logits = [scale * float(images[i] @ c) for c in captions] + [scale * float(images[i] @ x) for x in negatives[i]]
            per_image.append(math.log(sum(math.exp(v) for v in logits)) - logits[i])
        per_caption = []
        for j in range(n):
            logits = [scale * float(images[m] @ captions[j]) for m in range(n)]
            per_caption.append(math.log(sum(math.exp(v) for v in logits)) - logits[j])
        return 0.5 * (sum(per_image) / n + sum(per_caption) / n)

    for log_scale, scale in ((math.log(3.0), 3.0), (math.log(500.0), 100.0)):
        got = tiny_clip.contrastive_loss(images, texts, torch.tensor(log_scale))
        assert float(got) == pytest.approx(by_rows(scale), rel=1e-5)


def test_hard_negatives_change_one_slot_or_swap_the_colours_of_their_own_scene():
    rng = np.random.default_rng(0)
    _, attrs = world.make_batch(4, 60)
    negatives = tiny_clip.hard_negatives(attrs, rng, k=5)
    assert len(negatives) == 5 * len(attrs)
    swaps = 0
    for i, a in enumerate(attrs):
        changed = [replace(a, **{slot: v}) for slot, values in world.ATTRIBUTES.items() for v in values
                   if v != getattr(a, slot)]
        one_slot = {world.caption(c) for c in changed if c.colour != c.bg_colour}  # the colours stay apart
        swapped = world.caption(replace(a, colour=a.bg_colour, bg_colour=a.colour))
        for negative in negatives[5 * i: 5 * i + 5]:  # grouped by scene
            assert negative in one_slot | {swapped}
            swaps += negative == swapped
    assert 0.05 < swaps / len(negatives) < 0.25  # one draw in seven: 43 of 300 expected


def test_labels_give_each_slot_its_index_and_the_absent_class_to_slots_left_out():
    a = world.Attrs("ring", "blue", "small", "bottom right", "white", "checkered")
    full = tiny_clip.labels([a])
    assert full.tolist() == [a.label()]
    some = tiny_clip.labels([a, a], keep=[frozenset({"shape", "pattern"}), frozenset(world.SLOTS)])
    absent = [len(values) for values in world.ATTRIBUTES.values()]
    expected = [a.label()[i] if name in ("shape", "pattern") else absent[i] for i, name in enumerate(world.ATTRIBUTES)]
    assert some.tolist() == [expected, a.label()]


def test_saved_tokenizer_files_follow_the_published_clip_layout(tmp_path):
    """The files of openai/clip-vit-large-patch14's tokenizer: BPE merges under a "#version: 0.2" header, the
    start/end tokens, the end token doubling as padding and unknown, and the class that AutoTokenizer builds."""
    from transformers import AutoTokenizer

    folder = tok.save_tokenizer(tmp_path / "made" / "here", max_length=12)
    assert folder == tmp_path / "made" / "here"
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and all(len(line.split(" ")) == 2 for line in merges[1:])
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|startoftext|>"] == 0 and vocab["<|endoftext|>"] == 1
    assert json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8")) == {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }
    assert json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) == {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 12, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True,
    }
    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=False)
    assert type(tokenizer).__name__ == "CLIPTokenizer" and tokenizer.model_max_length == 12
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert tokenizer.pad_token == tokenizer.unk_token == "<|endoftext|>"
    padded = tokenizer("a red circle", padding="max_length", max_length=12).input_ids
    assert padded[:5] == [0] + tokenizer("a red circle").input_ids[1:-1] + [1] and padded[5:] == [1] * 7
    assert tokenizer.convert_tokens_to_ids("zebra</w>") == 1
    assert tokenizer("A Red CIRCLE").input_ids == tokenizer("a red circle").input_ids


def test_vocabulary_holds_the_start_end_characters_and_every_merge_product():
    """Ids: start 0, end 1, then every character alone and word-final, then what each merge makes, in merge order;
    merges are learnt most frequent pair first, so applying them by rank makes every caption word one symbol."""
    vocab, merges = tok.build_vocab()
    words = tok.vocabulary_words()
    assert list(vocab)[:2] == ["<|startoftext|>", "<|endoftext|>"] and sorted(vocab.values()) == list(range(len(vocab)))
    letters = sorted(set("".join(words)))
    assert set(letters) | {c + "</w>" for c in letters} <= set(vocab)
    assert all(vocab[a + b] > vocab[c] for a, b in merges for c in letters)
    assert {w + "</w>" for w in words} <= set(vocab) and tok.vocab_size() == len(vocab)
    first = {}
    for w in words:
        symbols = [*w[:-1], w[-1] + "</w>"]
        for pair in zip(symbols, symbols[1:]):
            first[pair] = first.get(pair, 0) + 1
    most = max(first.values())
    assert merges[0] == min(p for p, n in first.items() if n == most)
    assert len(merges) == len(set(merges))


def test_vocabulary_is_the_specials_the_characters_and_the_merge_products_only():
    vocab, merges = tok.build_vocab()
    letters = set("".join(tok.vocabulary_words()))
    expected = {"<|startoftext|>", "<|endoftext|>"} | letters | {c + "</w>" for c in letters}
    assert set(vocab) == expected | {a + b for a, b in merges}


@pytest.mark.parametrize("keep,text", [
    ({"size"}, "a large object"),
    ({"shape"}, "a circle"),
    ({"colour"}, "a red object"),
    ({"bg_colour"}, "on a blue background"),
    ({"pattern"}, "on a checkered background"),
    ({"size", "colour", "position", "pattern"}, "a large red object at the top left on a checkered background"),
    ({"shape", "bg_colour"}, "a circle on a blue background"),
])
def test_partial_captions_read_as_the_grammar_with_the_unnamed_words_left_out(keep, text):
    a = world.Attrs("circle", "red", "large", "top left", "blue", "checkered")
    assert world.partial_caption(a, frozenset(keep)) == text


def test_every_partial_caption_is_the_full_caption_with_words_left_out():
    """For all 64 subsets: the words appear in the full caption's order ("object" standing in for the shape), and
    the words of a slot are there exactly when it is kept."""
    from itertools import combinations

    a = world.Attrs("cross", "white", "small", "bottom right", "purple", "horizontal striped")
    full = world.caption(a).split()
    for k in range(len(world.SLOTS) + 1):
        for keep in combinations(world.SLOTS, k):
            words = world.partial_caption(a, frozenset(keep)).split()
            rest = iter(full)
            assert all(w in rest for w in words if w != "object"), keep
            for slot in world.SLOTS:
                value = getattr(a, slot).split()
                present = any(words[i:i + len(value)] == value for i in range(len(words)))
                assert present == (slot in keep), (keep, slot)


@pytest.mark.parametrize("full", [0.0, 0.5, 1.0])
def test_random_slots_names_everything_with_probability_full_else_a_fair_nonempty_subset(full):
    """A non-empty subset with each slot kept at 1/2 is any of the 63 non-empty subsets alike: each slot is in 32."""
    rng = np.random.default_rng(7)
    draws = [world.random_slots(rng, full=full) for _ in range(4000)]
    assert all(draws) and all(d <= set(world.SLOTS) for d in draws)
    share_full = np.mean([d == frozenset(world.SLOTS) for d in draws])
    expected_full = full + (1 - full) / 63
    assert abs(share_full - expected_full) < 4 * np.sqrt(expected_full * (1 - expected_full) / 4000) + 1e-9
    for slot in world.SLOTS:
        kept = np.mean([slot in d for d in draws])
        expected = full + (1 - full) * 32 / 63
        assert abs(kept - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000) + 1e-9


def test_random_slots_names_every_slot_half_the_time_by_default():
    by_default, half = np.random.default_rng(9), np.random.default_rng(9)
    assert [world.random_slots(by_default) for _ in range(200)] == [world.random_slots(half, 0.5) for _ in range(200)]


def test_scenes_are_drawn_uniformly_and_a_bad_split_is_named():
    rng = np.random.default_rng(11)
    train = [world.sample_attrs(rng) for _ in range(3000)]
    for name, values in world.ATTRIBUTES.items():
        counts = np.array([sum(getattr(a, name) == v for a in train) for v in values])
        assert counts.min() > 0.7 * len(train) / len(values), name
    held = [world.sample_attrs(rng, "heldout") for _ in range(600)]
    assert {a.triple for a in held} == world.HELD_OUT
    for name in ("size", "position", "pattern"):
        assert {getattr(a, name) for a in held} == set(world.ATTRIBUTES[name])
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout', not 'test'"):
        world.sample_attrs(rng, "test")


def test_draw_is_the_image_of_draw_with_mask_in_each_style():
    attrs = world.Attrs("triangle", "cyan", "large", "bottom", "red", "gradient")
    for style in world.STYLES:
        image = world.draw(attrs, np.random.default_rng(3), style)
        assert np.array_equal(image, world.draw_with_mask(attrs, np.random.default_rng(3), style)[0])
    plain, two_tone = (world.draw(attrs, np.random.default_rng(3), s) for s in world.STYLES)
    assert not np.array_equal(plain, two_tone)
    with pytest.raises(ValueError, match="style must be one of plain, two-tone, not 'bold'"):
        world.draw(attrs, np.random.default_rng(3), "bold")


def test_masked_batches_are_the_batches_images_with_the_drawn_masks():
    images, masks, attrs = world.make_masked_batch(8, 6, "heldout", "two-tone")
    same, same_attrs = world.make_batch(8, 6, "heldout", "two-tone")
    assert np.array_equal(images, same) and attrs == same_attrs and {a.triple for a in attrs} <= world.HELD_OUT
    rng = np.random.default_rng(8)
    for _ in range(6):
        world.sample_attrs(rng, "heldout")
    for image, mask, a in zip(images, masks, attrs):
        drawn, coverage = world.draw_with_mask(a, rng, "two-tone")
        assert np.array_equal(image, drawn) and np.array_equal(mask, coverage)
    assert masks.shape == (6, 64, 64) and masks.dtype == np.float32
    assert not np.array_equal(world.make_batch(8, 6, "heldout")[0], images)


@pytest.mark.parametrize("masks", [False, True])
def test_the_dataset_holds_the_batches_images_masks_and_a_share_of_partial_captions(tmp_path, masks):
    """Images and masks are `make_masked_batch(seed, n, split)`'s (plain style); about `partial` of the captions
    name a subset of the slots; a mask is written, and named, only when asked for."""
    manifest = world.write_dataset(tmp_path, 40, seed=5, split="heldout", masks=masks, partial=0.5)
    assert manifest == tmp_path / "manifest.jsonl"
    images, object_masks, attrs = world.make_masked_batch(5, 40, "heldout")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 40 and (tmp_path / "masks").is_dir() == masks
    partial = 0
    for i, (record, image, mask, a) in enumerate(zip(records, images, object_masks, attrs)):
        assert record["image_file"] == f"images/heldout_{i:06d}.png" and record["attrs"] == a.__dict__
        assert np.array_equal(np.asarray(Image.open(tmp_path / record["image_file"])), image)
        full = world.caption(a)
        partial += record["text"] != full
        assert set(record["text"].split()) <= set(full.split()) | {"object"}
        if masks:
            assert record["mask_file"] == f"masks/heldout_{i:06d}.png"
            assert np.array_equal(np.asarray(Image.open(tmp_path / record["mask_file"])),
                                  np.asarray(world.mask_image(mask)))
        else:
            assert "mask_file" not in record
    assert 10 <= partial <= 30
    assert all(json.loads(line)["text"] == world.caption(world.Attrs(**json.loads(line)["attrs"]))
               for line in world.write_dataset(tmp_path / "full", 10, seed=5).read_text().splitlines())


def test_a_dataset_is_a_function_of_its_seed_and_can_be_rebuilt_in_place(tmp_path):
    """The same seed writes the same manifest (partial captions included), again into the same folder with its
    masks; with `partial` 0 the same scenes have their full captions."""
    first = world.write_dataset(tmp_path, 30, seed=2, masks=True, partial=0.6).read_text()
    again = world.write_dataset(tmp_path, 30, seed=2, masks=True, partial=0.6).read_text()
    assert first == again
    texts = [json.loads(line)["text"] for line in first.splitlines()]
    other = world.write_dataset(tmp_path / "other", 30, seed=2, partial=0.0).read_text()
    full = [json.loads(line)["text"] for line in other.splitlines()]
    assert texts != full and sum(t != f for t, f in zip(texts, full)) >= 10
