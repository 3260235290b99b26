"""`ipadapter miniature eval`: what each condition asks for, the target verdicts, and one real run on the shipped model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ipadapter.miniature import quality
from ipadapter.miniature.quality import CONDITIONS, Condition, Setup, asked_for, check_targets
from ipadapter.miniature.world import Attrs, caption

REF = Attrs("circle", "red", "large", "top left", "blue", "checkered")
MASK_SCENE = Attrs("cross", "green", "small", "bottom right", "white", "plain")


def test_asked_for_takes_each_attribute_from_its_source() -> None:
    by_name = {c.name: c for c in CONDITIONS}
    assert asked_for(by_name["IP-Adapter, image only"], REF, "square", MASK_SCENE) == REF
    assert asked_for(by_name["text only (reference caption)"], REF, "square", MASK_SCENE) == REF
    assert asked_for(by_name["IP-Adapter + text (another shape)"], REF, "square", MASK_SCENE) == replace(REF, shape="square")
    control = asked_for(by_name["ControlNet (mask) + IP-Adapter"], REF, "square", MASK_SCENE)
    assert control == Attrs("cross", "red", "small", "bottom right", "blue", "checkered")


def test_shape_prompt_never_names_a_colour() -> None:
    from ipadapter.miniature.world import COLOURS

    text = quality._prompt(Condition("t", adapter="base", prompt="shape"), REF, "square")
    assert "square" in text and not set(text.split()) & set(COLOURS)
    assert quality._prompt(Condition("t", prompt="caption"), REF, "square") == caption(REF)
    assert all(s != r.shape for s, r in zip(quality._shapes([REF] * 50), [REF] * 50))


def _row(clip_i: float, **agreement: float) -> dict:
    full = {a: 0.0 for a in ("shape", "colour", "size", "position", "bg_colour", "pattern")} | agreement
    return {"clip_i": clip_i, "agreement": full}


def test_targets_are_judged_on_the_right_rows() -> None:
    rows = {
        "IP-Adapter, image only": _row(0.6, colour=0.9, bg_colour=0.8, pattern=0.85),
        "IP-Adapter + text (another shape)": _row(0.5, shape=0.72, colour=0.69, bg_colour=0.9),
        "simple adapter (ablation), image only": _row(0.4),
    }
    verdicts = [t["met"] for t in check_targets(rows).values()]
    assert verdicts == [True, False, True]
    del rows["simple adapter (ablation), image only"]
    assert [t["met"] for t in check_targets(rows).values()][2] is None


def test_scale_zero_equals_the_plain_pipeline_and_report_is_written(tmp_path) -> None:
    """The eval's generation path against diffusers called directly: at scale 0 the adapter must not act."""
    from diffusers import StableDiffusionPipeline

    setup = Setup(steps=2, batch=2)
    if not setup.adapters["base"].is_file():
        pytest.skip("the shipped miniature adapter is missing")
    off = Condition("off", adapter="base", scale=0.0)
    generator = quality.Generator(setup, {"base"})
    from ipadapter.miniature.world import make_batch
    from PIL import Image

    arrays, _ = make_batch(1, 2, "heldout")
    refs = [Image.fromarray(a) for a in arrays]
    got = generator.run(off, refs, ["", ""], [], seed=5)
    pipe = StableDiffusionPipeline.from_pretrained(setup.pipeline, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt=["", ""], num_inference_steps=2, guidance_scale=setup.guidance,
                    generator=torch.Generator().manual_seed(5)).images
    for a, b in zip(got, expected):
        assert a.tobytes() == b.tobytes()

    results = quality.evaluate(tmp_path, n=2, setup=setup, conditions=(CONDITIONS[0], CONDITIONS[1]), sweep=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["rows"]) == {CONDITIONS[0].name, CONDITIONS[1].name} == set(results["rows"])
    for row in saved["rows"].values():
        assert all(0.0 <= v <= 1.0 for v in row["agreement"].values())
    assert "| text only (reference caption) |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "agreement.png").stat().st_size > 0 and (tmp_path / "samples.png").stat().st_size > 0


def test_adapter_recipes_train_with_the_project_trainer(tmp_path, monkeypatch) -> None:
    """`ipadapter miniature train adapter-simple` end to end on the shipped pipeline, shrunk to 8 scenes and 1 step:
    data written, cache built, trained, and the exported fp16 file loads as the same kind of adapter."""
    import shutil

    from ipadapter import load_adapter
    from ipadapter.miniature import adapters, assets
    from ipadapter.miniature.recipes import run_recipe

    shutil.copytree(assets.PIPELINE_DIR, tmp_path / "pipeline")
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
