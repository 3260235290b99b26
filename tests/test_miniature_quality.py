"""`ipadapter miniature eval`: what each condition asks for, the target verdicts, PIL references, and quick runs on
the shipped (v1) models and on a rebuild's folder layout (v2)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ipadapter.errors import IPAdapterError
from ipadapter.miniature import quality
from ipadapter.miniature.models import Models
from ipadapter.miniature.quality import (
    CONDITIONS, QUICK, SWEEP_CONDITION, Condition, Size, asked_for, check_targets, other_shapes, prompt_for,
)
from ipadapter.miniature.world import ATTRIBUTES, COLOURS, SHAPES, Attrs

REF = Attrs("circle", "red", "large", "top left", "blue", "checkered")
MASK_SCENE = Attrs("cross", "green", "small", "bottom right", "white", "plain")


def test_asked_for_takes_each_attribute_from_its_source() -> None:
    by_name = {c.name: c for c in CONDITIONS}
    assert asked_for(by_name["IP-Adapter, image only"], REF, "square", MASK_SCENE) == REF
    assert asked_for(by_name["IP-Adapter + text (another shape)"], REF, "square", MASK_SCENE) == replace(REF, shape="square")
    control = asked_for(by_name["ControlNet (mask) + IP-Adapter"], REF, "square", MASK_SCENE)
    assert control == Attrs("cross", "red", "small", "bottom right", "blue", "checkered")


def test_shape_prompt_never_names_a_colour() -> None:
    text = prompt_for(Condition("t", adapter="base", prompt="shape"), "square")
    assert "square" in text and not set(text.split()) & set(COLOURS)
    assert prompt_for(Condition("t", adapter="base"), "square") == ""
    assert all(s != r.shape for s, r in zip(other_shapes([REF] * 50), [REF] * 50))
    assert set(other_shapes([REF] * 100)) == set(SHAPES) - {REF.shape}, "every other shape can be asked for"


@pytest.mark.parametrize("side", [48, 200])
def test_pil_references_draw_the_asked_scene_at_any_size(side) -> None:
    """Independent of the world's renderer: the object's pixels are exactly its palette colour, centred on its grid
    cell, and the rest is the background colour."""
    import numpy as np

    from ipadapter.miniature.world import PALETTE

    scene = replace(REF, shape="square", pattern="plain", size="large", position="bottom right")
    pixels = np.asarray(quality.draw_with_pil(scene, side))
    assert pixels.shape == (side, side, 3)
    obj = (pixels == PALETTE["red"]).all(axis=-1)
    assert ((pixels == PALETTE["blue"]).all(axis=-1) | obj).mean() > 0.97
    ys, xs = np.nonzero(obj)
    k = side / 64
    assert abs(xs.mean() - 48 * k) <= 1 and abs(ys.mean() - 48 * k) <= 1
    assert abs((xs.max() - xs.min() + 1) - 2 * 0.85 * 14 * k) <= 2


def _agreement(**values: float) -> dict:
    return dict.fromkeys(ATTRIBUTES, 0.0) | values


def _results(rows: dict, stages: dict | None = None, sweep: dict | None = None) -> dict:
    return {"rows": {k: {"clip_i": c, "agreement": a} for k, (c, a) in rows.items()}, "stages": stages or {},
            "sweep": sweep}


def test_targets_are_judged_on_the_right_rows() -> None:
    good = _agreement(colour=0.9, bg_colour=0.86, pattern=0.85, shape=0.7, size=0.71)
    results = _results({
        "IP-Adapter, image only": (0.60, good),
        "IP-Adapter Plus, image only": (0.62, good | {"position": 0.1}),
        "simple adapter (ablation), image only": (0.58, good),
        "IP-Adapter on the custom model, image only": (0.6, good | {"colour": 0.84}),
        "IP-Adapter, image only, PIL-drawn references": (0.5, good | {"bg_colour": 0.80}),
    }, stages={"vae": dict.fromkeys(ATTRIBUTES, 0.95), "base_full": dict.fromkeys(ATTRIBUTES, 0.9) | {"shape": 0.79}},
        sweep={"0.3": _agreement(shape=0.5, colour=0.9, bg_colour=0.9),
               "1.0": _agreement(shape=0.71, colour=0.7, bg_colour=0.8)})
    verdicts = {name.split(":")[0]: t["met"] for name, t in check_targets(results).items()}
    assert verdicts == {
        "image encoder": None, "text encoder": None, "VAE reconstruction": True, "base, text only, full caption": False,
        "base, partial captions": None, "IP-Adapter, image only": True, "Plus, image only": True,
        "image + text at the best scale": True, "decoupled vs simple adapter": None,
        "same adapter on the custom model": False, "ControlNet (mask) + image": None, "PIL-drawn references": False,
    }
    best = next(t for n, t in check_targets(results).items() if n.startswith("image + text"))
    assert best["measured"]["scale"] == 1.0


# Each target of docs/miniature.md's table at its threshold (met) and just past it (not met), one attribute at a time.
# Values are chosen so that the subtractions are exact in binary floating point (0.03 - 0.0, 0.05 - 0.0).
FLOORS = {
    "image encoder": ("image_encoder", dict.fromkeys(ATTRIBUTES, 0.9)),
    "text encoder": ("text_encoder", dict.fromkeys(ATTRIBUTES, 0.95)),
    "VAE reconstruction": ("vae", dict.fromkeys(ATTRIBUTES, 0.95)),
    "base, text only, full caption": ("base_full", {"shape": 0.8, "position": 0.8, "colour": 0.9, "size": 0.9,
                                                    "bg_colour": 0.9, "pattern": 0.9}),
    "base, partial captions": ("base_partial", dict.fromkeys(ATTRIBUTES, 0.8)),
    "IP-Adapter, image only": ("IP-Adapter, image only", {"colour": 0.85, "bg_colour": 0.85, "pattern": 0.85,
                                                          "shape": 0.7, "size": 0.7}),
    "ControlNet (mask) + image": ("ControlNet (mask) + IP-Adapter", {"position": 0.85, "colour": 0.8, "bg_colour": 0.8}),
}


def _floor_results(target: str, values: dict) -> dict:
    where, _ = FLOORS[target]
    if where in ("image_encoder", "text_encoder"):
        inner = {"global": values} if where == "image_encoder" else {"told_apart": values}
        return _results({}, stages={where: inner})
    if where in ("vae", "base_full", "base_partial"):
        return _results({}, stages={where: values})
    return _results({where: (0.5, _agreement(**values))})


def _verdict(results: dict, target: str) -> bool | None:
    (found,) = [t["met"] for name, t in check_targets(results).items() if name.split(":")[0] == target]
    return found


@pytest.mark.parametrize("target", list(FLOORS))
def test_each_floor_target_is_met_at_its_threshold_and_missed_just_below_it(target: str) -> None:
    _, floors = FLOORS[target]
    at = dict.fromkeys(ATTRIBUTES, 0.0) | floors
    assert _verdict(_floor_results(target, at), target) is True
    for attribute, floor in floors.items():
        assert _verdict(_floor_results(target, at | {attribute: floor - 0.001}), target) is False, attribute
    unmeasured = at | {next(iter(floors)): None}
    assert _verdict(_floor_results(target, unmeasured), target) is None


def test_the_comparison_targets_at_their_thresholds() -> None:
    base, simple = "IP-Adapter, image only", "simple adapter (ablation), image only"
    level = _agreement(**dict.fromkeys(ATTRIBUTES, 0.5))
    for attribute in ATTRIBUTES:  # Plus: level everywhere is met, one attribute below base is not
        rows = {base: (0.5, level), "IP-Adapter Plus, image only": (0.5, level | {attribute: 0.499})}
        assert _verdict(_results(rows), "Plus, image only") is False, attribute
        rows["IP-Adapter Plus, image only"] = (0.5, level)
        assert _verdict(_results(rows), "Plus, image only") is True
        custom = "IP-Adapter on the custom model, image only"  # within 5 points either way, not 5.1
        for base_value, custom_value, met in ((0.0, 0.05, True), (0.05, 0.0, True), (0.0, 0.051, False),
                                              (0.051, 0.0, False)):
            rows = {base: (0.5, level | {attribute: base_value}), custom: (0.5, level | {attribute: custom_value})}
            assert _verdict(_results(rows), "same adapter on the custom model") is met, (attribute, base_value)
    drawn = "IP-Adapter, image only, PIL-drawn references"  # colours within 5 points below the world's references
    for attribute in ("colour", "bg_colour"):
        for base_value, met in ((0.05, True), (0.06, False)):
            rows = {base: (0.5, level | {attribute: base_value}), drawn: (0.5, level | {attribute: 0.0})}
            assert _verdict(_results(rows), "PIL-drawn references") is met, (attribute, base_value)
    rows = {base: (0.5, level), drawn: (0.5, level | {"shape": 0.0, "pattern": 0.0})}
    assert _verdict(_results(rows), "PIL-drawn references") is True, "only the colours are compared"
    # Decoupled vs simple: CLIP-I ahead by 0.03 or more, and strictly ahead on image + text (shape from the text,
    # colours from the image: the weakest of the three).
    with_text, simple_text = SWEEP_CONDITION, "simple adapter (ablation) + text (another shape)"
    for clip_i, simple_clip_i, composed, simple_composed, met in (
            (0.03, 0.0, 0.7, 0.6, True), (0.029, 0.0, 0.7, 0.6, False), (0.03, 0.0, 0.6, 0.6, False),
            (0.03, 0.0, 0.7, 0.69, True), (0.53, 0.5, 0.7, 0.6, True), (0.529, 0.5, 0.7, 0.6, False)):
        ours = _agreement(shape=composed, colour=0.9, bg_colour=0.9)
        theirs = _agreement(shape=0.9, colour=simple_composed, bg_colour=0.9)
        rows = {base: (clip_i, level), simple: (simple_clip_i, level), with_text: (0.5, ours),
                simple_text: (0.5, theirs)}
        assert _verdict(_results(rows), "decoupled vs simple adapter") is met, (clip_i, composed, simple_composed)
    # Image + text: the row's own scale without a sweep; each of shape, colour and background at 70% at least.
    for attribute in ("shape", "colour", "bg_colour"):
        row = _agreement(shape=0.7, colour=0.7, bg_colour=0.7)
        assert _verdict(_results({with_text: (0.5, row)}), "image + text at the best scale") is True
        low = _results({with_text: (0.5, row | {attribute: 0.699})})
        assert _verdict(low, "image + text at the best scale") is False, attribute


def test_the_comparison_targets_report_their_differences_and_pick_the_best_scale_by_its_weakest_attribute() -> None:
    base, plus = _agreement(**dict.fromkeys(ATTRIBUTES, 0.5)), _agreement(**dict.fromkeys(ATTRIBUTES, 0.75))
    custom, drawn = base | {"shape": 0.25}, base | {"colour": 1.0, "bg_colour": 0.25}
    rows = {"IP-Adapter, image only": (0.75, base), "IP-Adapter Plus, image only": (0.5, plus),
            "simple adapter (ablation), image only": (0.5, base),
            "IP-Adapter on the custom model, image only": (0.5, custom),
            "IP-Adapter, image only, PIL-drawn references": (0.5, drawn),
            "simple adapter (ablation) + text (another shape)": (0.5, _agreement(shape=0.5, colour=0.75, bg_colour=1.0)),
            SWEEP_CONDITION: (0.5, _agreement(shape=0.75, colour=1.0, bg_colour=1.0))}
    # The lowest scale's weakest attribute is the highest: it is the best, though not the highest scale
    sweep = {"0.3": _agreement(shape=0.875, colour=0.875, bg_colour=1.0), "0.6": rows[SWEEP_CONDITION][1],
             "1.0": _agreement(shape=1.0, colour=0.25, bg_colour=1.0)}
    measured = {name.split(":")[0]: t["measured"] for name, t in check_targets(_results(rows, sweep=sweep)).items()}
    assert measured["Plus, image only"] == dict.fromkeys(ATTRIBUTES, 0.25)
    assert measured["same adapter on the custom model"] == dict.fromkeys(ATTRIBUTES, 0.0) | {"shape": -0.25}
    assert measured["PIL-drawn references"] == {"colour": 0.5, "bg_colour": -0.25}
    assert measured["decoupled vs simple adapter"] == {"clip_i_gap": 0.25, "composition_gap": 0.25}
    assert measured["image + text at the best scale"] == {"scale": 0.3, "shape": 0.875, "colour": 0.875,
                                                          "bg_colour": 1.0}
    del rows["simple adapter (ablation), image only"]
    assert _verdict(_results(rows), "decoupled vs simple adapter") is None


def test_every_target_is_unjudged_without_its_measurements() -> None:
    targets = check_targets({"rows": {}})
    assert len(targets) == 12 and all(t["met"] is None for t in targets.values())


@pytest.mark.parametrize("with_clip", [True, False])
def test_each_stage_is_measured_on_its_model_with_its_count(monkeypatch, with_clip: bool) -> None:
    """`measure_stages` against stand-ins that record their calls: each probe gets the model it measures and the
    count `Size` gives it; the text checks that need the whole CLIP run only when there is one; the base model is
    measured from full captions, then partial ones."""
    from types import SimpleNamespace

    calls: list[tuple] = []

    def record(name):
        def probe(*args, **kwargs):
            calls.append((name, args, kwargs))
            return name

        return probe

    for name in ("encoder_probes", "text_state_gap", "text_told_apart", "vae_ceiling", "base_text_only"):
        monkeypatch.setattr(quality.probes, name, record(name))
    pipes: list[str] = []
    loaded = SimpleNamespace(encoder=SimpleNamespace(model="encoder"), text_encoder="text", tokenizer="tok",
                             clip="clip" if with_clip else None, vae="vae",
                             pipeline=lambda model: pipes.append(model) or "base pipeline")
    size = Size(probe_train=11, probe_test=12, probe_iters=13, text=14, vae=15, base=16, steps=17, guidance=1.5)
    stages = quality.measure_stages(loaded, "judge", size)
    text_calls = [("text_told_apart", ("clip", "tok", 14), {}),
                  ("text_told_apart", ("clip", "tok", 14), {"image_encoder": "encoder"})] if with_clip else []
    assert calls == [
        ("encoder_probes", ("encoder", 11, 12, 13), {}),
        ("text_state_gap", ("text", "tok", 14), {}),
        *text_calls,
        ("vae_ceiling", ("vae", "judge", 15), {}),
        ("base_text_only", ("base pipeline", "judge", 16), {"partial": False, "steps": 17, "guidance": 1.5}),
        ("base_text_only", ("base pipeline", "judge", 16), {"partial": True, "steps": 17, "guidance": 1.5}),
    ]
    assert pipes == ["base"]
    text = {"state_gap": "text_state_gap"} | (
        {"told_apart_clip": "text_told_apart", "told_apart": "text_told_apart"} if with_clip else {})
    assert stages == {"image_encoder": "encoder_probes", "text_encoder": text, "vae": "vae_ceiling",
                      "base_full": "base_text_only", "base_partial": "base_text_only"}


def test_a_row_whose_model_is_missing_is_skipped_saying_which(tmp_path) -> None:
    """The bundled models without the custom LoRA and the ControlNet: those rows are skipped with the recipe that makes
    each, no image is generated; one reference is enough, none is refused."""
    models = replace(Models.bundled(), custom_lora=None, controlnet=None)
    if models.missing("base"):
        pytest.skip("the shipped miniature adapter is missing")
    by_name = {c.name: c for c in CONDITIONS}
    rows = (by_name["IP-Adapter on the custom model, image only"], by_name["ControlNet (mask) + IP-Adapter"])
    results = quality.evaluate(tmp_path, models, replace(QUICK, references=1, sweep=True), conditions=rows,
                               stages=False)
    assert "sweep" not in results, "no sweep without the row it sweeps"
    assert results["skipped"] == {rows[0].name: "no custom_lora/ (`ipadapter miniature train custom`)",
                                  rows[1].name: "no controlnet/ (`ipadapter miniature train controlnet`)"}
    assert results["rows"] == {}
    with pytest.raises(IPAdapterError) as refused:
        quality.evaluate(tmp_path / "none", models, replace(QUICK, references=0), conditions=rows, stages=False)
    assert str(refused.value) == "the number of references must be at least 1, got 0"


def test_the_sweep_regenerates_the_image_and_text_row_at_each_scale(tmp_path) -> None:
    """The sweep's 0.6 entry is the table's own row (same prompts, seed and scale); 0.3 and 1.0 are that row generated
    again at those scales and judged against the same asked-for scenes; the sweep is plotted."""
    from ipadapter.miniature.models import Loaded

    models = Models.bundled()
    if models.missing("base"):
        pytest.skip("the shipped miniature adapter is missing")
    row = next(c for c in CONDITIONS if c.name == SWEEP_CONDITION)
    size = replace(QUICK, references=2, sweep=True)
    out = tmp_path / "made" / "here"
    results = quality.evaluate(out, models, size, conditions=(row,), stages=False)
    assert list(results["sweep"]) == ["0.3", "0.6", "1.0"]
    assert results["sweep"]["0.6"] == results["rows"][row.name]["agreement"]
    loaded, inputs = Loaded(models), quality.Inputs.build(size.references)
    judge = loaded.judge()
    for scale in (0.3, 1.0):
        refs, prompts, truth = inputs.for_condition(replace(row, scale=scale))
        images = quality.generate(loaded, replace(row, scale=scale), refs, prompts, inputs.masks, size)
        expected = {k: v for k, v in judge.accuracy(images, truth).items() if k in ATTRIBUTES}
        assert results["sweep"][str(scale)] == expected
    assert (out / "text_image_sweep.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["sweep"] == results["sweep"]


def test_the_inputs_are_the_same_held_out_scenes_and_masks_every_time() -> None:
    from ipadapter.miniature.world import HELD_OUT

    a, b = quality.Inputs.build(6), quality.Inputs.build(6)
    assert a.attrs == b.attrs and a.mask_scenes == b.mask_scenes and a.pil_attrs == b.pil_attrs
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a.masks + a.images, b.masks + b.images))
    assert {s.triple for s in a.pil_attrs} <= HELD_OUT and {s.triple for s in a.attrs} <= HELD_OUT


def test_bundled_folder_reads_as_the_v1_layout() -> None:
    from ipadapter import bundled

    models = Models.bundled()
    assert models.pipeline == bundled.PIPELINE_DIR and models.image_encoder is None
    assert models.clip == bundled.ASSETS_DIR / "clip"
    assert models.judge == bundled.JUDGE_DIR
    assert models.missing("base") is None or "adapter" in models.missing("base")


def test_scale_zero_equals_the_plain_pipeline(tmp_path) -> None:
    """The eval's generation path against diffusers called directly: at scale 0 the adapter must not act."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ipadapter.miniature.models import Loaded
    from ipadapter.miniature.world import make_batch

    models = Models.bundled()
    if models.missing("base"):
        pytest.skip("the shipped miniature adapter is missing")
    size = replace(QUICK, batch=2)
    arrays, _ = make_batch(1, 2, "heldout")
    refs = [Image.fromarray(a) for a in arrays]
    got = quality.generate(Loaded(models), Condition("off", adapter="base", scale=0.0), refs, ["", ""], [], size,
                           seed=5)
    pipe = StableDiffusionPipeline.from_pretrained(models.pipeline, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt=["", ""], num_inference_steps=size.steps, guidance_scale=size.guidance,
                    generator=torch.Generator().manual_seed(5)).images
    for a, b in zip(got, expected):
        assert a.tobytes() == b.tobytes()


def _check_report(out, results) -> None:
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"].keys() == results["rows"].keys()
    for row in saved["rows"].values():
        assert all(0.0 <= v <= 1.0 for v in row["agreement"].values())
    stages = saved["stages"]
    for values in (stages["image_encoder"]["global"], stages["vae"], stages["base_full"]):
        assert set(values) - {"all"} == set(ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in values.values())
    assert set(stages["text_encoder"]["state_gap"]) == set(ATTRIBUTES)
    report = (out / "report.md").read_text()
    assert "## Stages" in report and "## Targets" in report
    for png in ("agreement.png", "samples.png"):
        assert (out / png).stat().st_size > 0


def test_quick_report_on_the_bundled_models(tmp_path) -> None:
    models = Models.bundled()
    if models.missing("base"):
        pytest.skip("the shipped miniature adapter is missing")
    results = quality.evaluate(tmp_path, models, QUICK)
    _check_report(tmp_path, results)
    assert set(results["stages"]["text_encoder"]["told_apart"]) == set(ATTRIBUTES)  # the bundle ships its CLIP
    report = (tmp_path / "report.md").read_text()
    assert "| IP-Adapter, image only, PIL-drawn references |" in report
    assert ("what was tried and the next step" in report) == any(
        t["met"] is False for t in results["targets"].values())


def _stage_folder(root, bundled_pipeline):
    """A rebuild's layout made from the bundled pipeline: clip/ (its two towers in one CLIPModel), vae/, unet/, a
    separate random image_encoder/ with 4 px patches, and the bundled base adapter as trained."""
    import shutil

    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModelWithProjection

    from ipadapter.miniature.tiny_clip import image_processor

    text_model = CLIPTextModel.from_pretrained(bundled_pipeline / "text_encoder")
    vision = CLIPVisionModelWithProjection.from_pretrained(bundled_pipeline / "image_encoder")
    config = CLIPConfig(text_config=text_model.config.to_dict(), vision_config=vision.config.to_dict(),
                        projection_dim=vision.config.projection_dim)
    clip = CLIPModel(config)
    clip.text_model.load_state_dict(text_model.state_dict())
    clip.vision_model.load_state_dict(vision.vision_model.state_dict())
    clip.save_pretrained(root / "clip")
    shutil.copytree(bundled_pipeline / "tokenizer", root / "clip", dirs_exist_ok=True)
    for part in ("vae", "unet"):
        shutil.copytree(bundled_pipeline / part, root / part)
    torch.manual_seed(0)
    encoder_config = vision.config
    encoder_config.patch_size = 4
    CLIPVisionModelWithProjection(encoder_config).save_pretrained(root / "image_encoder")
    image_processor().save_pretrained(root / "image_encoder")
    (root / "adapter-base").mkdir()
    shutil.copy(bundled_pipeline.parent / "adapters" / "base.safetensors",
                root / "adapter-base" / "adapter.ipadapter.safetensors")
    return root


def test_quick_report_on_a_rebuild_folder_uses_its_image_encoder(tmp_path) -> None:
    from ipadapter import bundled

    models = Models.bundled()
    if models.missing("base"):
        pytest.skip("the shipped miniature adapter is missing")
    folder = Models.from_folder(_stage_folder(tmp_path / "v2", bundled.PIPELINE_DIR))
    assert folder.pipeline is None and folder.image_encoder == tmp_path / "v2" / "image_encoder"
    assert set(folder.adapters) == {"base"} and folder.judge == bundled.JUDGE_DIR
    from ipadapter.miniature.models import Loaded

    loaded = Loaded(folder)
    assert loaded.encoder.model.config.patch_size == 4  # the separate encoder, not the CLIP's 8 px vision tower
    out = tmp_path / "report"
    results = quality.evaluate(out, folder, QUICK, conditions=CONDITIONS[:1])
    _check_report(out, results)
    assert set(results["stages"]["text_encoder"]["told_apart"]) == set(ATTRIBUTES)
    assert set(results["skipped"]) == set() and results["models"]["image_encoder"].endswith("image_encoder")


def test_a_folder_without_models_is_one_clear_error(tmp_path, capsys) -> None:
    from ipadapter.cli.main import main

    assert main(["miniature", "eval", "--models", str(tmp_path), "--out", str(tmp_path / "o"), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no miniature model" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_adapter_recipes_train_with_the_project_trainer(tmp_path, monkeypatch) -> None:
    """`ipadapter miniature train adapter-simple` end to end on the shipped pipeline, shrunk to 8 scenes and 1 step:
    data written, cache built, trained, and the exported fp16 file loads as the same kind of adapter."""
    import shutil

    from ipadapter import load_adapter
    from ipadapter import bundled
    from ipadapter.miniature import adapters
    from ipadapter.miniature.recipes import run_recipe

    shutil.copytree(bundled.PIPELINE_DIR, tmp_path / "pipeline")
    monkeypatch.setattr(adapters, "DATA_SIZE", 8)
    own = run_recipe("adapter-simple", tmp_path, steps=1)
    assert (tmp_path / "adapter_data" / "manifest.jsonl").read_text().count("\n") == 8
    sizes = adapters.export_adapters(tmp_path, tmp_path / "assets")
    assert set(sizes) == {"simple"}
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipeline" / "unet")
    shipped = load_adapter(tmp_path / "assets" / "adapters" / "simple.safetensors", unet)
    trained = load_adapter(own, unet)
    assert shipped.config.attention == trained.config.attention == "concat"
    assert shipped.config.encoder == "miniature/pipeline/image_encoder"
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(shipped.state_dict()[k].float(), v.half().float())


def test_image_encoder_recipe_runs_the_shipped_schedule(tmp_path, monkeypatch) -> None:
    """The shipped encoder is a 3,000-step run resumed to 6,000 (the cosine restarts at a resume), then to 9,000 with
    the per-patch read-outs: the default rebuilds it that way; `--steps N` is one run of N steps with today's
    objective; `--resume` continues the stage the checkpoint is in."""
    from ipadapter.miniature import recipes, tiny_clip

    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    calls = []

    def train_image_encoder(out, clip, steps, resume, per_patch):
        assert (out, clip) == (tmp_path, tmp_path / "clip")  # trained in the run folder against its CLIP
        calls.append((steps, resume, per_patch))

    monkeypatch.setattr(tiny_clip, "train_image_encoder", train_image_encoder)
    recipes.run_recipe("image-encoder", tmp_path)
    recipes.run_recipe("image-encoder", tmp_path, steps=500)
    recipes.run_recipe("image-encoder", tmp_path, resume=True)
    shipped = [(3000, False, False), (6000, True, False), (9000, True, True)]
    assert calls == [*shipped, (500, False, True), (3000, True, False), *shipped[1:]]


def test_a_run_folder_with_a_pipeline_reads_the_pipelines_image_encoder(tmp_path) -> None:
    """The adapters train against pipeline/image_encoder. A run folder's own image_encoder/ (the encoder recipe's
    output, trained further after the pipeline was assembled) must not replace it: the v2 report was measured that way,
    the adapters given an encoder they never saw."""
    import shutil

    from transformers import CLIPVisionModelWithProjection

    from ipadapter import bundled
    from ipadapter.miniature.models import Loaded
    from ipadapter.miniature.tiny_clip import image_processor

    root = tmp_path / "run"
    shutil.copytree(bundled.PIPELINE_DIR, root / "pipeline")
    shipped = CLIPVisionModelWithProjection.from_pretrained(root / "pipeline" / "image_encoder")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(shipped.config).save_pretrained(root / "image_encoder")  # same shape, other weights
    image_processor().save_pretrained(root / "image_encoder")
    models = Models.from_folder(root)
    assert models.pipeline == root / "pipeline" and models.image_encoder is None
    encoder = Loaded(models).encoder.model
    for name, value in shipped.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value), name


@pytest.mark.parametrize("position", ["top left", "center", "bottom"])
@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_each_pil_shape_has_its_own_geometry_in_its_cell(position, size) -> None:
    """Closed-form checks per shape, at 128 px (k = 2): half-extent r = 6/10/14 × k, centred on the position's cell
    (16 + 16·column, 16 + 16·row) × k; a disc fills π (r + ½)², a square (half side 0.85 r) its box, a diamond
    (half diagonal 1.1 r) half its box, a triangle is wider at its base than at its top, a ring (0.45 r wide) is
    empty inside 0.55 r, a cross (bars 0.66 r wide) fills its centre and two bars' area but not its box's corners."""
    import numpy as np

    from ipadapter.miniature.world import PALETTE, POSITIONS

    side, k = 128, 2
    r = {"small": 6, "medium": 10, "large": 14}[size] * k
    row, col = divmod(POSITIONS.index(position), 3)
    cx, cy = (16 + 16 * col) * k, (16 + 16 * row) * k

    def drawn(shape: str) -> np.ndarray:
        scene = replace(REF, shape=shape, size=size, position=position, colour="red", bg_colour="blue")
        pixels = np.asarray(quality.draw_with_pil(scene, side))
        assert ((pixels == PALETTE["red"]).all(-1) | (pixels == PALETTE["blue"]).all(-1)).all()  # two colours only
        return (pixels == PALETTE["red"]).all(-1)

    def box(mask: np.ndarray) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(mask)
        return xs.min(), ys.min(), xs.max(), ys.max()

    circle = drawn("circle")
    area = np.pi * (r + 0.5) ** 2  # PIL fills the box's end pixels too: a diameter of 2r + 1 pixels
    assert abs(circle.sum() - area) < 0.05 * area
    x0, y0, x1, y1 = box(circle)
    assert abs((x0 + x1) / 2 - cx) <= 1 and abs((y0 + y1) / 2 - cy) <= 1 and abs(x1 - x0 - 2 * r) <= 2
    square = drawn("square")
    x0, y0, x1, y1 = box(square)
    assert square.sum() == (x1 - x0 + 1) * (y1 - y0 + 1) and abs(x1 - x0 - 2 * 0.85 * r) <= 2
    diamond = drawn("diamond")
    x0, y0, x1, y1 = box(diamond)
    assert abs(x1 - x0 - 2 * 1.1 * r) <= 2 and abs(diamond.sum() / ((x1 - x0 + 1) * (y1 - y0 + 1)) - 0.5) < 0.08
    triangle = drawn("triangle")
    x0, y0, x1, y1 = box(triangle)
    widths = triangle[y0:y1 + 1].sum(axis=1)
    assert widths[0] <= 3 and widths[-1] >= 2 * r - 2 and (np.diff(widths) >= 0).all()  # apex up, base down
    assert abs(y0 - (cy - r)) <= 1 and abs(y1 - (cy + 0.8 * r)) <= 1
    ring = drawn("ring")
    assert not ring[cy, cx] and ring[cy, cx + r - 1] and ring.sum() < 0.8 * circle.sum()
    assert not ring[cy, cx + round(0.45 * r)] and ring[cy, cx + round(0.65 * r)]  # 0.45 r wide, hole of 0.55 r
    cross = drawn("cross")
    x0, y0, x1, y1 = box(cross)
    assert cross[cy, cx] and not cross[y0, x0] and not cross[y1, x1] and abs(x1 - x0 - 2 * r) <= 2
    bars = 2 * (2 * r) * (0.66 * r) - (0.66 * r) ** 2  # two bars 2r by 0.66r sharing their middle square
    assert abs(cross.sum() - bars) < 0.2 * bars


def test_pil_references_cycle_through_the_sizes_on_plain_backgrounds() -> None:
    from ipadapter.miniature.quality import PIL_SIDES, pil_references

    images, attrs = pil_references(6)
    assert [image.size for image in images] == [(PIL_SIDES[i % len(PIL_SIDES)],) * 2 for i in range(6)]
    assert {a.pattern for a in attrs} == {"plain"}
    again, same = pil_references(6)
    assert same == attrs and all(a.tobytes() == b.tobytes() for a, b in zip(images, again))


def test_the_pil_row_asks_for_what_was_drawn_without_text() -> None:
    inputs = quality.Inputs.build(3)
    pil_row = next(c for c in CONDITIONS if c.references == "pil")
    refs, prompts, truth = inputs.for_condition(pil_row)
    assert refs is inputs.pil_images and prompts == ["", "", ""] and truth == inputs.pil_attrs
    text_row = next(c for c in CONDITIONS if c.prompt == "shape")
    refs, prompts, truth = inputs.for_condition(text_row)
    assert refs is inputs.images and prompts == [f"a {s}" for s in inputs.shapes]
    assert [t.shape for t in truth] == inputs.shapes and [t.colour for t in truth] == [a.colour for a in inputs.attrs]
