"""The SD 3 joint-block processor: the base attention untouched, plus InstantX's image branch.

Per acting adapter, the image stream's query and keys (fresh projections, normalised by the adapter's own RMS norms)
attend jointly over [image keys; IP keys], the IP tokens having been AdaNorm'd by the resampler's timestep embedding;
Σ w · mask ⊙ that attention is added to the image stream before `to_out`. `to_out` is linear, so the image branch
is added as its weight times the branch (no second bias) to the base processor's own output. Nothing acting → the
original processor's call, bitwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ipadapter.dit.plan import BlockProcessor, heads_layout
from ipadapter.groups import scale_embeds


class JointIPProcessor(BlockProcessor):
    """Replaces one joint block's processor while adapters are attached."""

    def __call__(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any,
    ) -> Any:
        active = self.active(encoder_hidden_states)
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if not active:
            return out
        image = out[0]  # (image stream, text stream): the joint call has text
        heads = attn.heads
        query, key, value = (heads_layout(proj(hidden_states), heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        branch = torch.zeros_like(query)  # (B, h, L, d)
        for p, w in active:
            weights = p.weights
            q, k = weights.norm_q(query), weights.norm_k(key)
            # on the call's device: offload leaves the projection head on the CPU (attention.py `_laid`)
            tokens, temb = self.step.tokens[p.name], self.step.temb[p.name].to(query.device)
            for group in p.groups:
                ip_k, ip_v = [], []
                for i, factor in zip(group.refs, self.factors(p, group)):
                    normed = weights.norm_ip(tokens[i].to(query.device, weights.to_k_ip.weight.dtype), temb)
                    ip_k.append(weights.to_k_ip(normed))
                    v = weights.to_v_ip(normed)
                    ip_v.append(v * factor if factor != 1.0 else v)
                kk = weights.norm_ip_k(heads_layout(torch.cat(ip_k, dim=1).to(query.dtype), heads))
                vv = heads_layout(torch.cat(ip_v, dim=1).to(query.dtype), heads)
                scale = w
                if p.prompt.scaling != "v":
                    kk, vv, scale = scale_embeds(kk, vv, w, p.prompt.scaling, self.block.width)
                o = F.scaled_dot_product_attention(q, torch.cat([k, kk], dim=2), torch.cat([value, vv], dim=2))
                m = self.mask_map(p, group, query.shape[2], query)
                branch = branch + scale * (o if m is None else o * m)
        added = F.linear(branch.transpose(1, 2).flatten(2).to(image.dtype), attn.to_out[0].weight)  # (B, L, width)
        return (image + added, *out[1:])

    # Outside compiled graphs; by assignment, not as a decorator, since mutmut skips decorated functions.
    __call__ = torch.compiler.disable(__call__)
