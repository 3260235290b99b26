"""The one attention processor behind every variant and feature.

Z = softmax(Q Kᵀ/√d) V + Σ_adapters Σ_groups w · mask ⊙ softmax(Q K'ᵀ/√d) V', summed before `to_out`
(decoupled cross-attention), plus optional FaceID LoRA deltas on q/k/v/out. The paper's "simple adapter" ablation
(`attention="concat"`) instead appends the image tokens to the text tokens of the frozen attention. When nothing of
ours acts on a call (scale 0, outside the step window, layer weight 0, no prompt set) it hands the call to the
layer's original processor, so the output is bitwise the base model's. The optimisations are described in the
README ("How it works"); the data flow around this module in docs/architecture.md.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ipadapter.adapter import AdapterLayer
from ipadapter.groups import Group, reference_groups, scale_embeds
from ipadapter.kv import KVCache, KVKey
from ipadapter.layers import AttentionLayer
from ipadapter.plan import Act, Acts, AdapterPlan, Laid, LayerState, Prepared, Resolved, Term, sort_acts
from ipadapter.runtime import Runtime
from ipadapter.token_grids import grid_sizes, on_grid


class IPAttnProcessor(nn.Module):
    """Replaces one attention layer's processor while adapters are attached; keeps the original to restore it.

    Per generation (each `Runtime.set`) a plan is resolved once for all the layers that agree on it: which adapters
    act, with which layer weight, LoRA scale and reference groups; per batch layout the terms are made once (K'/V'
    from a `KVCache`, masks on the layer's token grid); per call only the step window's factor is applied. Image
    attention is added to the text attention in the heads layout, before `to_out`, in place when autograd is off.

    Under `torch.compile` the call is traced whole (no graph break): the attachment calls `prepare` before each
    UNet call, outside the graph, and the traced call reads only tensors (weights, step factors, K'/V', masks) and
    the plan's structure, so changing the scale, weights or references recompiles nothing.
    """

    def __init__(
        self, layer: AttentionLayer, original: Any, runtime: Runtime, adapters: dict[str, AdapterLayer],
        heads: int | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.original = original
        self.runtime = runtime
        self.adapters = nn.ModuleDict(adapters)
        self.heads = heads
        self.kv = KVCache()
        self.state = LayerState()
        self._weights: dict[str, AdapterLayer] = dict(adapters)  # a plain dict: read at every call
        # What the plan depends on of this layer's adapters (`_signature`); they are fixed once made.
        self._kinds = tuple((name, w.has_ip, w.concat, w.has_lora) for name, w in adapters.items())
        self._uniform = ("plan", self._kinds)  # the signature where no prompt has anything per layer
        self._prepared: list[Prepared] | None = None
        self._held: dict[Hashable, torch.Tensor] = {}

    def clear_cache(self) -> None:
        self.kv.clear()
        self.state.resolved.maps.clear()
        self.state.resolved.terms.clear()
        self.state.kv_terms = {}
        self._held = {}
        self._prepared = None

    def plan(self) -> list[AdapterPlan]:
        """The adapters with a prompt this generation and something to do at this layer (resolved once, shared with
        the layers that agree on it)."""
        state = self.state
        if state.generation != self.runtime.generation:
            state.resolved = self.runtime.shared(self._signature(), lambda: Resolved(self._resolve(every=False)))
            state.kv_terms, state.generation = {}, self.runtime.generation
            if not self.runtime.cache_kv:  # switched off: nothing an earlier generation made is kept
                self.kv.clear()
        return state.resolved.plan

    def _signature(self) -> tuple:
        """What this layer's plan depends on: its adapters' kinds and, for a prompt with per-layer weights, this
        layer's factors in it. Layers with equal signatures have equal plans, maps and terms without K'/V' (their
        tokens are cast to the adapter's dtype, which its weights token holds); a prompt without per-layer weights
        (the common case) gives them all one signature."""
        per_layer = self.runtime.per_layer
        if not per_layer:
            return self._uniform
        layer, factors = self.layer.name, []
        for name, has_ip, _, _ in self._kinds:
            if has_ip and name in per_layer:
                prompt = self.runtime.prompts[name]
                factors.append((name, prompt.layer_weight(layer), layer in prompt.uncond_layers,
                                tuple(r.weight_at(layer) for r in prompt.references)))
        return *self._uniform, *factors

    def _resolve(self, every: bool) -> list[AdapterPlan]:
        """Each prompted adapter's plan here; `every`: also those whose scale or layer weight is 0 now (the compiled
        path's structure must not depend on those values: they are tensors there)."""
        plans = []
        for name, weights in self._weights.items():
            prompt = self.runtime.prompts.get(name)
            if prompt is None:
                continue
            uncond_layer = weights.has_ip and self.layer.name in prompt.uncond_layers
            layer_weight = prompt.layer_weight(self.layer.name) if weights.has_ip else 0.0
            lora_scale = prompt.lora_scale if weights.has_lora else 0.0
            if every or layer_weight != 0.0 or lora_scale != 0.0 or uncond_layer:
                groups = reference_groups(prompt, self.layer.name, every_reference=uncond_layer) if weights.has_ip else ()
                gridded = uncond_layer or any(g.mask is not None for g in groups)
                plans.append(AdapterPlan(name, prompt, weights.has_ip, weights.concat, weights.has_lora, layer_weight,
                                         uncond_layer, lora_scale, groups, gridded))
        return plans

    def prepare(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make the compiled call's plan, weights and terms for this generation and batch layout; the attachment's
        hook calls it once per layout (`Attachment._before_unet`)."""
        self.plan()  # a new generation resets the per-generation caches the terms are made from
        names = list(self.runtime.prompts)
        sizes = grid_sizes(self.runtime.latent_hw)
        prepared = []
        for p in self._resolve(every=True):
            decoupled = p.has_ip and not p.concat  # the simple adapter has no K'/V' of its own
            image = p.prompt.scale if p.uncond_layer and decoupled else p.layer_weight
            terms = self._build(p, batch, self.heads, dtype, device, sizes, lazy=False) if decoupled else ()
            terms = tuple(self._hold_term((p.name, i), term) for i, term in enumerate(terms))
            image_t = self._held_as((p.name, "image"), torch.Size(), torch.float32, device).fill_(image)
            lora_t = self._held_as((p.name, "lora"), torch.Size(), torch.float32, device).fill_(p.lora_scale)
            prepared.append(Prepared(p, names.index(p.name), image_t, lora_t, terms))
        self.kv.settle()
        self._prepared = prepared

    def _held_as(self, key: Hashable, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This layer's tensor for `key`, the same one every generation while its shape, dtype and device stay: the
        compiled graph then reads its inputs at fixed addresses, and CUDA graphs (`mode="reduce-overhead"`) neither
        copy them at each replay nor record again. Numbers are written with `fill_`: no copy from the host. Under
        autograd a new tensor each time: the last generation's backward may still need the one before."""
        held = self._held.get(key)
        recording = torch.is_grad_enabled()
        if recording or held is None or held.shape != shape or held.dtype != dtype or held.device != device:
            held = torch.empty(shape, dtype=dtype, device=device)
            if not recording:
                self._held[key] = held
                torch._dynamo.mark_static_address(held, guard=False)
        return held

    def _hold(self, key: Hashable, value: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # autograd: `value` itself (a new tensor each generation, see `_held_as`)
            return value
        return self._held_as(key, value.shape, value.dtype, value.device).copy_(value)

    def _hold_term(self, key: tuple, term: Term) -> Term:
        """A prepared term with its K'/V' and weight maps copied into held tensors (`_held_as`)."""
        maps = tuple((n, None if m is None else self._hold((*key, "map", n), m)) for n, m in term.maps)
        return term._replace(k=self._hold((*key, "k"), term.k), v=self._hold((*key, "v"), term.v), maps=maps)

    def forget_prepared(self) -> None:
        """The UNet runs uncompiled again: what `prepare` made would go stale."""
        self._prepared = None

    def __call__(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if self._prepared is None:  # compiled without the attachment's hook before it (e.g. `unet.compile()`)
                return self._uncompiled(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            factors = self.runtime.step_tensor
            acts = [Act(c.plan, c.image * factors[c.index], c.lora, c.terms) for c in self._prepared]
            return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                sort_acts(acts, self.runtime.cfg))
        return self._eager(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def _uncompiled(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The eager call inside a compiled graph that nothing prepared for: a graph break, but right."""
        return self._eager(*args, **kwargs)

    # Outside compiled graphs; by assignment, not as a decorator, since mutmut skips decorated functions.
    _uncompiled = torch.compiler.disable(_uncompiled)

    def _eager(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        """The call with float weights; nothing of ours acting hands it to the original processor (bitwise)."""
        plan, r = self.plan(), self.state.resolved
        factors, cfg = self.runtime.step_factors(), self.runtime.cfg
        if r.factors is not factors or r.cfg != cfg:  # a new generation, step factor or batch layout
            acts = []
            for p in plan:
                f = factors[p.name]
                if p.uncond_layer and not p.concat:
                    image = p.prompt.scale * f if cfg else 0.0
                else:
                    image = p.layer_weight * f if p.layer_weight else 0.0
                if image != 0.0 or p.lora_scale != 0.0:
                    acts.append(Act(p, image, p.lora_scale))
            r.acts, r.factors, r.cfg = sort_acts(acts, cfg), factors, cfg
        if not r.acts.every:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, r.acts)

    def _attend(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None, temb: torch.Tensor | None, acts: Acts,
    ) -> torch.Tensor:
        """The layer's attention with `acts` added: LoRA on q/k/v/out, image attention before `to_out`."""
        inplace = not torch.is_grad_enabled()
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

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # (B, L, h*d)
        loras = acts.lora
        for a in loras:
            weights = self._weights[a.plan.name]
            query = query + a.lora * weights.to_q_lora(hidden_states).to(query.dtype)
            key = key + a.lora * weights.to_k_lora(context).to(key.dtype)
            value = value + a.lora * weights.to_v_lora(context).to(value.dtype)

        cross = self.layer.cross and encoder_hidden_states is not None
        if acts.concat and cross:
            key, value, attention_mask = self._concat(attn, acts.concat, key, value, attention_mask, batch)

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

        if cross:
            for a in acts.image:
                terms = a.terms if a.terms is not None else self._terms_of(a.plan, query, seq_len)
                out = self._add_image(out, a.plan, a.image, terms, query, seq_len, inplace)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)  # (B, L, h*d)

        project_out, drop_out = attn.to_out  # unpacked: indexing a ModuleList costs more than the kernels here
        hidden = project_out(out)
        for a in loras:
            hidden = hidden + a.lora * self._weights[a.plan.name].to_out_lora(out).to(hidden.dtype)
        if drop_out.training or not isinstance(drop_out, nn.Dropout):  # an evaluating Dropout returns its input
            hidden = drop_out(hidden)
        if input_ndim == 4:
            hidden = hidden.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden = hidden + residual
        # x / 1 is x, bit for bit: skipping it saves a kernel and an output-sized tensor per call (diffusers divides).
        return hidden / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else hidden

    def _concat(
        self, attn: nn.Module, concat: list[Act], key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The "simple adapter": image tokens through the frozen to_k/to_v, appended to the text keys and values.

        A weight w becomes an additive log(w) on the image columns' logits, i.e. their unnormalised attention is
        multiplied by w (w = 1: the plain concatenation the ablation trains with; w ≤ 0 on the compiled path: −inf,
        the columns drop out as the eager path leaves them out).
        """
        keys, values, bias = [key], [value], [key.new_zeros(key.shape[1])]
        for a in concat:
            tokens = torch.cat([self.runtime.batch_tokens(r.cond, r.uncond, batch) for r in a.plan.prompt.references],
                               dim=1)
            tokens = tokens.to(key.dtype)
            keys.append(attn.to_k(tokens))
            values.append(attn.to_v(tokens))
            if isinstance(a.image, torch.Tensor):
                bias.append(a.image.clamp_min(0).log().to(key.dtype).expand(tokens.shape[1]))
            else:
                bias.append(key.new_full((tokens.shape[1],), math.log(a.image)))
        key, value, bias = torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.cat(bias)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(attention_mask, dtype=key.dtype).masked_fill(~attention_mask, -math.inf)
            pad = bias[attention_mask.shape[-1]:].expand(*attention_mask.shape[:-1], -1)
            return key, value, torch.cat([attention_mask, pad], dim=-1)
        # Decided from the weights, not the bias tensor: reading a tensor back would fail on the meta device
        # (`ipadapter train --dry-run` traces the models there). A tensor weight comes from the compiled path.
        if torch.compiler.is_compiling() or any(isinstance(a.image, torch.Tensor) or a.image != 1.0 for a in concat):
            return key, value, bias.view(1, 1, 1, -1)
        return key, value, None

    def _terms_of(self, p: AdapterPlan, query: torch.Tensor, seq_len: int) -> tuple[Term, ...]:
        """The eager call's terms, made at the generation's first call of this layout and kept for the next calls
        (with K'/V' under `cache_kv`, else with the laid-out tokens they are projected from at each call); made anew
        at every call while autograd records or without a weights token (training)."""
        batch, heads = query.shape[0], query.shape[1]
        keep = not torch.is_grad_enabled() and self.runtime.weights.get(p.name) is not None
        grid = (seq_len,) if p.gridded else ()  # without weights per token, one set of terms serves every grid
        key = (p.name, batch, self.runtime.cfg, grid, self.runtime.latent_hw, query.dtype, query.device)
        lazy = not self.runtime.cache_kv  # no K'/V' in them: the same at every layer that shares the plan
        found = self.state.resolved.terms if lazy else self.state.kv_terms
        terms = found.get(key) if keep else None
        if terms is None:
            terms = self._build(p, batch, heads, query.dtype, query.device, grid, lazy=keep and lazy)
            if keep:
                found[key] = terms
                if not lazy and {q.name for q in self.state.resolved.plan if q.has_ip} <= {k[0] for k in found}:
                    self.kv.settle()
        return terms

    def _build(
        self, p: AdapterPlan, batch: int, heads: int, dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...],
        *, lazy: bool,
    ) -> tuple[Term, ...]:
        """The terms of a plan: several masked references in one (with the "v" scaling), the rest one per group,
        each with its weights for every token count in `sizes`; `lazy`: with the laid-out tokens instead of K'/V'."""
        self.kv.roll(self.runtime.generation)
        if not self.runtime.cache_kv:  # switched off: free what earlier generations kept
            self.kv.clear()
        groups, parts = p.groups, []
        masked = [g for g in groups if g.mask is not None]
        if len(masked) > 1 and p.prompt.scaling == "v":
            parts.append((tuple(g.refs[0] for g in masked), len(masked),
                          tuple((n, self._stacked_maps(p, masked, n, batch, dtype, device)) for n in sizes)))
            groups = tuple(g for g in groups if g.mask is None)
        parts += [(g.refs, 0, tuple((n, self._weight_map(p, g, n, batch, dtype, device)) for n in sizes))
                  for g in groups]
        terms = []
        for refs, together, maps in parts:
            laid = self._laid(p, refs, batch, device)
            if lazy:
                terms.append(Term(None, None, maps, together, laid))
            else:
                terms.append(Term(*self._kv(p, refs, laid, batch, heads, dtype, device), maps, together))
        return tuple(terms)

    def _laid(self, p: AdapterPlan, refs: tuple[int, ...], batch: int, device: torch.device) -> Laid:
        """A reference group's tokens on the batch (their rows, not yet concatenated: a term kept for the generation
        without K'/V' holds no copy of the tokens). Projecting the laid-out batch rather than its distinct rows is
        diffusers' work at one step for the common batch of two (CFG, one image), and leaves nothing to lay out after
        the projection. The tokens move to the UNet call's `device`: model offload leaves the projection head on the
        CPU while it moves the UNet, and sequential offload moves each weight only while its module runs."""
        # An uncond layer takes each reference at its plain weight (presets weight it there by the layer list).
        chosen = [p.prompt.references[i] for i in refs]
        factors = tuple(ref.weight if p.uncond_layer else ref.weight_at(self.layer.name) for ref in chosen)
        dtype = self._weights[p.name].to_k_ip.weight.dtype
        halves = tuple(tuple(t.to(device, dtype) for t in self.runtime.batch_halves(
            ref.cond, ref.cond if p.uncond_layer else ref.uncond, batch)) for ref in chosen)
        return Laid(halves, tuple(ref.cond.shape[1] for ref in chosen), factors, any(f != 1.0 for f in factors))

    def _kv(
        self, p: AdapterPlan, refs: tuple[int, ...], laid: Laid, batch: int, heads: int, dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K'/V' (B, h, T, d) of a reference group, from the cache when `cache_kv` is on and its key is there."""
        token = self.runtime.weights.get(p.name)
        key = None
        if self.runtime.cache_kv and token is not None and not torch.is_grad_enabled():
            key = KVKey(p.name, token, batch, self.runtime.cfg, p.uncond_layer, dtype, device,
                        tuple((p.prompt.references[i].tokens_key(), f) for i, f in zip(refs, laid.factors)))
            found = self.kv.get(key)
            if found is not None:
                return found
        k, v = self._project(self._weights[p.name], laid, heads, dtype)
        if key is not None:
            self.kv.put(key, (k, v))
        return k, v

    @staticmethod
    def _project(weights: AdapterLayer, laid: Laid, heads: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K'/V' (B, h, R·T, d) of laid-out tokens, each reference's V' times its factor."""
        x = laid.tokens()
        k, v = weights.to_k_ip(x), weights.to_v_ip(x)
        if laid.scaled:
            parts = v.split(laid.sizes, dim=1)
            v = torch.cat([part * factor for part, factor in zip(parts, laid.factors)], dim=1)
        if k.dtype != dtype:
            k, v = k.to(dtype), v.to(dtype)
        batch, head_dim = k.shape[0], k.shape[-1] // heads
        return k.view(batch, -1, heads, head_dim).transpose(1, 2), v.view(batch, -1, heads, head_dim).transpose(1, 2)

    def _add_image(
        self, out: torch.Tensor, p: AdapterPlan, w: float | torch.Tensor, terms: tuple[Term, ...],
        query: torch.Tensor, seq_len: int, inplace: bool,
    ) -> torch.Tensor:
        """out + Σ_terms w · mask ⊙ softmax(Q K'ᵀ/√d) V', all (B, h, L, d): the unmasked references in one SDPA
        call, several masked ones together in one more (`_add_together`)."""
        for term in terms:
            weights = None  # none made: the term has no weights per token
            for n, m in term.maps:  # a loop, not next(generator): this runs at every call of every layer
                if n == seq_len:
                    weights = m
                    break
            if term.laid is None:
                k, v = term.k, term.v
            else:
                k, v = self._project(self._weights[p.name], term.laid, query.shape[1], query.dtype)
            if k.dtype != query.dtype:  # compiled under autocast: prepared at the UNet's dtype
                k, v = k.to(query.dtype), v.to(query.dtype)
            if term.together:
                out = _add_together(out, w, k, v, weights, term.together, query, inplace)
                continue
            scale = w
            if p.prompt.scaling != "v":
                k, v, scale = scale_embeds(k, v, w, p.prompt.scaling, self.layer.width)
            out = _accumulate(out, F.scaled_dot_product_attention(query, k, v), scale, weights, inplace)
        return out

    def _stacked_maps(
        self, p: AdapterPlan, groups: list[Group], seq_len: int, batch: int, dtype: torch.dtype, device: torch.device,
    ) -> torch.Tensor:
        """The masked references' weights side by side (B or 1, 1, L or 1, R, 1), for one attention over all; shared
        by every layer of this token count unless the layer moves the references to the unconditional rows."""

        def stack() -> torch.Tensor:
            # Each mask on the grid is made here and not kept: only the stack is read at the calls.
            maps = [on_grid(g.mask, seq_len, self.runtime.latent_hw, dtype, device) for g in groups]
            maps = [m if m is not None else torch.ones(1, 1, 1, 1, dtype=dtype, device=device) for m in maps]
            if p.uncond_layer:
                maps = [m * _uncond_rows(batch, dtype, device) for m in maps]
            shape = torch.broadcast_shapes(*(m.shape for m in maps))
            return torch.stack([m.expand(shape) for m in maps], dim=3)

        if p.uncond_layer:
            return stack()
        masks = tuple(id(g.mask) for g in groups)
        return self.runtime.shared(("stacked", masks, seq_len, self.runtime.latent_hw, dtype, device), stack)

    def _weight_map(
        self, p: AdapterPlan, group: Group, seq_len: int, batch: int, dtype: torch.dtype, device: torch.device,
    ) -> torch.Tensor | None:
        """Per-token and per-row factors (B or 1, 1, L or 1, 1) of a group: its mask on this layer's token grid, and
        on an uncond layer the unconditional rows only; None when all ones. Made once per generation."""
        if group.mask is None and not p.uncond_layer:
            return None
        key = (p.name, group.id, seq_len, self.runtime.latent_hw, batch, device, dtype)
        maps = self.state.resolved.maps
        if key not in maps:
            m = None
            if group.mask is not None:
                m = self.runtime.shared(("mask", id(group.mask), seq_len, self.runtime.latent_hw, dtype, device),
                                        lambda: on_grid(group.mask, seq_len, self.runtime.latent_hw, dtype, device))
            if p.uncond_layer:
                rows = _uncond_rows(batch, dtype, device)
                m = rows if m is None else m * rows
            maps[key] = m
        return maps[key]


def _uncond_rows(batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B, 1, 1, 1): 1 on the unconditional rows (the first half of a CFG batch), 0 on the others."""
    return torch.arange(batch, device=device).lt(batch // 2).to(dtype)[:, None, None, None]


def _add_together(
    out: torch.Tensor, w: float | torch.Tensor, k: torch.Tensor, v: torch.Tensor, maps: torch.Tensor, together: int,
    query: torch.Tensor, inplace: bool,
) -> torch.Tensor:
    """Several masked references in one attention: Q against all their K' at once, a softmax per reference over
    its own tokens, each weighted by its mask, and one product with all their V'. Batching SDPA instead needs a
    copy of Q per reference; on CPU at SD 1.5 layer sizes this is 1.1-3x faster than one SDPA call each."""
    batch, heads, length, head_dim = query.shape
    scores = torch.matmul(query, k.transpose(-1, -2))  # (B, h, L, R·T)
    scores = scores.mul_(head_dim**-0.5) if inplace else scores * head_dim**-0.5  # SDPA's scale
    scores = scores.view(batch, heads, length, together, -1)
    if inplace:  # softmax in the scores' own buffer: one (B, h, L, R·T) tensor at a time, as SDPA's memory
        probs = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        probs = probs.div_(probs.sum(dim=-1, keepdim=True)).mul_(maps)
    else:
        probs = scores.softmax(dim=-1) * maps
    return _accumulate(out, torch.matmul(probs.view(batch, heads, length, -1), v), w, None, inplace)


def _accumulate(
    out: torch.Tensor, o: torch.Tensor, scale: float | torch.Tensor, weights: torch.Tensor | None, inplace: bool,
) -> torch.Tensor:
    """out + scale · weights ⊙ o; in place only with autograd off (it may keep `out` for SDPA's backward) and a
    float scale (the compiled path's tensor scale is fused by the compiler instead)."""
    if not inplace or isinstance(scale, torch.Tensor):
        return out + scale * (o if weights is None else o * weights)
    if weights is None:
        return out.add_(o, alpha=scale)
    return out.addcmul_(o, weights, value=scale)
