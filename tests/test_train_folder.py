"""A tiny end-to-end run writes the finished model folder (published file, own file, model card, samples, loss
curve); the published file loads in diffusers; validation goes through `ImagePrompter` and its CLIP-I / CLIP-T are
the evaluation stack's, on the images it shows, and reach TensorBoard."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.train import TrainConfig, train
from ipadapter.train.model_folder import append_loss, loss_curve, read_losses, restart_losses
from tests import factories


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    manifest = factories.write_images(tmp / "data", 4)
    judge = factories.save_judge(tmp / "judge")
    models, encoder = factories.in_memory()
    config = TrainConfig(data=str(manifest), output=str(tmp / "out"), resolution=factories.RES, batch_size=2,
                         max_steps=2, num_workers=0, save_every=1000, seed=0, validate_every=2, validation_steps=2,
                         validation_prompts=["", "a red square"], validation_judge=judge,
                         validation_images=[str(tmp / "data" / "img1.png"), str(tmp / "data" / "img2.png")])
    result = train(config, models=models, image_encoder=encoder, log_with="tensorboard")
    factories.reset_accelerate()
    return {"result": result, "models": models, "encoder": encoder, "judge": judge, "tmp": tmp, "config": config}


def test_the_folder_is_complete(finished) -> None:
    result, config = finished["result"], finished["config"]
    out = result.output
    for name in ("ip-adapter.safetensors", "adapter.ipadapter.safetensors", "README.md", "loss.png", "samples.png",
                 "config.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "| variant | base " in card and "| steps | 2 " in card and "| training data | 4 samples" in card
    assert "![validation samples](samples.png)" in card and "![training loss](loss.png)" in card
    assert '"learning_rate": 0.0001' in card and "clip_i" in card
    assert Image.open(out / "samples.png").size == ((1 + 2) * config.resolution, 2 * config.resolution)
    assert [s for s, _ in read_losses(out)] == [1, 2]
    assert Image.open(out / "loss.png").size == (640, 360)


def _section(card: str, title: str) -> str:
    return card.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def named_line(card: str) -> str:
    """The Files section's first entry: the published file and who reads it."""
    return _section(card, "Files").strip().splitlines()[0]


def test_the_card_states_the_run(finished) -> None:
    """Each fact of the card read back from its own source: the front matter through the Hub's own parser, the
    parameter count from the own file, the numbers from the result, the file names from the folder, the configuration
    block as JSON."""
    import json
    import re

    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    from ipadapter.train.model_folder import model_card

    result, config = finished["result"], finished["config"]
    out, adapter = result.output, result.adapter
    card = (out / "README.md").read_text()
    # Made again here, so that a tool that maps functions to the tests calling them (mutmut) counts this test.
    assert model_card(config, adapter, result, data_size=4, samples=True) == card
    base = config.base or adapter.config.base
    assert ModelCard(card).data.to_dict() == {"library_name": "ipadapter", "base_model": base,
                                              "tags": ["ip-adapter", "image-prompt", "diffusers"]}
    rows = dict(re.findall(r"^\| ([a-z ]+) \| (.*) \|$", card, flags=re.M))
    assert rows["base model"] == f"`{base}`" and f"\n# IP-Adapter (base) for {base}\n" in card
    assert rows["training data"] == f"4 samples (`{config.data}`)"
    assert rows["variant"] == f"base (attention: {adapter.config.attention}; 4 tokens per reference; 1 reference(s) per sample)"
    assert not config.image_encoder and rows["image encoder"] == "an encoder given in memory (no name)"
    own = sum(t.numel() for t in load_file(out / "adapter.ipadapter.safetensors").values())
    assert rows["trainable parameters"] == f"{own:,}"
    assert rows["steps"] == f"2 × batch 2 × grad accumulation {config.grad_accum} per process"
    assert rows["resolution"] == f"{factories.RES} px" and rows["skipped"] == "0 samples; 0 non-finite steps"
    shown = {k: float(v) for k, v in re.findall(r"(\w+) (-?\d+\.\d{4})", rows["last validation"])}
    assert shown == pytest.approx(result.validation[max(result.validation)], abs=1e-4) and len(shown) == 2
    named = re.findall(r"^- `([^`]+)`", _section(card, "Files"), flags=re.M)
    assert named[:2] == ["ip-adapter.safetensors", "adapter.ipadapter.safetensors"]
    assert all((out / name).is_file() for name in named + ["loss.png", "samples.png"])
    assert _section(card, "Files").strip().splitlines()[-1] == "- `README.md` (this card), `loss.png`, `samples.png`"
    assert "the published layout (diffusers' `load_ip_adapter`, ComfyUI, A1111)" in named_line(card)
    use = _section(card, "Use").strip().splitlines()
    assert use[:2] == ["```python", "import ipadapter"] and use[-1] == "```"
    assert 'weight_name="ip-adapter.safetensors"' in use[2]
    assert use[3] == 'images = prompter.generate(reference, prompt="...", scale=1.0)'
    assert _section(card, "Samples").strip() == "![validation samples](samples.png)"
    assert _section(card, "Loss").strip() == "![training loss](loss.png)"
    block = _section(card, "Training configuration").split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block) == json.loads(json.dumps(config.to_dict()))


def test_a_card_without_validation_or_published_layout_says_so(finished) -> None:
    import dataclasses

    from ipadapter.train.model_folder import model_card

    result, config = finished["result"], finished["config"]
    bare = dataclasses.replace(result, published=None, validation={})
    card = model_card(config, result.adapter, bare, data_size=None, samples=False)
    assert "samples.png" not in card and _section(card, "Samples").strip() == "No validation ran (`--validate-every 0`)."
    assert _section(card, "Files").strip().splitlines()[-1] == "- `README.md` (this card), `loss.png`"
    assert named_line(card) == "- (no published layout: the simple-adapter ablation has none)"
    assert "| last validation | not measured (no validation judge) |" in card
    assert "| training data | tar shards " in card and "no published layout" in card
    assert f'weight_name="{result.own.name}"' in _section(card, "Use")


def test_the_card_names_the_encoder_the_buckets_and_who_reads_the_file(finished) -> None:
    """A named encoder is given by name; FaceID reads no CLIP features, so it has none (an in-memory encoder, which has
    no name, is the complete card's case above); buckets are said; a FLUX adapter's file is read by FluxPipeline."""
    import dataclasses

    from ipadapter.train.model_folder import model_card

    result, config = finished["result"], finished["config"]
    named = model_card(dataclasses.replace(config, image_encoder="h94/IP-Adapter/models/image_encoder"),
                       result.adapter, result, data_size=4, samples=True)
    assert "| image encoder | `h94/IP-Adapter/models/image_encoder` |" in named
    assert "| resolution | " + f"{config.resolution} px |" in named
    bucketed = model_card(dataclasses.replace(config, buckets=True), result.adapter, result, data_size=4, samples=True)
    assert f"| resolution | {config.resolution} px (aspect-ratio buckets) |" in bucketed
    flux = copy.copy(result.adapter)
    flux.config = dataclasses.replace(result.adapter.config, base="flux")
    flux_card = model_card(config, flux, result, data_size=4, samples=True)
    assert "XLabs' FLUX layout (diffusers' `FluxPipeline.load_ip_adapter`)" in named_line(flux_card)
    faceid = copy.copy(result.adapter)
    faceid.config = dataclasses.replace(result.adapter.config, variant="faceid", encoder="")
    assert "| image encoder | none (ID embeddings only) |" in model_card(config, faceid, result, data_size=4, samples=True)


def test_a_run_keeps_only_the_logged_steps_up_to_where_it_starts(tmp_path) -> None:
    for step, loss in [(1, 0.5), (2, 0.4), (3, 0.3), (2, 0.25)]:
        append_loss(tmp_path, step, loss)
    restart_losses(tmp_path, 2)
    assert read_losses(tmp_path) == [(1, 0.5), (2, 0.25)]
    restart_losses(tmp_path, 0)
    assert read_losses(tmp_path) == []


def test_a_fresh_run_into_a_used_folder_draws_only_itself(finished) -> None:
    """A longer earlier run's later steps are not kept in the loss log of a new, shorter run."""
    tmp = finished["tmp"]
    out = tmp / "reused"
    append_loss(out, 7, 9.0)
    config = TrainConfig(data=finished["config"].data, output=str(out), resolution=factories.RES, batch_size=2,
                         max_steps=1, num_workers=0, save_every=1000, seed=0)
    train(config, models=finished["models"], image_encoder=finished["encoder"])
    assert [s for s, _ in read_losses(out)] == [1]


def test_published_file_of_the_folder_loads_in_diffusers(finished) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    models, result = finished["models"], finished["result"]
    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0],
        unet=copy.deepcopy(models.unet), scheduler=DDIMScheduler.from_config(models.scheduler_config),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.load_ip_adapter(str(result.output), subfolder="", weight_name="ip-adapter.safetensors",
                         image_encoder_folder=None)
    from safetensors.torch import load_file

    loaded = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    published = load_file(str(result.output / "ip-adapter.safetensors"))
    torch.testing.assert_close(loaded.image_embeds.weight, published["image_proj.proj.weight"])


def test_validation_metrics_are_clip_i_and_clip_t_of_the_shown_images(finished) -> None:
    """Recomputed here with the evaluation stack's definitions on the grid's own cells and the references."""
    from ipadapter.evaluate.judges import ClipJudge
    from ipadapter.evaluate.metrics import clip_i, clip_t

    result, config, tmp = finished["result"], finished["config"], finished["tmp"]
    res = config.resolution
    grid = Image.open(result.output / "validation" / "step-00000002.png")
    cells = [[grid.crop((x * res, y * res, (x + 1) * res, (y + 1) * res)) for x in range(3)] for y in range(2)]
    samples = [c for row in cells for c in row[1:]]
    refs = [Image.open(tmp / "data" / f"img{i}.png").convert("RGB") for i in (1, 2)]
    judge = ClipJudge.load(finished["judge"])
    metrics = result.validation[2]
    assert metrics["clip_i"] == pytest.approx(float(clip_i(judge, samples, refs, per_reference=2).mean()), abs=1e-5)
    assert metrics["clip_t"] == pytest.approx(float(clip_t(judge, samples[1::2], ["a red square"] * 2).mean()),
                                              abs=1e-5)


def test_validation_reaches_tensorboard(finished) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished["result"].output / "logs" / "train"))
    events.Reload()
    tags = events.Tags()
    assert {"validation/clip_i", "validation/clip_t", "train/loss", "train/nonfinite_steps"} <= set(tags["scalars"])
    assert "validation" in tags["images"]


def test_loss_curve_draws_finite_points_only() -> None:
    image = np.asarray(loss_curve([(1, 1.0), (2, float("nan")), (3, 0.5)]).convert("L"))
    assert image.min() == 0  # something was drawn
    empty = np.asarray(loss_curve([(1, float("nan"))]).convert("L"))
    assert (empty < 128).sum() < (image < 128).sum()


def _sized(folder, sizes) -> list[str]:
    """One image per size (width, height), so which file a reference came from reads off its size."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 0, 0)).save(folder / f"v{i}.png")
        paths.append(str(folder / f"v{i}.png"))
    return paths


def test_validation_images_are_taken_in_groups_of_the_runs_references(tmp_path, caplog) -> None:
    """`validation_images` in consecutive groups of `references`; a group with an unreadable image is left out (with a
    warning naming it), an incomplete last group too, and at most `count` are kept."""
    from types import SimpleNamespace

    from ipadapter.train.validate import validation_references

    paths = _sized(tmp_path, [(10, 10), (11, 11), (12, 12), (13, 13), (14, 14), (15, 15), (16, 16)])
    (tmp_path / "v1.png").write_bytes(b"not a png")
    config = TrainConfig(references=2, validation_images=paths)
    found = validation_references(SimpleNamespace(config=config), count=4)
    assert [[im.size[0] for im in r.images] for r in found] == [[12, 13], [14, 15]]
    assert all(r.face_embeds is None for r in found)
    assert "v0.png" in caplog.text and "not used" in caplog.text
    assert len(validation_references(SimpleNamespace(config=config), count=1)) == 1


def test_validation_references_from_the_data_are_its_condition_images(tmp_path) -> None:
    """Without `validation_images`: the condition images of the data's first samples in manifest order (the reference
    images, not the targets), a sample with a bad reference skipped, and for FaceID each one's ID embeddings."""
    import json
    from types import SimpleNamespace

    from ipadapter import IPAdapterError
    from ipadapter.train.validate import validation_references

    _sized(tmp_path, [(10 + i, 10 + i) for i in range(8)])
    (tmp_path / "v1.png").write_bytes(b"not a png")
    ids = [np.full(4, i, np.float32) for i in range(7)]
    for i, value in enumerate(ids):
        np.save(tmp_path / f"id{i}.npy", value)
    lines = [{"image_file": "v7.png", "text": "t", "ref_image_file": f"v{i}.png", "id_embed_file": f"id{i}.npy"}
             for i in range(7)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = SimpleNamespace(config=TrainConfig(data=str(tmp_path / "data.jsonl")))
    found = validation_references(run, count=2)
    assert [[im.size[0] for im in r.images] for r in found] == [[10], [12]]
    assert [[im.size[0] for im in r.images] for r in validation_references(run, count=4)] == [[10], [12], [13], [14]]

    face = SimpleNamespace(config=TrainConfig(data=str(tmp_path / "data.jsonl"), variant="faceid", id_dim=4))
    found = validation_references(face, count=3)
    assert [r.images[0].size[0] for r in found] == [10, 12, 13]
    assert [r.face_embeds.tolist() for r in found] == [[ids[i].tolist()] for i in (0, 2, 3)]

    (tmp_path / "data.jsonl").write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(IPAdapterError, match="no usable validation reference"):
        validation_references(run)


def test_the_cards_command_for_the_own_file_finds_it_in_the_folder(finished) -> None:
    """The Files line gives the command form: its --adapter and --weight-name, with the folder put in for
    <this folder>, name the own file (`--adapter <folder>` alone is refused: a folder needs the file's name)."""
    import shlex

    from ipadapter.checkpoint import resolve
    from ipadapter.cli.main import build_parser

    result = finished["result"]
    card = (result.output / "README.md").read_text()
    (line,) = [ln for ln in _section(card, "Files").splitlines() if ln.startswith(f"- `{result.own.name}`")]
    command = line.split("(`", 1)[1].split("`)", 1)[0]
    argv = shlex.split(command.replace("<this folder>", str(result.output)).replace(" ...", ""))
    assert argv[:2] == ["ipadapter", "generate"]
    args = build_parser().parse_args(argv[1:])
    assert resolve(args.adapter[0], weight_name=(args.weight_name or [None])[0]) == result.own
