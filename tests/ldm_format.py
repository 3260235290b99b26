"""A diffusers SD 1.5- or SDXL-layout pipeline written as one file in the original (CompVis LDM) layout, the way web
UIs, ComfyUI and model sites keep checkpoints: the fixture for loading a single-file base. Written from the LDM names
(`model.diffusion_model.input_blocks…`, `first_stage_model.encoder.down…`, `cond_stage_model.transformer…`,
`conditioner.embedders.1.model.transformer.resblocks…`), so diffusers' own `from_single_file`, reading them back, is
the independent side of a round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(state: dict[str, torch.Tensor], prefix: str, to: str, names: dict[str, str] | None = None) -> dict:
    """The tensors under `prefix`, moved under `to`, their first name part renamed by `names`."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for old, new in (names or {}).items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
            out[to + rest] = value
    return out


def unet_state(unet: Any) -> dict[str, torch.Tensor]:
    """The UNet's weights by LDM name: input blocks count (resnet, attention) pairs and downsamplers in one list,
    output blocks count resnets with their attention and upsampler; the mid block is resnet, attention, resnet."""
    state, per = unet.state_dict(), unet.config.layers_per_block
    out = {**_renamed(state, "time_embedding.linear_1", "time_embed.0"),
           **_renamed(state, "time_embedding.linear_2", "time_embed.2"),
           **_renamed(state, "conv_in", "input_blocks.0.0"), **_renamed(state, "conv_norm_out", "out.0"),
           **_renamed(state, "conv_out", "out.2")}
    for i in range(len(unet.config.block_out_channels)):
        for j in range(per):
            block = 1 + i * (per + 1) + j
            out |= _renamed(state, f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", RESNET)
            out |= _renamed(state, f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.")
        out |= _renamed(state, f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op.")
        for j in range(per + 1):
            block = i * (per + 1) + j
            out |= _renamed(state, f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", RESNET)
            out |= _renamed(state, f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.")
        has_attention = any(key.startswith(f"up_blocks.{i}.attentions.") for key in state)
        last = i * (per + 1) + per
        out |= _renamed(state, f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if has_attention else 1}.")
    out |= _renamed(state, "add_embedding.linear_1", "label_emb.0.0")  # SDXL's size and pooled-text conditioning
    out |= _renamed(state, "add_embedding.linear_2", "label_emb.0.2")
    out |= _renamed(state, "mid_block.resnets.0.", "middle_block.0.", RESNET)
    out |= _renamed(state, "mid_block.attentions.0.", "middle_block.1.")
    out |= _renamed(state, "mid_block.resnets.1.", "middle_block.2.", RESNET)
    assert len(out) == len(state), "a UNet weight has no LDM name here"
    return {UNET + key: value for key, value in out.items()}


def vae_state(vae: Any) -> dict[str, torch.Tensor]:
    """The VAE's weights by LDM name: the decoder's `up` list runs from the highest resolution, the reverse of
    diffusers' `up_blocks`, and the mid attention's projections are 1×1 convolutions."""
    state, levels = vae.state_dict(), len(vae.config.block_out_channels)
    out = {}
    for part in ("encoder", "decoder"):
        out |= {f"{part}.{name}.{p}": state[f"{part}.{name}.{p}"] for name in ("conv_in", "conv_out")
                for p in ("weight", "bias")}
        out |= _renamed(state, f"{part}.conv_norm_out.", f"{part}.norm_out.")
        out |= _renamed(state, f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.")
        out |= _renamed(state, f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")
        for diffusers_name, ldm in VAE_ATTENTION.items():
            for p in ("weight", "bias"):
                value = state[f"{part}.mid_block.attentions.0.{diffusers_name}.{p}"]
                out[f"{part}.mid.attn_1.{ldm}.{p}"] = value[:, :, None, None] if value.dim() == 2 else value
    for i in range(levels):
        out |= _renamed(state, f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
        out |= _renamed(state, f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.")
        up = levels - 1 - i
        out |= _renamed(state, f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{up}.block.")
        out |= _renamed(state, f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.")
    out = {key.replace("conv_shortcut", "nin_shortcut"): value for key, value in out.items()}
    for name in ("quant_conv", "post_quant_conv"):
        out |= _renamed(state, f"{name}.", f"{name}.")
    assert len(out) == len(state), "a VAE weight has no LDM name here"
    return {VAE + key: value for key, value in out.items()}


def _text_model(key: str) -> str:
    """The text encoder's names as in SD 1.5's file, under `text_model.` (transformers ≥ 5.6 dropped that level from
    CLIPTextModel's own names)."""
    return key if key.startswith("text_model.") else "text_model." + key


def open_clip_text_state(encoder: Any) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection by OpenCLIP's names (SDXL's second text encoder): one packed q/k/v projection
    per layer (`attn.in_proj_weight`), `ln_1`/`ln_2`, `mlp.c_fc`/`c_proj`, and the text projection stored
    transposed, (width, projection)."""
    state = {_text_model(key) if not key.startswith("text_projection") else key: value
             for key, value in encoder.state_dict().items()}
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].T}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(encoder.config.num_hidden_layers):
        layer, block = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[block + f"attn.in_proj_{p}"] = torch.cat([state[layer + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for theirs, ours in names.items():
                out[block + f"{ours}.{p}"] = state[layer + f"{theirs}.{p}"]
    return out


def write_single_file(pipe: Any, path: Path) -> Path:
    """`pipe`'s UNet, VAE and text encoder(s) in one safetensors file, as an SD 1.5 or SDXL checkpoint is shared:
    SDXL keeps its first text encoder under `conditioner.embedders.0.transformer.`, its second in OpenCLIP's layout
    under `conditioner.embedders.1.model.`."""
    text = pipe.text_encoder.state_dict().items()
    state = {**unet_state(pipe.unet), **vae_state(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is None:
        state |= {TEXT + _text_model(key): value for key, value in text}
    else:
        state |= {"conditioner.embedders.0.transformer." + _text_model(key): value for key, value in text}
        state |= {"conditioner.embedders.1.model." + key: value
                  for key, value in open_clip_text_state(pipe.text_encoder_2).items()}
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path
