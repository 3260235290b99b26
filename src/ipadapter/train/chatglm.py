"""Kolors' text side in a UNet run: its ChatGLM tokenizer and encoder, loaded from the base and run on captions as
diffusers' `KolorsPipeline.encode_prompt` runs them, so an adapter trains on the text states it will generate with.

A Kolors UNet is SDXL-shaped, but it projects its text input itself (`encoder_hid_dim_type: "text_proj"`, ChatGLM's
4096-wide states to 2048): that is how a Kolors base is told from the UNet's config alone, before any weights load.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ipadapter.errors import IPAdapterError, first_clause

MAX_LENGTH = 256  # tokens a caption is padded to: KolorsPipeline's `max_sequence_length`


def is_kolors(unet_config: Mapping[str, Any]) -> bool:
    """Whether the UNet (its config, a diffusers `FrozenDict` or a dict) reads ChatGLM's states through its own text
    projection (Kolors)."""
    return unet_config.get("encoder_hid_dim_type") == "text_proj"


def load(source: str) -> tuple[Any, nn.Module]:
    """The base's tokenizer and text encoder (diffusers' copies of ChatGLM's); the tokenizer's vocabulary needs
    sentencepiece, which the `kolors` extra brings."""
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

    from ipadapter.sources import base_part, require_vocabulary

    require_vocabulary(ChatGLMTokenizer.__name__, source, "the base model")
    try:
        tokenizer = base_part(ChatGLMTokenizer, source, "tokenizer", "tokenizer")
    except ImportError as err:
        raise IPAdapterError(f"cannot load the tokenizer of {source}: {first_clause(str(err))}; for Kolors: "
                             "pip install 'ipadapter[kolors]'") from None
    return tokenizer, base_part(ChatGLMModel, source, "text encoder", "text_encoder")


@torch.no_grad()
def encode(tokenizer: Any, encoder: nn.Module, texts: list[str], device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 256, C) prompt states (the second-to-last layer's) and (B, C) pooled (the last layer at the last token;
    the tokenizer pads on the left, so that is the caption's end)."""
    tokens = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    out = encoder(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
                  position_ids=tokens["position_ids"].to(device), output_hidden_states=True)
    return out.hidden_states[-2].permute(1, 0, 2).contiguous(), out.hidden_states[-1][-1].contiguous()


def from_config(base: str) -> nn.Module:
    """The encoder built from the base's config alone, for counting (the dry run builds it on the meta device)."""
    from diffusers.pipelines.kolors import ChatGLMModel

    from ipadapter.sources import from_cache_or_hub

    try:
        config = from_cache_or_hub(lambda local: ChatGLMModel.config_class.from_pretrained(
            base, subfolder="text_encoder", local_files_only=local), base, "the base model")
    except OSError as err:
        raise IPAdapterError(f"cannot read {base}/text_encoder: {first_clause(str(err))}") from None
    return ChatGLMModel(config)
