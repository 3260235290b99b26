"""CPU offload, which users with little GPU memory turn on. Model offload (`pipe.enable_model_cpu_offload()`) moves
each model to the accelerator only while it runs; sequential offload (`enable_sequential_cpu_offload()`) each module,
its weights on the meta device in between. The adapter's layers sit inside the denoiser and move with it; its
projection head and the image encoder, loaded where the denoiser was (the CPU), stay there, so the tokens they make
must follow the call. Images must equal those of the same pipeline kept on the accelerator.

On a machine without CUDA the model offload device is the CPU itself: accelerate's hooks still wrap every model and
run around ours, but nothing moves. The CUDA cases run where a GPU is lent (`scripts/gpu_checks.sh`, `cuda-tests`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ipadapter
from tests import dit_factories as df
from tests import factories

DEVICES = ["cpu", "cuda"]


def _sd15(root: Path):
    from diffusers import StableDiffusionPipeline

    folder = factories.save_tiny_sd15_pipeline(root, adapters=("plus",))
    return (lambda: StableDiffusionPipeline.from_pretrained(str(folder))), root / "plus.bin", dict(
        prompt="a red", steps=2, guidance=6.0, height=32, width=32)


def _flux(root: Path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    folder = df.save_flux_base(root)
    save_file(df.xlabs_state(), str(root / "ip_adapter.safetensors"))
    return (lambda: FluxPipeline.from_pretrained(str(folder))), root / "ip_adapter.safetensors", dict(
        prompt="a cat", steps=2, guidance=3.5, height=16, width=16, max_sequence_length=8, true_cfg_scale=3.0,
        negative_prompt="blurry")


def _sd3(root: Path):
    from diffusers import StableDiffusion3Pipeline

    folder = df.save_sd3_base(root)
    torch.save(df.instantx_state(), root / "ip-adapter.bin")
    return (lambda: StableDiffusion3Pipeline.from_pretrained(str(folder))), root / "ip-adapter.bin", dict(
        prompt="a cat", steps=2, guidance=4.0, height=16, width=16, max_sequence_length=8)


BASES = {"sd15": _sd15, "flux": _flux, "sd3": _sd3}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# Sequential offload needs an accelerator: with the CPU as its device, accelerate fails on a plain pipeline. SD 3's
# branch reads the block's own `to_out` weight outside that module's call, which sequential offload has on the meta
# device then: left out.
CASES = [pytest.param(base, "model", device, marks=CUDA if device == "cuda" else ())
         for base in BASES for device in DEVICES] + [
    pytest.param("sd15", "sequential", "cuda", marks=CUDA), pytest.param("flux", "sequential", "cuda", marks=CUDA)]


@pytest.mark.parametrize("base, offload, device", CASES)
def test_images_under_offload_equal_those_on_the_device(tmp_path, base: str, offload: str, device: str) -> None:
    build, adapter, settings = BASES[base](tmp_path)
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))

    def generate(pipe, offload: str | None = None) -> tuple[np.ndarray, torch.device]:
        pipe.set_progress_bar_config(disable=True)
        if offload == "model":  # before loading: the adapter and encoder are placed where the denoiser waits
            pipe.enable_model_cpu_offload(device=device)
        with ipadapter.load(pipe, str(adapter)) as prompter:
            if offload == "sequential":  # only after loading (the weights are on the meta device then)
                pipe.enable_sequential_cpu_offload(device=device)
            images = prompter.generate(reference, scale=0.7, seed=1, output_type="np", **settings)
            return np.stack(images), next(prompter.adapters["0"].image_proj.parameters()).device

    kept, kept_on = generate(build().to(device))
    moved, head_on = generate(build(), offload)
    assert kept_on.type == device and head_on.type == "cpu", "the head stays where offload left the denoiser"
    np.testing.assert_allclose(moved, kept, atol=1e-4, rtol=0)
    assert np.abs(kept - _plain(build(), device, settings)).max() > 1e-3, "the adapter changes the image"


def test_loading_into_a_sequentially_offloaded_pipeline_is_one_sentence(tmp_path) -> None:
    build, adapter, _ = BASES["sd15"](tmp_path)
    pipe = build()
    pipe.enable_sequential_cpu_offload(device="cpu")  # the weights go to the meta device whatever the device
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ipadapter.IPAdapterError) as caught:
        ipadapter.load(pipe, str(adapter))
    assert str(caught.value) == ("the pipeline's weights are offloaded module by module "
                                 "(enable_sequential_cpu_offload): load the adapters first, then turn offloading on")
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())


def _plain(pipe, device: str, settings: dict) -> np.ndarray:
    """The same generation without any adapter, through diffusers' own call."""
    pipe.to(device).set_progress_bar_config(disable=True)
    call = {k: v for k, v in settings.items() if k not in ("steps", "guidance")}
    return pipe(**call, num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                generator=torch.Generator().manual_seed(1), output_type="np").images
