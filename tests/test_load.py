"""`ipadapter.load`, the one-call API: the README's example as written, diffusers' images, exact restoration."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ipadapter
from ipadapter import IPAdapterError
from ipadapter.encoders import ImageEncoder
from tests import factories

ROOT = Path(__file__).resolve().parents[1]
GEN = dict(num_inference_steps=3, guidance_scale=6.0, height=32, width=32)


def _readme_python() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"From Python:\n\n```python\n(.*?)```", readme, re.S).group(1)


def _cache_repo(cache: Path, repo: str) -> Path:
    """A snapshot folder laid out as huggingface_hub caches `repo`, so its id resolves offline."""
    entry = cache / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_readme_python_example_runs_as_written(tmp_path) -> None:
    """The example's Hub ids resolve from a local cache holding a tiny SD 1.5 pipeline and a tiny base adapter."""
    cache = tmp_path / "hub"
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    pipe.save_pretrained(_cache_repo(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5"))
    models = _cache_repo(cache, "h94/IP-Adapter") / "models"
    models.mkdir()
    torch.save(factories.published(pipe.unet, "base", factories.SD15_CROSS), models / "ip-adapter_sd15.bin")
    encoder, processor = factories.tiny_image_encoder()
    encoder.save_pretrained(models / "image_encoder")
    processor.save_pretrained(models / "image_encoder")
    work = tmp_path / "work"
    work.mkdir()
    factories.reference_image().save(work / "ref.jpg")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _readme_python()], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "out.png").stat().st_size > 0


def _adapter_file(pipe, folder: Path, family: str = "base", seed: int = 1) -> Path:
    torch.save(factories.published(pipe.unet, family, factories.SD15_CROSS, seed=seed), folder / f"{family}.bin")
    return folder / f"{family}.bin"


def test_load_generates_diffusers_images_and_the_context_restores_the_pipeline(tmp_path) -> None:
    encoder, processor = factories.tiny_image_encoder()
    reference = factories.reference_image()
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    weight = _adapter_file(pipe, tmp_path)
    oracle = factories.tiny_sd15_pipeline(tmp_path)
    oracle.load_ip_adapter(str(tmp_path), subfolder="", weight_name=weight.name, image_encoder_folder=None)
    oracle.image_encoder, oracle.feature_extractor = encoder, processor
    oracle.set_ip_adapter_scale(0.7)
    expected = oracle(prompt="a red", ip_adapter_image=reference, generator=torch.Generator().manual_seed(0),
                      output_type="np", **GEN).images

    before = dict(pipe.unet.attn_processors)
    plain = pipe(prompt="a red", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    with ipadapter.load(pipe, str(tmp_path), weight_name=weight.name,
                        image_encoder=ImageEncoder(encoder, processor)) as prompter:
        got = prompter.generate(reference, prompt="a red", scale=0.7, seed=0, steps=3, guidance=6.0, height=32,
                                width=32, output_type="np")
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-4)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    again = pipe(prompt="a red", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    np.testing.assert_array_equal(again, plain)


def test_load_finds_the_encoder_in_the_pipeline_folder_and_names_several_adapters(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = factories.save_tiny_sd15_pipeline(tmp_path, adapters=("base", "plus"))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    with ipadapter.load(pipe, [tmp_path / "base.bin", tmp_path / "plus.bin"], adapter_name=["look", "shape"],
                        cache_kv=False) as p:
        assert set(p.adapters) == {"look", "shape"} and p.encoder is not None
        assert p.attachment.runtime.cache_kv is False
        with pytest.raises(IPAdapterError, match="several adapters"):
            p.generate(factories.reference_image(), steps=1, height=32, width=32)
        images = p.generate({"look": factories.reference_image(0), "shape": [factories.reference_image(1)]},
                            steps=1, height=32, width=32)
        assert len(images) == 1


def test_load_errors_name_parameters(tmp_path) -> None:
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    weight = _adapter_file(pipe, tmp_path)
    with pytest.raises(IPAdapterError, match=r"give weight_name= once, or once per adapter \(2\)"):
        ipadapter.load(pipe, [weight, weight], weight_name=["a", "b", "c"])
    with pytest.raises(IPAdapterError, match="give image_encoder="):
        ipadapter.load(pipe, weight)
    assert not any("IPAttn" in type(p).__name__ for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("source, subfolder, weight_name, expected", [
    # h94's table: the SD 1.5 and "_vit-h" SDXL adapters and FaceID-Plus take ViT-H, the other SDXL ones ViT-bigG
    ("h94/IP-Adapter", "models", "ip-adapter_sd15.bin", ("h94/IP-Adapter", "models/image_encoder")),
    ("h94/IP-Adapter", "models", "ip-adapter-plus-face_sd15.safetensors", ("h94/IP-Adapter", "models/image_encoder")),
    ("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors", ("h94/IP-Adapter", "sdxl_models/image_encoder")),
    ("h94/IP-Adapter", "sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors",
     ("h94/IP-Adapter", "models/image_encoder")),
    ("h94/IP-Adapter-FaceID", None, "ip-adapter-faceid-plusv2_sdxl.bin", ("h94/IP-Adapter", "models/image_encoder")),
    # the newer families, as their model cards name them
    ("XLabs-AI/flux-ip-adapter", None, "ip_adapter.safetensors", ("openai/clip-vit-large-patch14", None)),
    ("XLabs-AI/flux-ip-adapter-v2", None, "ip_adapter.safetensors", ("openai/clip-vit-large-patch14", None)),
    ("InstantX/SD3.5-Large-IP-Adapter", None, "ip-adapter.bin", ("google/siglip-so400m-patch14-384", None)),
    ("Kwai-Kolors/Kolors-IP-Adapter-Plus", None, "ip_adapter_plus_general.bin",
     ("Kwai-Kolors/Kolors-IP-Adapter-Plus", "image_encoder")),
    ("someone/own-adapter", None, "adapter.bin", None),
])
def test_the_default_encoder_of_each_published_adapter(source, subfolder, weight_name, expected) -> None:
    from ipadapter.sources import AdapterSource, default_image_encoder

    assert default_image_encoder(None, AdapterSource(source, subfolder, weight_name)) == expected


def test_a_local_encoder_beside_the_base_or_the_adapter_comes_first(tmp_path) -> None:
    from ipadapter.sources import AdapterSource, default_image_encoder

    for folder in (tmp_path / "base" / "image_encoder", tmp_path / "adapters" / "image_encoder"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (tmp_path / "adapters" / "sdxl").mkdir()
    adapter = AdapterSource(str(tmp_path / "adapters" / "sdxl" / "a.bin"))
    assert default_image_encoder(str(tmp_path / "base"), adapter) == (str(tmp_path / "base"), "image_encoder")
    assert default_image_encoder(None, adapter) == (str(tmp_path / "adapters" / "image_encoder"), None)


def test_the_bundled_adapters_load_by_their_command_line_keywords() -> None:
    """README: diffusers' own `from_pretrained` of the bundled pipeline, then `ipadapter.load(pipe, "miniature-plus")`,
    the shipped Plus file as `--adapter miniature-plus` is; every part loads in fp32 (transformers follows a config's
    `dtype`: the fp16 files' configs made the encoders fp16 beside an fp32 UNet); a name inside a bundled adapter
    (one file) is refused, not ignored."""
    from diffusers import StableDiffusionPipeline

    from ipadapter.bundled import ASSETS_DIR, pipeline_path
    from ipadapter.checkpoint import load_adapter

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder)
    assert {p.dtype for part in parts for p in part.parameters()} == {torch.float32}
    for keyword, asset in (("miniature", "base"), ("miniature-plus", "plus")):
        with ipadapter.load(pipe, keyword) as prompter:
            loaded = prompter.adapter().state_dict()
            shipped = load_adapter(ASSETS_DIR / "adapters" / f"{asset}.safetensors", pipe.unet).state_dict()
            assert loaded.keys() == shipped.keys() and all(torch.equal(loaded[k], shipped[k]) for k in loaded)
            assert prompter.adapter().variant.name == asset
            assert prompter.generate(factories.reference_image(0), steps=1)[0].size == (64, 64)
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(pipe, "miniature", weight_name="plus.safetensors")
    assert str(caught.value) == "miniature is a bundled adapter, one file: give no subfolder= or weight_name="


def test_a_pipeline_shipped_in_half_precision_loads_in_fp32(tmp_path) -> None:
    """The miniature's export stores fp16 weights (`save_pipeline(half=True)`) whose configs still load as fp32:
    diffusers' `from_pretrained` then returns one precision, not fp16 encoders beside an fp32 UNet."""
    from diffusers import StableDiffusionPipeline

    from safetensors import safe_open

    from ipadapter.miniature.base_model import save_pipeline

    folder = save_pipeline(factories.tiny_sd15_pipeline(tmp_path), tmp_path / "shipped", half=True)
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert {p.dtype for part in (pipe.unet, pipe.vae, pipe.text_encoder) for p in part.parameters()} == {torch.float32}
