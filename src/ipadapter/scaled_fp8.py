"""ComfyUI's "scaled" fp8 files (`flux_dev_fp8_scaled`, `sd3.5_large_fp8_scaled`): each linear weight stored in fp8
after division by a scale kept beside it, so that fp8's narrow range holds the weight's own. diffusers' single-file
loaders read the fp8 values and leave the scales unread, which makes weights hundreds to thousands of times too large
and images noise; so the weights are multiplied back here, before diffusers converts the layout.

Two layouts mark a file. The older: a `scaled_fp8` tensor, and per layer `{layer}.scale_weight` (and `scale_input`,
the activations' scale for fp8 matrix products, not needed once the weight is dequantized). The newer: per layer
`{layer}.comfy_quant` (its format, JSON as bytes), `{layer}.weight_scale` (and `input_scale`). One scale per weight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

from ipadapter.errors import IPAdapterError

MARKER = "scaled_fp8"
SCALES = ("scale_weight", "weight_scale")  # the older layout's name, the newer's
UNREAD = ("scale_input", "input_scale", "comfy_quant")  # what the dequantized weights no longer need
FORMATS = ("float8_e4m3fn", "float8_e5m2")  # the newer layout's formats that are fp8 with one scale
DENOISER = "model.diffusion_model."  # the prefix of the denoiser's weights in a file that also holds other parts


def is_scaled(keys: Iterable[str]) -> bool:
    """Whether a file with these tensor names stores scaled weights (its header alone tells)."""
    return any(key.split(".")[-1] in (MARKER, *SCALES) for key in keys)


def dequantized(path: str | os.PathLike, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The denoiser's weights of a scaled file, each scaled weight as `(stored · scale)` in `dtype` (computed in
    float32), every other tensor as stored; the scales and markers left out. A file that also holds text encoders and
    a VAE gives its `model.diffusion_model.` weights alone, which is all a transformer's loader reads."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        wanted = {key for key in keys if key.startswith(DENOISER)} or keys
        out = {}
        for key in sorted(wanted):
            name = key.split(".")[-1]
            if name in (MARKER, *SCALES, *UNREAD):
                continue
            layer = key.removesuffix(".weight")
            scale = next((f"{layer}.{s}" for s in SCALES if f"{layer}.{s}" in keys), None)
            if not key.endswith(".weight") or scale is None:
                out[key] = f.get_tensor(key)
                continue
            if f"{layer}.comfy_quant" in keys:
                _check_format(path, layer, f.get_tensor(f"{layer}.comfy_quant"))
            factor = f.get_tensor(scale)
            if factor.numel() != 1:
                raise IPAdapterError(f"{path}: {scale} holds {factor.numel()} scales; ipadapter reads scaled fp8 "
                                     "files with one scale per weight")
            out[key] = (f.get_tensor(key).float() * factor.float().reshape(())).to(dtype)
    return out


def _check_format(path: str | os.PathLike, layer: str, conf: torch.Tensor) -> None:
    """Refuses a layer quantized as anything but fp8 with one scale (nvfp4's block scales, say), in one line."""
    try:
        kind = json.loads(bytes(conf.tolist())).get("format")
    except (ValueError, AttributeError):
        kind = "an unreadable format"
    if kind not in FORMATS:
        raise IPAdapterError(f"{path}: {layer} is quantized as {kind}, which ipadapter does "
                             f"not read (it reads {' and '.join(FORMATS)} with one scale per weight); use the model's "
                             "bf16 or fp8 file")
