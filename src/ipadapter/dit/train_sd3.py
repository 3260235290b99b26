"""Training an SD 3 / 3.5 IP-Adapter in InstantX's layout: the paper's recipe on SD 3's rectified-flow loss.

Trainable: the timestep-aware resampler over SigLIP patch features and, per joint block, the image branch (the IP
tokens' AdaNorm, K'/V', the RMS norms of the image query and keys). A new adapter starts as the paper's: K'/V' copied
from each block's text-stream key and value projections (and the block's own query/key norms, where it has them),
the AdaNorm's modulation at zero. A dropped image is zero features, the SD 3 pipeline's unconditional input.

σ is drawn as SD 3 is trained, and as diffusers' SD 3 training scripts draw it: u = sigmoid(n), n ~ N(0, 1)
(logit-normal), put on the base scheduler's shifted schedule σ = s·u / (1 + (s − 1)·u) (s: its `shift`, 3 for SD
3.5). The transformer gets t = 1000·σ, as the pipeline passes it. The result is written in InstantX's key layout as
safetensors, which diffusers' `StableDiffusion3Pipeline.load_ip_adapter` reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ipadapter.adapter import AdapterConfig
from ipadapter.atomic import save_safetensors
from ipadapter.dit.adapter import DiTAdapter
from ipadapter.dit.blocks import dit_blocks
from ipadapter.dit.flow import SigmaDraw, TransformerFamily, vae_latents
from ipadapter.encoders import ImageEncoder
from ipadapter.projection.detect import new_projection
from ipadapter.validation import vae_downscale

TIMESTEP = 1000.0  # the SD 3 pipeline passes t = 1000·σ
T5_TOKENS = 256  # T5's states per caption, after the CLIP tokenizer's (77): the pipeline's default max_sequence_length
# A block's own norm whose weights the adapter's starts from: (the adapter's, the block's).
NORMS = (("norm_q", "norm_q"), ("norm_k", "norm_k"), ("norm_ip_k", "norm_added_k"))


def new_sd3_adapter(transformer: nn.Module, *, feature_dim: int, tokens: int = 64) -> DiTAdapter:
    """An untrained adapter for `transformer`: IP tokens as wide as its blocks (InstantX: 2432 for SD 3.5 Large),
    reading `feature_dim`-wide patch features, started from the text branch (module docstring)."""
    blocks = dit_blocks(transformer)
    projection = new_projection("time_resampler", cross_dim=blocks[0].width, tokens=tokens, hidden_dim=feature_dim)
    adapter = DiTAdapter(AdapterConfig(variant="sd3", projection=projection, base="sd3"), blocks)
    with torch.no_grad():
        for name, weights in adapter.named_layers():
            attn = transformer.get_submodule(name)
            for mine, theirs in ((weights.to_k_ip, attn.add_k_proj), (weights.to_v_ip, attn.add_v_proj)):
                if mine.weight.shape == theirs.weight.shape:
                    mine.weight.copy_(theirs.weight)
            for mine, theirs in NORMS:
                norm = getattr(attn, theirs, None)
                if getattr(norm, "weight", None) is not None:
                    getattr(weights, mine).weight.copy_(norm.weight)
            nn.init.zeros_(weights.norm_ip.linear.weight)
            nn.init.zeros_(weights.norm_ip.linear.bias)
    return adapter


def save_instantx(adapter: DiTAdapter, path: str | os.PathLike) -> Path:
    """InstantX's layout: `image_proj.*` (the resampler, published names), `ip_adapter.{i}.*` per joint block in
    block order, written atomically."""
    flat = {f"image_proj.{k}": v for k, v in adapter.image_proj.state_dict().items()}
    for i, (_, weights) in enumerate(adapter.named_layers()):
        flat.update({f"ip_adapter.{i}.{k}": v for k, v in weights.state_dict().items()})
    return save_safetensors({k: v.detach().contiguous() for k, v in flat.items()}, path)


@dataclass
class Encoded:
    """One batch with every frozen encoder applied."""

    latents: torch.Tensor  # (B, C, h, w)
    text: torch.Tensor
    pooled: torch.Tensor
    empty_text: torch.Tensor
    empty_pooled: torch.Tensor
    image: torch.Tensor  # (B, patches, width): SigLIP's penultimate hidden states

    def rows(self, idx: torch.Tensor) -> "Encoded":
        return Encoded(**{f: getattr(self, f)[idx] for f in self.__dataclass_fields__})

    def call(self, model: nn.Module, x_sigma: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
             pooled: torch.Tensor) -> dict[str, Any]:
        return {"hidden_states": x_sigma, "timestep": sigma * TIMESTEP, "encoder_hidden_states": text,
                "pooled_projections": pooled}


@torch.no_grad()
def empty_prompt(pipe: Any, max_sequence_length: int = T5_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's (text states, pooled embedding), one row: a dropped caption's input, and the SD 3 pipeline's
    own negative prompt."""
    text, _, pooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=max_sequence_length)
    return text, pooled


@torch.no_grad()
def features(pipe: Any, encoder: ImageEncoder, pixels: torch.Tensor, image_pixels: torch.Tensor,
             captions: list[str], max_sequence_length: int = T5_TOKENS) -> dict[str, torch.Tensor]:
    """Per sample: the VAE latents of `pixels` in [-1, 1], the three text encoders' states and pooled embedding of
    the caption, the patch features of `image_pixels` (the encoder's processor's output)."""
    text, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=max_sequence_length)
    return {"latents": vae_latents(pipe.vae, pixels), "text": text, "pooled": pooled,
            "image": encoder.encode_pixels(image_pixels, "patch")}


def assemble(rows: dict[str, torch.Tensor], empty: tuple[torch.Tensor, torch.Tensor]) -> Encoded:
    """The batch of `features` rows, the empty prompt once per sample."""
    b = rows["latents"].shape[0]
    empty_text, empty_pooled = empty
    return Encoded(rows["latents"], rows["text"], rows["pooled"], empty_text.expand(b, -1, -1),
                   empty_pooled.expand(b, -1), rows["image"])


def shifted_logit_normal(pipe: Any) -> SigmaDraw:
    """The σ draw of the module docstring, with the shift of `pipe`'s scheduler."""
    shift = float(pipe.scheduler.config.shift)  # a flow-matching scheduler always has one (1.0 unless set)

    def draw(rows: int, g: torch.Generator) -> torch.Tensor:
        u = torch.sigmoid(torch.randn(rows, generator=g))
        return shift * u / (1 + (shift - 1) * u)

    return draw


FAMILY = TransformerFamily(
    name="SD 3", variant="sd3", pipeline="StableDiffusion3Pipeline", transformer="SD3Transformer2DModel",
    readers="InstantX's SD 3.5 layout (diffusers' `StableDiffusion3Pipeline.load_ip_adapter`)", image_features="patch",
    new_adapter=lambda transformer, width, tokens: new_sd3_adapter(transformer, feature_dim=width, tokens=tokens),
    features=features, assemble=assemble, empty_prompt=empty_prompt, sigmas=shifted_logit_normal, save=save_instantx,
    size_step=lambda vae, transformer: vae_downscale(vae) * transformer["patch_size"],
    size_rule="VAE downscale × the transformer's patch size",
    max_size=lambda vae, transformer: transformer["pos_embed_max_size"] * transformer["patch_size"]
    * vae_downscale(vae),  # its learned positions cover that many patches a side
    text_tokens=lambda base: clip_tokens(base) + T5_TOKENS,
)


def clip_tokens(base: str) -> int:
    """The CLIP tokens of a caption's states: the base tokenizer's `model_max_length`, from its config file alone."""
    from ipadapter.train.models import tokenizer_length

    return tokenizer_length(base)
