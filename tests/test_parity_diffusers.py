"""Our adapters against diffusers' own IP-Adapter implementation, on identical weights (the independent oracle)."""

from __future__ import annotations

import copy

import pytest
import torch

from ipadapter import AdapterPrompt, Reference, adapter_from_state_dict, attach, load_adapter
from tests import factories

FAMILIES = ["base", "plus", "full", "faceid", "faceid-plus", "faceid-plusv2"]
ARCHS = {"sd15": (factories.sd15_unet, factories.SD15_CROSS), "sdxl": (factories.sdxl_unet, factories.SDXL_CROSS)}


def features(family: str, batch: int, images: int = 1, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "global": torch.randn(batch, images, 24, generator=g),
        "patch": torch.randn(batch, images, 5, 40, generator=g),
        "id": torch.randn(batch, images, 16, generator=g),
    }


def our_inputs(family: str, f: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, ...]:
    return {
        "base": (f["global"][:, i],), "plus": (f["patch"][:, i],), "full": (f["patch"][:, i],),
        "faceid": (f["id"][:, i],), "faceid-plus": (f["id"][:, i], f["patch"][:, i]),
        "faceid-plusv2": (f["id"][:, i], f["patch"][:, i]),
    }[family]


def diffusers_unet(unet, states: list[dict], families: list[str], f_list: list[dict]):
    ref = copy.deepcopy(unet)
    ref._load_ip_adapter_weights(copy.deepcopy(states), low_cpu_mem_usage=False)
    embeds = []
    for proj, family, f in zip(ref.encoder_hid_proj.image_projection_layers, families, f_list):
        if family.startswith("faceid-plus"):
            proj.clip_embeds = f["patch"]
            proj.shortcut = family == "faceid-plusv2"
            embeds.append(f["id"])
        else:
            embeds.append({"base": f["global"], "plus": f["patch"], "full": f["patch"], "faceid": f["id"]}[family])
    return ref, embeds


def run_unet(unet, arch: str, batch: int, **extra):
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(batch, 4, 16, 16, generator=g)
    text = torch.randn(batch, 6, ARCHS[arch][1], generator=g)
    added = dict(extra.pop("added_cond_kwargs", {}))
    if arch == "sdxl":
        torch.manual_seed(11)
        added.update(factories.sdxl_added_cond(batch))
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added or None, **extra).sample


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("family", FAMILIES)
def test_unet_output_equals_diffusers(arch: str, family: str, tmp_path) -> None:
    make, cross = ARCHS[arch]
    unet = make()
    state = factories.published(unet, family, cross)
    path = tmp_path / f"ip-adapter-{family}.bin"
    torch.save(state, path)
    adapter = load_adapter(path, unet)
    assert adapter.config.variant == family
    f = features(family, batch=2)

    ref, embeds = diffusers_unet(unet, [state], [family], [f])
    expected = run_unet(ref, arch, 2, added_cond_kwargs={"image_embeds": embeds})

    plain = run_unet(unet, arch, 2)
    att = attach(unet, adapter)
    with torch.no_grad():
        tokens = adapter.project(*our_inputs(family, f, 0))
    att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)])})
    got = run_unet(unet, arch, 2)
    att.detach()
    assert (got - plain).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(run_unet(unet, arch, 2), plain), "detach must restore the UNet bitwise"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_several_adapters_and_images_equal_diffusers(arch: str) -> None:
    make, cross = ARCHS[arch]
    unet = make()
    families = ["base", "plus"]
    states = [factories.published(unet, fam, cross, seed=s) for s, fam in enumerate(families, start=1)]
    f_list = [features(fam, batch=2, images=2, seed=5 + i) for i, fam in enumerate(families)]
    ref, embeds = diffusers_unet(unet, states, families, f_list)
    ref.set_attn_processor({k: copy.copy(v) for k, v in ref.attn_processors.items()})
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.7, 0.4]
    expected = run_unet(ref, arch, 2, added_cond_kwargs={"image_embeds": embeds})

    adapters = [adapter_from_state_dict(st, unet) for st in states]
    att = attach(unet, adapters)
    prompts = {}
    for i, (fam, a, f) in enumerate(zip(families, adapters, f_list)):
        with torch.no_grad():
            refs = [Reference(cond=a.project(*our_inputs(fam, f, j))) for j in range(2)]
        prompts[str(i)] = AdapterPrompt(refs, scale=[0.7, 0.4][i])
    att.set_prompts(prompts)
    got = run_unet(unet, arch, 2)
    att.detach()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_equals_diffusers_in_the_same_precision(dtype: torch.dtype, tmp_path) -> None:
    """The fp16/bf16 path: UNet, adapter and tokens in `dtype`, against diffusers' IP-Adapter cast the same way."""
    unet = factories.sd15_unet()
    state = factories.published(unet, "plus", factories.SD15_CROSS)
    torch.save(state, tmp_path / "plus.bin")
    f = features("plus", batch=2)
    ref, embeds = diffusers_unet(unet, [state], ["plus"], [f])
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    text = torch.randn(2, 6, factories.SD15_CROSS, generator=g).to(dtype)
    with torch.no_grad():
        expected = ref.to(dtype)(sample, 500, encoder_hidden_states=text,
                                 added_cond_kwargs={"image_embeds": [e.to(dtype) for e in embeds]}).sample
        plain = unet.to(dtype)(sample, 500, encoder_hidden_states=text).sample
    adapter = load_adapter(tmp_path / "plus.bin", unet)  # made in the UNet's dtype
    att = attach(unet, adapter)
    with torch.no_grad():
        tokens = adapter.project(f["patch"][:, 0].to(dtype))
        att.set_prompts({"0": AdapterPrompt([Reference(cond=tokens)])})
        got = unet(sample, 500, encoder_hidden_states=text).sample
    att.detach()
    assert got.dtype == dtype and adapter.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    assert (expected.float() - plain.float()).abs().max() > 10 * tol  # the image prompt does act
