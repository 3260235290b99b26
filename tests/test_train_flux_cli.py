"""`ipadapter train --variant flux` end to end on a tiny FLUX pipeline folder: the loss on a fixed batch falls from
the start adapter's, the written XLabs file loads in diffusers' own FLUX loader with the trained weights, and the
options a FLUX run does not have are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ipadapter.cli.main import main
from ipadapter.dit.attach import attach_dit
from ipadapter.dit.checkpoint import load_dit_adapter
from ipadapter.dit.flow import flow_matching_loss
from ipadapter.dit.train import encode
from ipadapter.dit.train_flux import new_flux_adapter, save_xlabs
from ipadapter.encoders import ImageEncoder
from ipadapter.train.dropout import Drops
from tests import dit_factories as df

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # the run builds an Accelerator
COLOURS = [(230, 40, 40), (40, 200, 60), (40, 60, 230), (230, 220, 40)]


def _data(root) -> tuple[list[Image.Image], list[str]]:
    """Four flat colours whose caption says nothing of the colour: only the image prompt can lower the loss."""
    (root / "images").mkdir(parents=True)
    images = [Image.fromarray(np.full((16, 16, 3), c, np.uint8)) for c in COLOURS]
    lines = []
    for i, image in enumerate(images):
        image.save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image_file": f"images/{i}.png", "text": "a square"}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return images, ["a square"] * len(images)


def test_train_flux_cli_loss_falls_and_diffusers_loads_the_file(tmp_path) -> None:
    from diffusers import FluxPipeline

    base = df.save_flux_base(tmp_path)
    images, captions = _data(tmp_path / "data")
    pipe = FluxPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    encoder = ImageEncoder.from_pretrained(str(base / "image_encoder"))
    torch.manual_seed(0)
    start = save_xlabs(new_flux_adapter(pipe.transformer, clip_dim=encoder.global_dim), tmp_path / "start.safetensors")
    out = tmp_path / "run"
    code = main(["train", "--variant", "flux", "--base", str(base), "--image-encoder", str(base / "image_encoder"),
                 "--data", str(tmp_path / "data" / "train.jsonl"), "--init-from", str(start), "--resolution", "16",
                 "--max-steps", "15", "--batch-size", "4", "--learning-rate", "5e-3", "--seed", "3",
                 "--num-workers", "0", "--output", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"ip-adapter.safetensors", "adapter.ipadapter.safetensors", "README.md",
                                              "config.json", "loss.png", "logs"}

    # (a) the loss on one fixed batch, noise, σ and no dropout: start adapter vs the trained file
    data = encode(pipe, encoder, images, captions, 16)
    g = torch.Generator().manual_seed(5)
    sigma, noise = torch.rand(4, generator=g) * 0.5 + 0.5, torch.randn(data.latents.shape, generator=g)
    keep = Drops(image=torch.zeros(4, dtype=torch.bool), text=torch.zeros(4, dtype=torch.bool))

    def fixed_loss(path) -> float:
        adapter = load_dit_adapter(path, pipe.transformer)
        attachment = attach_dit(pipe.transformer, adapter)
        with torch.no_grad():
            loss = float(flow_matching_loss(attachment, adapter, data, sigma=sigma, noise=noise, drops=keep))
        attachment.detach()
        return loss

    before, after = fixed_loss(start), fixed_loss(out / "ip-adapter.safetensors")
    assert after < 0.8 * before

    # (b) diffusers' own FLUX loader reads the XLabs file; its weights are the trained ones (the own-format file)
    trained = load_file(str(out / "adapter.ipadapter.safetensors"))
    pipe.load_ip_adapter(str(out), weight_name="ip-adapter.safetensors", image_encoder_pretrained_model_name_or_path=None)
    projection = pipe.transformer.encoder_hid_proj.image_projection_layers[0]
    names = {"image_embeds": "proj", "norm": "norm"}  # diffusers' ImageProjection calls the linear map image_embeds
    loaded = {f"image_proj.{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in projection.state_dict().items()}
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        for kv in "kv":
            for kind, tensor in getattr(block.attn.processor, f"to_{kv}_ip")[0].state_dict().items():
                loaded[f"layers.transformer_blocks.{i}.attn.to_{kv}_ip.{kind}"] = tensor
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert not torch.equal(trained["image_proj.proj.weight"], load_file(str(start))["ip_adapter_proj_model.proj.weight"])


@pytest.mark.parametrize("flags, says", [
    (["--lora-rank", "64"], "--lora-rank does not apply to FLUX training"),
    (["--mixed-precision", "fp16"], "--mixed-precision fp16 does not apply to FLUX training"),
    (["--num-tokens", "8"], "--num-tokens does not apply to FLUX training"),
    (["--noise-offset", "0.1"], "--noise-offset does not apply to FLUX training"),
    (["--references", "2"], "--references does not apply to FLUX training: one reference image per sample"),
    (["--snr-gamma", "5"], "--snr-gamma does not apply to FLUX training"),
    (["--attention", "concat"], "is for the base variant, not 'flux'"),
])
def test_options_a_flux_run_does_not_have_are_refused(tmp_path, capsys, flags: list[str], says: str) -> None:
    code = main(["train", "--variant", "flux", "--base", str(tmp_path), "--data", "x.jsonl",
                 "--output", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("from_file", [False, True])
def test_a_resolution_the_flux_base_cannot_take_is_named_as_given(tmp_path, capsys, from_file: bool) -> None:
    """FLUX latents are the VAE's downscale, packed 2 × 2: a size off that grid is refused before training, by the
    flag when typed, by the config file's key otherwise."""
    base = df.save_flux_base(tmp_path)
    _data(tmp_path / "data")
    vae = json.loads((base / "vae" / "config.json").read_text())
    step = 2 ** (len(vae["block_out_channels"]) - 1) * 2
    size = step + step // 2
    argv = ["train", "--variant", "flux", "--base", str(base), "--image-encoder", str(base / "image_encoder"),
            "--data", str(tmp_path / "data" / "train.jsonl"), "--max-steps", "1", "--num-workers", "0",
            "--output", str(tmp_path / "run")]
    if from_file:
        (tmp_path / "run.yaml").write_text(f"resolution: {size}\n")
        argv += ["--config", str(tmp_path / "run.yaml")]
    else:
        argv += ["--resolution", str(size)]
    capsys.readouterr()  # the factory's own output
    assert main(argv) == 2
    called = "resolution" if from_file else "--resolution"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ipadapter: error: {called} {size} does not fit this FLUX base: it must be a multiple of {step} (VAE "
        "downscale × 2, latents packed 2 × 2)"]
    assert not any((tmp_path / "run").glob("*.safetensors"))


def test_bf16_keeps_the_adapter_in_fp32(tmp_path) -> None:
    """--mixed-precision bf16: the frozen models run in bf16, the adapter trains and is written in fp32."""
    base = df.save_flux_base(tmp_path)
    _data(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--variant", "flux-v2", "--base", str(base), "--image-encoder", str(base / "image_encoder"),
                 "--data", str(tmp_path / "data" / "train.jsonl"), "--resolution", "16", "--max-steps", "2",
                 "--batch-size", "2", "--mixed-precision", "bf16", "--num-workers", "0", "--output", str(out)]) == 0
    written = load_file(str(out / "ip-adapter.safetensors"))
    assert written["ip_adapter_proj_model.proj.weight"].shape[0] == 16 * df.FLUX_JOINT  # flux-v2: 16 tokens
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in written.values())
    losses = [float(line.split(",")[1]) for line in (out / "logs" / "losses.csv").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
