"""Which published layout a file's keys are in: the UNet adapters', XLabs' FLUX or InstantX's SD 3.

A leaf module (keys only) so checkpoint.py can name the right base for a transformer file without importing the
transformer code. The layouts are listed in docs/checkpoints.md.
"""

from __future__ import annotations

from collections.abc import Iterable

FLUX_PREFIXES = ("ip_adapter_proj_model.", "double_blocks.")


def published_layout(keys: Iterable[str]) -> str | None:
    """"flux", "sd3", "unet", or None when no IP-Adapter layout matches. FLUX files in diffusers' own nested form
    ("image_proj" / "ip_adapter.{i}.to_k_ip") are the only ones with biased K'; SD 3 files the only ones with a
    timestep embedding in the projection and an AdaNorm per block."""
    keys = list(keys)
    if any(k.startswith(FLUX_PREFIXES) for k in keys):
        return "flux"
    if any(k.startswith("ip_adapter.") and k.endswith(".to_k_ip.bias") for k in keys):
        return "flux"
    if any(k.startswith("image_proj.time_embedding.") or ".norm_ip.linear." in k for k in keys):
        return "sd3"
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        return "unet"
    return None
