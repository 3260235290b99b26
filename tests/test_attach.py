"""Attaching leaves what the caller passed as it was: the adapter's dtype and device, the UNet's processors."""

from __future__ import annotations

import pytest
import torch

from ipadapter import IPAdapterError, attach
from ipadapter.adapter import AdapterConfig, IPAdapter
from ipadapter.projection import ProjectionConfig
from tests import factories


def _new_adapter(unet) -> IPAdapter:
    config = AdapterConfig("base", ProjectionConfig("linear", in_dim=8, cross_dim=factories.SD15_CROSS, tokens=4))
    return IPAdapter.for_unet(unet, config)


def test_attach_to_a_bf16_unet_keeps_the_fp32_adapter_bit_for_bit() -> None:
    """The trainer's order: adapter made from the fp32 UNet (K'/V' = to_k/to_v), UNet cast to bf16, then attached."""
    unet = factories.sd15_unet()
    adapter = _new_adapter(unet)
    fp32_kv = {name: (unet.get_submodule(name).to_k.weight.clone(), unet.get_submodule(name).to_v.weight.clone())
               for name, layer in adapter.named_layers() if layer.has_ip}
    unet.to(torch.bfloat16)
    attachment = attach(unet, adapter)
    try:
        assert adapter.dtype == torch.float32
        for name, (k, v) in fp32_kv.items():
            layer = adapter.layer(name)
            assert torch.equal(layer.to_k_ip.weight, k) and torch.equal(layer.to_v_ip.weight, v)
    finally:
        attachment.detach()


def test_attach_refuses_an_adapter_on_another_device_without_moving_it() -> None:
    unet = factories.sd15_unet()
    adapter = _new_adapter(unet).to("meta")
    with pytest.raises(IPAdapterError, match="is on meta but the UNet on cpu"):
        attach(unet, adapter)
    assert adapter.device == torch.device("meta")
    assert not any("IPAttn" in type(p).__name__ for p in unet.attn_processors.values())
