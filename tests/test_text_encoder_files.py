"""Text encoders kept as single files (`--text-encoder`, ComfyUI's `models/clip/`): each takes the base's slot of
its kind and width, whatever the order. With a transformer file as `--base`, a VAE file and the three text encoder
files (ComfyUI's separate files), SD 3.5 generates from the family repository's configs alone. The truth is diffusers
reading the same weights laid out as one all-in-one file (`StableDiffusion3Pipeline.from_single_file`)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ipadapter.cli.main import main
from ipadapter.pipelines import load_pipeline
from tests import dit_factories as df
from tests import factories

REPO = "stabilityai/stable-diffusion-3.5-large"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ComfyUI's separate files of an SD 3.5 model, cut from an all-in-one file: the transformer
    (`models/unet/`), the VAE (`models/vae/`), CLIP-L without a projection, CLIP-G and T5 without its tied input
    embedding (`models/clip/`); a cache of the repository's configs and tokenizers alone."""
    root = tmp_path_factory.mktemp("te-files")
    made = df.sd35_all_in_one(root, REPO)
    state = load_file(str(made.path))

    def part(prefix: str, name: str, drop: tuple[str, ...] = ()) -> str:
        save_file({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)
                   and k.removeprefix(prefix) not in drop}, str(root / name))
        return str(root / name)

    made.unet = part("model.diffusion_model.", "sd3.5_large.safetensors")
    made.vae = part("first_stage_model.", "sd35_vae.safetensors")
    made.clip_l = part("text_encoders.clip_l.transformer.", "clip_l.safetensors", ("text_projection.weight",))
    made.clip_g = part("text_encoders.clip_g.transformer.", "clip_g.safetensors")
    made.t5 = part("text_encoders.t5xxl.transformer.", "t5xxl.safetensors", ("encoder.embed_tokens.weight",))
    made.configs = df.configs_only_hub(made.repo, REPO, root / "configs")
    return made


def _equal(model, truth) -> bool:
    mine, theirs = model.state_dict(), truth.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_comfyuis_separate_files_generate_from_the_repositorys_configs_alone(files, monkeypatch, tmp_path) -> None:
    """The transformer, VAE and three text encoder files (given in any order), no network, only the configs
    cached: every part is diffusers' reading of the same weights as one all-in-one file (CLIP-L's absent projection
    the identity, as there), and `generate` makes that pipeline's image."""
    from diffusers import StableDiffusion3Pipeline

    sent = factories.hub_without_network(monkeypatch, files.configs)
    encoders = [files.t5, files.clip_g, files.clip_l]
    pipe = load_pipeline(files.unet, vae=files.vae, text_encoders=encoders)
    truth = StableDiffusion3Pipeline.from_single_file(str(files.path), config=str(files.repo))
    truth.text_encoder_3.eval()  # diffusers leaves it in training mode
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert _equal(getattr(pipe, part), getattr(truth, part)), part
        assert not getattr(pipe, part).training, part

    flags = ["--base", files.unet, "--vae", files.vae, *[x for f in encoders for x in ("--text-encoder", f)]]
    df.assert_generate_matches(files.root, flags, truth, tmp_path / "out.png")
    assert [url for url in sent if "stabilityai" in url] == []  # huggingface_hub's telemetry names no model


def test_a_scaled_fp8_t5_replaces_a_folder_bases_own(tmp_path) -> None:
    """ComfyUI's `t5xxl_fp8_e4m3fn_scaled` on a FLUX pipeline folder: T5 is each weight times its scale, in the
    precision asked for; CLIP stays the folder's."""
    from diffusers import FluxPipeline

    folder = df.save_flux_base(tmp_path / "flux")
    own = FluxPipeline.from_pretrained(str(folder))
    stored, meant = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in df.t5(9).state_dict().items():
        if key.endswith(".weight") and value.ndim == 2 and key != "encoder.embed_tokens.weight":
            scale = value.abs().amax().float() / 448
            stored[key] = (value / scale).to(torch.float8_e4m3fn)
            stored[key.removesuffix(".weight") + ".scale_weight"] = scale
            meant[key] = (stored[key].float() * scale).to(torch.bfloat16)
        elif key != "encoder.embed_tokens.weight":
            stored[key], meant[key] = value, value.to(torch.bfloat16)
    save_file(stored, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    pipe = load_pipeline(folder, dtype=torch.bfloat16,
                         text_encoders=[tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"])
    loaded = pipe.text_encoder_2.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in meant.items())
    assert torch.equal(loaded["encoder.embed_tokens.weight"], meant["shared.weight"])
    assert all(torch.equal(v, own.text_encoder.state_dict()[k].to(torch.bfloat16))
               for k, v in pipe.text_encoder.state_dict().items())


@pytest.mark.parametrize("case", ["width", "twice", "cut", "not-text"])
def test_a_file_no_slot_takes_is_one_line(files, monkeypatch, tmp_path, capsys, case) -> None:
    """A CLIP of a width the base has not, two files for one slot, a file missing weights, a file holding no text
    encoder: one line each, before any image is made."""
    factories.hub_without_network(monkeypatch, files.root / "hub")
    if case == "width":
        factories.tiny_text_encoder(40, 3).save_pretrained(tmp_path / "clip40")
        given, says = [str(next((tmp_path / "clip40").glob("*.safetensors")))], (
            "is a CLIP text encoder 40 wide, which no text encoder of this base is: it has text_encoder (CLIP, 32 "
            "wide), text_encoder_2 (CLIP, 48 wide), text_encoder_3 (T5, 96 wide)")
    elif case == "twice":
        given, says = [files.clip_l, files.clip_l], "both take this base's text_encoder; give one"
    elif case == "cut":
        weights = load_file(files.clip_g)
        del weights["text_model.final_layer_norm.weight"]
        save_file(weights, str(tmp_path / "cut.safetensors"))
        given, says = [str(tmp_path / "cut.safetensors")], (
            "lacks 1 weights of this base's text_encoder_2 (CLIPTextModelWithProjection), "
            "text_model.final_layer_norm.weight first; it is another model's text encoder")
    else:
        given, says = [files.vae], "holds no CLIP or T5 text encoder by transformers' names"
    root, out = files.root, tmp_path / "out.png"
    assert main(["generate", "--base", files.unet, *[x for f in given for x in ("--text-encoder", f)],
                 "--adapter", str(root / "ip-adapter.bin"), "--image-encoder", str(root / "siglip"), "--image",
                 str(root / "ref.png"), "--out", str(out), "--steps", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("ipadapter: error: ") and says in err and "\n" not in err
    assert not out.exists()
