"""Base models in one file, in the original Stable Diffusion layout (web UIs, ComfyUI's `models/checkpoints/`).

The fixture is the tests' SD 1.5-layout pipeline written by `ldm_format` under the original names; the truth is
that pipeline itself: its weights, and the images `--base <its folder>` makes. The family's published configs
come from a Hugging Face cache the tests write, with the Hub unreachable and every request recorded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ipadapter import IPAdapterError
from ipadapter.cli.main import main
from ipadapter.loading import base_geometry
from ipadapter.pipelines import load_pipeline
from ipadapter.single_file import CONFIG_FILES, UNET_KEY, family
from tests import factories, ldm_format

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the published repositories diffusers' table names
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
REPOS = {"sd15": SD15_REPO, "sdxl": SDXL_REPO}


def _sdxl_folder(root: Path) -> Path:
    """The tests' SDXL-layout pipeline saved with an image encoder and a base adapter. Its text encoders differ in
    width, as SDXL's do (768, 1280), and the second has 10 layers: diffusers tells the two apart by width, and the
    family by the second's tenth layer."""
    pipe = factories.tiny_sdxl_pipeline(root)
    pipe.text_encoder = factories.tiny_text_encoder(24)
    pipe.text_encoder_2 = factories.tiny_text_encoder(40, 1, projection=32, layers=10)
    pipe.save_pretrained(root / "pipe")
    factories.write_image_encoder(root / "pipe" / "image_encoder")
    torch.save(factories.published(pipe.unet, "base", factories.SDXL_CROSS), root / "base.bin")
    return root / "pipe"


def _write(root: Path, kind: str) -> Path:
    """`pipe/` (the diffusers folder), `model.safetensors` (the same weights as one original-layout file), the
    family's configs without weights in `configs/`, an adapter `base.bin` and a reference image."""
    folder = factories.save_tiny_sd15_pipeline(root) if kind == "sd15" else _sdxl_folder(root)
    ldm_format.write_single_file(load_pipeline(folder), root / "model.safetensors")
    shutil.copytree(folder, root / "configs", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    factories.reference_image(seed=1, size=32).save(root / "ref.png")
    return root


@pytest.fixture(scope="module", params=list(REPOS))
def family_base(request, tmp_path_factory) -> tuple[str, Path]:
    """(SD 1.5 or SDXL, the folder `_write` filled)."""
    return request.param, _write(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """SD 1.5's `_write` folder, for what does not depend on the family."""
    return _write(tmp_path_factory.mktemp("sd15"), "sd15")


def _cache(kind: str, root: Path, tmp_path: Path, monkeypatch) -> list[str]:
    """The family's configs (no weights) in the Hugging Face cache, the Hub unreachable; the requests sent."""
    factories.write_hub_cache(tmp_path / "hub", REPOS[kind], root / "configs")
    return factories.hub_without_network(monkeypatch, tmp_path / "hub")


@pytest.fixture
def cached(family_base, tmp_path, monkeypatch) -> list[str]:
    return _cache(*family_base, tmp_path, monkeypatch)


@pytest.fixture
def sd15_cached(base, tmp_path, monkeypatch) -> list[str]:
    return _cache("sd15", base, tmp_path, monkeypatch)


def test_the_file_loads_as_the_pipeline_it_was_written_from(family_base, cached) -> None:
    """Every weight of the UNet, VAE and text encoder(s) as written, the family's pipeline class, no request sent:
    the configs come from the cache, the weights from the file (the cache holds none)."""
    kind, base = family_base
    pipe, original = load_pipeline(base / "model.safetensors"), load_pipeline(base / "pipe")
    assert type(pipe) is type(original)
    assert type(pipe).__name__ == {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[kind]
    for part in ("unet", "vae", "text_encoder", *(["text_encoder_2"] if kind == "sdxl" else [])):
        mine, truth = getattr(pipe, part).state_dict(), getattr(original, part).state_dict()
        assert mine.keys() == truth.keys()
        assert all(torch.equal(mine[key], truth[key]) for key in truth), part
    assert getattr(pipe, "safety_checker", None) is None
    assert cached == []


def test_generate_from_the_file_makes_the_folders_images(family_base, cached, tmp_path) -> None:
    """The command line end to end: `--base model.safetensors` gives the pixels `--base pipe/` gives, and the
    size check before loading reads the family's configs (its default size is the folder's)."""
    _, base = family_base

    def run(source: Path, out: Path) -> np.ndarray:
        assert main(["generate", "--base", str(source), "--adapter", str(base / "base.bin"), "--image-encoder",
                     str(base / "pipe" / "image_encoder"), "--image", str(base / "ref.png"), "--steps", "2",
                     "--out", str(out)]) == 0
        return np.asarray(Image.open(out))

    from_file = run(base / "model.safetensors", tmp_path / "file.png")
    assert np.array_equal(from_file, run(base / "pipe", tmp_path / "folder.png"))
    assert from_file.shape == (32, 32, 3)
    assert base_geometry(str(base / "model.safetensors")) == base_geometry(str(base / "pipe"))
    assert cached == []


def test_the_parts_load_in_the_dtype_asked_for(base, sd15_cached) -> None:
    """`--dtype bfloat16` with a file: every part in bfloat16, as the folder loads in it."""
    pipe, original = (load_pipeline(source, dtype=torch.bfloat16) for source in (base / "model.safetensors",
                                                                                  base / "pipe"))
    for part in ("unet", "vae", "text_encoder"):
        mine, truth = getattr(pipe, part), getattr(original, part)
        assert mine.dtype == truth.dtype == torch.bfloat16
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), truth.state_dict().values()))


def test_a_file_missing_a_part_is_refused_in_one_line_naming_it(base, sd15_cached, tmp_path) -> None:
    """An SD 1.5 file without its VAE (some are shared so): diffusers' reason, its first line, after the file."""
    from safetensors.torch import load_file

    path = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in load_file(base / "model.safetensors").items() if not k.startswith(ldm_format.VAE)},
              str(path))
    with pytest.raises(IPAdapterError) as err:
        load_pipeline(path)
    assert str(err.value) == (f"could not load {path} as a StableDiffusionPipeline: Failed to load AutoencoderKL. "
                              "Weights for this component appear to be missing in the checkpoint.")


@pytest.mark.parametrize("marks", [("scaled_fp8", "model.diffusion_model.out.2.scale_weight"),
                                   ("model.diffusion_model.out.2.weight_scale",)])
def test_a_whole_checkpoint_in_scaled_fp8_is_refused_in_one_line(base, sd15_cached, tmp_path, marks) -> None:
    """diffusers' whole-pipeline loader would read the fp8 values and leave their scales unread: refused, not
    loaded wrong."""
    from safetensors.torch import load_file

    path = tmp_path / "sd15_fp8_scaled.safetensors"
    save_file({**load_file(base / "model.safetensors"), **{mark: torch.ones(()) for mark in marks}}, str(path))
    with pytest.raises(IPAdapterError) as err:
        load_pipeline(path)
    assert str(err.value) == (f"{path} stores its weights as scaled fp8, which ipadapter reads for FLUX.1 and SD 3 / "
                              "3.5 transformer files only; use the checkpoint's fp16 or bf16 file")


def test_a_cache_entry_without_the_pipeline_index_is_fetched_again(base, tmp_path, monkeypatch) -> None:
    """A cached snapshot holding other files of the repository (a UNet config alone) is not the layout: the Hub is
    asked for the configs; a download still without `model_index.json` is refused, naming the repository."""
    partial = tmp_path / "partial"
    shutil.copytree(base / "configs" / "unet", partial / "unet")
    asked = []

    def download(repo, *, allow_patterns, local_files_only):
        asked.append(local_files_only)
        return str(partial)

    monkeypatch.setattr("huggingface_hub.snapshot_download", download)
    monkeypatch.setattr("ipadapter.sources.hub_answers", lambda *args, **kwargs: None)
    with pytest.raises(IPAdapterError) as err:
        load_pipeline(base / "model.safetensors")
    assert str(err.value) == f"could not fetch the configs of {SD15_REPO}: no model_index.json in {partial}"
    assert asked == [True, False]


def test_only_the_configs_are_downloaded(base, tmp_path, monkeypatch) -> None:
    """Not cached and online: one download, of the family's repository with patterns that keep its configs and
    tokenizer and leave out every weight file SD 1.5's repository publishes."""
    from huggingface_hub.utils import filter_repo_objects

    asked = []

    def download(repo, *, allow_patterns, local_files_only):
        asked.append((repo, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        published = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "unet/diffusion_pytorch_model.fp16.bin", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
                     "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                     "vae/diffusion_pytorch_model.safetensors", "safety_checker/pytorch_model.bin"]
        kept = list(filter_repo_objects(published, allow_patterns=allow_patterns))
        assert kept == ["model_index.json", "unet/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"]
        return str(base / "configs")

    monkeypatch.setattr("huggingface_hub.snapshot_download", download)
    monkeypatch.setattr("ipadapter.sources.hub_answers", lambda *args, **kwargs: None)
    assert type(load_pipeline(base / "model.safetensors")).__name__ == "StableDiffusionPipeline"
    assert asked == [(SD15_REPO, True), (SD15_REPO, False)]


@pytest.mark.parametrize(("offline", "says"), [
    (True, "offline mode is on"), (False, "the Hub cannot be reached")])
def test_configs_not_cached_and_not_reachable_name_the_download(base, tmp_path, monkeypatch, offline, says) -> None:
    sent = factories.hub_without_network(monkeypatch, tmp_path / "empty-hub")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline)
    with pytest.raises(IPAdapterError) as err:
        load_pipeline(base / "model.safetensors")
    message = str(err.value)
    assert message.startswith(f"the Stable Diffusion 1.x layout {SD15_REPO} is not in the local Hugging Face cache")
    assert says in message and "\n" not in message
    assert f"(hf download {SD15_REPO} --include {' '.join(repr(p) for p in CONFIG_FILES)})" in message
    assert message.endswith(") or give --base the model as a diffusers pipeline folder")
    assert all("/resolve/" not in url for url in sent)  # nothing was downloaded


def _header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path


def test_the_family_is_read_from_the_header(tmp_path) -> None:
    """SD 1.5's text width (768) and SDXL's second text encoder, by the names the original checkpoints use."""
    v1 = {UNET_KEY: (1, 4, 1, 1), "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
          (1, 768)}
    xl = {UNET_KEY: (1, 4, 1, 1), "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1,)}
    assert family(_header_only(tmp_path / "v1.safetensors", v1)) == ("v1", SD15_REPO)
    assert family(_header_only(tmp_path / "xl.safetensors", xl)) == ("xl_base", SDXL_REPO)


@pytest.mark.parametrize(("name", "write", "says"), [
    ("model.ckpt", lambda p: torch.save({"state_dict": {}}, p), "is a pickle (.ckpt); ipadapter does not open"),
    ("lora.safetensors", lambda p: _header_only(p, {"lora_unet_down.alpha": (1,)}), "holds no Stable Diffusion UNet"),
    ("inpaint.safetensors", lambda p: _header_only(p, {UNET_KEY: (1, 9, 1, 1)}), "is of the family 'inpainting'"),
    ("flux1-fill.safetensors", lambda p: _header_only(p, {"double_blocks.0.img_attn.norm.key_norm.scale": (1,),
                                                      "guidance_in.in_layer.bias": (1,), "img_in.weight": (1, 384)}),
     "is of the family 'flux-fill'"),
    ("notes.safetensors", lambda p: p.write_text("not weights"), "is not a .safetensors file"),
])
def test_a_file_that_is_not_a_whole_base_is_refused_in_one_line(base, tmp_path, capsys, name, write, says) -> None:
    """Before any weight or config is read, on the command line: the reason, then what to give instead."""
    write(tmp_path / name)
    assert main(["generate", "--base", str(tmp_path / name), "--adapter", str(base / "base.bin"), "--image",
                 str(base / "ref.png"), "--out", str(tmp_path / "out.png")]) != 0
    err = capsys.readouterr().err.strip()
    instead = (": use the model's .safetensors file" if name.endswith(".ckpt") else
               "; --base takes a whole Stable Diffusion 1.x, 2.x or SDXL checkpoint, or a FLUX.1 or SD 3 / 3.5 "
               "transformer, in one .safetensors file, or a diffusers pipeline folder or Hub id")
    assert err.startswith(f"ipadapter: error: {tmp_path / name} ")
    assert says in err and err.endswith(instead) and "\n" not in err
    assert not (tmp_path / "out.png").exists()


def _training_base(root: Path, kind: str) -> Path:
    """The training tests' tiny base (`factories.write_base`) saved whole by diffusers, as `from_pretrained` reads it
    and as a family's published repository lays it out, with its one-file form. SDXL's text encoders are given
    different widths (20 and 44, 64 together as the UNet reads them), as SDXL's are, and the second 10 layers."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    sdxl = kind == "sdxl"
    parts = factories.write_base(root / "parts", sdxl=sdxl)
    components = dict(unet=UNet2DConditionModel.from_pretrained(parts / "unet"),
                      vae=AutoencoderKL.from_pretrained(parts / "vae"),
                      tokenizer=CLIPTokenizer.from_pretrained(parts / "tokenizer"),
                      scheduler=DDPMScheduler.from_pretrained(parts / "scheduler"))
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            **components, text_encoder=factories.tiny_text_encoder(20, seed=1),
            text_encoder_2=factories.tiny_text_encoder(44, seed=5, projection=factories.CROSS, layers=10),
            tokenizer_2=CLIPTokenizer.from_pretrained(parts / "tokenizer_2"))
    else:
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel

        pipe = StableDiffusionPipeline(**components, text_encoder=CLIPTextModel.from_pretrained(parts / "text_encoder"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    ldm_format.write_single_file(pipe, root / "model.safetensors")
    shutil.copytree(root / "pipe", root / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    return root


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("kind", list(REPOS))
def test_training_on_the_file_ends_at_the_weights_training_on_the_folder_does(tmp_path, monkeypatch, capsys,
                                                                               kind) -> None:
    """`ipadapter train --base model.safetensors`: the memory estimate (from the family's configs) is the folder's,
    and the adapter trained on the file's weights equals the one trained on the diffusers folder, bit for bit."""
    from safetensors.torch import load_file

    root = _training_base(tmp_path / "base", kind)
    factories.write_hub_cache(tmp_path / "hub", REPOS[kind], root / "configs")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    data, encoder = factories.write_images(tmp_path / "data", 2), factories.write_image_encoder(tmp_path / "enc")
    adapters, estimates = [], []
    for name, source in (("folder", root / "pipe"), ("file", root / "model.safetensors")):
        factories.reset_accelerate()
        flags = ["--base", str(source), "--image-encoder", str(encoder), "--resolution", str(factories.RES)]
        assert main(["train", *flags, "--dry-run"]) == 0
        estimates.append(capsys.readouterr().out.replace(str(source), "BASE"))
        assert main(["train", *flags, "--data", str(data), "--max-steps", "2", "--batch-size", "2", "--num-workers",
                     "0", "--output", str(tmp_path / name)]) == 0
        adapters.append(load_file(tmp_path / name / "ip-adapter.safetensors"))
    assert estimates[0] == estimates[1] and "parameters" in estimates[0]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])
    assert sent == []
