"""The SigLIP vision encoder the SD 3.5 IP-Adapter reads (InstantX: so400m-patch14-384), behind `ImageEncoder`'s API.

Its features are the penultimate hidden states (no class token, so patches only); there is no global embedding.
The unconditional input is zero features, as the SD 3 pipeline and InstantX's training use (not the encoder's
output on zero pixels, which the CLIP Plus adapters use).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ipadapter.encoders import ImageEncoder, _where
from ipadapter.errors import IPAdapterError, first_clause
from ipadapter.sources import from_cache_or_hub


class SiglipEncoder(ImageEncoder):
    """A `SiglipVisionModel` (a full SigLIP checkpoint loads its vision tower) with its image processor."""

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, *, subfolder: str | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ) -> "SiglipEncoder":
        from transformers import SiglipImageProcessor, SiglipVisionModel

        kwargs = {"subfolder": subfolder} if subfolder else {}

        def read(local: bool) -> tuple[Any, object]:
            model = SiglipVisionModel.from_pretrained(str(source), dtype=dtype, local_files_only=local, **kwargs)
            try:
                processor = SiglipImageProcessor.from_pretrained(str(source), local_files_only=local, **kwargs)
            except (OSError, ValueError):
                size = model.config.image_size
                processor = SiglipImageProcessor(size={"height": size, "width": size})
            return model, processor

        try:
            model, processor = from_cache_or_hub(read, str(source), "the image encoder", subfolder=subfolder)
        except (OSError, ValueError, RuntimeError) as err:
            raise IPAdapterError(f"could not load a SigLIP vision encoder from {_where(source, subfolder)}: "
                                 f"{first_clause(str(err))}") from None
        return cls(model.to(device), processor, name=_where(source, subfolder))

    @property
    def global_dim(self) -> int:
        return 0

    @property
    def patch_tokens(self) -> int:
        config = self.model.config
        return (config.image_size // config.patch_size) ** 2

    def encode_pixels(self, pixels: torch.Tensor, features: str) -> torch.Tensor:
        """The CLIP encoder's patch path (penultimate hidden states, `penultimate_hidden_states`); no global one."""
        if features != "patch":
            raise IPAdapterError("a SigLIP encoder gives patch features only; this adapter needs a CLIP encoder")
        return super().encode_pixels(pixels, features)  # (B, P, H)

    def uncond(self, features: str, *, keep: bool = True) -> torch.Tensor:
        """Zero patch features (nothing to keep: `keep` is the CLIP encoder's)."""
        return torch.zeros(1, self.patch_tokens, self.patch_dim, device=self.device, dtype=self.dtype)


def encoder_class(source: str, subfolder: str | None) -> type[ImageEncoder]:
    """SigLIP for a folder whose config says so, CLIP otherwise (whose loader reports a missing folder). An uncached Hub
    id the Hub cannot serve fails here, at once (`from_cache_or_hub`)."""
    from transformers import AutoConfig

    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        config = from_cache_or_hub(lambda local: AutoConfig.from_pretrained(source, local_files_only=local, **kwargs),
                                   source, "the image encoder", subfolder=subfolder)
    except (OSError, ValueError):
        return ImageEncoder
    return SiglipEncoder if "siglip" in getattr(config, "model_type", "") else ImageEncoder
