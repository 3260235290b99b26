"""`--adapter h94:NAME`: h94's published adapters by what they do, the file chosen for the base's family.

The truth is h94's repositories as published (h94/IP-Adapter's `models/` and `sdxl_models/`, h94/IP-Adapter-FaceID's
top level), written below by hand from their file lists: each file is placed alone in a Hugging Face cache, the Hub
unreachable, so a name that pointed at any other file would fail to load. Each file holds the head of its variant
at the widths h94's encoders give (ViT-H: 1024 global, 1280 patch; bigG: 1280 global).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import ipadapter
from ipadapter import IPAdapterError
from ipadapter.cli.main import main
from tests import factories

VIT_H, VIT_BIGG = ("h94/IP-Adapter", "models/image_encoder"), ("h94/IP-Adapter", "sdxl_models/image_encoder")
# (name, base family) → (repository, path in it, variant the file holds, its head's widths, the encoder it reads)
H94_FILES = {
    ("base", "sd15"): ("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors", "base", {"embed_dim": 1024}, VIT_H),
    ("base", "sdxl"): ("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl_vit-h.safetensors", "base",
                       {"embed_dim": 1024}, VIT_H),
    ("base-vit-g", "sd15"): ("h94/IP-Adapter", "models/ip-adapter_sd15_vit-G.safetensors", "base",
                             {"embed_dim": 1280}, VIT_BIGG),
    ("base-vit-g", "sdxl"): ("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl.safetensors", "base",
                             {"embed_dim": 1280}, VIT_BIGG),
    ("light", "sd15"): ("h94/IP-Adapter", "models/ip-adapter_sd15_light_v11.bin", "base", {"embed_dim": 1024}, VIT_H),
    ("plus", "sd15"): ("h94/IP-Adapter", "models/ip-adapter-plus_sd15.safetensors", "plus", {"patch_dim": 1280},
                       VIT_H),
    ("plus", "sdxl"): ("h94/IP-Adapter", "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "plus",
                       {"patch_dim": 1280}, VIT_H),
    ("plus-face", "sd15"): ("h94/IP-Adapter", "models/ip-adapter-plus-face_sd15.safetensors", "plus",
                            {"patch_dim": 1280}, VIT_H),
    ("plus-face", "sdxl"): ("h94/IP-Adapter", "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors", "plus",
                            {"patch_dim": 1280}, VIT_H),
    ("full-face", "sd15"): ("h94/IP-Adapter", "models/ip-adapter-full-face_sd15.safetensors", "full",
                            {"patch_dim": 1280}, VIT_H),
    ("faceid", "sd15"): ("h94/IP-Adapter-FaceID", "ip-adapter-faceid_sd15.bin", "faceid", {}, None),
    ("faceid", "sdxl"): ("h94/IP-Adapter-FaceID", "ip-adapter-faceid_sdxl.bin", "faceid", {}, None),
    ("faceid-plus", "sd15"): ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-plus_sd15.bin", "faceid-plus",
                              {"patch_dim": 1280}, VIT_H),
    ("faceid-plusv2", "sd15"): ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sd15.bin", "faceid-plusv2",
                                {"patch_dim": 1280}, VIT_H),
    ("faceid-plusv2", "sdxl"): ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin", "faceid-plusv2",
                                {"patch_dim": 1280}, VIT_H),
    ("faceid-portrait", "sd15"): ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-portrait-v11_sd15.bin",
                                  "faceid-portrait", {}, None),
    ("faceid-portrait", "sdxl"): ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-portrait_sdxl.bin", "faceid-portrait",
                                  {}, None),
}
CROSS = {"sd15": factories.SD15_CROSS, "sdxl": factories.SDXL_CROSS}


def _pipe(family: str, tmp_path):
    return factories.tiny_sd15_pipeline(tmp_path) if family == "sd15" else factories.tiny_sdxl_pipeline(tmp_path)


def _publish(pipe, tmp_path, family: str, name: str, **widths: int) -> None:
    """h94's one file for (name, family) in the Hub cache at tmp_path/hub, as published: nested torch file for `.bin`,
    flat `image_proj.*` / `ip_adapter.*` for `.safetensors`; FaceID's LoRA inside (rank 4 here, 128 there). Its
    head reads the widths of h94's encoder unless `widths` names others."""
    repo, path, variant, published_widths, _ = H94_FILES[(name, family)]
    lora = 4 if variant in ("faceid", "faceid-plus", "faceid-plusv2") else 0
    state = factories.published(pipe.unet, variant, CROSS[family], lora_rank=lora)
    state["image_proj"] = factories.image_proj_state(variant, CROSS[family], **(widths or published_widths))
    file = tmp_path / "repo" / path
    file.parent.mkdir(parents=True)
    if file.suffix == ".safetensors":
        save_file({f"{part}.{key}": value.contiguous() for part, tensors in state.items()
                   for key, value in tensors.items()}, str(file))
    else:
        torch.save(state, file)
    factories.write_hub_cache(tmp_path / "hub", repo, tmp_path / "repo")


@pytest.mark.parametrize(("name", "family"), list(H94_FILES))
def test_each_name_loads_its_published_file_for_the_base(tmp_path, monkeypatch, name, family) -> None:
    """The file for the base's family, read from the cache alone; its variant as the name says; the encoder asked
    for is the one h94 published for it (none for the face-embedding-only FaceID files)."""
    pipe = _pipe(family, tmp_path)
    _publish(pipe, tmp_path, family, name)
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    *_, variant, _, encoder = H94_FILES[(name, family)]
    factories.ask_encoder(monkeypatch)
    if encoder is None:
        prompter = ipadapter.load(pipe, f"h94:{name}")
        assert prompter.adapters["0"].variant.name == variant
        prompter.detach()
    else:
        with pytest.raises(factories.EncoderAsked) as asked:
            ipadapter.load(pipe, f"h94:{name}")
        assert asked.value.args == encoder
    assert not [url for url in sent if "h94" in url], "read from the cache alone"


@pytest.mark.parametrize(("name", "family", "says"), [
    ("light", "sdxl", "h94:light is published for SD 1.5 only, and this base is SDXL"),
    ("full-face", "sdxl", "h94:full-face is published for SD 1.5 only, and this base is SDXL"),
    ("faceid-plus", "sdxl", "h94:faceid-plus is published for SD 1.5 only, and this base is SDXL"),
])
def test_a_name_without_a_file_for_the_base_is_refused(tmp_path, name, family, says) -> None:
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(_pipe(family, tmp_path), f"h94:{name}")
    assert str(caught.value) == says


def test_a_base_of_another_family_is_refused(tmp_path) -> None:
    """FLUX's transformer has no h94 file."""
    from tests import dit_factories

    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(dit_factories.flux_pipeline(tmp_path), "h94:plus")
    assert str(caught.value) == "h94:plus is published for SD 1.5 and SDXL only, and this base is neither"


def test_a_unet_reading_other_text_is_refused(tmp_path) -> None:
    """Kolors' UNet is SDXL's with a projection of ChatGLM's text (`encoder_hid_dim_type`): h94's SDXL files would
    load onto it by shape alone, and mean nothing there."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    sdxl = {key: value for key, value in factories.sdxl_unet().config.items() if not key.startswith("_")}
    unet = UNet2DConditionModel.from_config({**sdxl, "encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 48})
    assert unet.config.addition_embed_type == "text_time"
    with pytest.raises(IPAdapterError) as caught:
        ipadapter.load(SimpleNamespace(unet=unet), "h94:plus")
    assert str(caught.value) == "h94:plus is published for SD 1.5 and SDXL only, and this base is neither"


def test_the_command_line_refuses_unknown_names_and_names_inside_before_loading(tmp_path, capsys) -> None:
    """Before any model loads: an unknown name lists the valid ones; a file name inside one is refused."""
    image = tmp_path / "ref.png"
    factories.reference_image().save(image)
    assert main(["generate", "--adapter", "h94:pluss", "--image", str(image), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ipadapter: error: unknown published adapter 'h94:pluss'; valid: h94:base, h94:base-vit-g,")
    assert "h94:faceid-portrait" in err and "\n" not in err
    assert main(["generate", "--adapter", "h94:plus", "--weight-name", "x.bin", "--image", str(image)]) == 2
    assert capsys.readouterr().err.strip() == ("ipadapter: error: --weight-name x.bin names a file inside --adapter, "
                                               "but h94:plus is a published adapter")


def test_generate_with_a_published_name_from_the_cache(tmp_path, monkeypatch) -> None:
    """End to end on the command line: `--adapter h94:plus` on an SD 1.5 folder, the file read from the Hub cache
    (its head sized to the tests' tiny encoder, given as --image-encoder)."""
    from PIL import Image

    folder = factories.save_tiny_sd15_pipeline(tmp_path, adapters=())
    _publish(ipadapter.pipelines.load_pipeline(folder), tmp_path, "sd15", "plus", patch_dim=40)
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    factories.reference_image().save(tmp_path / "ref.png")
    assert main(["generate", "--base", str(folder), "--adapter", "h94:plus", "--image", str(tmp_path / "ref.png"),
                 "--image-encoder", str(folder / "image_encoder"), "--steps", "2",
                 "--out", str(tmp_path / "o.png")]) == 0
    assert Image.open(tmp_path / "o.png").size == (32, 32)
    assert not [url for url in sent if "h94" in url]


def test_an_unknown_name_fails_before_the_base_loads(monkeypatch) -> None:
    """`load_prompter` checks the names first: a misspelt one costs no pipeline load."""
    from ipadapter import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the base was loaded before the adapter names were checked")

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    with pytest.raises(IPAdapterError, match=r"^unknown published adapter 'h94:pluss'; valid: h94:base,"):
        loading.load_prompter(base="some/base", adapters=["h94:pluss"])
