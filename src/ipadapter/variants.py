"""The adapter families as data: what each projects from, and what a 'dropped' (unconditional) input is."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One family of published adapters.

    features: what the image encoder must deliver — "global" (CLIP `image_embeds`), "patch" (penultimate hidden
    states), "faceid" (an ArcFace embedding), "faceid+patch" (both: ID embedding and patches of the face crop).
    dropped: the unconditional input — zero embedding, zero pixels through the encoder, or zero ID embedding.
    """

    name: str
    head: str
    features: str
    dropped: str
    shortcut: bool = False
    lora: bool = False
    description: str = ""


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("base", "linear", "global", "zero_embeds", description="global CLIP embedding → 4 tokens"),
        Variant("plus", "resampler", "patch", "zero_pixels", description="perceiver resampler over CLIP patches"),
        Variant("full", "token_mlp", "patch", "zero_pixels", description="per-token MLP over all 257 CLIP tokens"),
        Variant("faceid", "faceid", "faceid", "zero_embeds", lora=True, description="ArcFace ID → 4 tokens + LoRA"),
        Variant("faceid-portrait", "faceid", "faceid", "zero_embeds", description="several ArcFace IDs, 16 tokens each"),
        Variant(
            "faceid-plus", "faceid_plus", "faceid+patch", "zero_embeds", lora=True,
            description="ID tokens as perceiver latents over CLIP patches of the face + LoRA",
        ),
        Variant(
            "faceid-plusv2", "faceid_plus", "faceid+patch", "zero_embeds", shortcut=True, lora=True,
            description="FaceID-Plus with the ID-token shortcut (s_scale)",
        ),
    )
}


# How an adapter's image tokens enter the UNet: the paper's decoupled cross-attention, or its "simple adapter"
# ablation (tokens concatenated to the text tokens of the frozen cross-attention).
ATTENTION_MODES = ("decoupled", "concat")


def get_variant(name: str) -> Variant:
    from ipadapter.errors import IPAdapterError

    if name not in VARIANTS:
        raise IPAdapterError(f"unknown adapter variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]
