"""A new adapter's shape, from the variant table and the models' widths (tested as a table)."""

from __future__ import annotations

from ipadapter.adapter import AdapterConfig
from ipadapter.errors import IPAdapterError
from ipadapter.projection.detect import new_projection
from ipadapter.variants import get_variant


def adapter_config_for(
    variant: str, *, cross_dim: int, embed_dim: int = 0, hidden_dim: int = 0, patch_tokens: int = 0, id_dim: int = 512,
    num_tokens: int = 0, lora_rank: int = 128, encoder: str = "", base: str = "", attention: str = "decoupled",
) -> AdapterConfig:
    """A new adapter's config: the variant's head shaped by `new_projection`, its token count unless `num_tokens`
    is given (a per-token head has one token per encoder token, `patch_tokens`), LoRA of `lora_rank` if it has any."""
    v = get_variant(variant)
    if not v.trainable:
        raise IPAdapterError(f"variant {variant!r} cannot be trained")
    tokens = (num_tokens or v.tokens) if v.tokens else patch_tokens
    proj = new_projection(v.head, cross_dim=cross_dim, tokens=tokens, embed_dim=embed_dim, hidden_dim=hidden_dim,
                          id_dim=id_dim)
    return AdapterConfig(variant=variant, projection=proj, lora_rank=lora_rank if v.lora else 0, encoder=encoder,
                         base=base, attention=attention)
