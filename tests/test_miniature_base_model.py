"""The miniature base model's training pieces against their definitions: the noised batch (DDPM's forward process on
Stable Diffusion's betas), caption dropout, offset noise, the object-weighted loss map, the EMA with its warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ipadapter.miniature import base_model


def _alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's schedule written out: betas linear in their square root from 0.00085 to 0.012, 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _cache(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    text = torch.arange(n, dtype=torch.float16).view(n, 1, 1).expand(n, 3, 2).clone()  # caption i holds the value i
    empty = torch.full((1, 3, 2), -1.0)
    return latents, text, empty


def test_a_noised_batch_follows_ddpms_forward_process_on_sds_betas() -> None:
    latents, text, empty = _cache()
    scheduler = base_model.training_scheduler()
    idx, noisy, t, cond, noise = base_model.noisy_batch(scheduler, latents, text, empty, 8,
                                                        torch.Generator().manual_seed(3), offset_noise=0.1)
    a = _alphas_cumprod()[t].view(-1, 1, 1, 1).float()
    assert torch.allclose(noisy, a.sqrt() * latents[idx] + (1 - a).sqrt() * noise, atol=1e-5)
    assert t.min() >= 0 and t.max() < 1000
    kept = cond[:, 0, 0] != -1
    assert torch.equal(cond[kept], text[idx][kept].float()) and cond.dtype == torch.float32
    assert torch.equal(cond[~kept], empty.expand(int((~kept).sum()), -1, -1))


def test_captions_are_dropped_at_the_asked_rate() -> None:
    latents, text, empty = _cache()
    scheduler = base_model.training_scheduler()
    for rate in (0.0, 0.3, 1.0):
        dropped = 0
        for seed in range(40):
            cond = base_model.noisy_batch(scheduler, latents, text, empty, 50, torch.Generator().manual_seed(seed),
                                          offset_noise=0.0, text_drop=rate)[3]
            dropped += int((cond[:, 0, 0] == -1).sum())
        assert dropped / 2000 == pytest.approx(rate, abs=0.04)


def test_offset_noise_shifts_each_channel_of_each_sample_by_one_constant() -> None:
    """Same seed, offset 0 and 0.5: the two noises differ by a constant over each (sample, channel)'s pixels, half
    of a standard normal draw, one per channel; the batch, timesteps and captions are the same."""
    latents, text, empty = _cache()
    scheduler = base_model.training_scheduler()
    plain, offset = (base_model.noisy_batch(scheduler, latents, text, empty, 64, torch.Generator().manual_seed(1),
                                            offset_noise=k) for k in (0.0, 0.5))
    for i in (0, 2, 3):
        assert torch.equal(plain[i], offset[i])
    shift = offset[4] - plain[4]
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-6)
    assert per_channel.std().item() == pytest.approx(0.5, rel=0.15)
    assert (per_channel.flatten(1).std(dim=1) > 0.05).all(), "each channel draws its own offset"


def test_the_loss_map_weights_the_object_and_a_one_pixel_ring_around_it() -> None:
    masks = np.zeros((1, 64, 64), dtype=np.uint8)
    masks[0, 10:14, 20:23] = 1
    got = base_model.object_weights(masks, 5.0)
    assert got.shape == (1, 1, 64, 64)
    expected = torch.ones(64, 64)
    expected[9:15, 19:24] = 6.0  # the object grown by one pixel on every side, corners included
    assert torch.equal(got[0, 0], expected)


def test_the_ema_moves_toward_the_weights_by_one_minus_its_warmed_up_decay() -> None:
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    for step, decay in ((0, 0.999), (90, 0.9), (10_000, 0.999)):
        d = min(decay, (1 + step) / (10 + step))  # 0.1 at step 0, 0.9 from step 80 on (decay 0.9)
        start = [p.detach().clone() for p in ema.parameters()]
        base_model._ema_update(ema, model, step, decay)
        for e, s, p in zip(ema.parameters(), start, model.parameters()):
            assert torch.allclose(e, d * s + (1 - d) * p, atol=1e-7)
    assert not torch.equal(before[0], next(ema.parameters()))


def test_images_map_to_the_vaes_range_channels_first() -> None:
    images = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    images[1, 5, 7] = (255, 0, 51)
    x = base_model.to_model_range(images)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x[0].eq(-1).all() and x[1, :, 5, 7].tolist() == pytest.approx([1.0, -1.0, 51 / 127.5 - 1])
