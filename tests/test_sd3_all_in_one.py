"""An SD 3.5 file that holds its text encoders and VAE beside the transformer (ComfyUI's `models/checkpoints/`
files, Stability's `sd3_medium_incl_clips_t5xxlfp16`) as `--base`: every part the file holds comes from it, so the
family repository's configs and tokenizers are all that must be cached; a part it does not hold, or holds as scaled
fp8, comes from the repository. The truth is diffusers reading the whole file (`StableDiffusion3Pipeline.
from_single_file`) and the objects the file was written from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ipadapter.cli.main import main
from ipadapter.pipelines import load_pipeline
from tests import dit_factories as df
from tests import factories

REPO = "stabilityai/stable-diffusion-3.5-large"
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # runs build Accelerators


@pytest.fixture(scope="module")
def aio(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-aio")
    made = df.sd35_all_in_one(root, REPO)
    made.configs = df.configs_only_hub(made.repo, REPO, root / "configs")
    return made


def _equal(model, truth) -> bool:
    mine, theirs = model.state_dict(), truth.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def _without(aio, tmp_path: Path, prefixes: tuple[str, ...]) -> Path:
    path = tmp_path / "sd3.5_large_incl_clips.safetensors"
    save_file({k: v for k, v in load_file(str(aio.path)).items() if not k.startswith(prefixes)}, str(path))
    return path


def test_a_file_holding_every_part_needs_the_repositorys_configs_alone(aio, monkeypatch, tmp_path) -> None:
    """With only the repository's configs and tokenizers cached and no network: the pipeline diffusers reads from
    the whole file, the parts as written (CLIP-L's projection is the identity, diffusers' rule for these files, which
    keep none), every part in eval mode; `generate` makes that pipeline's image; a run trains on the file; nothing is
    requested."""
    from diffusers import StableDiffusion3Pipeline

    from ipadapter.single_file import parts_source

    sent = factories.hub_without_network(monkeypatch, aio.configs)
    pipe = load_pipeline(aio.path)
    truth = StableDiffusion3Pipeline.from_single_file(str(aio.path), config=str(aio.repo))
    truth.text_encoder_3.eval()  # diffusers leaves it in training mode: dropout, another embedding at each call
    assert not any(getattr(pipe, part).training for part in PARTS)
    assert all(_equal(getattr(pipe, part), getattr(truth, part)) for part in PARTS)
    assert all(_equal(getattr(pipe, part), getattr(aio.pipe, part))
               for part in ("transformer", "vae", "text_encoder_2", "text_encoder_3"))
    assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(32))
    assert parts_source(str(aio.path)) == str(aio.path)  # a feature cache is keyed by the file's encoders

    root = aio.root
    df.assert_generate_matches(root, ["--base", str(aio.path)], truth, tmp_path / "out.png")

    data = factories.write_images(tmp_path / "data", 2)  # a run that builds a feature cache, then one from it alone
    run = ["train", "--variant", "sd3", "--base", str(aio.path), "--image-encoder", str(root / "siglip"),
           "--resolution", "16", "--max-steps", "1", "--batch-size", "1", "--num-workers", "0", "--cache",
           str(tmp_path / "cache"), "--validate-every", "1", "--validation-image", str(root / "ref.png"),
           "--validation-steps", "1"]
    assert main([*run, "--data", str(data), "--output", str(tmp_path / "built")]) == 0
    factories.reset_accelerate()
    assert main([*run, "--output", str(tmp_path / "cached")]) == 0
    for out in ("built", "cached"):
        assert (tmp_path / out / "ip-adapter.safetensors").is_file()
        assert (tmp_path / out / "validation" / "step-00000001.png").is_file()
    assert [url for url in sent if "stabilityai" in url] == []  # huggingface_hub's telemetry names no model


@pytest.mark.parametrize("lacks", [("text_encoder_3",), ("text_encoder_2", "text_encoder_3")])
def test_a_part_the_file_lacks_comes_from_the_repository(aio, monkeypatch, tmp_path, capsys, lacks) -> None:
    """A file without T5 (Stability's `sd3_medium_incl_clips`), or without CLIP-G too: those from the repository in
    the cache, the rest from the file; with the configs alone cached, one line naming the download of those parts and
    the configs, and nothing else."""
    prefixes = {"text_encoder_2": "text_encoders.clip_g.", "text_encoder_3": "text_encoders.t5xxl."}
    path = _without(aio, tmp_path, tuple(prefixes[part] for part in lacks))
    factories.hub_without_network(monkeypatch, aio.root / "hub")
    pipe = load_pipeline(path)
    assert all(_equal(getattr(pipe, part), getattr(aio.pipe, part)) for part in lacks)
    half = load_pipeline(path, dtype=torch.bfloat16)  # the repository's parts in the precision asked for too
    assert {p.dtype for part in PARTS for p in getattr(half, part).parameters()} == {torch.bfloat16}
    assert all(_equal(getattr(pipe, part), getattr(aio.pipe, part)) for part in ("transformer", "vae"))

    factories.hub_without_network(monkeypatch, aio.configs)
    root = aio.root
    assert main(["generate", "--base", str(path), "--adapter", str(root / "ip-adapter.bin"), "--image-encoder",
                 str(root / "siglip"), "--image", str(root / "ref.png"), "--out", str(tmp_path / "out.png")]) != 0
    patterns = ["*.json", "*.txt", "*.model", "scheduler/*", "tokenizer/*", *(["text_encoder_2/*"] if len(lacks) > 1
                else []), "tokenizer_2/*", "text_encoder_3/*", "tokenizer_3/*"]
    command = f"hf download {REPO} --include " + " ".join(f"'{p}'" for p in patterns)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ipadapter: error: the SD 3.5 Large {' and '.join(lacks)} {REPO} is not in the local Hugging Face cache and "
        f"the Hub cannot be reached; download it once with network access ({command}) or give --base the model as a "
        "diffusers pipeline folder"]


def test_a_part_whose_weights_do_not_fit_is_one_line(aio, monkeypatch, tmp_path, capsys) -> None:
    """A file whose VAE lacks its decoder's last convolution (diffusers leaves it on the meta device and fails to
    copy it): one line naming the file and the pipeline it was read as, with nothing written."""
    path = tmp_path / "no-vae-out.safetensors"
    cut = "first_stage_model.decoder.conv_out"
    save_file({k: v for k, v in load_file(str(aio.path)).items() if not k.startswith(cut)}, str(path))
    factories.hub_without_network(monkeypatch, aio.configs)
    root, out = aio.root, tmp_path / "out.png"
    assert main(["generate", "--base", str(path), "--adapter", str(root / "ip-adapter.bin"), "--image-encoder",
                 str(root / "siglip"), "--image", str(root / "ref.png"), "--out", str(out), "--steps", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"ipadapter: error: could not load {path} as a StableDiffusion3Pipeline: a part it "
                                "holds lacks some of its weights; it was cut short or made for another model"]
    assert not out.exists()


def test_parts_stored_as_scaled_fp8_are_dequantized_or_read_from_the_repository(aio, monkeypatch, tmp_path) -> None:
    """ComfyUI's `sd3.5_large_fp8_scaled`: the transformer and T5 stored as scaled fp8, the CLIPs and VAE as they
    are. The transformer is its weights times their scales (diffusers reading a plain file of those); T5, which
    diffusers would read without its scales, is the repository's; the CLIPs and VAE are the file's."""
    from diffusers import SD3Transformer2DModel

    denoiser = "model.diffusion_model."
    stored, meant = df.scaled_fp8_state(load_file(str(aio.path)), chosen=lambda key: key.startswith(
        (denoiser, "text_encoders.t5xxl.")), marker=denoiser + "scaled_fp8")
    scaled = tmp_path / "sd3.5_large_fp8_scaled.safetensors"
    save_file(stored, str(scaled))
    save_file({k.removeprefix(denoiser): v for k, v in meant.items() if k.startswith(denoiser)},
              str(tmp_path / "plain.safetensors"))
    factories.hub_without_network(monkeypatch, aio.root / "hub")
    pipe = load_pipeline(scaled)
    assert _equal(pipe.transformer, SD3Transformer2DModel.from_single_file(
        str(tmp_path / "plain.safetensors"), config=str(aio.repo), subfolder="transformer"))
    assert all(_equal(getattr(pipe, part), getattr(aio.pipe, part)) for part in ("vae", "text_encoder_2",
                                                                                   "text_encoder_3"))
