"""The training loss: min-SNR-gamma weights against their closed form, and `diffusion_loss` applying them per sample."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ipadapter.snr import min_snr_weights
from ipadapter.train import TrainConfig
from ipadapter.train.step import diffusion_loss, scale_latents

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def closed_form_snr() -> np.ndarray:
    """SD's scaled-linear schedule written out: betas on a square-root grid, alpha-bar their running product."""
    betas = np.linspace(SD_BETAS["beta_start"] ** 0.5, SD_BETAS["beta_end"] ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
    return alpha_bar / (1.0 - alpha_bar)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_closed_form(prediction: str) -> None:
    scheduler = DDPMScheduler(**SD_BETAS)
    t = torch.tensor([0, 10, 100, 250, 500, 999])
    snr = closed_form_snr()[t.numpy()]
    denominator = snr if prediction == "epsilon" else snr + 1
    expected = np.minimum(snr, 5.0) / denominator
    got = min_snr_weights(scheduler, t, 5.0, prediction).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert got[0] < 0.01  # the nearly clean step weighs almost nothing
    if prediction == "epsilon":
        assert got[-1] == pytest.approx(1.0)  # SNR below gamma: full weight



def test_the_weighted_loss_is_each_samples_mse_times_its_weight_averaged() -> None:
    """`min_snr_mse`, which the trainer and the miniature UNet recipe share, written out sample by sample in float64."""
    from ipadapter.snr import min_snr_mse

    scheduler = DDPMScheduler(**SD_BETAS)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 2, 3, 3, generator=g).half(), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([3, 80, 400, 990])
    weights = np.minimum(closed_form_snr()[t.numpy()], 5.0) / closed_form_snr()[t.numpy()]
    errors = (pred.double().numpy() - target.double().numpy()) ** 2
    expected = np.mean([w * e.mean() for w, e in zip(weights, errors)])
    got = min_snr_mse(pred, target, scheduler, t, 5.0, "epsilon")
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-4)

def stub_run(snr_gamma: float, batch: int = 6) -> tuple[SimpleNamespace, dict[str, torch.Tensor]]:
    """A cached-feature run whose latents are exactly zero, so the noise is recoverable from the noisy input."""
    config = TrainConfig(snr_gamma=snr_gamma, drop_image=0.0, drop_text=0.0, drop_both=0.0)
    run = SimpleNamespace(
        config=config, accelerator=SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext),
        weight_dtype=torch.float32, cache=object(), sdxl=False, features="global",
        constants={"uncond_text": torch.zeros(1, 3, 8), "uncond_image": torch.zeros(1, 16)},
        vae_config={"scaling_factor": 1.0},
    )
    data = {"latent_mean": torch.zeros(batch, 4, 8, 8), "latent_std": torch.zeros(batch, 4, 8, 8),
            "text_embeds": torch.randn(batch, 3, 8), "image": torch.randn(batch, 16)}
    return run, data


def _loss_of_a_zero_prediction(run, data, prediction: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """`diffusion_loss` with a UNet that predicts zeros, seeded; with the stub's zero latents the noisy input is
    √(1−ᾱ)·noise, so the drawn timesteps and noise are read back from it. Returns (loss, timesteps, noise)."""
    seen = {}

    def module(noisy, timesteps, text, features, added):
        seen.update(noisy=noisy, t=timesteps)
        return torch.zeros_like(noisy)

    torch.manual_seed(0)
    loss = diffusion_loss(run, module, DDPMScheduler(**SD_BETAS, prediction_type=prediction), prediction, data)
    t = seen["t"].numpy()
    snr = closed_form_snr()[t]
    noise = seen["noisy"].double().numpy() / np.sqrt(1 - snr / (1 + snr))[:, None, None, None]
    return loss, t, noise


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [0.0, 5.0])
def test_diffusion_loss_weights_each_sample(snr_gamma: float, prediction: str) -> None:
    """With zero latents the noisy input is √(1−ᾱ)·noise, so the noise is recovered from it; the target is the noise
    (epsilon) or √ᾱ·noise − √(1−ᾱ)·0 (the velocity), and a zero prediction's error is the target squared."""
    run, data = stub_run(snr_gamma)
    loss, t, noise = _loss_of_a_zero_prediction(run, data, prediction)
    snr = closed_form_snr()[t]
    alpha_bar = snr / (1 + snr)
    target = noise if prediction == "epsilon" else np.sqrt(alpha_bar)[:, None, None, None] * noise
    per_sample = (target ** 2).reshape(len(t), -1).mean(axis=1)
    denominator = snr if prediction == "epsilon" else snr + 1
    weights = np.minimum(snr, snr_gamma) / denominator if snr_gamma else np.ones_like(snr)
    assert float(loss) == pytest.approx(float((weights * per_sample).mean()), rel=1e-4)


def test_noise_offset_adds_one_draw_per_sample_and_channel() -> None:
    """Offset noise (Guttenberg 2023): randn + offset·randn(B, C, 1, 1). With offset 100 each channel's spatial mean
    is one N(0, 100²) draw of its own, while the noise around it stays standard normal."""
    run, data = stub_run(0.0, batch=8)
    run.config = run.config.replace(noise_offset=100.0)
    _, _, noise = _loss_of_a_zero_prediction(run, data, "epsilon")
    means = noise.mean(axis=(2, 3))  # (B, C): 32 draws of N(0, 100²) plus N(0, 1/64)
    assert 50 < means.std() < 200 and np.abs(means).max() < 450
    assert 0.8 < (noise - means[:, :, None, None]).std() < 1.2


@pytest.mark.parametrize("config, expected", [
    ({"scaling_factor": 0.18215}, lambda x: x * 0.18215),  # SD 1.5's VAE
    ({"scaling_factor": 1.5305, "shift_factor": 0.0609}, lambda x: (x - 0.0609) * 1.5305),  # SD 3.5's
    ({"scaling_factor": 0.3611, "shift_factor": None}, lambda x: x * 0.3611),  # a config that writes null
])
def test_latents_are_shifted_then_scaled_as_the_vae_config_says(config, expected) -> None:
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(scale_latents(config, x), expected(x))


def test_snr_gamma_is_refused_when_negative_and_for_flux() -> None:
    from ipadapter.errors import IPAdapterError

    with pytest.raises(IPAdapterError, match="snr_gamma must be a finite number >= 0"):
        TrainConfig(snr_gamma=-1.0)
    with pytest.raises(IPAdapterError, match="--snr-gamma does not apply to FLUX"):
        TrainConfig(variant="flux", snr_gamma=5.0)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("scheduler_predicts, asked, used", [
    ("epsilon", "", "epsilon"), ("v_prediction", "", "v_prediction"),
    ("epsilon", "v_prediction", "v_prediction"), ("v_prediction", "epsilon", "epsilon"),
])
def test_a_run_trains_the_prediction_its_base_makes_unless_told(tmp_path, monkeypatch, scheduler_predicts: str,
                                                                asked: str, used: str) -> None:
    """The target follows the base's scheduler (SD 2.x-style bases predict the velocity); `prediction_type` overrides
    it. The noise comes from a DDPM scheduler of the base's own betas."""
    from ipadapter.train import train, trainer
    from tests import factories

    seen = []

    def recording(run, module, scheduler, prediction, batch):
        seen.append((type(scheduler).__name__, scheduler.config.prediction_type, float(scheduler.betas[-1]),
                     prediction))
        return diffusion_loss(run, module, scheduler, prediction, batch)

    monkeypatch.setattr(trainer, "diffusion_loss", recording)
    manifest = factories.write_images(tmp_path / "data", 2)
    models, encoder = factories.in_memory(prediction_type=scheduler_predicts)
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=2,
                         max_steps=1, num_workers=0, prediction_type=asked)
    train(config, models=models, image_encoder=encoder, log_with=None)
    assert seen == [("DDPMScheduler", scheduler_predicts, pytest.approx(SD_BETAS["beta_end"]), used)]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_base_predicting_the_sample_is_refused(tmp_path) -> None:
    from ipadapter import IPAdapterError
    from ipadapter.train import train
    from tests import factories

    manifest = factories.write_images(tmp_path / "data", 2)
    models, encoder = factories.in_memory(prediction_type="sample")
    config = TrainConfig(data=str(manifest), output=str(tmp_path / "out"), resolution=factories.RES, batch_size=2,
                         max_steps=1, num_workers=0)
    with pytest.raises(IPAdapterError) as caught:
        train(config, models=models, image_encoder=encoder, log_with=None)
    assert str(caught.value) == "the base's scheduler predicts 'sample'; only epsilon and v_prediction are supported"
