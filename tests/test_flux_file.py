"""A FLUX.1 transformer kept alone in one file, in Black Forest Labs' layout (ComfyUI's `models/unet/`, model sites'
FLUX fine-tunes) as `--base`: the transformer from the file, every other part from FLUX.1 [dev]'s repository in the
Hugging Face cache, whose own transformer weights are never read (the cache here holds none), and no request names
the repository (huggingface_hub's own telemetry, /api/agent-harnesses, names no model).

diffusers' conversion of these files is written for FLUX.1's own width, so the transformer here has it (24 heads of
128) with one block of each kind: 531M parameters, a 1 GB file. Every other part is tiny. The file is written from the
transformer by the inverse of diffusers' conversion (`dit_factories.flux_as_bfl`); the truth each test compares with
is that transformer object itself, in a pipeline built around it in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ipadapter.cli.main import main
from tests import dit_factories as df
from tests import factories

REPO = "black-forest-labs/FLUX.1-dev"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # runs build Accelerators


def _asked(sent: list[str]) -> list[str]:
    return [url for url in sent if "black-forest-labs" in url]


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-file")
    made = df.transformer_file(root, REPO, df.flux_pipeline(root / "parts"), df.flux_transformer_full_width(),
                               df.flux_as_bfl, "my-flux-finetune.safetensors")
    save_file(df.xlabs_state(width=3072, blocks=1), str(root / "ip_adapter.safetensors"))
    factories.write_image_encoder(root / "encoder")
    return made


def test_the_file_is_the_transformer_and_the_rest_is_the_repositorys_read_from_the_cache(flux_file,
                                                                                         monkeypatch) -> None:
    from diffusers import FluxPipeline

    from ipadapter.pipelines import load_pipeline

    sent = factories.hub_without_network(monkeypatch, flux_file.cache)
    pipe = load_pipeline(flux_file.path, dtype=torch.bfloat16)
    assert _asked(sent) == [] and isinstance(pipe, FluxPipeline)
    loaded, written = pipe.transformer.state_dict(), flux_file.transformer.state_dict()
    assert loaded.keys() == written.keys() and all(torch.equal(loaded[k], written[k]) for k in written)
    repo = FluxPipeline.from_pretrained(str(flux_file.repo), transformer=None)
    for part in ("vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(repo, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k].to(torch.bfloat16)) for k in theirs), part


def test_generate_from_the_file_makes_the_image_of_its_transformer(flux_file, monkeypatch, tmp_path) -> None:
    """`ipadapter generate --base file.safetensors` with an XLabs adapter: the image `ipadapter.load` makes on a
    pipeline holding the transformer the file was written from (float32, the command's own on the CPU)."""
    import ipadapter
    from diffusers import FluxPipeline

    root = flux_file.root
    sent = factories.hub_without_network(monkeypatch, flux_file.cache)
    out = tmp_path / "out.png"
    settings = ["--prompt", "a cat", "--steps", "2", "--width", "16", "--height", "16", "--seed", "3"]
    assert main(["generate", "--base", str(flux_file.path), "--adapter", str(root / "ip_adapter.safetensors"),
                 "--image-encoder", str(root / "encoder"), "--image", str(root / "ref.png"), "--out", str(out),
                 *settings]) == 0
    assert _asked(sent) == []
    pipe = FluxPipeline.from_pretrained(str(flux_file.repo), transformer=flux_file.transformer.float())
    pipe.set_progress_bar_config(disable=True)
    try:  # bf16 → fp32 → bf16 is exact: the module-wide transformer is as it was after
        with ipadapter.load(pipe, str(root / "ip_adapter.safetensors"),
                            image_encoder=str(root / "encoder")) as prompter:
            expected, plain = (prompter.generate(Image.open(root / "ref.png"), prompt="a cat", steps=2, width=16,
                                                 height=16, seed=3, scale=scale)[0] for scale in (1.0, 0.0))
    finally:
        flux_file.transformer.to(torch.bfloat16)
    got = np.asarray(Image.open(out).convert("RGB"), np.int16)
    assert np.abs(got - np.asarray(expected, np.int16)).max() <= 1
    assert np.abs(np.asarray(plain, np.int16) - np.asarray(expected, np.int16)).max() > 8  # the adapter acts


def test_a_flux_adapter_trains_on_the_file(flux_file, monkeypatch, tmp_path, capsys) -> None:
    """`ipadapter train --variant flux --base file.safetensors`: the file's transformer, the repository's text
    encoders and VAE, no request; the adapter written is for the file's 3,072-wide blocks. The dry run counts that
    transformer (its layout from the repository's config)."""
    import re

    from safetensors.torch import load_file

    sent = factories.hub_without_network(monkeypatch, flux_file.cache)
    data = factories.write_images(tmp_path / "data", 2)
    flags = ["train", "--variant", "flux", "--base", str(flux_file.path), "--image-encoder",
             str(flux_file.root / "encoder"), "--data", str(data), "--output", str(tmp_path / "run"),
             "--resolution", "16", "--max-steps", "1", "--batch-size", "1", "--num-workers", "0"]
    assert main([*flags, "--dry-run"]) == 0
    frozen = int(re.search(r"frozen in memory ([\d,]+)", capsys.readouterr().out)[1].replace(",", ""))
    assert frozen >= sum(p.numel() for p in flux_file.transformer.parameters())
    assert main(flags) == 0
    assert _asked(sent) == []
    written = load_file(str(tmp_path / "run" / "ip-adapter.safetensors"))
    assert written["double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"].shape[0] == 3072


def test_a_unet_variant_refuses_the_file_in_one_line(flux_file, monkeypatch, tmp_path, capsys) -> None:
    factories.hub_without_network(monkeypatch, flux_file.cache)
    data = factories.write_images(tmp_path / "data", 2)
    assert main(["train", "--base", str(flux_file.path), "--image-encoder", str(flux_file.root / "encoder"),
                 "--data", str(data), "--output", str(tmp_path / "run"), "--resolution", "16"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ipadapter: error: {flux_file.path} is a transformer of FLUX.1 [dev], which UNet variants do "
                   "not train: give --variant flux or flux-v2"]


def _cache_holding(flux_file, folder, patterns) -> Path:
    """A Hugging Face cache holding the repository's files that match `patterns` (fnmatch: `*` crosses folders)."""
    import fnmatch
    import shutil

    kept = folder / "kept"
    kept.mkdir(parents=True)
    for path in flux_file.repo.rglob("*"):
        relative = path.relative_to(flux_file.repo).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
            (kept / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, kept / relative)
    factories.write_hub_cache(folder / "hub", REPO, kept)
    return folder / "hub"


@pytest.mark.parametrize("cached", ["nothing", "configs"])
def test_a_repository_not_in_the_cache_is_one_line_with_the_download_that_suffices(flux_file, monkeypatch, tmp_path,
                                                                                   capsys, cached) -> None:
    """Offline with nothing of FLUX.1 [dev] cached, or its configs alone: one line naming one `hf download` for every
    file the file's pipeline reads; a cache holding exactly what that command fetches then generates."""
    patterns = ["*.json", "*.txt", "*.model", "scheduler/*", "vae/*", "text_encoder/*", "tokenizer/*",
                "text_encoder_2/*", "tokenizer_2/*"]
    cache = _cache_holding(flux_file, tmp_path / "partial", patterns[:3] if cached == "configs" else ["none"])
    factories.hub_without_network(monkeypatch, cache)
    root = flux_file.root
    argv = ["generate", "--base", str(flux_file.path), "--adapter", str(root / "ip_adapter.safetensors"),
            "--image-encoder", str(root / "encoder"), "--image", str(root / "ref.png"), "--steps", "1", "--width",
            "16", "--height", "16"]
    assert main([*argv, "--out", str(tmp_path / "no.png")]) != 0
    what = "layout" if cached == "nothing" else "text encoders and VAE"
    command = f"hf download {REPO} --include " + " ".join(f"'{p}'" for p in patterns)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ipadapter: error: the FLUX.1 [dev] {what} {REPO} is not in the local Hugging Face cache and the Hub cannot "
        f"be reached; download it once with network access ({command}) or give --base the model as a diffusers "
        "pipeline folder"]
    if cached == "configs":
        factories.hub_without_network(monkeypatch, _cache_holding(flux_file, tmp_path / "all", patterns))
        assert main([*argv, "--out", str(tmp_path / "yes.png")]) == 0



def test_a_file_holding_every_part_needs_the_repositorys_configs_alone(flux_file, monkeypatch, tmp_path) -> None:
    """ComfyUI's FLUX checkpoints (`flux1-dev-fp8.safetensors`): the transformer under `model.diffusion_model.`, the
    VAE under `first_stage_model.`, CLIP-L and T5 under `text_encoders.clip_l|t5xxl.transformer.`. With the
    repository's configs alone cached, every part is the file's, in eval mode (diffusers' loader leaves T5 training,
    dropout on), and nothing is requested."""
    from diffusers import FluxPipeline

    from ipadapter.pipelines import load_pipeline
    from tests import ldm_format

    repo = FluxPipeline.from_pretrained(str(flux_file.repo), transformer=None)  # its parts written into the file
    state = {"model.diffusion_model." + key: value for key, value in df.flux_as_bfl(flux_file.transformer).items()}
    state |= ldm_format.vae_state(repo.vae)
    state |= {"text_encoders.clip_l.transformer." + ldm_format._text_model(key): value
              for key, value in repo.text_encoder.state_dict().items()}
    state |= {"text_encoders.t5xxl.transformer." + key: value
              for key, value in repo.text_encoder_2.state_dict().items()}
    path = tmp_path / "flux1-dev-all-in-one.safetensors"
    save_file({key: value.clone().contiguous() for key, value in state.items()}, str(path))
    sent = factories.hub_without_network(monkeypatch, _cache_holding(flux_file, tmp_path / "configs",
                                                                     ["*.json", "*.txt", "*.model"]))
    pipe = load_pipeline(path, dtype=torch.bfloat16)
    assert _asked(sent) == []
    for part, truth in (("transformer", flux_file.transformer), ("vae", repo.vae), ("text_encoder", repo.text_encoder),
                        ("text_encoder_2", repo.text_encoder_2)):
        ours, theirs = getattr(pipe, part).state_dict(), truth.state_dict()
        assert all(torch.equal(ours[k], theirs[k].to(torch.bfloat16)) for k in theirs), part
        assert not getattr(pipe, part).training, part
