"""The transformer training loop (`dit.flow`) on a tiny SD 3 pipeline: which draws each step makes, what `average`
does under several processes, gradient clipping only when asked, and the in-memory trainer's defaults (the paper's
AdamW) and what it leaves untouched."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.dit.flow import fit, step_generator
from ipadapter.dit.train import encode, train_dit_adapter
from ipadapter.dit.train_sd3 import new_sd3_adapter
from tests import dit_factories as df


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import SiglipImageProcessor

    from ipadapter.siglip import SiglipEncoder

    pipe = df.sd3_pipeline(tmp_path_factory.mktemp("sd3"))
    encoder = SiglipEncoder(df.siglip(), SiglipImageProcessor(size={"height": 24, "width": 24}), name="tiny-siglip")
    images = [Image.fromarray(np.full((24, 24, 3), c, np.uint8)) for c in ((230, 40, 40), (40, 60, 230))]
    torch.manual_seed(0)
    start = new_sd3_adapter(pipe.transformer, feature_dim=encoder.patch_dim, tokens=8)
    return pipe, encoder, images, start


def _weights(adapter) -> list[torch.Tensor]:
    return [p.detach().clone() for p in adapter.parameters()]


def _run(parts, **kwargs) -> tuple[list[torch.Tensor], list[float], list[torch.Tensor]]:
    """Two steps of `fit` on one fixed batch; (weights after, losses, the first σ draw of each step)."""
    pipe, encoder, images, start = parts
    adapter = copy.deepcopy(start).train().requires_grad_(True)
    batch = encode(pipe, encoder, images, ["a square"] * 2, 16)
    drawn: list[torch.Tensor] = []

    def sigmas(rows: int, g: torch.Generator) -> torch.Tensor:
        drawn.append(torch.rand(rows, generator=g))
        return drawn[-1]

    optimizer = kwargs.pop("optimizer", None) or torch.optim.SGD(adapter.parameters(), lr=1e-2)
    losses = fit(pipe.transformer, adapter, lambda g: batch, steps=2, optimizer=optimizer, sigmas=sigmas, **kwargs)
    return _weights(adapter), losses, drawn


def test_each_step_draws_from_the_generator_of_its_seed_step_and_rank(parts) -> None:
    for kwargs, (seed, rank) in (({}, (0, 0)), ({"seed": 5, "rank": 1}, (5, 1))):
        _, _, drawn = _run(parts, **kwargs)
        expected = [torch.rand(2, generator=step_generator(seed, step, rank)) for step in (1, 2)]
        assert all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True))


def test_average_is_applied_to_the_gradients_and_the_reported_loss(parts) -> None:
    """A mean over processes whose others contributed nothing (here: × 0) leaves plain SGD nothing to step on."""
    before = _weights(parts[3])
    after, losses, _ = _run(parts, average=lambda t: t * 0)
    assert losses == [0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    moved, _, _ = _run(parts)
    assert not all(torch.equal(a, b) for a, b in zip(moved, before, strict=True))


def test_gradients_are_clipped_only_when_a_limit_is_given(parts, monkeypatch) -> None:
    calls: list[tuple[int, float]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, limit, *args, **kwargs):
        params = list(params)
        calls.append((len(params), limit))
        return clip(params, limit, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    _run(parts)
    assert calls == []
    _run(parts, max_grad_norm=0.5)
    assert calls == [(len(list(parts[3].parameters())), 0.5)] * 2


def test_the_in_memory_trainer_defaults_to_the_papers_adamw_and_leaves_the_transformer_frozen(parts) -> None:
    pipe, encoder, images, start = parts
    frozen = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    common = dict(steps=2, size=16, batch_size=2)
    sizes: list[tuple[int, ...]] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(tuple(kwargs["hidden_states"].shape[-2:])), with_kwargs=True)
    default = train_dit_adapter(pipe, encoder, images, ["a"] * 2, adapter=copy.deepcopy(start), **common)[0]
    hook.remove()
    latent = 16 // pipe.vae_scale_factor  # the 24 px images resized to `size`
    assert sizes == [(latent, latent)] * 2
    paper = train_dit_adapter(pipe, encoder, images, ["a"] * 2, adapter=copy.deepcopy(start), lr=1e-4,
                              weight_decay=0.01, seed=0, **common)[0]
    no_decay = train_dit_adapter(pipe, encoder, images, ["a"] * 2, adapter=copy.deepcopy(start), weight_decay=0.0,
                                 **common)[0]
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), paper.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(default.parameters(), no_decay.parameters(), strict=True))
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in pipe.transformer.state_dict().items())


class _Scaled:
    """A batch whose loss is `coefficient · Σ weight` of the adapter's first weight: its gradient is the coefficient
    everywhere, so what an optimizer step does is closed-form."""

    def __init__(self, coefficient: float) -> None:
        self.latents, self.coefficient = torch.zeros(1, 1), coefficient


def _closed_form_fit(parts, monkeypatch, coefficients: list[float], **kwargs) -> tuple[torch.Tensor, list[float]]:
    """`fit` with plain SGD (lr 1) on batches cycling through `coefficients`; (first weight's change, losses)."""
    import ipadapter.dit.flow as flow

    start = parts[3]
    adapter = copy.deepcopy(start).train().requires_grad_(True)
    first = next(adapter.parameters())
    monkeypatch.setattr(flow, "flow_matching_loss", lambda attachment, adapter, batch, **kw:
                        batch.coefficient * first.sum())
    feed = iter(coefficients * 10)
    losses = fit(parts[0].transformer, adapter, lambda g: _Scaled(next(feed)),
                 optimizer=torch.optim.SGD([first], lr=1.0), sigmas=lambda rows, g: torch.zeros(rows), **kwargs)
    return (first - next(start.parameters())).detach(), losses


def test_accumulated_batches_step_once_on_their_mean_gradient_and_loss(parts, monkeypatch) -> None:
    change, losses = _closed_form_fit(parts, monkeypatch, [1.0, 3.0], steps=2, accumulate=2)
    assert torch.allclose(change, torch.full_like(change, -2 * 2.0))  # two steps of the mean gradient (1 + 3) / 2
    total = float(next(parts[3].parameters()).sum())
    n = next(parts[3].parameters()).numel()
    assert losses == pytest.approx([2.0 * total, 2.0 * (total - 2.0 * n)], rel=1e-5)


def test_a_schedule_sets_each_steps_learning_rate(parts, monkeypatch) -> None:
    """The paper's constant rate after a linear warm-up: steps 1, 2, 3, 4 at 1/3, 2/3, 1, 1 of it."""
    from ipadapter.train.trainer import warmup_then_constant

    import ipadapter.dit.flow as flow

    start = parts[3]
    adapter = copy.deepcopy(start).train().requires_grad_(True)
    first = next(adapter.parameters())
    monkeypatch.setattr(flow, "flow_matching_loss", lambda attachment, adapter, batch, **kw: first.sum())
    optimizer = torch.optim.SGD([first], lr=1.0)
    fit(parts[0].transformer, adapter, lambda g: _Scaled(1.0), steps=4, optimizer=optimizer,
        sigmas=lambda rows, g: torch.zeros(rows),
        schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(3)))
    change = (first - next(start.parameters())).detach()
    assert torch.allclose(change, torch.full_like(change, -(1 / 3 + 2 / 3 + 1 + 1)))


def test_a_step_with_non_finite_gradients_is_skipped_and_too_many_in_a_row_end_the_run(parts, monkeypatch,
                                                                                       caplog) -> None:
    import ipadapter.train.step as step_module
    from ipadapter.errors import IPAdapterError

    with caplog.at_level("WARNING", logger="ipadapter.train"):
        change, losses = _closed_form_fit(parts, monkeypatch, [1.0, float("nan"), 1.0], steps=3)
    assert torch.allclose(change, torch.full_like(change, -2.0))  # steps 1 and 3 applied, step 2 left the weights
    assert math.isnan(losses[1]) and not any(math.isnan(v) for v in (losses[0], losses[2]))
    assert [r.getMessage() for r in caplog.records] == ["step 2 skipped: non-finite gradients (1 in a row)"]
    monkeypatch.setattr(step_module, "NONFINITE_LIMIT", 3)
    with pytest.raises(IPAdapterError) as caught:
        _closed_form_fit(parts, monkeypatch, [float("inf"), float("nan"), float("inf"), 1.0], steps=6)
    assert str(caught.value) == ("3 consecutive steps had non-finite gradients (last at step 3); lower the learning "
                                 "rate or check the data")
