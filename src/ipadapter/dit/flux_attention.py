"""The FLUX double-stream processor: the base attention untouched, plus the image branch XLabs trained.

For each acting adapter the image stream's query (after its QK-norm, without rotary embedding) attends to the IP
tokens' biased K'/V' in a separate attention; Σ w · mask ⊙ softmax(Q K'ᵀ/√d) V' is returned as the block's third
attention output, which the diffusers block adds to the image stream after its feed-forward (no out-projection, no
gate). Nothing acting → the original processor's call, so the output is bitwise the base model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ipadapter.dit.plan import BlockPlan, BlockProcessor, heads_layout
from ipadapter.groups import Group, scale_embeds


def image_query(attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The image stream's query as the base processor makes it, in the heads layout (B, h, L, d), no rotary."""
    if attn.fused_projections:  # diffusers' QKV fusion: the block runs `to_qkv`, so the query comes from it
        query = attn.to_qkv(hidden_states).chunk(3, dim=-1)[0]
    else:
        query = attn.to_q(hidden_states)
    return attn.norm_q(query.unflatten(-1, (attn.heads, -1))).transpose(1, 2)


class FluxIPProcessor(BlockProcessor):
    """Replaces one double-stream block's processor while adapters are attached."""

    def __call__(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args: Any, **kwargs: Any,
    ) -> Any:
        active = self.active(encoder_hidden_states)
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args, **kwargs)
        if not active:
            return out
        image, context = out[0], out[1]
        query = image_query(attn, hidden_states)
        ip = torch.zeros_like(query)
        for p, w in active:
            for group in p.groups:
                k, v = self._kv(p, group, query)
                scale = w
                if p.prompt.scaling != "v":
                    k, v, scale = scale_embeds(k, v, w, p.prompt.scaling, self.block.width)
                o = F.scaled_dot_product_attention(query, k, v, dropout_p=0.0, is_causal=False)
                m = self.mask_map(p, group, query.shape[2], query)
                ip = ip + scale * (o if m is None else o * m)
        return image, context, ip.transpose(1, 2).flatten(2).to(image.dtype)  # (B, L, h·d)

    # Outside compiled graphs; by assignment, not as a decorator, since mutmut skips decorated functions.
    __call__ = torch.compiler.disable(__call__)

    def _kv(self, p: BlockPlan, group: Group, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K'/V' (B, h, T, d) of a reference group on this call's batch: the references' tokens, or their
        unconditional tokens on a negative-prompt call; kept for the generation with `cache_kv` and autograd off."""
        negative = self.step.negative
        key = ("kv", p.name, group.id, negative, query.shape[0], query.dtype, query.device)
        keep = self.runtime.cache_kv and not torch.is_grad_enabled()
        cache = self.state.cache
        if keep and key in cache:
            return cache[key]
        weights = p.weights
        ks, vs = [], []
        for i, factor in zip(group.refs, self.factors(p, group)):
            ref = p.prompt.references[i]
            tokens = ref.cond if not negative else (ref.uncond if ref.uncond is not None else torch.zeros_like(ref.cond))
            # on the call's device: offload leaves the projection head on the CPU (attention.py `_laid`)
            tokens = self.runtime.batch_tokens(tokens, None, query.shape[0]).to(query.device,
                                                                               weights.to_k_ip.weight.dtype)
            ks.append(weights.to_k_ip(tokens))
            v = weights.to_v_ip(tokens)
            vs.append(v * factor if factor != 1.0 else v)
        heads = query.shape[1]
        kv = tuple(heads_layout(torch.cat(t, dim=1).to(query.dtype), heads) for t in (ks, vs))
        if keep:
            cache[key] = kv
        return kv
