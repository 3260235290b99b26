"""`--vae`: a VAE instead of the base's own, as web UIs let one pick: a diffusers folder or Hub id, or one file.

The truth is the VAE as saved (its weights, read back by diffusers), and diffusers' own pipeline folder holding that
VAE: generating with `--vae` gives the pixels that folder gives.
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
from ipadapter.pipelines import load_pipeline
from tests import factories, ldm_format


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """`pipe/` (the tests' SD 1.5 pipeline), `vae/` (another VAE of the same shape, other weights), the same VAE
    as one file in the original names (`vae-original.safetensors`, no prefix, as fine-tuned VAEs are shared) and in
    diffusers' (`vae-diffusers.safetensors`), `swapped/` (the pipeline folder with `vae/` in place of its own), an
    adapter and a reference."""
    root = tmp_path_factory.mktemp("vae")
    folder = factories.save_tiny_sd15_pipeline(root)
    vae = factories.tiny_vae(seed=9)
    vae.save_pretrained(root / "vae")
    state = {key[len(ldm_format.VAE):]: value for key, value in ldm_format.vae_state(vae).items()}
    save_file({key: value.contiguous() for key, value in state.items()}, str(root / "vae-original.safetensors"))
    save_file({key: value.contiguous() for key, value in vae.state_dict().items()},
              str(root / "vae-diffusers.safetensors"))
    shutil.copytree(folder, root / "swapped")
    shutil.rmtree(root / "swapped" / "vae")
    shutil.copytree(root / "vae", root / "swapped" / "vae")
    factories.reference_image(seed=3, size=32).save(root / "ref.png")
    return root


def _same_weights(mine: torch.nn.Module, truth: torch.nn.Module) -> bool:
    a, b = mine.state_dict(), truth.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("source", ["vae", "vae-original.safetensors", "vae-diffusers.safetensors"])
def test_the_vae_is_the_one_given(root, source) -> None:
    """From its folder, or one file in either names: the VAE's weights, in the dtype asked for; the rest the base's."""
    from diffusers import AutoencoderKL

    pipe = load_pipeline(root / "pipe", vae=str(root / source), dtype=torch.bfloat16)
    truth = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.bfloat16)
    assert pipe.vae.dtype == torch.bfloat16 and _same_weights(pipe.vae, truth)
    assert _same_weights(pipe.unet, load_pipeline(root / "pipe", dtype=torch.bfloat16).unet)


def test_generate_with_vae_makes_the_images_of_the_folder_holding_it(root, tmp_path) -> None:
    def run(base: str, *extra: str) -> np.ndarray:
        out = tmp_path / f"{len(extra)}.png"
        assert main(["generate", "--base", base, "--adapter", str(root / "base.bin"), "--image", str(root / "ref.png"),
                     "--steps", "2", "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out))

    given = run(str(root / "pipe"), "--vae", str(root / "vae-original.safetensors"))
    assert np.array_equal(given, run(str(root / "swapped")))
    assert not np.array_equal(given, run(str(root / "pipe"), "--vae", str(root / "pipe" / "vae")))


def test_a_single_file_base_without_its_vae_loads_with_one(root, tmp_path, monkeypatch) -> None:
    """Some checkpoints are shared without their VAE: the file alone is refused naming the missing part, and with
    `--vae` it loads."""
    factories.write_hub_cache(tmp_path / "hub", "stable-diffusion-v1-5/stable-diffusion-v1-5", root / "pipe")
    factories.hub_without_network(monkeypatch, tmp_path / "hub")
    pipe = load_pipeline(root / "pipe")
    state = {k: v for k, v in {**ldm_format.unet_state(pipe.unet), **{
        ldm_format.TEXT + "text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()}}.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "no-vae.safetensors"))
    with pytest.raises(IPAdapterError, match="Failed to load AutoencoderKL"):
        load_pipeline(tmp_path / "no-vae.safetensors")
    loaded = load_pipeline(tmp_path / "no-vae.safetensors", vae=str(root / "vae"))
    assert _same_weights(loaded.vae, load_pipeline(root / "swapped").vae)


def test_a_vae_of_other_latents_is_refused(root, tmp_path) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(16, 16), latent_channels=16, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  ).save_pretrained(tmp_path / "flux-like")
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(root / "pipe", vae=str(tmp_path / "flux-like"))
    assert str(caught.value) == (f"the VAE {tmp_path / 'flux-like'} was made for another base model (16 latent "
                                 "channels; this base's VAE has 4)")


def test_a_vae_file_missing_weights_is_refused(root, tmp_path) -> None:
    """A file holding the encoder alone (the decoder is what a VAE swap is for)."""
    from safetensors.torch import load_file

    half = {k: v for k, v in load_file(root / "vae-diffusers.safetensors").items() if k.startswith("encoder.")}
    save_file(half, str(tmp_path / "encoder-only.safetensors"))
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(root / "pipe", vae=str(tmp_path / "encoder-only.safetensors"))
    assert str(caught.value) == (f"the VAE {tmp_path / 'encoder-only.safetensors'} lacks weights of the base's VAE; "
                                 "it was made for another base model")


def test_a_missing_vae_is_one_line_before_loading(root, tmp_path, capsys) -> None:
    assert main(["generate", "--base", str(root / "pipe"), "--adapter", str(root / "base.bin"), "--image",
                 str(root / "ref.png"), "--vae", str(tmp_path / "nothere.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == (f"ipadapter: error: --vae not found: {tmp_path / 'nothere.safetensors'} "
                                               "(no such file or folder; a Hub model id has the form owner/name)")


def test_a_vae_by_hub_id_and_subfolder_is_read_from_the_cache(root, tmp_path, monkeypatch) -> None:
    """`owner/repo/subfolder` (a pipeline's `vae/` on the Hub), from the cache alone."""
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/tiny-swapped", root / "swapped")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    pipe = load_pipeline(root / "pipe", vae="ipadapter-tests/tiny-swapped/vae")
    assert _same_weights(pipe.vae, load_pipeline(root / "swapped").vae)
    assert not [url for url in sent if "tiny-swapped" in url]


def test_generate_takes_a_vae_by_hub_id_and_subfolder(root, tmp_path, monkeypatch) -> None:
    """On the command line too: `--vae owner/repo/subfolder` passes the flags' check, and gives the swapped folder's
    pixels."""
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/tiny-swapped", root / "swapped")
    factories.hub_without_network(monkeypatch, tmp_path / "hub")
    images = []
    for extra in (["--base", str(root / "pipe"), "--vae", "ipadapter-tests/tiny-swapped/vae"],
                  ["--base", str(root / "swapped")]):
        out = tmp_path / f"{len(images)}.png"
        assert main(["generate", *extra, "--adapter", str(root / "base.bin"), "--image", str(root / "ref.png"),
                     "--steps", "2", "--out", str(out)]) == 0
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(*images)


def test_a_vae_file_for_a_base_by_hub_id_takes_its_layout_from_the_cache(root, tmp_path, monkeypatch) -> None:
    factories.write_hub_cache(tmp_path / "hub", "ipadapter-tests/tiny-pipe", root / "pipe")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    pipe = load_pipeline("ipadapter-tests/tiny-pipe", vae=str(root / "vae-original.safetensors"))
    assert _same_weights(pipe.vae, load_pipeline(root / "swapped").vae)
    assert not [url for url in sent if "tiny-pipe" in url]


def test_a_base_whose_vae_config_cannot_be_read_is_named(root, tmp_path, monkeypatch) -> None:
    """Before any weight: the base's VAE config, not cached and the Hub unreachable, in one line naming the base
    (the whole pipeline is loaded next)."""
    factories.hub_without_network(monkeypatch, tmp_path / "empty-hub")
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline("ipadapter-tests/not-cached", vae=str(root / "vae-original.safetensors"))
    assert str(caught.value) == (
        "the base model ipadapter-tests/not-cached is not in the local Hugging Face cache and the Hub cannot be "
        "reached; download it once with network access (hf download ipadapter-tests/not-cached) or give a local "
        "folder")


def test_a_missing_vae_is_named_by_the_library(root) -> None:
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(root / "pipe", vae="./nothere")
    assert str(caught.value) == ("VAE not found: ./nothere (no such file or folder; a Hub model id has the form "
                                 "owner/name)")


def test_an_uncached_vae_by_hub_id_names_the_download(root, tmp_path, monkeypatch) -> None:
    factories.hub_without_network(monkeypatch, tmp_path / "empty-hub")
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(root / "pipe", vae="ipadapter-tests/not-cached/vae")
    assert str(caught.value) == (
        "the VAE ipadapter-tests/not-cached/vae is not in the local Hugging Face cache and the Hub cannot be reached; "
        "download it once with network access (hf download ipadapter-tests/not-cached --include 'vae/*') or give a "
        "local folder")


def test_a_vae_that_diffusers_cannot_read_carries_its_reason(root, tmp_path) -> None:
    """A folder without a VAE in it, and a file of other widths: diffusers' own error, its first clause."""
    from diffusers import AutoencoderKL

    from ipadapter.errors import first_clause

    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError) as theirs:
        AutoencoderKL.from_pretrained(tmp_path / "empty")
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(root / "pipe", vae=str(tmp_path / "empty"))
    assert str(caught.value) == f"could not load a VAE from {tmp_path / 'empty'}: {first_clause(str(theirs.value))}"
    wide = AutoencoderKL(block_out_channels=(32, 32), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(Exception) as theirs:
        AutoencoderKL.from_single_file(str(tmp_path / "wide.safetensors"), config=str(root / "pipe"), subfolder="vae")
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(root / "pipe", vae=str(tmp_path / "wide.safetensors"))
    assert str(caught.value) == (f"could not load the VAE {tmp_path / 'wide.safetensors'}: "
                                 f"{first_clause(str(theirs.value))}")


def test_a_base_without_a_vae_config_is_named(root, tmp_path) -> None:
    shutil.copytree(root / "pipe", tmp_path / "no-vae")
    shutil.rmtree(tmp_path / "no-vae" / "vae")
    from diffusers import AutoencoderKL

    from ipadapter.errors import first_clause

    with pytest.raises(OSError) as theirs:
        AutoencoderKL.load_config(tmp_path / "no-vae", subfolder="vae")
    with pytest.raises(IPAdapterError) as caught:
        load_pipeline(tmp_path / "no-vae", vae=str(root / "vae"))
    assert str(caught.value) == f"cannot read {tmp_path / 'no-vae'}/vae: {first_clause(str(theirs.value))}"
