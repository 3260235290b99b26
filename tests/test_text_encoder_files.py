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
    (`models/unet/`), the VAE (`models/vae/`), CLIP-L without a projection, CLIP-G by transformers' names without
    `text_model.` and T5 without its tied input embedding (`models/clip/`); a cache of the repository's configs and
    tokenizers alone."""
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
    made.clip_g = part("text_encoders.clip_g.transformer.text_model.", "clip_g.safetensors")
    save_file({**load_file(made.clip_g), "text_projection.weight": state[
        "text_encoders.clip_g.transformer.text_projection.weight"]}, made.clip_g)
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
    t5 = {k: v for k, v in df.t5(9).state_dict().items() if k != "shared.weight"}  # the tied input embedding kept
    stored, meant = df.scaled_fp8_state(t5)
    meant = {k: v.to(torch.bfloat16) for k, v in meant.items()}
    save_file(stored, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    pipe = load_pipeline(folder, dtype=torch.bfloat16,
                         text_encoders=[tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"])
    loaded = pipe.text_encoder_2.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in meant.items())
    assert torch.equal(loaded["shared.weight"], meant["encoder.embed_tokens.weight"])
    assert {p.dtype for p in pipe.text_encoder_2.parameters()} == {torch.bfloat16}
    assert all(torch.equal(v, own.text_encoder.state_dict()[k].to(torch.bfloat16))
               for k, v in pipe.text_encoder.state_dict().items())


def test_comfyuis_clip_l_file_replaces_a_flux_folders_own(tmp_path) -> None:
    """ComfyUI's `clip_l.safetensors` keeps transformers' older names (`text_model.`) and the projection and
    `logit_scale` of the whole CLIP, which FLUX's CLIP-L (no projection) has not: its text model is read, the rest
    left; T5 stays the folder's."""
    from diffusers import FluxPipeline

    from tests import ldm_format

    folder = df.save_flux_base(tmp_path / "flux")
    own = FluxPipeline.from_pretrained(str(folder))
    mine = {ldm_format._text_model(k): v * 2 for k, v in own.text_encoder.state_dict().items()}
    width = own.text_encoder.config.hidden_size
    save_file({**mine, "text_projection.weight": torch.ones(width, width), "logit_scale": torch.ones(())},
              str(tmp_path / "clip_l.safetensors"))
    pipe = load_pipeline(folder, text_encoders=[tmp_path / "clip_l.safetensors"])
    assert all(torch.equal(v, own.text_encoder.state_dict()[k] * 2) for k, v in pipe.text_encoder.state_dict().items())
    assert _equal(pipe.text_encoder_2, own.text_encoder_2)


def test_a_base_without_clip_or_t5_text_encoders_is_one_line(tmp_path) -> None:
    """Kolors' ChatGLM is neither kind: no file replaces it."""
    from ipadapter.errors import IPAdapterError
    from ipadapter.text_encoder_files import load_text_encoder_files

    (tmp_path / "kolors").mkdir()
    (tmp_path / "kolors" / "model_index.json").write_text('{"_class_name": "KolorsPipeline", "text_encoder": '
                                                          '["kolors", "ChatGLMModel"]}')
    factories.tiny_text_encoder(32, 3).save_pretrained(tmp_path / "clip")
    clip = next((tmp_path / "clip").glob("*.safetensors"))
    with pytest.raises(IPAdapterError) as err:
        load_text_encoder_files([clip], base=str(tmp_path / "kolors"), dtype=torch.float32)
    assert str(err.value) == (f"{clip} is a CLIP text encoder 32 wide, which no text encoder of this base is: it has "
                              "none of either kind")


def _clip_g_without_projection(files, tmp_path):
    weights = load_file(files.clip_g)
    del weights["text_projection.weight"]  # 48 → 32: not square, so no identity stands for it
    save_file(weights, str(tmp_path / "clip_g.safetensors"))
    return str(tmp_path / "clip_g.safetensors")


def _clip_of_other_shapes(files, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16)
    save_file(CLIPTextModel(config).state_dict(), str(tmp_path / "clip_l.safetensors"))
    return str(tmp_path / "clip_l.safetensors")


@pytest.mark.parametrize("case", ["width", "twice", "cut", "projection", "shapes", "not-text", "not-safetensors"])
def test_a_file_no_slot_takes_is_one_line(files, monkeypatch, tmp_path, capsys, case) -> None:
    """A CLIP of a width the base has not, two files for one slot, a file missing weights (a CLIP-G without its
    projection among them), weights of other shapes, a file holding no text encoder, a file that is not
    safetensors: one line each, before any image is made."""
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
        del weights["final_layer_norm.weight"]
        save_file(weights, str(tmp_path / "cut.safetensors"))
        given, says = [str(tmp_path / "cut.safetensors")], (
            "lacks 1 weights of this base's text_encoder_2 (CLIPTextModelWithProjection), "
            "text_model.final_layer_norm.weight first; it is another model's text encoder")
    elif case == "projection":
        given, says = [_clip_g_without_projection(files, tmp_path)], (
            "lacks 1 weights of this base's text_encoder_2 (CLIPTextModelWithProjection), text_projection.weight "
            "first; it is another model's text encoder")
    elif case == "shapes":
        given, says = [_clip_of_other_shapes(files, tmp_path)], (
            "text_model.encoder.layers.0.mlp.fc1.bias is (48,), this base's text_encoder takes (64,); it is another "
            "model's text encoder")
    elif case == "not-text":
        given, says = [files.vae], ("holds no CLIP or T5 text encoder by transformers' names (no "
                                    "text_model.embeddings.token_embedding.weight or shared.weight); give "
                                    "--text-encoder a CLIP or T5 text encoder in one .safetensors file")
    else:
        (tmp_path / "notes.safetensors").write_text("not weights")
        given, says = [str(tmp_path / "notes.safetensors")], "is not a .safetensors file ("
    root, out = files.root, tmp_path / "out.png"
    assert main(["generate", "--base", files.unet, *[x for f in given for x in ("--text-encoder", f)],
                 "--adapter", str(root / "ip-adapter.bin"), "--image-encoder", str(root / "siglip"), "--image",
                 str(root / "ref.png"), "--out", str(out), "--steps", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("ipadapter: error: ") and says in err and "\n" not in err
    if case == "not-safetensors":
        assert err.endswith("; give --text-encoder a CLIP or T5 text encoder in one .safetensors file")
    assert not out.exists()
