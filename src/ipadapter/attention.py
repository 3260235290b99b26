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
    """Replaces one attention layer's processor while adapters are attached; keeps the original to restore it.

    K'/V' of a reference are computed once per generation, and carried into the next generation when its tokens
    and the adapter's weights are unchanged (a UI re-running with the same reference); resized masks are per
    generation. Image attention is added to the text attention in place, in the heads layout, before `to_out`.
    """

    def __init__(self, layer: AttentionLayer, original: Any, runtime: Runtime, adapters: dict[str, AdapterLayer]) -> None:
        super().__init__()
        self.layer = layer
        self.original = original
        self.runtime = runtime
        self.adapters = nn.ModuleDict(adapters)
        self._generation = -1
        self._kv_now: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kv_before: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def clear_cache(self) -> None:
        self._kv_now, self._kv_before, self._masks = {}, {}, {}

    def _roll(self) -> None:
        """At a new generation: K'/V' used in the last one stay reusable, older ones and all masks are dropped."""
        if self._generation != self.runtime.generation:
            self._kv_before, self._kv_now, self._masks = self._kv_now, {}, {}
            self._generation = self.runtime.generation

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
        self._roll()

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

        if self.layer.cross and encoder_hidden_states is not None:
            for name, prompt, weights, w in active:
                if weights.has_ip and not weights.concat and (w != 0.0 or self.layer.name in prompt.uncond_layers):
                    out = self._add_image(out, name, prompt, weights, w, query, seq_len)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)  # (B, L, h*d)

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
        self, name: str, prompt: AdapterPrompt, weights: AdapterLayer, refs: list[int], query: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K'/V' (B, h, T, d) of a reference group laid out on the batch: computed once per generation, and reused
        by the next while the tokens (by content) and the adapter's weights (in place updates, moves) are the same."""
        batch, heads, _, head_dim = query.shape
        precise = self.layer.name in prompt.uncond_layers
        # "Precise" layers: the reference moves to the unconditional rows, pushing guidance away from it.
        chosen = [(prompt.references[i], prompt.references[i].weight if precise
                   else prompt.references[i].weight_at(self.layer.name)) for i in refs]
        cacheable = self.runtime.cache_kv and not torch.is_grad_enabled()
        if cacheable:
            key = (name, batch, self.runtime.cfg, precise, query.dtype, query.device,
                   *(_version(p) for p in (weights.to_k_ip.weight, weights.to_v_ip.weight)),
                   *((ref.tokens_key(), factor) for ref, factor in chosen))
            found = self._kv_now.get(key) or self._kv_before.pop(key, None)
            if found is not None:
                self._kv_now[key] = found
                return found
        # Distinct token rows only (equal CFG halves and repeated images are laid out afterwards), all in one call:
        # projecting a few tokens reads the whole K'/V' weight, so one read serves every row.
        rows: list[torch.Tensor] = []
        for ref, _ in chosen:
            rows.append(ref.cond)
            source = ref.cond if precise else ref.uncond
            if self.runtime.cfg and source is not None and source is not ref.cond:
                rows.append(source)
        tokens = torch.cat(rows).to(weights.to_k_ip.weight.dtype)
        parts = [t.split([r.shape[0] for r in rows]) for t in (weights.to_k_ip(tokens), weights.to_v_ip(tokens))]
        projected = {id(r): (k, v) for r, k, v in zip(rows, *parts)}
        ks, vs = [], []
        for ref, factor in chosen:
            source = ref.cond if precise else ref.uncond
            cond, uncond = projected[id(ref.cond)], projected.get(id(source)) if self.runtime.cfg else None
            ks.append(self.runtime.batch_tokens(cond[0], uncond and uncond[0], batch))
            v = self.runtime.batch_tokens(cond[1], uncond and uncond[1], batch)
            vs.append(v * factor if factor != 1.0 else v)
        k, v = (torch.cat(t, dim=1).to(query.dtype).view(batch, -1, heads, head_dim).transpose(1, 2) for t in (ks, vs))
        if cacheable:
            self._kv_now[key] = (k, v)
        return k, v

    def _add_image(
        self, out: torch.Tensor, name: str, prompt: AdapterPrompt, weights: AdapterLayer, w: float,
        query: torch.Tensor, seq_len: int,
    ) -> torch.Tensor:
        """out + Σ_groups w · mask ⊙ softmax(Q K'ᵀ/√d) V', all (B, h, L, d): the unmasked references in one SDPA
        call, the masked ones together in one more (`_add_masked`)."""
        precise = self.layer.name in prompt.uncond_layers
        if precise:
            if not self.runtime.cfg:
                return out
            w = prompt.scale * prompt.step_factor(self.runtime.progress)
        groups = self._groups(prompt)
        masked = [g for g in groups if g[2] is not None]
        if len(masked) > 1 and prompt.scaling == "v":
            out = self._add_masked(out, name, prompt, weights, w, query, seq_len, masked, precise)
            groups = [g for g in groups if g[2] is None]
        for group, refs, mask in groups:
            k, v = self._kv(name, prompt, weights, refs, query)
            scale = w
            if prompt.scaling != "v":
                k, v, scale = scale_embeds(k, v, w, prompt.scaling, self.layer.width)
            o = F.scaled_dot_product_attention(query, k, v, dropout_p=0.0, is_causal=False)
            out = _accumulate(out, o, scale, self._weight_map(name, group, mask, precise, query, seq_len))
        return out

    def _add_masked(
        self, out: torch.Tensor, name: str, prompt: AdapterPrompt, weights: AdapterLayer, w: float,
        query: torch.Tensor, seq_len: int, groups: list[tuple[int, list[int], torch.Tensor | None]], precise: bool,
    ) -> torch.Tensor:
        """Several masked references in one attention: Q against all their K' at once, a softmax per reference over
        its own tokens, each weighted by its mask, and one product with all their V'. Batching SDPA instead needs a
        copy of Q per reference; on CPU at SD 1.5 layer sizes this is 1.1-3x faster than one SDPA call each."""
        k, v = self._kv(name, prompt, weights, [refs[0] for _, refs, _ in groups], query)  # (B, h, R·T, d)
        key = ("masked", name, tuple(g for g, _, _ in groups), seq_len, self.runtime.latent_hw, query.shape[0],
               precise, query.dtype, query.device)
        if key not in self._masks:
            maps = [self._weight_map(name, g, mask, precise, query, seq_len) for g, _, mask in groups]
            maps = [m if m is not None else query.new_ones(1, 1, 1, 1) for m in maps]
            shape = torch.broadcast_shapes(*(m.shape for m in maps))
            self._masks[key] = torch.stack([m.expand(shape) for m in maps], dim=3)
        maps = self._masks[key]  # (B or 1, 1, L or 1, R, 1)
        batch, heads, length, head_dim = query.shape
        scores = torch.matmul(query, k.transpose(-1, -2))
        grad = scores.requires_grad
        scores = scores * head_dim**-0.5 if grad else scores.mul_(head_dim**-0.5)  # SDPA's scale
        probs = scores.view(batch, heads, length, len(groups), -1).softmax(dim=-1)
        probs = probs * maps if grad else probs.mul_(maps)
        return _accumulate(out, torch.matmul(probs.view(batch, heads, length, -1), v), w, None)

    def _weight_map(
        self, name: str, group: int, mask: torch.Tensor | None, precise: bool, query: torch.Tensor, seq_len: int,
    ) -> torch.Tensor | None:
        """Per-token and per-row factors (B or 1, 1, L or 1, 1) of a group: its mask on this layer's token grid, and
        for a "precise" layer the unconditional rows only; None when all ones. Made once per generation."""
        if mask is None and not precise:
            return None
        batch = query.shape[0]
        key = (name, group, seq_len, self.runtime.latent_hw, batch, precise, query.device, query.dtype)
        if key not in self._masks:
            m = None
            if mask is not None:
                m = resize_mask(mask.to(query.device), seq_len, self.runtime.latent_hw)
                m = None if bool((m == 1).all()) else m.to(query.dtype)[None, None]  # (1, 1, L, 1)
            if precise:
                rows = torch.arange(batch, device=query.device).lt(batch // 2).to(query.dtype)[:, None, None, None]
                m = rows if m is None else m * rows
            self._masks[key] = m
        return self._masks[key]


def _version(t: torch.Tensor) -> tuple[int, int]:
    """Identifies a tensor's current values: in-place updates bump `_version`, a move or cast changes the pointer."""
    return t.data_ptr(), t._version


def _accumulate(out: torch.Tensor, o: torch.Tensor, scale: float, weights: torch.Tensor | None) -> torch.Tensor:
    """out + scale · weights ⊙ o; in place when autograd records neither (it may keep `out` for SDPA's backward)."""
    if out.requires_grad or o.requires_grad:
        return out + scale * (o if weights is None else o * weights)
    if weights is None:
        return out.add_(o, alpha=scale)
    return out.addcmul_(o, weights, value=scale)


def scale_embeds(k: torch.Tensor, v: torch.Tensor, w: float, mode: str, width: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ComfyUI's embeds scaling modes; returns (k, v, factor still to apply to the output)."""
    if mode == "kv":
        return k * w, v * w, 1.0
    penalty = w * width / 1280.0
    if mode == "kv_penalty":
        return k * penalty, v * penalty, 1.0
    mean = v.mean(dim=-2, keepdim=True)  # k_mean_v: only the token-mean part of V is scaled
    return k * penalty, (v - mean) + mean * penalty, 1.0
