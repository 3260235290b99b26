"""`ipadapter.load`, the one-call API: the README's example as written, diffusers' images, exact restoration."""

from __future__ import annotations

import json
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
    # ViT-H's 1024-wide embedding, as the published file reads (the width names the encoder, models/image_encoder)
    state = factories.published(pipe.unet, "base", factories.SD15_CROSS)
    state["image_proj"] = factories.image_proj_state("base", factories.SD15_CROSS, embed_dim=1024)
    torch.save(state, models / "ip-adapter_sd15.bin")
    encoder, processor = factories.tiny_image_encoder(projection_dim=1024)
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
    analyzer = object()  # stands for a FaceAnalyzer (insightface), which `load` only passes on
    with ipadapter.load(pipe.to(torch.float64), tmp_path / "base.bin", face_analyzer=analyzer) as p:
        assert p.encoder.dtype == torch.float64, "the encoder in the denoiser's dtype"
        assert p.face_analyzer is analyzer
        assert p.attachment.runtime.cache_kv is False, "K'/V' made at every call by default, as diffusers"
    pipe.to(torch.float32)
    with ipadapter.load(pipe, [tmp_path / "base.bin", tmp_path / "plus.bin"], adapter_name=["look", "shape"],
                        cache_kv=True) as p:
        assert set(p.adapters) == {"look", "shape"} and p.encoder is not None
        assert p.encoder.dtype == torch.float32
        assert p.attachment.runtime.cache_kv is True
        with pytest.raises(IPAdapterError, match="several adapters"):
            p.generate(factories.reference_image(), steps=1, height=32, width=32)
        images = p.generate({"look": factories.reference_image(0), "shape": [factories.reference_image(1)]},
                            steps=1, height=32, width=32)
        assert len(images) == 1


def test_load_errors_name_parameters(tmp_path) -> None:
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    weight = _adapter_file(pipe, tmp_path)
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(pipe, [])
    assert str(caught.value) == "give at least one adapter"
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(pipe, [weight, weight], adapter_name=["a", "b", "c"])
    assert str(caught.value) == "give adapter_name= once, or once per adapter (2), not 3 times"
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(pipe, [weight, weight], subfolder=["a", "b", "c"])
    assert str(caught.value) == "give subfolder= once, or once per adapter (2), not 3 times"
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(pipe, [weight, weight], adapter_name="a")
    assert str(caught.value) == "adapter names must differ, got a, a"
    with pytest.raises(IPAdapterError, match=r"give weight_name= once, or once per adapter \(2\)"):
        ipadapter.load(pipe, [weight, weight], weight_name=["a", "b", "c"])
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(pipe, weight)
    assert str(caught.value) == ("cannot tell which image encoder the adapters need (24-wide global features, which "
                                 "no published encoder alone gives); give image_encoder=")
    assert not any("IPAttn" in type(p).__name__ for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("source, subfolder, weight_name, expected", [
    # the newer families, as their model cards name them
    ("XLabs-AI/flux-ip-adapter", None, "ip_adapter.safetensors", ("openai/clip-vit-large-patch14", None)),
    ("XLabs-AI/flux-ip-adapter-v2", None, "ip_adapter.safetensors", ("openai/clip-vit-large-patch14", None)),
    ("InstantX/SD3.5-Large-IP-Adapter", None, "ip-adapter.bin", ("google/siglip-so400m-patch14-384", None)),
    ("Kwai-Kolors/Kolors-IP-Adapter-Plus", None, "ip_adapter_plus_general.bin",
     ("Kwai-Kolors/Kolors-IP-Adapter-Plus", "image_encoder")),
    # h94's are told by the width they read (test_each_h94_adapter_gets_the_encoder_it_was_trained_with)
    ("h94/IP-Adapter", "models", "ip-adapter_sd15.bin", None),
    ("someone/own-adapter", None, "adapter.bin", None),
])
def test_the_default_encoder_of_each_published_adapter(source, subfolder, weight_name, expected) -> None:
    from ipadapter.sources import AdapterSource, default_image_encoder

    assert default_image_encoder(None, AdapterSource(source, subfolder, weight_name)) == expected


VIT_H, VIT_BIGG = ("h94/IP-Adapter", "models/image_encoder"), ("h94/IP-Adapter", "sdxl_models/image_encoder")


@pytest.mark.parametrize("family, widths, expected", [
    # the widths h94's files read (docs/checkpoints.md): ip-adapter_sd15 ViT-H's 1024-wide embedding, ip-adapter_sdxl
    # and _sd15_vit-G bigG's 1280-wide one, the Plus and FaceID-Plus adapters ViT-H's 1280-wide patches; bigG's patches
    # are 1664 wide; XLabs' FLUX adapters read OpenAI ViT-L/14's 768-wide embedding
    ("base", {"embed_dim": 1024}, VIT_H),
    ("base", {"embed_dim": 1280}, VIT_BIGG),
    ("base", {"embed_dim": 768}, ("openai/clip-vit-large-patch14", None)),
    ("plus", {"patch_dim": 1280}, VIT_H),
    ("plus", {"patch_dim": 1664}, VIT_BIGG),
    ("faceid-plus", {"patch_dim": 1280}, VIT_H),
])
def test_an_adapter_of_unknown_origin_gets_the_encoder_its_width_names(tmp_path, monkeypatch, family, widths,
                                                                        expected) -> None:
    """A renamed or community file, no encoder beside it: the width its head reads names the published encoder."""
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    weight = tmp_path / "adapters" / "my-adapter.bin"
    weight.parent.mkdir()
    state = factories.published(pipe.unet, family, factories.SD15_CROSS)
    state["image_proj"] = factories.image_proj_state(family, factories.SD15_CROSS, **widths)
    torch.save(state, weight)
    factories.ask_encoder(monkeypatch)
    with pytest.raises(factories.EncoderAsked) as asked:
        ipadapter.load(pipe, weight)
    assert asked.value.args == expected


def test_adapters_needing_different_encoders_are_not_guessed(tmp_path, monkeypatch) -> None:
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    files = []
    for family, widths in (("base", {"embed_dim": 1024}), ("plus", {"patch_dim": 1664})):
        state = factories.published(pipe.unet, family, factories.SD15_CROSS)
        state["image_proj"] = factories.image_proj_state(family, factories.SD15_CROSS, **widths)
        torch.save(state, tmp_path / f"{family}.bin")
        files.append(tmp_path / f"{family}.bin")
    factories.ask_encoder(monkeypatch)
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(pipe, files)
    assert str(caught.value) == ("cannot tell which image encoder the adapters need (1024-wide global and 1664-wide "
                                 "patch features, which no published encoder alone gives); give image_encoder=")
    with pytest.raises(factories.EncoderAsked) as asked:  # one named: no guess
        ipadapter.load(pipe, files, image_encoder="me/encoder/sub")
    assert asked.value.args == ("me/encoder", "sub")


@pytest.mark.parametrize("subfolder, weight_name, family, widths, expected", [
    # h94's files and the widths their heads read (docs/checkpoints.md): the SD 1.5 adapters, the SDXL "_vit-h" ones
    # and FaceID-Plus on ViT-H, the other SDXL adapters and ip-adapter_sd15_vit-G on bigG
    ("models", "ip-adapter_sd15.safetensors", "base", {"embed_dim": 1024}, VIT_H),
    ("models", "ip-adapter_sd15_vit-G.safetensors", "base", {"embed_dim": 1280}, VIT_BIGG),
    ("models", "ip-adapter-plus-face_sd15.safetensors", "plus", {"patch_dim": 1280}, VIT_H),
    ("sdxl_models", "ip-adapter_sdxl.safetensors", "base", {"embed_dim": 1280}, VIT_BIGG),
    ("sdxl_models", "ip-adapter_sdxl_vit-h.safetensors", "base", {"embed_dim": 1024}, VIT_H),
    ("sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors", "plus", {"patch_dim": 1280}, VIT_H),
    (None, "ip-adapter-faceid-plusv2_sd15.bin", "faceid-plusv2", {"patch_dim": 1280}, VIT_H),
])
def test_each_h94_adapter_gets_the_encoder_it_was_trained_with(tmp_path, monkeypatch, subfolder, weight_name, family,
                                                               widths, expected) -> None:
    """As downloaded from the Hub (its cache, no network), the encoder asked for is the one h94 published for it."""
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    folder = tmp_path / "repo" / (subfolder or "")
    folder.mkdir(parents=True)
    state = factories.published(pipe.unet, family, factories.SD15_CROSS, lora_rank=4 if "faceid" in family else 0)
    state["image_proj"] = factories.image_proj_state(family, factories.SD15_CROSS, **widths)
    torch.save(state, folder / weight_name)
    repo = "h94/IP-Adapter-FaceID" if "faceid" in family else "h94/IP-Adapter"
    factories.write_hub_cache(tmp_path / "hub", repo, tmp_path / "repo")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    factories.ask_encoder(monkeypatch)
    with pytest.raises(factories.EncoderAsked) as asked:
        ipadapter.load(pipe, repo, subfolder=subfolder, weight_name=weight_name)
    assert asked.value.args == expected and not [url for url in sent if "h94" in url], "read from the cache alone"


def _encoder_config(folder: Path, hidden: int, projection: int) -> Path:
    """An encoder folder's config.json alone: where the encoder is chosen, only its widths are read."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": hidden,
                                                    "projection_dim": projection}))
    return folder


@pytest.mark.parametrize("subfolder, weight_name, family, widths, encoder", [
    # h94/IP-Adapter copied to disk: ViT-H in models/, bigG in sdxl_models/, whatever folder the adapter is in
    ("sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors", "plus", {"patch_dim": 1280}, "models"),
    ("sdxl_models", "ip-adapter_sdxl_vit-h.safetensors", "base", {"embed_dim": 1024}, "models"),
    ("sdxl_models", "ip-adapter_sdxl.safetensors", "base", {"embed_dim": 1280}, "sdxl_models"),
    ("models", "ip-adapter_sd15.safetensors", "base", {"embed_dim": 1024}, "models"),
    ("models", "ip-adapter_sd15_vit-G.safetensors", "base", {"embed_dim": 1280}, "sdxl_models"),
])
def test_a_local_copy_of_h94_gives_each_adapter_the_encoder_it_reads(tmp_path, monkeypatch, subfolder, weight_name,
                                                                    family, widths, encoder) -> None:
    pipe = factories.tiny_sd15_pipeline(tmp_path)
    repo = tmp_path / "IP-Adapter"
    _encoder_config(repo / "models" / "image_encoder", 1280, 1024)  # ViT-H/14 (docs/checkpoints.md)
    _encoder_config(repo / "sdxl_models" / "image_encoder", 1664, 1280)  # ViT-bigG/14
    state = factories.published(pipe.unet, family, factories.SD15_CROSS)
    state["image_proj"] = factories.image_proj_state(family, factories.SD15_CROSS, **widths)
    torch.save(state, repo / subfolder / weight_name)
    factories.ask_encoder(monkeypatch)
    for given in (dict(adapter=repo / subfolder / weight_name), dict(adapter=repo, subfolder=subfolder,
                                                                       weight_name=weight_name)):
        with pytest.raises(factories.EncoderAsked) as asked:
            ipadapter.load(pipe, given.pop("adapter"), **given)
        assert asked.value.args == (str(repo / encoder / "image_encoder"), None)


@pytest.mark.parametrize("config, fits", [
    ({"model_type": "clip_vision_model", "hidden_size": 1664, "projection_dim": 1280}, False),  # bigG's tower
    # a whole CLIP model's config: the tower nested, its projection width at the top level (the tower's own may hold
    # transformers' default)
    ({"model_type": "clip", "projection_dim": 1280, "vision_config": {"hidden_size": 1664, "projection_dim": 1024}},
     False),
    ({"model_type": "clip", "projection_dim": 1024, "vision_config": {"hidden_size": 1280}}, True),  # ViT-H's
    ({"model_type": "clip_vision_model", "hidden_size": 1664}, True),  # no projection width: cannot tell, so kept
    ("{not json", True),  # unreadable: kept, and its loader says what is wrong with it
])
def test_a_base_folders_own_encoder_is_taken_only_when_it_fits(tmp_path, monkeypatch, config, fits) -> None:
    """An SDXL pipeline folder keeping bigG, with a "_vit-h" adapter: ViT-H from h94, not a size mismatch."""
    from diffusers import StableDiffusionPipeline

    pipe = factories.tiny_sd15_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "image_encoder").mkdir()
    (tmp_path / "base" / "image_encoder" / "config.json").write_text(
        config if isinstance(config, str) else json.dumps(config))
    state = factories.published(pipe.unet, "base", factories.SD15_CROSS)
    state["image_proj"] = factories.image_proj_state("base", factories.SD15_CROSS, embed_dim=1024)
    torch.save(state, tmp_path / "sdxl_vit-h.bin")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"))
    factories.ask_encoder(monkeypatch)
    with pytest.raises(factories.EncoderAsked) as asked:
        ipadapter.load(pipe, tmp_path / "sdxl_vit-h.bin")
    assert asked.value.args == ((str(tmp_path / "base"), "image_encoder") if fits else VIT_H)


def test_a_local_encoder_beside_the_base_or_the_adapter_comes_first(tmp_path) -> None:
    from ipadapter.sources import AdapterSource, default_image_encoder

    for folder in (tmp_path / "base" / "image_encoder", tmp_path / "adapters" / "image_encoder"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (tmp_path / "adapters" / "sdxl").mkdir()
    adapter = AdapterSource(str(tmp_path / "adapters" / "sdxl" / "a.bin"))
    assert default_image_encoder(str(tmp_path / "base"), adapter) == (str(tmp_path / "base"), "image_encoder")
    assert default_image_encoder(None, adapter) == (str(tmp_path / "adapters" / "image_encoder"), None)
    # h94's layout, downloaded: the encoder in the adapter's own folder, given as the folder or as the file in it
    (tmp_path / "adapters" / "sdxl" / "image_encoder").mkdir()
    (tmp_path / "adapters" / "sdxl" / "image_encoder" / "config.json").write_text("{}")
    own = (str(tmp_path / "adapters" / "sdxl" / "image_encoder"), None)
    assert default_image_encoder(None, adapter) == own
    (tmp_path / "adapters" / "a" / "image_encoder").mkdir(parents=True)  # a sibling's, sorted first: after its own
    (tmp_path / "adapters" / "a" / "image_encoder" / "config.json").write_text("{}")
    assert default_image_encoder(None, adapter) == own
    assert default_image_encoder(None, AdapterSource(str(tmp_path / "adapters" / "sdxl"), weight_name="a.bin")) == own


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


def test_transformer_bases_have_the_size_step_and_default_size_of_diffusers_own_pipelines(tmp_path) -> None:
    """`base_geometry` reads configs only (the command line checks --width/--height before loading anything); for
    FLUX and SD 3 it must agree with the pipelines diffusers builds from the same folders: their default size, and
    the step their `check_inputs` asks sizes to be multiples of (FLUX: twice the VAE's scale, for its 2 × 2 latent
    packing; SD 3: the VAE's scale times the patch size)."""
    from diffusers import AutoencoderKL, FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline

    from ipadapter.loading import base_geometry
    from tests import dit_factories as df

    flux_folder, sd3_folder = df.save_flux_base(tmp_path / "flux"), df.save_sd3_base(tmp_path / "sd3")
    patched = {**SD3Transformer2DModel.load_config(sd3_folder / "transformer"), "patch_size": 2}  # as SD 3.5's
    SD3Transformer2DModel.from_config(patched).save_pretrained(sd3_folder / "transformer")
    four = {**AutoencoderKL.load_config(sd3_folder / "vae"), "block_out_channels": [8] * 4,  # SD's 8x downscale
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    AutoencoderKL.from_config(four).save_pretrained(sd3_folder / "vae")
    flux = FluxPipeline.from_pretrained(str(flux_folder))
    sd3 = StableDiffusion3Pipeline.from_pretrained(str(sd3_folder))
    assert sd3.patch_size > 1 and sd3.vae_scale_factor == 8 and sd3.default_sample_size != 128, "shows nothing else"
    flux_size = flux.default_sample_size * flux.vae_scale_factor
    assert base_geometry(str(flux_folder)) == (2 * flux.vae_scale_factor, (flux_size, flux_size))
    sd3_size = sd3.default_sample_size * sd3.vae_scale_factor
    assert base_geometry(str(sd3_folder)) == (sd3.vae_scale_factor * sd3.patch_size, (sd3_size, sd3_size))


def test_a_transformer_config_without_size_or_patch_gets_the_defaults_diffusers_gives_it(tmp_path) -> None:
    """SD 3 configs saved by hand may leave out `sample_size` and `patch_size`; the model class then fills in its
    own defaults, and the pipeline reads those."""
    import json

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from ipadapter.loading import base_geometry
    from tests import dit_factories as df

    folder = df.save_sd3_base(tmp_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    assert pipe.patch_size == 1 and pipe.default_sample_size != 128, "the defaults differ from the config's"
    assert base_geometry(str(folder)) == (pipe.vae_scale_factor * pipe.patch_size, (size, size))
    stripped = {k: v for k, v in SD3Transformer2DModel.load_config(folder / "transformer").items()
                if k not in ("sample_size", "patch_size")}
    SD3Transformer2DModel.from_config(stripped).save_pretrained(folder / "transformer")
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k not in ("sample_size", "patch_size")}))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    assert base_geometry(str(folder)) == (pipe.vae_scale_factor * pipe.patch_size, (size, size))


def test_a_unet_sample_size_of_height_and_width_gives_the_size_diffusers_generates(tmp_path) -> None:
    """A UNet's `sample_size` may be [height, width]; the default size is the one diffusers' pipeline makes."""
    import json

    from diffusers import StableDiffusionPipeline

    from ipadapter.loading import base_geometry

    folder = factories.save_tiny_sd15_pipeline(tmp_path)
    config_file = folder / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "sample_size": [12, 8]}))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=1).images[0]
    assert image.size[0] != image.size[1], "shows nothing else"
    assert base_geometry(str(folder))[1] == image.size


def test_an_unreadable_base_is_one_sentence_with_the_libraries_first_clause(tmp_path) -> None:
    from diffusers import AutoencoderKL

    from ipadapter.errors import first_clause
    from ipadapter.loading import base_geometry

    folder = tmp_path / "base"
    (folder / "vae").mkdir(parents=True)
    with pytest.raises(OSError) as theirs:
        AutoencoderKL.load_config(str(folder), subfolder="vae", local_files_only=True)
    with pytest.raises(IPAdapterError) as caught:
        base_geometry(str(folder))
    assert str(caught.value) == f"cannot read {folder}/vae: {first_clause(str(theirs.value))}"
    assert str(theirs.value).strip(), "shows nothing else"


@pytest.mark.parametrize("device, dtype", [("cuda", torch.float16), ("cuda:1", torch.float16), ("cpu", torch.float32),
                                           ("mps", torch.float32), ("meta", torch.float32)])
def test_the_default_dtype_is_half_precision_on_cuda_only(device, dtype) -> None:
    """As `load_prompter`'s docstring and the command line's `--dtype` help state it."""
    from ipadapter.loading import default_dtype

    assert default_dtype(device) == dtype


def test_every_part_goes_to_the_device_named() -> None:
    """`load_prompter(device=...)`: the pipeline, the image encoder and the adapters on that device. The meta device
    stands for a GPU here: nothing is computed, only placed."""
    from ipadapter.loading import load_prompter

    prompter = load_prompter(device="meta").prompter
    parts = [prompter.pipe.unet, prompter.pipe.vae, prompter.pipe.text_encoder, prompter.encoder.model,
             *prompter.adapters.values()]
    assert {p.device.type for part in parts for p in part.parameters()} == {"meta"}


def test_the_adapters_a_command_line_names_and_its_mistakes(tmp_path) -> None:
    """`adapter_sources`, what `--adapter`/`--subfolder`/`--weight-name` become: the bundled adapter when neither
    adapters nor a base are named, none for a base alone (`load_prompter` then asks for one), and a count of names
    that fits neither one nor one per adapter is a sentence naming the flag's parameter."""
    import diffusers

    from ipadapter.loading import adapter_sources, load_prompter
    from ipadapter.sources import AdapterSource, miniature_adapter

    assert adapter_sources([], base=None) == [miniature_adapter()]
    assert adapter_sources([], base=str(tmp_path)) == []
    with pytest.raises(IPAdapterError) as caught:
        load_prompter(base=str(tmp_path))
    assert str(caught.value) == "give adapters= (a file, folder or Hub repo id) to use an image prompt with base="
    with pytest.raises(IPAdapterError) as caught:
        load_prompter(dtype="float8")
    assert str(caught.value) == "unknown dtype 'float8'; valid: float32, float16, bfloat16"
    loaded = load_prompter(dtype="bfloat16", scheduler="EulerDiscreteScheduler")  # the bundled model, as named
    assert {p.dtype for p in loaded.prompter.pipe.unet.parameters()} == {torch.bfloat16}
    assert type(loaded.prompter.pipe.scheduler) is diffusers.EulerDiscreteScheduler, "its own is DDIM"
    assert loaded.prompter.attachment.runtime.cache_kv is False, "K'/V' made at every call by default, as diffusers"
    loaded.prompter.detach()
    kept = load_prompter(cache_kv=True)
    assert kept.prompter.attachment.runtime.cache_kv is True
    kept.prompter.detach()
    assert adapter_sources(["a", "b"], base=None, subfolders=["s"], weight_names=["w1", "w2"]) == [
        AdapterSource("a", "s", "w1"), AdapterSource("b", "s", "w2")]
    for given, sentence in ((dict(weight_names=["1", "2", "3"]), "give weight_name= once, or once per adapter (2), "
                             "not 3 times"), (dict(subfolders=["1", "2", "3"]), "give subfolder= once, or once per "
                             "adapter (2), not 3 times")):
        with pytest.raises(IPAdapterError) as caught:
            adapter_sources(["a", "b"], base=None, **given)
        assert str(caught.value) == sentence


def test_a_missing_bundled_adapter_names_the_command_that_rebuilds_it(tmp_path, monkeypatch) -> None:
    """A checkout without the shipped files (a partial clone, a deleted asset): one sentence naming the file and the
    `ipadapter miniature train` target that makes it, one the command line takes."""
    from ipadapter import bundled
    from ipadapter.cli.main import main
    from ipadapter.sources import miniature_adapter

    monkeypatch.setattr(bundled, "ASSETS_DIR", tmp_path)
    for name in ("base", "plus", "simple"):
        with pytest.raises(IPAdapterError) as caught:
            miniature_adapter(name)
        target = re.search(r"`ipadapter miniature train (\S+)`", str(caught.value)).group(1)
        assert str(caught.value) == (
            f"the miniature {name} adapter is missing ({tmp_path / 'adapters' / f'{name}.safetensors'}); rebuild it "
            f"with the recipe in docs/miniature.md (`ipadapter miniature train {target}` then `ipadapter miniature "
            "export`)")
        assert target == ("adapter" if name == "base" else f"adapter-{name}")
        with pytest.raises(SystemExit) as usage:
            main(["miniature", "train", target, "--help"])
        assert usage.value.code == 0, f"{target} is a target of `ipadapter miniature train`"


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
