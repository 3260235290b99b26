"""The training run's optimizer: every setting of the config reaches it; 8-bit AdamW from bitsandbytes when it is
installed, else torch's AdamW with a warning."""

from __future__ import annotations

import logging
import sys

import torch

from ipadapter.train import TrainConfig
from ipadapter.train.optim import make_optimizer


def test_adamw8bit_without_bitsandbytes_falls_back_and_says_so(monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it raises ImportError
    params = [torch.nn.Parameter(torch.zeros(2))]
    with caplog.at_level(logging.WARNING, logger="ipadapter.train"):
        optimizer = make_optimizer(TrainConfig(optimizer="adamw8bit", learning_rate=3e-4), params)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["lr"] == 3e-4
    assert [r.getMessage() for r in caplog.records] == [
        "optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes), which is not installed: using torch's "
        "AdamW (32-bit states) instead"]


def test_every_optimizer_setting_of_the_config_reaches_adamw() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    config = TrainConfig(learning_rate=3e-4, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    optimizer = make_optimizer(config, params)
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["params"] == params
    assert {k: optimizer.defaults[k] for k in ("lr", "weight_decay", "betas", "eps")} == {
        "lr": 3e-4, "weight_decay": 0.05, "betas": (0.8, 0.95), "eps": 1e-6}


def test_adamw8bit_with_bitsandbytes_is_its_adamw8bit_with_the_same_settings(monkeypatch, caplog) -> None:
    from types import SimpleNamespace

    class AdamW8bit:
        def __init__(self, params, **kwargs) -> None:
            self.params, self.kwargs = params, kwargs

    monkeypatch.setitem(sys.modules, "bitsandbytes", SimpleNamespace(optim=SimpleNamespace(AdamW8bit=AdamW8bit)))
    params = [torch.nn.Parameter(torch.zeros(2))]
    config = TrainConfig(optimizer="adamw8bit", learning_rate=2e-4, weight_decay=0.1, adam_beta1=0.7,
                         adam_beta2=0.9, adam_epsilon=1e-7)
    with caplog.at_level(logging.WARNING, logger="ipadapter.train"):
        optimizer = make_optimizer(config, params)
    assert type(optimizer) is AdamW8bit and optimizer.params is params
    assert optimizer.kwargs == {"lr": 2e-4, "weight_decay": 0.1, "betas": (0.7, 0.9), "eps": 1e-7}
    assert caplog.records == []
