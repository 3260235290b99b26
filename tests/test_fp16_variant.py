"""Repositories that hold only fp16 weight files (`diffusion_pytorch_model.fp16.safetensors`), as
Kwai-Kolors/Kolors-diffusers does: diffusers and transformers read those only when told `variant="fp16"`, so a user
who names the repository got "no file named diffusion_pytorch_model.bin". ipadapter falls back to them by itself.
"""

from __future__ import annotations

import pytest
from PIL import Image

from ipadapter.cli.main import main
from ipadapter.sources import FP16, plain_or_fp16
from tests import factories
from tests.test_kolors_cli import write_kolors

REPO = "Kwai-Kolors/Kolors-diffusers"


def _loader(has: set[str], calls: list[dict]):
    def load(variant: dict) -> str:
        calls.append(variant)
        name = variant.get("variant", "plain")
        if name not in has:
            raise OSError(f"no file named {name}")
        return name
    return load


@pytest.mark.parametrize("has, expected", [({"plain", "fp16"}, ["plain"]), ({"fp16"}, ["fp16"])])
def test_the_plain_files_are_read_first_and_the_fp16_ones_when_they_are_all_there_is(has, expected) -> None:
    calls: list[dict] = []
    assert plain_or_fp16(_loader(has, calls)) == expected[0]
    assert calls == ([{}] if expected == ["plain"] else [{}, FP16])


def test_with_neither_the_first_error_is_the_one_raised() -> None:
    calls: list[dict] = []
    with pytest.raises(OSError, match="^no file named plain$"):
        plain_or_fp16(_loader(set(), calls))
    assert calls == [{}, FP16]


def test_generate_and_train_read_a_hub_base_cached_with_only_fp16_files(tmp_path, monkeypatch) -> None:
    """The Kolors folder saved as its Hub repository is (every weight file `*.fp16.*`; the tensors kept in fp32 so
    that the images compare bit for bit), in the local Hugging Face cache under that id: `generate` makes the plain
    folder's image and `train` runs, without a request naming the repository."""
    from diffusers import KolorsPipeline

    root = write_kolors(tmp_path / "kolors")
    KolorsPipeline.from_pretrained(str(root / "kolors")).save_pretrained(tmp_path / "fp16", variant="fp16")
    weights = [p for p in (tmp_path / "fp16").rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights and all(".fp16." in p.name for p in weights)
    factories.write_hub_cache(tmp_path / "hub", REPO, tmp_path / "fp16")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")

    def generate(base: str, out: str) -> Image.Image:
        assert main(["generate", "--base", base, "--adapter", str(root / "ip_adapter_plus_general.safetensors"),
                     "--image-encoder", str(root / "clip"), "--image", str(root / "ref.png"), "--prompt", "a cat",
                     "--steps", "2", "--width", "16", "--height", "16", "--seed", "1", "--device", "cpu",
                     "--out", str(tmp_path / out)]) == 0
        return Image.open(tmp_path / out)

    assert generate(REPO, "hub.png").tobytes() == generate(str(root / "kolors"), "plain.png").tobytes()
    assert main(["train", "--base", REPO, "--variant", "plus", "--image-encoder", str(root / "clip"),
                 "--data", str(factories.write_images(tmp_path / "data", 2)), "--output", str(tmp_path / "run"),
                 "--resolution", "16", "--max-steps", "1", "--batch-size", "2", "--num-workers", "0"]) == 0
    assert (tmp_path / "run" / "ip-adapter.safetensors").is_file()
    assert [url for url in sent if REPO in url] == []


def test_a_vae_and_a_controlnet_held_as_fp16_files_alone_load(tmp_path) -> None:
    """`--vae` and `--controlnet` folders whose weights are only `*.fp16.*` files: the weights written are the ones
    loaded."""
    import torch
    from diffusers import ControlNetModel

    from ipadapter.pipelines import add_controlnet, load_pipeline, load_vae

    folder = factories.save_tiny_sd15_pipeline(tmp_path)
    vae = factories.tiny_vae(seed=9)
    vae.save_pretrained(tmp_path / "vae", variant="fp16")
    pipe = load_pipeline(folder)
    controlnet = ControlNetModel.from_unet(pipe.unet)
    controlnet.save_pretrained(tmp_path / "cn", variant="fp16")
    for saved in (tmp_path / "vae", tmp_path / "cn"):
        assert [p.name for p in saved.glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    half = load_pipeline(folder, dtype=torch.bfloat16)  # the ControlNet takes the UNet's dtype
    for mine, truth in ((load_vae(tmp_path / "vae", base=str(folder), dtype=torch.bfloat16), vae),
                        (add_controlnet(half, tmp_path / "cn").controlnet, controlnet)):
        a, b = mine.state_dict(), truth.to(torch.bfloat16).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert {t.dtype for t in a.values() if t.is_floating_point()} == {torch.bfloat16}
