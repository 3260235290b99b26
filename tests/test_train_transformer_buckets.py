"""Aspect-ratio buckets in FLUX and SD 3 runs (`--buckets`): every batch is one bucket, each image in the bucket
nearest its own aspect; a non-square batch is what the families' own pipelines make of that size (FLUX: the packing
and position ids of `FluxPipeline`; SD 3: diffusers' transformer, given the written adapter through its own loader,
computes the same loss); sizes a base cannot take are refused before any weights load."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from PIL import Image

from ipadapter.train.buckets import bucket_sizes, nearest_bucket
from ipadapter.train.config import TrainConfig
from ipadapter.train.transformer import train_transformer
from tests import dit_factories as df

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds an Accelerator
FAMILIES = {"flux": (df.save_flux_base, 4), "sd3": (df.save_sd3_base, 2)}  # the tiny bases' size steps
SHAPES = [(16, 32), (32, 16), (16, 32), (32, 16), (24, 24), (24, 24)]  # (height, width): two of each bucket


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """`bases(variant)`: (variant, base folder, a manifest of landscape, portrait and square images), each family's
    made once."""
    made = {}

    def get(variant: str):
        if variant not in made:
            root = tmp_path_factory.mktemp(variant)
            (root / "data").mkdir()
            lines = []
            for i, (h, w) in enumerate(SHAPES):
                Image.new("RGB", (w, h), (40 * i, 200 - 30 * i, 90)).save(root / "data" / f"{i}.png")
                lines.append(json.dumps({"image_file": f"{i}.png", "text": f"shape {i}"}))
            (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
            made[variant] = variant, FAMILIES[variant][0](root), root / "data" / "train.jsonl"
        return made[variant]

    return get


def _config(setup, tmp_path, **overrides) -> TrainConfig:
    variant, base, data = setup
    values = dict(variant=variant, base=str(base), image_encoder=str(base / "image_encoder"), data=str(data),
                  resolution=16, batch_size=2, max_steps=6, num_workers=0, buckets=True, output=str(tmp_path / "run"))
    return TrainConfig(**{**values, **overrides})


@pytest.mark.parametrize("variant", sorted(FAMILIES))
def test_each_batch_is_one_bucket_the_nearest_to_each_images_aspect(bases, variant, tmp_path, monkeypatch,
                                                                    caplog) -> None:
    from ipadapter.dit import train as families

    setup = bases(variant)
    family = families.FAMILIES[variant]
    seen: list[tuple[list[str], tuple[int, int]]] = []

    def spy(pipe, encoder, pixels, clip, texts, **kwargs):
        seen.append((list(texts), tuple(pixels.shape[-2:])))
        return family.features(pipe, encoder, pixels, clip, texts, **kwargs)

    monkeypatch.setitem(families.FAMILIES, variant, dataclasses.replace(family, features=spy))
    with caplog.at_level(logging.INFO, logger="ipadapter.train"):
        result = train_transformer(_config(setup, tmp_path))
    assert len(result.losses) == 6 and all(loss == loss for loss in result.losses)
    buckets = bucket_sizes(16, FAMILIES[variant][1])
    assert "aspect-ratio buckets (height × width): " + ", ".join(f"{h}×{w}" for h, w in buckets) in caplog.messages
    expected = {f"shape {i}": nearest_bucket(size, buckets) for i, size in enumerate(SHAPES)}
    assert len(seen) == 6 and {size for _, size in seen} == set(expected.values()) and len(set(expected.values())) == 3
    assert all(expected[text] == size for texts, size in seen for text in texts)


def test_a_non_square_flux_batch_is_packed_and_placed_as_the_flux_pipeline_does(bases) -> None:
    from diffusers import FluxPipeline

    from ipadapter.dit.train_flux import assemble

    setup = bases("flux")
    pipe = FluxPipeline.from_pretrained(str(setup[1]))
    latents = torch.randn(2, pipe.transformer.config.in_channels // 4, 6, 10)  # a 12 × 20 px bucket, VAE scale 2
    text = torch.randn(2, 5, pipe.transformer.config.joint_attention_dim)
    batch = assemble({"latents": latents, "text": text, "pooled": torch.randn(2, 7), "image": torch.randn(2, 3)},
                     (torch.zeros(1, 5, text.shape[-1]), torch.zeros(1, 7)))
    _, ids = pipe.prepare_latents(2, latents.shape[1], 12, 20, latents.dtype, "cpu", None, latents=batch.latents)
    assert torch.equal(batch.image_ids, ids)
    assert torch.equal(FluxPipeline._unpack_latents(batch.latents, 12, 20, pipe.vae_scale_factor), latents)
    assert torch.equal(batch.text_ids, torch.zeros(5, 3))


def test_diffusers_computes_the_loss_of_a_non_square_sd3_batch_through_the_written_file(bases, tmp_path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from ipadapter.dit.attach import attach_dit
    from ipadapter.dit.checkpoint import load_dit_adapter
    from ipadapter.dit.flow import flow_matching_loss
    from ipadapter.dit.train_sd3 import assemble, empty_prompt, features
    from ipadapter.siglip import SiglipEncoder
    from ipadapter.train.dropout import Drops

    setup = bases("sd3")
    result = train_transformer(_config(setup, tmp_path, max_steps=2, learning_rate=1e-2))
    folder = setup[1]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    encoder = SiglipEncoder.from_pretrained(str(folder / "image_encoder"))
    images = [Image.open(setup[2].parent / f"{i}.png").convert("RGB") for i in (0, 2)]  # both 16 × 32: one bucket
    pixels = pipe.image_processor.preprocess(images, height=12, width=20)
    batch = assemble(features(pipe, encoder, pixels, encoder.pixel_values(images), ["shape 0", "shape 2"]),
                     empty_prompt(pipe))
    g = torch.Generator().manual_seed(1)
    sigma, noise = torch.rand(2, generator=g), torch.randn(batch.latents.shape, generator=g)
    drops = Drops(image=torch.tensor([True, False]), text=torch.tensor([False, True]))
    adapter = load_dit_adapter(result.published, pipe.transformer)
    attachment = attach_dit(pipe.transformer, adapter)
    with torch.no_grad():
        ours = float(flow_matching_loss(attachment, adapter, batch, sigma=sigma, noise=noise, drops=drops))
    attachment.detach()

    pipe.load_ip_adapter(str(result.published.parent), weight_name=result.published.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    features_in = torch.where(drops.image[:, None, None], 0.0, batch.image)
    text = torch.where(drops.text[:, None, None], batch.empty_text, batch.text)
    pooled = torch.where(drops.text[:, None], batch.empty_pooled, batch.pooled)
    x_sigma = (1 - sigma[:, None, None, None]) * batch.latents + sigma[:, None, None, None] * noise
    with torch.no_grad():
        pred = pipe.transformer(hidden_states=x_sigma, timestep=1000 * sigma, encoder_hidden_states=text,
                                pooled_projections=pooled,
                                joint_attention_kwargs={"ip_adapter_image_embeds": features_in}).sample
    assert batch.latents.shape[-2:] == (6, 10)
    assert ours == pytest.approx(float(torch.nn.functional.mse_loss(pred, noise - batch.latents)), rel=1e-5)


def test_buckets_a_base_cannot_take_are_refused_before_any_weights_load(bases, tmp_path, monkeypatch,
                                                                        capsys) -> None:
    """SD 3's learned positions cover 96 patches a side of this tiny base (192 px): 144 px fits, but its buckets reach
    past it. FLUX has no such bound."""
    import ipadapter.train.transformer_feed as feed
    from ipadapter.cli.main import main

    _, base, data = bases("sd3")
    monkeypatch.setattr(feed, "load_transformer_pipeline", lambda *a, **k: pytest.fail("weights were loaded"))
    side = max(max(b) for b in bucket_sizes(144, 2))
    assert side > 192
    assert main(["train", "--variant", "sd3", "--base", str(base), "--image-encoder", str(base / "image_encoder"),
                 "--data", str(data), "--resolution", "144", "--buckets", "--output", str(tmp_path / "run")]) != 0
    assert capsys.readouterr().err.strip() == (f"ipadapter: error: --resolution 144 makes sides up to {side} px with "
                                               "--buckets, which is larger than this SD 3 base takes (192 px)")
    assert not (tmp_path / "run").exists()


def test_the_largest_size_sd3_positions_cover_is_taken_and_one_step_more_is_not(bases, tmp_path) -> None:
    """192 px on this tiny base (96 learned positions a side × patch 1 × VAE downscale 2): taken; 194 px: refused."""
    from ipadapter.dit.train import family
    from ipadapter.errors import FieldError
    from ipadapter.train.transformer_feed import check_size

    setup = bases("sd3")
    assert check_size(_config(setup, tmp_path, resolution=192, buckets=False), family("sd3")) is None
    with pytest.raises(FieldError, match=r"^resolution 194 is larger than this SD 3 base takes \(192 px\)$"):
        check_size(_config(setup, tmp_path, resolution=194, buckets=False), family("sd3"))
