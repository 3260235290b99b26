"""Image encoders kept as one `.safetensors` file, and ComfyUI's folders (`models/ipadapter`, `models/clip_vision`).

The oracle is transformers itself: the same weights saved by `save_pretrained` with the published tower's config
(h94/IP-Adapter's `image_encoder/config.json`: 16 heads, GELU), read from that folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ipadapter
from ipadapter import IPAdapterError
from ipadapter.cli.main import main
from ipadapter.clip_file import PATCH_EMBEDDING as PATCH
from ipadapter.encoders import ImageEncoder
from ipadapter.errors import first_clause
from tests import factories

# Published towers at toy depth and size: ViT-H/14's width (1280, projection 1024) and ViT-bigG/14's (1664, 1280),
# 28 px images of 14 px patches (5 tokens); the MLP width is read from the shapes, so a small one serves.
TOWERS = {"vit-h": dict(hidden_size=1280, projection_dim=1024, num_hidden_layers=2),
          "vit-bigg": dict(hidden_size=1664, projection_dim=1280, num_hidden_layers=1)}


def _tower(folder: Path, name: str, size: int = 28, **changes) -> Path:
    """A CLIP vision tower saved by transformers into `folder` (the oracle); returns its one weights file."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(len(name))
    config = CLIPVisionConfig(**{**TOWERS[name], **changes}, num_attention_heads=16, hidden_act="gelu",
                              intermediate_size=64, image_size=size, patch_size=14)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    # CLIP's preprocessing, saved beside the weights as it is published (transformers' CLIP mean/std defaults)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder / "model.safetensors"


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("name, size", [("vit-h", 28), ("vit-bigg", 42)])  # 2 × 2 and 3 × 3 patches
def test_one_file_gives_the_features_of_its_folder(tmp_path, name: str, size: int) -> None:
    weights = _tower(tmp_path / "folder", name, size)
    single = tmp_path / "clip_vision" / f"CLIP-{name}.safetensors"
    single.parent.mkdir()
    state = load_file(weights)
    state["vision_model.embeddings.position_ids"] = torch.arange((size // 14) ** 2 + 1)[None]  # older saves kept it
    save_file(state, single)
    folder, file = ImageEncoder.from_pretrained(tmp_path / "folder"), ImageEncoder.from_pretrained(single)
    assert file.name == str(single)
    for features in ("global", "patch"):  # equal but for summation order (the weights' memory differs)
        torch.testing.assert_close(file.encode([_image()], features), folder.encode([_image()], features),
                                   rtol=0, atol=1e-5)
    assert ImageEncoder.load_processor(single).crop_size == {"height": size, "width": size}
    assert ImageEncoder.from_pretrained(single, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_file_it_cannot_read_is_one_sentence(tmp_path) -> None:
    weights = _tower(tmp_path / "l14", "vit-h", hidden_size=1024, projection_dim=768)  # OpenAI ViT-L/14's widths
    with pytest.raises(IPAdapterError) as caught:
        ImageEncoder.from_pretrained(weights)
    assert str(caught.value) == (f"{weights} is a 1024-wide CLIP vision tower; one file is read only for ViT-H (1280) "
                                 "and ViT-bigG (1664): give the encoder's folder with its config.json")
    (tmp_path / "a.bin").write_bytes(b"not a safetensors file")
    with pytest.raises(IPAdapterError) as caught:
        ImageEncoder.from_pretrained(tmp_path / "a.bin")
    with pytest.raises(Exception) as library:  # safetensors' own reason, named in the sentence
        safe_open(str(tmp_path / "a.bin"), "pt")
    assert str(caught.value) == (f"{tmp_path / 'a.bin'} is not a .safetensors file ({first_clause(str(library.value))}"
                                 "); give the image encoder's folder (with its config.json) or its .safetensors file")
    state = load_file(_tower(tmp_path / "whole", "vit-h"))
    for cut in ("visual_projection.weight", "vision_model.embeddings.patch_embedding.weight"):  # e.g. no projection
        save_file({k: v for k, v in state.items() if k != cut}, tmp_path / "part.safetensors")
        with pytest.raises(IPAdapterError) as caught:
            ImageEncoder.from_pretrained(tmp_path / "part.safetensors")
        assert str(caught.value) == (
            f"{tmp_path / 'part.safetensors'} is not a CLIP vision encoder in transformers' layout (no "
            "vision_model.embeddings.patch_embedding.weight or visual_projection.weight); give the image encoder's "
            "folder with its config.json")
    odd = {**state, "vision_model.embeddings.position_embedding.weight": torch.zeros(6, 1280)}
    save_file(odd, tmp_path / "odd.safetensors")
    with pytest.raises(IPAdapterError) as caught:
        ImageEncoder.from_pretrained(tmp_path / "odd.safetensors")
    assert str(caught.value) == f"{tmp_path / 'odd.safetensors'} has no square grid of patch positions: not a CLIP " \
                                "vision tower"
    del state["vision_model.post_layernorm.weight"]
    save_file(state, tmp_path / "cut.safetensors")
    with pytest.raises(IPAdapterError, match=r"cut\.safetensors is not a whole CLIP vision encoder: 1 of its weights"):
        ImageEncoder.from_pretrained(tmp_path / "cut.safetensors")


def _comfy(root: Path) -> tuple[Path, Path, Path]:
    """ComfyUI's models folder: a Plus adapter on ViT-H patches in ipadapter/, both published towers in clip_vision/
    under the names ComfyUI's IPAdapter nodes ask for; returns (pipeline folder, adapter, ViT-H file)."""
    pipe = factories.tiny_sd15_pipeline(root)
    pipe.save_pretrained(root / "pipe")  # no image_encoder/ of its own
    models = root / "ComfyUI" / "models"
    (models / "ipadapter").mkdir(parents=True)
    (models / "clip_vision").mkdir()
    adapter = _adapter(pipe, models / "ipadapter" / "ip-adapter-plus_sd15.safetensors", "plus", patch_dim=1280)
    vit_h = models / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    shutil.copy(_tower(root / "vit-h", "vit-h"), vit_h)
    shutil.copy(_tower(root / "vit-bigg", "vit-bigg"), models / "clip_vision" / "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors")
    return root / "pipe", adapter, vit_h


def test_comfyui_folders_give_the_encoder_the_adapter_reads(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe_dir, adapter, vit_h = _comfy(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    settings = dict(scale=0.7, seed=0, steps=2, height=32, width=32, output_type="np")
    with ipadapter.load(pipe, str(adapter)) as prompter:
        assert prompter.encoder.name == str(vit_h)
        got = prompter.generate(_image(), **settings)
    oracle = ImageEncoder.from_pretrained(tmp_path / "vit-h")  # the folder transformers saved: its config, its weights
    with ipadapter.load(pipe, str(adapter), image_encoder=oracle) as prompter:
        want = prompter.generate(_image(), **settings)
    np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=0, atol=1e-4)


def _adapter(pipe, path: Path, family: str, **widths) -> Path:
    state = factories.published(pipe.unet, family, factories.SD15_CROSS)
    state["image_proj"] = factories.image_proj_state(family, factories.SD15_CROSS, **widths)
    save_file({f"{g}.{k}": v.contiguous() for g, t in state.items() for k, v in t.items()}, path)
    return path


@pytest.mark.parametrize("adapters, expected", [
    # what each adapter reads (docs/checkpoints.md): ViT-H 1024 global / 1280 patch, bigG 1280 global
    ({"ip-adapter_sd15.safetensors": ("base", {"embed_dim": 1024})}, "vit-h"),
    ({"ip-adapter_sdxl.safetensors": ("base", {"embed_dim": 1280})}, "bigg"),
    ({"ip-adapter_sd15.safetensors": ("base", {"embed_dim": 1024}),
      "ip-adapter-plus_sd15.safetensors": ("plus", {"patch_dim": 1280})}, "vit-h"),
    ({"ip-adapter_sdxl.safetensors": ("base", {"embed_dim": 1280}),
      "ip-adapter-plus_sd15.safetensors": ("plus", {"patch_dim": 1280})}, None),  # no one file gives both
])
def test_comfyui_clip_vision_files_are_matched_by_width(tmp_path, monkeypatch, adapters, expected) -> None:
    pipe_dir, adapter, vit_h = _comfy(tmp_path)
    files = {"vit-h": vit_h, "bigg": vit_h.parent / "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"}
    # another kind of file, named to come first: passed over
    save_file({PATCH: torch.zeros(1280, 3, 14, 14)}, vit_h.parent / "A-clip_g-text.safetensors")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    paths = [_adapter(pipe, adapter.parent / name, family, **widths) for name, (family, widths) in adapters.items()]
    factories.ask_encoder(monkeypatch)
    given = [dict(adapter=[str(p) for p in paths]),  # as files, as the folder and names, as a subfolder
             dict(adapter=[str(adapter.parent)] * len(paths), weight_name=[p.name for p in paths]),
             dict(adapter=[str(adapter.parent.parent)] * len(paths), subfolder="ipadapter",
                  weight_name=[p.name for p in paths])]
    for kwargs in given:
        with pytest.raises(factories.EncoderAsked if expected else IPAdapterError) as caught:
            ipadapter.load(pipe, kwargs.pop("adapter"), **kwargs)
        if expected:
            assert caught.value.args == (str(files[expected]), None)


def test_comfyui_falls_back_to_the_published_encoder_when_none_fits(tmp_path, monkeypatch) -> None:
    pipe_dir, adapter, vit_h = _comfy(tmp_path)
    vit_h.unlink()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    factories.ask_encoder(monkeypatch)
    with pytest.raises(factories.EncoderAsked) as asked:
        ipadapter.load(pipe, str(adapter))
    assert asked.value.args == ("h94/IP-Adapter", "models/image_encoder")


def test_comfyui_folders_on_the_command_line(tmp_path, capsys) -> None:
    pipe_dir, adapter, vit_h = _comfy(tmp_path)
    _image().save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    argv = ["generate", "--base", str(pipe_dir), "--adapter", str(adapter), "--image", str(tmp_path / "ref.png"),
            "--steps", "2", "--width", "32", "--height", "32", "--out", str(out)]
    assert main(argv) == 0 and Image.open(out).size == (32, 32)
    capsys.readouterr()
    out.unlink()
    bigg = vit_h.parent / "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"
    assert main([*argv, "--image-encoder", str(bigg)]) == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (
        f"ipadapter: error: adapter '0' expects 1280-d (ViT-H/14) patch image features but the image encoder {bigg} "
        "gives 1664-d (ViT-bigG/14); the published encoder of that width is --image-encoder "
        "h94/IP-Adapter/models/image_encoder")


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_reads_an_encoder_kept_as_one_file(tmp_path) -> None:
    from transformers import CLIPVisionModelWithProjection

    from ipadapter.train.config import TrainConfig
    from ipadapter.train.memory import estimate

    base, data = factories.write_base(tmp_path / "base"), factories.write_images(tmp_path / "data", 2)
    single = tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    shutil.copy(_tower(tmp_path / "vit-h", "vit-h"), single)
    found = estimate(TrainConfig(base=str(base), image_encoder=str(single), resolution=16), batch_sizes=(1,))
    without = estimate(TrainConfig(base=str(base), variant="faceid", resolution=16), batch_sizes=(1,))
    tower = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "vit-h")
    assert found.frozen_params - without.frozen_params == sum(p.numel() for p in tower.parameters())
    out = tmp_path / "out"
    assert main(["train", "--base", str(base), "--image-encoder", str(single), "--data", str(data), "--resolution",
                 "16", "--max-steps", "1", "--num-workers", "0", "--output", str(out)]) == 0
    weights = load_file(out / "ip-adapter.safetensors")
    assert weights["image_proj.proj.weight"].shape[1] == 1024, "the head reads the tower's 1024-wide embedding"
