"""The miniature's training stages as runs that span sessions: each one killed after its second step and resumed ends
at the weights of a run never interrupted, having drawn only the batches it had not trained on; and the VAE's losses
against their definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from ipadapter.miniature import base_model, tiny_clip
from tests.killed_runs import assert_same_weights, kill_and_resume

TINY_CLIP = tiny_clip.ClipSize(hidden=32, layers=1, heads=2, projection=32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """What the later stages train on: a tiny CLIP, a VAE, and the UNet's latent cache."""
    root = tmp_path_factory.mktemp("stages")
    tiny_clip.train_clip(root, name="clip", steps=1, size=TINY_CLIP, batch=4)
    base_model.train_vae(root, steps=1, batch=2, eval_n=4)
    base_model.build_cache(root, root / "vae", n=8)
    return root


def _stage(name: str, prepared: Path) -> tuple[Callable[[Path, bool], torch.nn.Module], object, str]:
    """(run(out, resume) -> the trained model, the module whose per-step batch function dies, that function)."""
    def with_the_vae(out: Path) -> Path:
        out.mkdir(exist_ok=True)
        if not (out / "vae").exists():
            (out / "vae").symlink_to(prepared / "vae")
        return out

    runs = {
        "clip": (lambda out, resume: tiny_clip.train_clip(out, name="clip", steps=3, size=TINY_CLIP, batch=4,
                                                          resume=resume), tiny_clip, "make_batch"),
        "image-encoder": (lambda out, resume: tiny_clip.train_image_encoder(
            out, prepared / "clip", steps=3, batch=4, patch=16, resume=resume), tiny_clip, "make_masked_batch"),
        "vae": (lambda out, resume: base_model.train_vae(out, steps=3, batch=2, eval_n=4, resume=resume),
                base_model, "make_masked_batch"),
        "decoder": (lambda out, resume: base_model.train_vae_decoder(with_the_vae(out), steps=3, batch=2,
                                                                     resume=resume), base_model, "make_masked_batch"),
        "unet": (lambda out, resume: base_model.train_unet(out, prepared / "unet_cache.pt", prepared / "clip", steps=3,
                                                           batch=2, widths=(32, 32, 32), resume=resume),
                 base_model, "caption_states"),
    }
    return runs[name]


@pytest.mark.parametrize("stage", ["clip", "image-encoder", "vae", "decoder", "unet"])
def test_a_killed_stage_resumes_to_the_weights_of_an_uninterrupted_run(stage, prepared, tmp_path, monkeypatch,
                                                                        every_step_checkpoints) -> None:
    run, module, batches = _stage(stage, prepared)
    whole, resumed, drawn = kill_and_resume(run, module, batches, tmp_path, monkeypatch)
    assert drawn == 1, "only the last step's batch is drawn again"
    assert_same_weights(whole, resumed)
    assert "resumed from" in next((tmp_path / "cut").glob("*.log")).read_text()


def test_the_reconstruction_loss_is_weighted_mse_plus_half_l1_over_the_mean_weight() -> None:
    g = torch.Generator().manual_seed(0)
    recon, x = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    weights = 1 + 4 * (torch.rand(2, 1, 4, 4, generator=g) > 0.7).float()
    per_pixel = [[[[sum(weights[n, 0, i, j].item() * ((recon[n, c, i, j] - x[n, c, i, j]).item() ** 2
                                                       + 0.5 * abs((recon[n, c, i, j] - x[n, c, i, j]).item()))
                        for c in range(3)) / 3 for j in range(4)] for i in range(4)]] for n in range(2)]
    expected = torch.tensor(per_pixel).mean() / weights.mean()
    assert base_model.reconstruction_loss(recon, x, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    assert base_model.reconstruction_loss(x, x, weights).item() == 0.0


def test_the_kl_is_per_latent_element_of_a_gaussian_against_the_standard_normal() -> None:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), averaged over every latent element of the batch."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 8, 4, 4, generator=g).clamp(-5, 5)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).mean()
    assert base_model.kl_per_element(posterior).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_vaes_scaling_factor_gives_its_latents_unit_standard_deviation(tmp_path) -> None:
    """Stable Diffusion's convention, on the scenes the run measures it on (its seed + 7)."""
    from ipadapter.miniature.world import make_batch

    vae = base_model.train_vae(tmp_path, steps=1, batch=2, eval_n=16)
    with torch.no_grad():
        latents = vae.encode(base_model.to_model_range(make_batch(1 + 7, 16)[0])).latent_dist.mean
    assert (latents * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-5)


def test_the_decoder_run_trains_the_decoder_only(prepared, tmp_path) -> None:
    """The encoder, so every latent the UNet and the adapters were trained on, stays as it is."""
    from diffusers import AutoencoderKL

    (tmp_path / "vae").symlink_to(prepared / "vae")
    tuned = base_model.train_vae_decoder(tmp_path, steps=2, batch=2)
    before = AutoencoderKL.from_pretrained(prepared / "vae").state_dict()
    after = tuned.state_dict()
    kept = [k for k in after if k.startswith(("encoder.", "quant_conv."))]
    moved = [k for k in after if k.startswith(("decoder.", "post_quant_conv."))
             and not torch.equal(after[k], before[k])]
    assert kept and all(torch.equal(after[k], before[k]) for k in kept)
    assert len(moved) > 10
    assert AutoencoderKL.from_pretrained(tmp_path / "vae_decoder").state_dict().keys() == after.keys()
