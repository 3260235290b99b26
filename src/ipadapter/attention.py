"""The one attention processor behind every variant and feature.

Z = softmax(Q Kᵀ/√d) V + Σ_adapters Σ_groups w · mask ⊙ softmax(Q K'ᵀ/√d) V', summed before `to_out`
(decoupled cross-attention), plus optional FaceID LoRA deltas on q/k/v/out. The paper's "simple adapter" ablation
(`attention="concat"`) instead appends the image tokens to the text tokens of the frozen attention. When nothing of ours acts on a call
(scale 0, outside the step window, layer weight 0, no prompt set) it hands the call to the layer's original
processor, so the output is bitwise the base model's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ipadapter.adapter import AdapterLayer
from ipadapter.layers import AttentionLayer
from ipadapter.runtime import AdapterPrompt, Runtime


def token_grid(seq_len: int, latent_hw: tuple[int, int] | None, mask_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer's tokens: exact from the latent size when known, else diffusers' estimate."""
    if latent_hw is not None:
        h, w = latent_hw
        for _ in range(8):
            if h * w == seq_len:
                return h, w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    aspect = mask_hw[1] / mask_hw[0]
    gh = int(math.sqrt(seq_len / aspect))
    gh += int(seq_len % gh != 0)
    return gh, seq_len // gh


def resize_mask(mask: torch.Tensor, seq_len: int, latent_hw: tuple[int, int] | None) -> torch.Tensor:
    """(H, W) mask → (seq_len, 1) weights on the layer's token grid (bicubic, as diffusers), padded or cropped."""
    gh, gw = token_grid(seq_len, latent_hw, tuple(mask.shape[-2:]))
    lo, hi = mask.min(), mask.max()
    if lo == hi:
        flat = mask.new_full((gh * gw,), float(lo))
    else:
        # Bicubic as diffusers, clamped: its overshoot near an edge would otherwise subtract the reference there.
        flat = F.interpolate(mask[None, None].float(), size=(gh, gw), mode="bicubic").clamp(0, 1).flatten()
    if flat.numel() < seq_len:
        flat = torch.cat([flat, flat.new_zeros(seq_len - flat.numel())])
    return flat[:seq_len, None]


class IPAttnProcessor(nn.Module):
    """Replaces one attention layer's processor while adapters are attached; keeps the original to restore it."""

    def __init__(self, layer: AttentionLayer, original: Any, runtime: Runtime, adapters: dict[str, AdapterLayer]) -> None:
        super().__init__()
        self.layer = layer
        self.original = original
        self.runtime = runtime
        self.adapters = nn.ModuleDict(adapters)
        self._cache: dict[tuple, object] = {}
        self._cache_generation = -1

    def _active(self, progress: float | None) -> list[tuple[str, AdapterPrompt, AdapterLayer, float]]:
        active = []
        for name, weights in self.adapters.items():
            prompt = self.runtime.prompts.get(name)
            if prompt is None:
                continue
            w = prompt.layer_weight(self.layer.name) * prompt.step_factor(progress) if weights.has_ip else 0.0
            lora = weights.has_lora and prompt.lora_scale != 0.0
            if w != 0.0 or lora or (weights.has_ip and self.layer.name in prompt.uncond_layers):
                active.append((name, prompt, weights, w))
        return active

    @torch.compiler.disable
    def __call__(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        active = self._active(self.runtime.progress)
        if not active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len = hidden_states.shape[0], hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        for _, prompt, weights, _ in active:
            if weights.has_lora and prompt.lora_scale:
                s = prompt.lora_scale
                query = query + s * weights.to_q_lora(hidden_states).to(query.dtype)
                key = key + s * weights.to_k_lora(context).to(key.dtype)
                value = value + s * weights.to_v_lora(context).to(value.dtype)

        concat = [(n, p, wt, w) for n, p, wt, w in active if wt.concat and w > 0.0]
        if concat and self.layer.cross and encoder_hidden_states is not None:
            key, value, attention_mask = self._concat(attn, concat, key, value, attention_mask, batch)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, h, L, d)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)  # (B, L, h*d)

        if self.layer.cross and encoder_hidden_states is not None:
            for name, prompt, weights, w in active:
                if weights.has_ip and not weights.concat and (w != 0.0 or self.layer.name in prompt.uncond_layers):
                    out = out + self._image_branch(name, prompt, weights, w, query, seq_len)

        hidden = attn.to_out[0](out)
        for _, prompt, weights, _ in active:
            if weights.has_lora and prompt.lora_scale:
                hidden = hidden + prompt.lora_scale * weights.to_out_lora(out).to(hidden.dtype)
        hidden = attn.to_out[1](hidden)
        if input_ndim == 4:
            hidden = hidden.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor

    def _concat(
        self, attn: nn.Module, concat: list[tuple[str, AdapterPrompt, AdapterLayer, float]], key: torch.Tensor,
        value: torch.Tensor, attention_mask: torch.Tensor | None, batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The "simple adapter": image tokens through the frozen to_k/to_v, appended to the text keys and values.

        A weight w becomes an additive log(w) on the image columns' logits, i.e. their unnormalised attention is
        multiplied by w (w = 1: the plain concatenation the ablation trains with).
        """
        keys, values, bias = [key], [value], [key.new_zeros(key.shape[1])]
        for name, prompt, _, w in concat:
            tokens = torch.cat([self.runtime.batch_tokens(r.cond, r.uncond, batch) for r in prompt.references], dim=1)
            tokens = tokens.to(key.dtype)
            keys.append(attn.to_k(tokens))
            values.append(attn.to_v(tokens))
            bias.append(key.new_full((tokens.shape[1],), math.log(w)))
        key, value, bias = torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.cat(bias)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(attention_mask, dtype=key.dtype).masked_fill(~attention_mask, -math.inf)
            pad = bias[attention_mask.shape[-1]:].expand(*attention_mask.shape[:-1], -1)
            return key, value, torch.cat([attention_mask, pad], dim=-1)
        return key, value, (bias.view(1, 1, 1, -1) if bool(bias.any()) else None)

    def _groups(self, prompt: AdapterPrompt) -> list[tuple[int, list[int], torch.Tensor | None]]:
        """Unmasked references share one attention over their concatenated tokens; each masked one is its own."""
        precise = self.layer.name in prompt.uncond_layers
        here = [i for i, r in enumerate(prompt.references) if precise or r.weight_at(self.layer.name) != 0.0]
        plain = [i for i in here if prompt.references[i].mask is None]
        groups = [(0, plain, None)] if plain else []
        groups += [(1 + i, [i], prompt.references[i].mask) for i in here if prompt.references[i].mask is not None]
        return groups

    def _kv(
        self, name: str, prompt: AdapterPrompt, weights: AdapterLayer, group: int, refs: list[int], batch: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K'/V' of a reference group laid out on the batch, computed once per generation when caching is allowed."""
        precise = self.layer.name in prompt.uncond_layers
        cacheable = self.runtime.cache_kv and not torch.is_grad_enabled()
        key = (name, group, batch, precise, dtype)
        if cacheable and self._cache_generation == self.runtime.generation and key in self._cache:
            return self._cache[key]
        ks, vs = [], []
        for i in refs:
            ref = prompt.references[i]
            # "Precise" layers: the reference moves to the unconditional rows, pushing guidance away from it.
            uncond = ref.cond if precise else ref.uncond
            tokens = self.runtime.batch_tokens(ref.cond, uncond, batch).to(weights.to_k_ip.weight.dtype)
            factor = ref.weight if precise else ref.weight_at(self.layer.name)
            ks.append(weights.to_k_ip(tokens))
            vs.append(weights.to_v_ip(tokens) * factor if factor != 1.0 else weights.to_v_ip(tokens))
        k, v = torch.cat(ks, dim=1).to(dtype), torch.cat(vs, dim=1).to(dtype)  # (B, T, width)
        if cacheable:
            if self._cache_generation != self.runtime.generation:
                self._cache, self._cache_generation = {}, self.runtime.generation
            self._cache[key] = (k, v)
        return k, v

    def _image_branch(
        self, name: str, prompt: AdapterPrompt, weights: AdapterLayer, w: float, query: torch.Tensor, seq_len: int
    ) -> torch.Tensor:
        batch = query.shape[0]
        precise = self.layer.name in prompt.uncond_layers
        if precise:
            if not self.runtime.cfg:
                return 0
            w = prompt.scale * prompt.step_factor(self.runtime.progress)
        # One group at a time, added up as it goes: at most one group's (B, L, C) output is alive besides the sum.
        total = None  # not 0: `0 + o` would copy the first group's output on every call
        for group, refs, mask in self._groups(prompt):
            k, v = self._kv(name, prompt, weights, group, refs, batch, query.dtype)
            out_scale = w
            if prompt.scaling != "v":
                k, v, out_scale = scale_embeds(k, v, w, prompt.scaling, self.layer.width)
            m = self._mask(name, group, mask, seq_len, query.device)
            o = self._attend(query, k, v)
            if out_scale != 1.0:
                o = o * out_scale
            if precise:
                o = o * torch.arange(batch, device=o.device).lt(batch // 2).to(o.dtype)[:, None, None]
            if m is not None:
                o = o * m.to(o.dtype)
            total = o if total is None else total + o
        return 0 if total is None else total

    @staticmethod
    def _attend(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(Q K'ᵀ/√d) V' of one reference group → (B, L, h·d).

        One call per group: batching equal-length (masked) groups into one call needs a copy of Q per group, and
        measured slower (1.3-1.8x on CPU at SD layer sizes) and larger (a 512 px SD1.5 layer: +20 MiB) than this.
        """
        batch, heads, _, head_dim = query.shape
        k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(query, k, v, dropout_p=0.0, is_causal=False)
        return o.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)

    def _mask(self, name: str, group: int, mask: torch.Tensor | None, seq_len: int, device: torch.device) -> torch.Tensor | None:
        """The mask on this layer's token grid (None when it is all ones), resized once per generation."""
        if mask is None:
            return None
        key = ("mask", name, group, seq_len, self.runtime.latent_hw, device)
        if self._cache_generation == self.runtime.generation and key in self._cache:
            return self._cache[key]
        m = resize_mask(mask.to(device), seq_len, self.runtime.latent_hw)
        m = None if bool((m == 1).all()) else m
        if self._cache_generation != self.runtime.generation:
            self._cache, self._cache_generation = {}, self.runtime.generation
        self._cache[key] = m
        return m


def scale_embeds(k: torch.Tensor, v: torch.Tensor, w: float, mode: str, width: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ComfyUI's embeds scaling modes; returns (k, v, factor still to apply to the output)."""
    if mode == "kv":
        return k * w, v * w, 1.0
    penalty = w * width / 1280.0
    if mode == "kv_penalty":
        return k * penalty, v * penalty, 1.0
    mean = v.mean(dim=1, keepdim=True)  # k_mean_v: only the token-mean part of V is scaled
    return k * penalty, (v - mean) + mean * penalty, 1.0
