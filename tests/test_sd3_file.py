"""An SD 3.5 transformer kept alone in one file, in Stability's layout (`sd3.5_large.safetensors`, ComfyUI's
`models/unet/`) as `--base`: the transformer from the file, the text encoders and VAE from SD 3.5 Large's repository
in the Hugging Face cache, whose own transformer weights are never read (the cache here holds none).

diffusers tells SD 3.5 Large from the header by its 38th joint block and takes every width from the file, so a tiny
transformer with 38 blocks stands in. The file is written from that transformer by the inverse of diffusers'
conversion (`dit_factories.sd3_as_stability`); the truth is that transformer object, in a pipeline built around it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ipadapter
from ipadapter.cli.main import main
from tests import dit_factories as df
from tests import factories

REPO = "stabilityai/stable-diffusion-3.5-large"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # runs build Accelerators


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-file")
    made = df.transformer_file(root, REPO, df.sd3_pipeline(root / "parts"), df.sd35_large_like(),
                               df.sd3_as_stability, "sd3.5_large_finetune.safetensors")
    df.sd35_adapter_files(root)
    return made


def test_generate_from_the_file_makes_the_image_of_its_transformer(sd3_file, monkeypatch, tmp_path) -> None:
    """The file loads back bit for bit, with the repository's other parts from the cache and no request naming it;
    `ipadapter generate` from it makes the image `ipadapter.load` makes on a pipeline holding that transformer."""
    from diffusers import StableDiffusion3Pipeline

    from ipadapter.pipelines import load_pipeline

    root = sd3_file.root
    sent = factories.hub_without_network(monkeypatch, root / "hub")
    pipe = load_pipeline(sd3_file.path)
    loaded, written = pipe.transformer.state_dict(), sd3_file.transformer.state_dict()
    assert isinstance(pipe, StableDiffusion3Pipeline) and loaded.keys() == written.keys()
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    half = load_pipeline(sd3_file.path, dtype=torch.bfloat16)  # every part in the precision asked for
    assert {p.dtype for part in (half.transformer, half.vae, half.text_encoder, half.text_encoder_3)
            for p in part.parameters()} == {torch.bfloat16}
    out = tmp_path / "out.png"
    assert main(["generate", "--base", str(sd3_file.path), "--adapter", str(root / "ip-adapter.bin"),
                 "--image-encoder", str(root / "siglip"), "--image", str(root / "ref.png"), "--out", str(out),
                 "--prompt", "a cat", "--steps", "2", "--width", "16", "--height", "16", "--seed", "3"]) == 0
    assert [url for url in sent if "stabilityai" in url] == []
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_file.repo), transformer=sd3_file.transformer)
    pipe.set_progress_bar_config(disable=True)
    with ipadapter.load(pipe, str(root / "ip-adapter.bin"), image_encoder=str(root / "siglip")) as prompter:
        expected, plain = (prompter.generate(Image.open(root / "ref.png"), prompt="a cat", steps=2, width=16,
                                             height=16, seed=3, scale=scale)[0] for scale in (1.0, 0.0))
    got = np.asarray(Image.open(out).convert("RGB"), np.int16)
    assert np.abs(got - np.asarray(expected, np.int16)).max() <= 1
    assert np.abs(np.asarray(plain, np.int16) - np.asarray(expected, np.int16)).max() > 8  # the adapter acts


def test_an_sd3_adapter_trains_on_the_file_and_a_unet_variant_refuses_it(sd3_file, monkeypatch, tmp_path,
                                                                          capsys) -> None:
    """In bf16 the file's transformer and the repository's parts are frozen in bf16, as from a folder."""

    import ipadapter.single_file as single_file

    root = sd3_file.root
    sent = factories.hub_without_network(monkeypatch, root / "hub")
    made, load = [], single_file.load_pipeline
    monkeypatch.setattr(single_file, "load_pipeline", lambda *args, **parts: made.append(load(*args, **parts))
                        or made[-1])
    data = factories.write_images(tmp_path / "data", 2)
    flags = ["--base", str(sd3_file.path), "--image-encoder", str(root / "siglip"), "--data", str(data),
             "--resolution", "16", "--max-steps", "1", "--batch-size", "1", "--num-workers", "0"]
    assert main(["train", "--variant", "sd3", *flags, "--mixed-precision", "bf16", "--output",
                 str(tmp_path / "run")]) == 0
    assert [url for url in sent if "stabilityai" in url] == []
    pipe, = made
    assert {p.dtype for part in (pipe.transformer, pipe.vae, pipe.text_encoder_3) for p in part.parameters()} == {
        torch.bfloat16}
    written = load_file(str(tmp_path / "run" / "ip-adapter.safetensors"))
    assert {key.split(".")[1] for key in written if key.startswith("ip_adapter.")} == {str(i) for i in range(38)}
    capsys.readouterr()
    assert main(["train", *flags, "--output", str(tmp_path / "unet")]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ipadapter: error: {sd3_file.path} is a transformer of SD 3.5 Large, which UNet variants do not train: give "
        "--variant sd3"]


def test_a_file_missing_a_weight_is_one_line_naming_it(sd3_file, monkeypatch, tmp_path, capsys) -> None:
    """A transformer file cut short (its final projection gone): diffusers' conversion fails on the missing key, and
    the command says which file and which weight in one line, with nothing written."""

    factories.hub_without_network(monkeypatch, sd3_file.root / "hub")
    weights = load_file(str(sd3_file.path))
    del weights["final_layer.linear.weight"]
    cut = tmp_path / "cut.safetensors"
    save_file(weights, str(cut))
    out = tmp_path / "out.png"
    assert main(["generate", "--base", str(cut), "--adapter", str(sd3_file.root / "ip-adapter.bin"),
                 "--image-encoder", str(sd3_file.root / "siglip"), "--image", str(sd3_file.root / "ref.png"),
                 "--out", str(out), "--steps", "1", "--width", "16", "--height", "16"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ipadapter: error: could not load {cut} as a SD3Transformer2DModel: it has no weight "
        "final_layer.linear.weight"]
    assert not out.exists()


def test_a_feature_cache_built_from_the_file_trains_without_the_data(sd3_file, monkeypatch, tmp_path) -> None:
    """`--cache` from a transformer file: built once with the repository's encoders, then a run from it alone (no
    `--data`) loads the transformer from the file and nothing else of the repository but its scheduler, and trains
    the first run's weights bit for bit (fp32 cache)."""

    import ipadapter.single_file as single_file

    root = sd3_file.root
    factories.hub_without_network(monkeypatch, root / "hub")
    data = factories.write_images(tmp_path / "data", 2)
    flags = ["train", "--variant", "sd3", "--base", str(sd3_file.path), "--image-encoder", str(root / "siglip"),
             "--resolution", "16", "--max-steps", "2", "--batch-size", "1", "--num-workers", "0", "--cache",
             str(tmp_path / "cache"), "--cache-dtype", "float32"]
    assert main([*flags, "--data", str(data), "--output", str(tmp_path / "built")]) == 0
    loads, made, load = [], [], single_file.load_pipeline

    def recording(path, dtype, **parts):
        loads.append(parts)
        made.append(load(path, dtype, **parts))
        return made[-1]

    monkeypatch.setattr(single_file, "load_pipeline", recording)
    assert main([*flags, "--output", str(tmp_path / "cached")]) == 0
    loaded, = loads
    assert "transformer" not in loaded and "scheduler" not in loaded
    assert {"vae", "text_encoder", "text_encoder_2", "text_encoder_3"} <= {k for k, v in loaded.items() if v is None}
    built, cached = (load_file(str(tmp_path / run / "ip-adapter.safetensors")) for run in ("built", "cached"))
    assert built.keys() == cached.keys() and all(torch.equal(built[k], cached[k]) for k in built)

    # The cache holds the outputs of the repository's encoders alone: another fine-tune of the family trains from it,
    # and its validation draws around the transformer being trained, not one loaded again from the file.
    other = tmp_path / "another-finetune.safetensors"
    save_file(df.sd3_as_stability(df.sd35_large_like(seed=5)), str(other))
    made.clear()
    flags[flags.index("--base") + 1] = str(other)
    assert main([*flags, "--output", str(tmp_path / "other"), "--validate-every", "2", "--validation-images",
                 str(data.parent / "img0.png"), "--validation-steps", "1"]) == 0
    trained, drew = made
    assert drew.transformer is trained.transformer and drew.text_encoder is not None
    assert not torch.equal(trained.transformer.proj_out.weight, sd3_file.transformer.proj_out.weight)


def test_a_file_stored_in_fp8_loads_its_values_in_the_runs_precision(sd3_file, monkeypatch, tmp_path) -> None:
    """ComfyUI's fp8 files (float8_e4m3fn weights, no scales): each weight is the fp8 value, exactly, in float32."""

    from ipadapter.pipelines import load_pipeline

    factories.hub_without_network(monkeypatch, sd3_file.root / "hub")
    fp8 = tmp_path / "sd3.5_large_fp8_e4m3fn.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(sd3_file.path)).items()}, str(fp8))
    loaded = load_pipeline(fp8).transformer.state_dict()
    expected = {k: v.to(torch.float8_e4m3fn).float() for k, v in sd3_file.transformer.state_dict().items()}
    assert loaded.keys() == expected.keys()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], expected[k]) for k in expected)
    assert not all(torch.equal(expected[k], v) for k, v in sd3_file.transformer.state_dict().items())  # fp8 rounds


def _scaled(path: Path, out: Path, layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The file at `path` written to `out` as ComfyUI writes a scaled fp8 file: each linear weight divided by its
    scale (its largest magnitude over fp8's largest) and stored as float8_e4m3fn, in the older layout (`scaled_fp8`
    marker, `scale_weight`, `scale_input`) or the newer (`comfy_quant`, `weight_scale`, `input_scale`), under `prefix`.
    Returns what each stored weight stands for: the fp8 value times its scale, in float32."""
    stored, meant = df.scaled_fp8_state({prefix + k: v for k, v in load_file(str(path)).items()}, layout,
                                        marker=prefix + "scaled_fp8")
    if prefix:  # an all-in-one file: a text encoder beside the transformer, itself scaled (never read for it)
        stored["text_encoders.t5xxl.transformer.shared.weight"] = torch.ones(4, 4, dtype=torch.float8_e4m3fn)
        stored["text_encoders.t5xxl.transformer.shared.scale_weight"] = torch.tensor(3.0)
    save_file(stored, str(out))
    return {k.removeprefix(prefix): v for k, v in meant.items()}


@pytest.mark.parametrize(("layout", "prefix", "dtype"), [("older", "", torch.float32),
                                                         ("newer", "model.diffusion_model.", torch.bfloat16)])
def test_a_scaled_fp8_file_loads_each_weight_times_its_scale(sd3_file, monkeypatch, tmp_path, layout, prefix,
                                                             dtype) -> None:
    """ComfyUI's scaled fp8 files (`sd3.5_large_fp8_scaled`, alone or with its text encoders): the transformer
    diffusers loads from a plain file of the dequantized weights (fp8 value × scale), in the precision asked for; the
    raw fp8 values are hundreds of times those. Generating from the file makes that transformer's image."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from ipadapter.pipelines import load_pipeline

    factories.hub_without_network(monkeypatch, sd3_file.root / "hub")
    scaled = tmp_path / "sd3.5_large_fp8_scaled.safetensors"
    meant = _scaled(sd3_file.path, scaled, layout, prefix)
    save_file(meant, str(tmp_path / "plain.safetensors"))
    truth = SD3Transformer2DModel.from_single_file(str(tmp_path / "plain.safetensors"), config=str(sd3_file.repo),
                                                   subfolder="transformer", torch_dtype=dtype)
    loaded, expected = load_pipeline(scaled, dtype=dtype).transformer.state_dict(), truth.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(loaded[k].dtype == dtype and torch.equal(loaded[k], expected[k]) for k in expected)
    raw = load_file(str(scaled))[prefix + "final_layer.linear.weight"].float()
    assert raw.abs().max() > 100 * meant["final_layer.linear.weight"].abs().max()  # the scales matter
    if dtype == torch.float32:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_file.repo), transformer=truth)
        df.assert_generate_matches(sd3_file.root, ["--base", str(scaled)], pipe, tmp_path / "out.png")


@pytest.mark.parametrize("conf", [b'{"format": "nvfp4"}', b"\xff"])
def test_a_layer_quantized_otherwise_is_one_line(sd3_file, monkeypatch, tmp_path, capsys, conf) -> None:
    """A layer in another of ComfyUI's formats (nvfp4's block scales), or one whose format cannot be read: the file
    and the layer named, in one line, with nothing written."""
    factories.hub_without_network(monkeypatch, sd3_file.root / "hub")
    scaled = tmp_path / "nvfp4.safetensors"
    _scaled(sd3_file.path, scaled, "newer")
    stored = load_file(str(scaled))
    stored["final_layer.linear.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    save_file(stored, str(scaled))
    root, out = sd3_file.root, tmp_path / "out.png"
    assert main(["generate", "--base", str(scaled), "--adapter", str(root / "ip-adapter.bin"), "--image-encoder",
                 str(root / "siglip"), "--image", str(root / "ref.png"), "--out", str(out), "--steps", "1"]) != 0
    kind = "nvfp4" if b"nvfp4" in conf else "an unreadable format"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ipadapter: error: {scaled}: final_layer.linear is quantized as {kind}, which ipadapter does not read (it "
        "reads float8_e4m3fn and float8_e5m2 with one scale per weight); use the model's bf16 or fp8 file"]
    assert not out.exists()


@pytest.mark.parametrize("cached", ["nothing", "configs"])
def test_a_repository_not_in_the_cache_is_one_line_with_the_download_that_suffices(sd3_file, monkeypatch, tmp_path,
                                                                                   capsys, cached) -> None:
    """Offline with nothing of SD 3.5 Large cached, or its configs alone: one line naming one `hf download` for every
    part its pipeline reads (three text encoders) but the transformer."""
    factories.hub_without_network(monkeypatch, tmp_path / "empty" if cached == "nothing" else
                                  df.configs_only_hub(sd3_file.repo, REPO, tmp_path))
    root = sd3_file.root
    assert main(["generate", "--base", str(sd3_file.path), "--adapter", str(root / "ip-adapter.bin"),
                 "--image-encoder", str(root / "siglip"), "--image", str(root / "ref.png"), "--out",
                 str(tmp_path / "out.png")]) != 0
    patterns = ["*.json", "*.txt", "*.model", "scheduler/*", "vae/*", "text_encoder/*", "tokenizer/*",
                "text_encoder_2/*", "tokenizer_2/*", "text_encoder_3/*", "tokenizer_3/*"]
    command = f"hf download {REPO} --include " + " ".join(f"'{p}'" for p in patterns)
    what = "layout" if cached == "nothing" else "text encoders and VAE"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ipadapter: error: the SD 3.5 Large {what} {REPO} is not in the local Hugging Face cache and the Hub cannot "
        f"be reached; download it once with network access ({command}) or give --base the model as a diffusers "
        "pipeline folder"]


def test_a_repository_holding_fp16_files_alone_serves_the_file(sd3_file, monkeypatch, tmp_path) -> None:
    """The repository's parts saved as `*.fp16.safetensors` only (as some are published): read all the same."""
    from diffusers import StableDiffusion3Pipeline

    from ipadapter.pipelines import load_pipeline

    repo = tmp_path / "repo"
    StableDiffusion3Pipeline.from_pretrained(str(sd3_file.repo), transformer=None).save_pretrained(repo, variant="fp16")
    (repo / "transformer").mkdir(exist_ok=True)
    sd3_file.transformer.save_config(repo / "transformer")
    (repo / "model_index.json").write_bytes((sd3_file.repo / "model_index.json").read_bytes())  # names the transformer
    assert not list(repo.rglob("diffusion_pytorch_model.safetensors")) and list(repo.rglob("*.fp16.safetensors"))
    factories.write_hub_cache(tmp_path / "hub", REPO, repo)
    factories.hub_without_network(monkeypatch, tmp_path / "hub")
    pipe = load_pipeline(sd3_file.path)
    expected = StableDiffusion3Pipeline.from_pretrained(str(sd3_file.repo), transformer=None).vae.state_dict()
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in expected.items())


def test_a_flux_run_refuses_an_sd3_file_in_one_line(sd3_file, monkeypatch, tmp_path, capsys) -> None:
    factories.hub_without_network(monkeypatch, sd3_file.root / "hub")
    data = factories.write_images(tmp_path / "data", 2)
    assert main(["train", "--variant", "flux", "--base", str(sd3_file.path), "--image-encoder",
                 str(sd3_file.root / "siglip"), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--resolution", "16"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ipadapter: error: --base {sd3_file.path} is not a FLUX transformer file: diffusers reads it as a "
        "StableDiffusion3Pipeline"]


def test_weights_that_do_not_fit_are_one_line_naming_the_part(sd3_file, monkeypatch, tmp_path, capsys) -> None:
    """A transformer weight of another shape, or a repository VAE of another size: diffusers' own reason, after the
    file or the repository it came from, in one line."""

    weights = load_file(str(sd3_file.path))
    weights["final_layer.linear.weight"] = weights["final_layer.linear.weight"][:, :-1].contiguous()
    save_file(weights, str(tmp_path / "narrow.safetensors"))
    repo = tmp_path / "repo"
    df.sd3_pipeline(tmp_path / "parts").save_pretrained(repo)
    df.flux_vae().save_pretrained(repo / "vae")  # another VAE's weights under the repository's VAE config
    for part in ("vae", "transformer"):
        (repo / part / "config.json").write_bytes((sd3_file.repo / part / "config.json").read_bytes())
    factories.write_hub_cache(tmp_path / "hub", REPO, repo)
    factories.hub_without_network(monkeypatch, tmp_path / "hub")
    root = sd3_file.root
    argv = ["generate", "--adapter", str(root / "ip-adapter.bin"), "--image-encoder", str(root / "siglip"),
            "--image", str(root / "ref.png"), "--out", str(tmp_path / "out.png")]
    for base, says in ((tmp_path / "narrow.safetensors", f"could not load {tmp_path / 'narrow.safetensors'} as a "
                        "SD3Transformer2DModel: "),
                       (sd3_file.path, f"could not load the SD 3.5 Large text encoders and VAE from {REPO}: ")):
        assert main([*argv, "--base", str(base)]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ipadapter: error: {says}") and "shape" in err[0], err
    assert not (tmp_path / "out.png").exists()

