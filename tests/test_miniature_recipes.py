"""The recipe table against the recipes docs/miniature.md publishes: each `ipadapter miniature train NAME` runs its
stage with the documented steps, batch, learning rate and seed, and each adapter is the documented `ipadapter train`
run. The training functions are replaced by recorders: what is checked is what the table hands them."""

from __future__ import annotations

import inspect

import pytest

from ipadapter.miniature import adapters, base_model, controlnet, custom_model, judge, recipes, tiny_clip


@pytest.fixture
def calls(monkeypatch, tmp_path) -> list[tuple]:
    """Every stage function the recipes call, recording (name, args, kwargs); the folders each recipe needs exist."""
    seen: list[tuple] = []

    def recorder(name: str, result: object = None):
        def record(*args, **kwargs):
            seen.append((name, args, kwargs))
            return result
        return record

    for module, name in ((tiny_clip, "train_clip"), (tiny_clip, "train_image_encoder"), (base_model, "train_vae"),
                         (base_model, "build_cache"), (base_model, "train_unet"), (base_model, "train_vae_decoder"),
                         (judge, "train_judge"), (controlnet, "run"), (custom_model, "run"),
                         (adapters, "train_adapter"), (recipes, "assemble")):
        monkeypatch.setattr(module, name, recorder(f"{module.__name__.rsplit('.', 1)[1]}.{name}"))
    for need in ("clip", "vae", "unet"):
        (tmp_path / need).mkdir()
        (tmp_path / need / "config.json").write_text("{}")
    return seen


# docs/miniature.md, "Recipes" and the table of "What is shipped": (recipe, the call it makes)
DOCUMENTED = {
    "clip": ("tiny_clip.train_clip", {"name": "clip", "steps": 1200, "batch": 64, "lr": 1e-3, "seed": 0}),
    "vae": ("base_model.train_vae", {"steps": 2000, "batch": 16, "lr": 1e-3, "seed": 1}),
    "judge": ("judge.train_judge", {"steps": 500}),
    "decoder": ("base_model.train_vae_decoder", {"steps": 1500, "seed": 4}),
}


@pytest.mark.parametrize("name", DOCUMENTED)
@pytest.mark.parametrize("resume", [False, True])
def test_each_stage_runs_with_the_documented_settings(calls, tmp_path, name, resume) -> None:
    recipes.run_recipe(name, tmp_path, resume=resume)
    function, settings = DOCUMENTED[name]
    (called, args, kwargs), *rest = calls
    assert called == function and args == (tmp_path,)
    assert {k: kwargs[k] for k in settings} == settings and kwargs["resume"] is resume
    assert rest == ([("recipes.assemble", (tmp_path,), {})] if name == "decoder" else [])


def test_steps_override_the_documented_count(calls, tmp_path) -> None:
    recipes.run_recipe("vae", tmp_path, steps=7)
    assert calls[0][2]["steps"] == 7


def test_the_decoder_assembles_only_once_the_unet_exists(calls, tmp_path) -> None:
    (tmp_path / "unet" / "config.json").unlink()
    assert recipes.run_recipe("decoder", tmp_path) is None
    assert [c[0] for c in calls] == ["base_model.train_vae_decoder"]


def test_the_unet_caches_latents_once_then_trains_2600_steps_and_assembles(calls, tmp_path) -> None:
    recipes.run_recipe("unet", tmp_path)
    (tmp_path / "unet_cache.pt").write_bytes(b"")
    recipes.run_recipe("unet", tmp_path, resume=True)
    cache = ("base_model.build_cache", (tmp_path, tmp_path / "vae"), {})
    first = ("base_model.train_unet", (tmp_path, tmp_path / "unet_cache.pt", tmp_path / "clip"),
             {"steps": 2600, "seed": 3, "resume": False})
    again = (first[0], first[1], {**first[2], "resume": True})
    assemble = ("recipes.assemble", (tmp_path,), {})
    assert calls == [cache, first, assemble, again, assemble]


@pytest.mark.parametrize("name, module, steps", [("controlnet", "controlnet", 400), ("custom", "custom_model", 700)])
def test_the_controlnet_and_the_custom_model_run_their_own_recipes(calls, tmp_path, name, module, steps) -> None:
    recipes.run_recipe(name, tmp_path, resume=True)
    assert calls == [(f"{module}.run", (tmp_path, steps, True), {})]


@pytest.mark.parametrize("name, adapter, steps", [("adapter", "base", 12000), ("adapter-plus", "plus", 20000),
                                                  ("adapter-simple", "simple", 12000)])
def test_each_adapter_recipe_trains_its_adapter(calls, tmp_path, name, adapter, steps) -> None:
    recipes.run_recipe(name, tmp_path)
    recipes.run_recipe(name, tmp_path, steps=5, resume=True)
    assert calls == [("adapters.train_adapter", (tmp_path, adapter, steps, False), {}),
                     ("adapters.train_adapter", (tmp_path, adapter, 5, True), {})]


def test_the_base_models_defaults_are_the_documented_recipe() -> None:
    """What the recipes leave to the functions' defaults (docs/miniature.md, "Recipes"): the UNet's batch 64, AdamW
    8e-4, offset noise 0.2, EMA 0.999, min-SNR-5; the decoder's AdamW 2e-4, batch 16, object weighted 16x; the image
    encoder's patches and batch."""
    def defaults(function) -> dict:
        return {k: p.default for k, p in inspect.signature(function).parameters.items()}

    unet = defaults(base_model.train_unet)
    assert (unet["batch"], unet["lr"], unet["offset_noise"], unet["ema_decay"], unet["snr_gamma"]) == (
        64, 8e-4, 0.2, 0.999, 5.0)
    assert defaults(base_model.build_cache)["n"] == 49152
    decoder = defaults(base_model.train_vae_decoder)
    assert (decoder["lr"], decoder["batch"], decoder["object_weight"]) == (2e-4, 16, 16.0)
    encoder = defaults(tiny_clip.train_image_encoder)  # the table of "What is shipped": 4 px patches, batch 32
    assert (encoder["patch"], encoder["batch"]) == (4, 32)


@pytest.mark.parametrize("name, variant, attention, cache", [("base", "base", "decoupled", "base"),
                                                            ("plus", "plus", "decoupled", "plus"),
                                                            ("simple", "base", "concat", "base")])
def test_each_adapter_is_the_documented_ipadapter_train_run(tmp_path, name, variant, attention, cache) -> None:
    """adapters.py's recipe: the frozen pipeline and its image encoder, batch 32 at 64 px, AdamW 5e-4 after 100
    warm-up steps, offset noise 0.2, min-SNR-5, EMA 0.999, the paper's 5/5/5% dropout, seed 0; Plus on its own
    feature cache (patch tokens), base and simple sharing one (global embeddings)."""
    config = adapters.training_config(tmp_path, name)
    pipeline = tmp_path / "pipeline"
    assert (config.base, config.image_encoder) == (str(pipeline), str(pipeline / "image_encoder"))
    assert config.data == str(tmp_path / "adapter_data" / "manifest.jsonl")
    assert (config.variant, config.attention, config.output) == (variant, attention, str(tmp_path / f"adapter-{name}"))
    assert config.cache == str(tmp_path / f"adapter_cache_{cache}")
    assert (config.max_steps, config.batch_size, config.resolution) == (adapters.ADAPTERS[name].steps, 32, 64)
    assert (config.learning_rate, config.warmup_steps, config.noise_offset) == (5e-4, 100, 0.2)
    assert (config.snr_gamma, config.ema_decay, config.seed) == (5.0, 0.999, 0)
    assert (config.drop_image, config.drop_text, config.drop_both) == (0.05, 0.05, 0.05)
    assert config.resume == ""
    resumed = adapters.training_config(tmp_path, name, steps=30, resume=True)
    assert (resumed.max_steps, resumed.resume) == (30, "latest")



def test_the_base_models_check_scores_what_diffusers_draws_from_each_splits_captions(tmp_path) -> None:
    """`evaluate_base` (the `unet` recipe's check, base_eval.json): for the train-split captions of seed 777 and the
    held-out ones of seed 778, the judge's reading of what diffusers' own pipeline draws from them (DDIM, guidance,
    one generator seeded as the split), written whole with one sample grid per split."""
    import json

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from ipadapter import bundled

    (tmp_path / "pipeline").symlink_to(bundled.PIPELINE_DIR)
    (tmp_path / "judge").symlink_to(bundled.JUDGE_DIR)
    (tmp_path / "judge_clip").symlink_to(bundled.JUDGE_DIR / "clip")
    report = recipes.evaluate_base(tmp_path, n=3, steps=2, guidance=3.0)
    pipe = StableDiffusionPipeline.from_pretrained(bundled.PIPELINE_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scorer = judge.Judge.load(bundled.JUDGE_DIR)
    for split, seed in (("train", 777), ("heldout", 778)):
        prompts, attrs = judge.caption_batch(seed, 3, split)
        drawn = pipe(prompts, num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(seed)).images
        images = (np.clip(drawn, 0, 1) * 255 + 0.5).astype(np.uint8)
        assert report[split] == {"accuracy": scorer.accuracy(images, attrs),
                                 "clip_t": float(scorer.text_score(images, prompts).mean())}
        assert (tmp_path / f"base_samples_{split}.png").is_file()
    assert json.loads((tmp_path / "base_eval.json").read_text()) == {**report, "n": 3, "ddim_steps": 2,
                                                                       "guidance": 3.0}
    assert not list(tmp_path.glob("*.tmp*"))
