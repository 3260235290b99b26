"""Training an adapter for Kolors, checked against diffusers' own KolorsPipeline: captions encoded by ChatGLM exactly as
its `encode_prompt` encodes them (in the step and in the feature cache), and the trained file, loaded by its
`load_ip_adapter`, making the image the run's validation grid shows.

The base is built here from test_kolors_cli.py's parts: real classes with tiny random weights (a two-layer ChatGLM, so
that the second-to-last layer's states the UNet reads are a layer's output, with a sentencepiece tokenizer; the
SDXL-shaped Kolors UNet with its text projection; a ViT-L/14-336-like CLIP beside it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.cli.main import main
from tests import factories
from tests.test_kolors_cli import write_kolors

pytest.importorskip("sentencepiece")  # the ChatGLM tokenizer's vocabulary format
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
CAPTIONS = ["a red square on a blue ground", "", "a dog on a beach"]


@pytest.fixture(scope="module")
def kolors_folder(tmp_path_factory):
    return write_kolors(tmp_path_factory.mktemp("kolors-train"), layers=2)


def _pipeline(root):
    from diffusers import DDIMScheduler, KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(root / "kolors")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()  # as the pipeline's own call runs it (with gradients, CPU attention may take another kernel)
def _diffusers_prompt(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    text, _, pooled, _ = pipe.encode_prompt(texts, device=torch.device("cpu"), num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
    return text, pooled


def test_captions_are_what_kolors_pipeline_encodes(kolors_folder) -> None:
    from ipadapter.train.models import encode_text, load_base

    models = load_base(str(kolors_folder / "kolors"))
    text, pooled = encode_text(models, CAPTIONS, torch.device("cpu"))
    expected_text, expected_pooled = _diffusers_prompt(_pipeline(kolors_folder), CAPTIONS)
    assert text.shape == (3, 256, models.unet.config.encoder_hid_dim)  # KolorsPipeline's 256 tokens, ChatGLM's width
    assert torch.equal(text, expected_text) and torch.equal(pooled, expected_pooled)
    assert not torch.equal(text[0], text[2]) and not torch.equal(pooled[0], pooled[2]), "captions are told apart"


def _train(root, tmp_path, out: str, *flags: str) -> int:
    return main(["train", "--base", str(root / "kolors"), "--variant", "plus", "--image-encoder", str(root / "clip"),
                 "--data", str(factories.write_images(tmp_path / "data", 4)), "--output", str(tmp_path / out),
                 "--resolution", "16", "--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--seed", "4",
                 *flags])


def test_a_trained_kolors_adapter_makes_in_diffusers_what_its_validation_shows(kolors_folder, tmp_path,
                                                                             capsys) -> None:
    """`ipadapter train` on the Kolors base as a user runs it; the written file through diffusers' KolorsPipeline and
    its own `load_ip_adapter` gives the validation sample (same DDIM steps, guidance and seed), and differs from the
    plain pipeline's image (the sample is the second validation's: ChatGLM encoded its prompt at the first). The
    validation's own sampling shows no progress bar beside the run's."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    reference = tmp_path / "data" / "img1.png"
    assert _train(kolors_folder, tmp_path, "run", "--validate-every", "1", "--validation-steps", "2",
                  "--validation-guidance", "5", "--validation-prompts", "a cat",
                  "--validation-images", str(reference)) == 0
    err = capsys.readouterr().err
    assert "step/s" in err and "it/s]" not in err and "s/it]" not in err  # the run's bar only, not diffusers'
    grid = Image.open(tmp_path / "run" / "validation" / "step-00000002.png").convert("RGB")
    shown = np.asarray(grid.crop((16, 0, 32, 16))).astype(np.int16)

    pipe = _pipeline(kolors_folder)
    settings = dict(prompt="a cat", num_inference_steps=2, guidance_scale=5.0, height=16, width=16, output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(4), **settings).images[0]
    pipe.load_ip_adapter(str(tmp_path / "run"), subfolder="", weight_name="ip-adapter.safetensors",
                         image_encoder_folder=None)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(kolors_folder / "clip")
    pipe.feature_extractor = CLIPImageProcessor.from_pretrained(kolors_folder / "clip")
    expected = pipe(ip_adapter_image=Image.open(reference).convert("RGB"), generator=torch.Generator().manual_seed(4),
                    **settings).images[0]
    assert np.abs(expected - plain).max() > 2 / 255  # the adapter shows in the image, beyond PNG rounding
    assert np.abs(shown - np.round(expected * 255)).max() <= 1  # PNG: 8 bits per channel


def test_a_kolors_feature_cache_holds_chatglm_captions_and_trains(kolors_folder, tmp_path) -> None:
    """A run with `--cache` on Kolors: the rows' captions are the pipeline's own embeddings (stored at the cache's
    float16), and so is the dropped caption's."""
    import json

    from ipadapter.train.cache import CacheReader

    assert _train(kolors_folder, tmp_path, "run", "--cache", str(tmp_path / "cache")) == 0
    reader = CacheReader(str(tmp_path / "cache"))
    pipe = _pipeline(kolors_folder)
    empty_text, empty_pooled = _diffusers_prompt(pipe, [""])
    # kept in float32; computed in the run, where CPU kernels may round the last bit differently
    torch.testing.assert_close(reader.constants["uncond_text"], empty_text[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reader.constants["uncond_pooled"], empty_pooled[0], rtol=1e-5, atol=1e-6)
    captions = sorted({json.loads(line)["text"] for line in (tmp_path / "data" / "data.jsonl").read_text().splitlines()})
    expected = _diffusers_prompt(pipe, captions)[0].half().float()
    rows = [reader(r)["text_embeds"] for r in reader.records()]
    assert len(rows) == 4
    assert all(any(torch.allclose(row, e, rtol=1e-3, atol=1e-3) for e in expected) for row in rows)  # float16
    assert len({tuple(row.flatten().tolist()) for row in rows}) == len(captions) > 1


def test_a_kolors_dry_run_counts_chatglm(kolors_folder, capsys) -> None:
    """The estimate's frozen parameters are the loaded models' (ChatGLM included), and a cached run's leave out the
    VAE and ChatGLM."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel

    from ipadapter.encoders import ImageEncoder
    from ipadapter.train.config import TrainConfig
    from ipadapter.train.memory import estimate

    base, clip = kolors_folder / "kolors", kolors_folder / "clip"
    config = TrainConfig(base=str(base), image_encoder=str(clip), resolution=16, variant="plus")
    uncached, cached = (estimate(c, batch_sizes=(1,)) for c in (config, config.replace(cache="somewhere")))
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    chatglm = ChatGLMModel.from_pretrained(base, subfolder="text_encoder")
    vision = ImageEncoder.from_pretrained(str(clip)).model
    assert uncached.frozen_params == sum(p.numel() for m in (unet, vae, chatglm, vision) for p in m.parameters())
    assert uncached.frozen_params - cached.frozen_params == sum(
        p.numel() for m in (vae, chatglm, vision) for p in m.parameters())
    assert uncached.activations[1] > 0


def test_fine_tuning_starts_from_kolors_published_plus_file(kolors_folder, tmp_path) -> None:
    """`--init-from` Kolors' Plus file (here one in its published layout, `ip_adapter_plus_general`): one step at
    lr ≈ 0 writes back those very weights, under the same keys."""
    from safetensors.torch import load_file

    published = kolors_folder / "ip_adapter_plus_general.safetensors"
    assert _train(kolors_folder, tmp_path, "run", "--init-from", str(published), "--max-steps", "1",
                  "--learning-rate", "1e-12", "--weight-decay", "0") == 0
    start, after = load_file(str(published)), load_file(str(tmp_path / "run" / "ip-adapter.safetensors"))
    assert start.keys() == after.keys()
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)


def test_a_kolors_run_without_sentencepiece_is_a_one_line_error(kolors_folder, tmp_path, monkeypatch, capsys) -> None:
    """The tokenizer's own check (as on a machine without sentencepiece) becomes one line naming the extra."""
    import diffusers.pipelines.kolors.tokenizer as chatglm_tokenizer_module

    monkeypatch.setattr(chatglm_tokenizer_module, "is_sentencepiece_available", lambda: False)
    assert _train(kolors_folder, tmp_path, "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("; for Kolors: pip install 'ipadapter[kolors]'")
    assert "sentencepiece" in err[0].split("; for Kolors")[0]  # the library's own reason comes first
    assert not (tmp_path / "run" / "ip-adapter.safetensors").exists()


@pytest.mark.parametrize("broken, says, reason", [
    ("tokenizer", "cannot load the tokenizer from {base}/tokenizer: ", "tokenizer.model"),
    ("tokenizer/tokenizer.model", "cannot load the tokenizer from {base}/tokenizer: ", "tokenizer.model"),
    ("tokenizer/tokenizer_config.json", "cannot load the tokenizer from {base}/tokenizer: ", "line 1"),
    ("text_encoder", "cannot load the text encoder from {base}/text_encoder: ", "no file named"),
])
def test_a_kolors_base_with_a_text_part_missing_or_broken_is_named_in_one_line(kolors_folder, tmp_path, capsys,
                                                                               broken, says, reason) -> None:
    """A part or the vocabulary deleted (or a config that is not JSON): one line naming the part, with the library's
    reason."""
    import shutil

    base = tmp_path / "kolors"
    shutil.copytree(kolors_folder / "kolors", base)
    if (base / broken).is_dir():
        shutil.rmtree(base / broken)
    elif broken.endswith(".json"):
        (base / broken).write_text("{not json")
    else:
        (base / broken).unlink()
    code = main(["train", "--base", str(base), "--variant", "plus", "--image-encoder", str(kolors_folder / "clip"),
                 "--data", str(factories.write_images(tmp_path / "data", 2)), "--output", str(tmp_path / "run"),
                 "--resolution", "16", "--max-steps", "1", "--num-workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ipadapter: error: " + says.format(base=base))
    assert reason in err[0][len("ipadapter: error: " + says.format(base=base)):]


def test_a_kolors_hub_base_cached_without_its_vocabulary_names_the_download(kolors_folder, tmp_path, monkeypatch,
                                                                             capsys) -> None:
    factories.write_hub_cache(tmp_path / "hub", "qa/kolors", kolors_folder / "kolors")
    next((tmp_path / "hub").glob("models--qa--kolors/snapshots/*/tokenizer/tokenizer.model")).unlink()
    factories.hub_without_network(monkeypatch, tmp_path / "hub")
    code = main(["train", "--base", "qa/kolors", "--variant", "plus", "--image-encoder", str(kolors_folder / "clip"),
                 "--data", str(factories.write_images(tmp_path / "data", 2)), "--output", str(tmp_path / "run"),
                 "--resolution", "16", "--max-steps", "1", "--num-workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("ipadapter: error: the base model qa/kolors is not in the local Hugging Face cache and "
                             "the Hub cannot be reached")


@pytest.mark.parametrize("missing", [None, "text_encoder/config.json"])
def test_a_kolors_hub_base_dry_run_reads_chatglms_config_from_the_cache(kolors_folder, tmp_path, monkeypatch,
                                                                        missing) -> None:
    """From the local Hugging Face cache, no request: the estimate is the folder's; a ChatGLM config missing there
    is one line naming the base and its download."""
    from ipadapter.errors import IPAdapterError
    from ipadapter.train.config import TrainConfig
    from ipadapter.train.memory import estimate

    factories.write_hub_cache(tmp_path / "hub", "qa/kolors", kolors_folder / "kolors")
    if missing:
        next((tmp_path / "hub").glob(f"models--qa--kolors/snapshots/*/{missing}")).unlink()
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    config = TrainConfig(base="qa/kolors", image_encoder=str(kolors_folder / "clip"), resolution=16, variant="plus")
    if missing is None:
        found = estimate(config, batch_sizes=(1,))
        assert found == estimate(config.replace(base=str(kolors_folder / "kolors")), batch_sizes=(1,))
        assert [url for url in sent if "qa/kolors" in url] == []
        return
    with pytest.raises(IPAdapterError) as info:
        estimate(config, batch_sizes=(1,))
    assert str(info.value).startswith("the base model qa/kolors is not in the local Hugging Face cache and the Hub "
                                      "cannot be reached")


def test_a_kolors_dry_run_with_chatglms_config_broken_is_one_line(kolors_folder, tmp_path) -> None:
    import shutil

    from ipadapter.errors import IPAdapterError
    from ipadapter.train.config import TrainConfig
    from ipadapter.train.memory import estimate

    base = tmp_path / "kolors"
    shutil.copytree(kolors_folder / "kolors", base)
    (base / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(IPAdapterError) as info:
        estimate(TrainConfig(base=str(base), image_encoder=str(kolors_folder / "clip"), resolution=16,
                             variant="plus"), batch_sizes=(1,))
    assert str(info.value).startswith(f"cannot read {base}/text_encoder: ") and "config.json" in str(info.value)
