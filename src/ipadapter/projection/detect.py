"""Read a projection head's architecture from its weights (no flags from the user), and build it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ipadapter.errors import IPAdapterError

TIME_WIDTH, TIME_SINUSOID = 1280, 320  # InstantX's SD 3.5 resampler: its width, its timestep features


@dataclass(frozen=True)
class ProjectionConfig:
    """Everything needed to rebuild a head; `in_dim` is what the encoder must deliver (global dim or patch width).
    For the SD 3 "time_resampler" head `hidden_dim` is the width of its sinusoidal timestep features."""

    head: str
    in_dim: int
    cross_dim: int
    tokens: int
    dim: int = 0
    depth: int = 0
    heads: int = 0
    dim_head: int = 64
    ff_mult: int = 4
    hidden_dim: int = 0
    clip_dim: int = 0

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1  # callers read layer 0 first: a stack without layers is refused there


def _perceiver(state: dict[str, torch.Tensor], prefix: str, dim_head: int = 64) -> dict[str, int]:
    dim = state[f"{prefix}proj_in.weight"].shape[0]
    inner = state[f"{prefix}layers.0.0.to_q.weight"].shape[0]
    ff_inner = state[f"{prefix}layers.0.1.1.weight"].shape[0]
    return {"dim": dim, "depth": _depth(state, prefix), "heads": inner // dim_head, "dim_head": dim_head,
            "ff_mult": ff_inner // dim}


def detect_projection(state: dict[str, torch.Tensor]) -> ProjectionConfig:
    """Recognise the head from `image_proj` keys and shapes (the rules of docs/checkpoints.md)."""
    try:
        if "proj.weight" in state:
            cross = state["norm.weight"].shape[0]
            rows, in_dim = state["proj.weight"].shape
            return ProjectionConfig("linear", in_dim=in_dim, cross_dim=cross, tokens=rows // cross)
        if "proj.3.weight" in state:
            hidden, in_dim = state["proj.0.weight"].shape
            return ProjectionConfig("token_mlp", in_dim=in_dim, cross_dim=state["proj.3.weight"].shape[0], tokens=0,
                                    hidden_dim=hidden)
        if "perceiver_resampler.proj_in.weight" in state:
            cross = state["norm.weight"].shape[0]
            hidden, id_dim = state["proj.0.weight"].shape
            p = _perceiver(state, "perceiver_resampler.")
            return ProjectionConfig(
                "faceid_plus", in_dim=id_dim, cross_dim=cross, tokens=state["proj.2.weight"].shape[0] // cross,
                hidden_dim=hidden, clip_dim=state["perceiver_resampler.proj_in.weight"].shape[1],
                depth=p["depth"], heads=p["heads"], ff_mult=p["ff_mult"], dim=cross,
            )
        if "norm.weight" in state and "proj.0.weight" in state and "latents" not in state:
            cross = state["norm.weight"].shape[0]
            hidden, id_dim = state["proj.0.weight"].shape
            return ProjectionConfig("faceid", in_dim=id_dim, cross_dim=cross,
                                    tokens=state["proj.2.weight"].shape[0] // cross, hidden_dim=hidden)
        if "latents" in state:
            p = _perceiver(state, "")
            return ProjectionConfig(
                "resampler", in_dim=state["proj_in.weight"].shape[1], cross_dim=state["proj_out.weight"].shape[0],
                tokens=state["latents"].shape[1], **p,
            )
    except KeyError as err:
        raise IPAdapterError(f"the image projection weights are incomplete: missing {err.args[0]!r}") from None
    raise IPAdapterError(
        "the file's image projection matches no IP-Adapter family (keys: " + ", ".join(sorted(state)[:6]) + ", ...)"
    )


def new_projection(
    head: str, *, cross_dim: int, tokens: int, embed_dim: int = 0, hidden_dim: int = 0, id_dim: int = 512,
) -> ProjectionConfig:
    """The shape of a new (untrained) head as the published ones are built (docs/checkpoints.md): resamplers of
    depth 4, 64-wide heads, feed-forward ×4, width min(C, encoder width); SD 3's timestep-aware one as InstantX's,
    width min(1280, C) and 320 sinusoid channels; FaceID's ID MLP 512 → 1024 → N·C.
    `embed_dim`: the encoder's global width; `hidden_dim`: its patch width; the head's own must be given."""
    dim = min(cross_dim, hidden_dim)
    shapes = {
        "linear": lambda: ProjectionConfig("linear", in_dim=embed_dim, cross_dim=cross_dim, tokens=tokens),
        "resampler": lambda: ProjectionConfig("resampler", in_dim=hidden_dim, cross_dim=cross_dim, tokens=tokens,
                                              dim=dim, depth=4, heads=max(1, dim // 64), dim_head=64, ff_mult=4),
        "token_mlp": lambda: ProjectionConfig("token_mlp", in_dim=hidden_dim, cross_dim=cross_dim, tokens=tokens,
                                              hidden_dim=hidden_dim),
        "time_resampler": lambda: ProjectionConfig(
            "time_resampler", in_dim=hidden_dim, cross_dim=cross_dim, tokens=tokens, dim=min(TIME_WIDTH, cross_dim),
            depth=4, heads=max(1, min(TIME_WIDTH, cross_dim) // 64), dim_head=64, ff_mult=4, hidden_dim=TIME_SINUSOID,
        ),
        "faceid": lambda: ProjectionConfig("faceid", in_dim=id_dim, cross_dim=cross_dim, tokens=tokens,
                                           hidden_dim=2 * id_dim),
        "faceid_plus": lambda: ProjectionConfig(
            "faceid_plus", in_dim=id_dim, cross_dim=cross_dim, tokens=tokens, hidden_dim=2 * id_dim,
            clip_dim=hidden_dim, dim=cross_dim, depth=4, heads=max(1, cross_dim // 64), dim_head=64, ff_mult=4,
        ),
    }
    if head not in shapes:
        raise IPAdapterError(f"unknown projection head {head!r}; valid: {', '.join(shapes)}")
    needs = {"linear": ("embed_dim", embed_dim), "faceid": ("id_dim", id_dim)}
    width, value = needs.get(head, ("hidden_dim", hidden_dim))
    if value <= 0:
        raise IPAdapterError(f"a new {head} head needs the encoder's width ({width}), got {value}")
    return shapes[head]()


def build_projection(config: ProjectionConfig, *, shortcut: bool) -> nn.Module:
    """An untrained head of the given architecture (load weights into it afterwards)."""
    from ipadapter.projection.faceid import FaceIDPlusProjection, FaceIDProjection
    from ipadapter.projection.linear import LinearProjection
    from ipadapter.projection.resampler import Resampler
    from ipadapter.projection.time_resampler import TimeResampler
    from ipadapter.projection.token_mlp import TokenMLPProjection

    c = config
    builders = {
        "linear": lambda: LinearProjection(in_dim=c.in_dim, cross_dim=c.cross_dim, tokens=c.tokens),
        "token_mlp": lambda: TokenMLPProjection(in_dim=c.in_dim, cross_dim=c.cross_dim, hidden_dim=c.hidden_dim),
        "resampler": lambda: Resampler(in_dim=c.in_dim, dim=c.dim, out_dim=c.cross_dim, depth=c.depth, heads=c.heads,
                                       dim_head=c.dim_head, queries=c.tokens, ff_mult=c.ff_mult),
        "faceid": lambda: FaceIDProjection(id_dim=c.in_dim, hidden_dim=c.hidden_dim, cross_dim=c.cross_dim,
                                           tokens=c.tokens),
        "faceid_plus": lambda: FaceIDPlusProjection(
            id_dim=c.in_dim, hidden_dim=c.hidden_dim, cross_dim=c.cross_dim, tokens=c.tokens, clip_dim=c.clip_dim,
            depth=c.depth, heads=c.heads, dim_head=c.dim_head, ff_mult=c.ff_mult, shortcut=shortcut,
        ),
        "time_resampler": lambda: TimeResampler(in_dim=c.in_dim, dim=c.dim, out_dim=c.cross_dim, depth=c.depth,
                                                heads=c.heads, dim_head=c.dim_head, queries=c.tokens,
                                                ff_mult=c.ff_mult, timestep_dim=c.hidden_dim),
    }
    if c.head not in builders:
        raise IPAdapterError(f"unknown projection head {c.head!r}; valid: {', '.join(builders)}")
    return builders[c.head]()


def detect_time_resampler(state: dict[str, torch.Tensor]) -> ProjectionConfig:
    """The head's sizes from the published keys: widths from proj_in/proj_out, queries from `latents`, heads from
    to_q rows / 64, the sinusoid width from `time_embedding.linear_1`."""
    try:
        dim, in_dim = state["proj_in.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        return ProjectionConfig(
            "time_resampler", in_dim=in_dim, cross_dim=state["proj_out.weight"].shape[0],
            tokens=state["latents"].shape[1], dim=dim, depth=depth, heads=state["layers.0.0.to_q.weight"].shape[0] // 64,
            dim_head=64, ff_mult=state["layers.0.1.1.weight"].shape[0] // dim,
            hidden_dim=state["time_embedding.linear_1.weight"].shape[1],
        )
    except (KeyError, ValueError) as err:
        raise IPAdapterError(f"the SD 3 image projection weights are incomplete: missing {err.args[0]!r}") from None
