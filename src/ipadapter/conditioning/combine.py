"""Several reference images' encoder features combined into one before projection.

Inputs: N tensors e_1..e_N of one shape — global (B, D) or patch (B, T, D) — and per-image weights w_i (default 1).
Definitions, with weights entering as stated:
- concat:       the weighted features w_i·e_i side by side along the token axis: patch (B, N·T, D); global
                (B, N, D), one row per image (project it with `project_each`, since a global head expects (B, D)).
- add:          Σ w_i·e_i.
- subtract:     w_1·e_1 − mean_{i>1}(w_i·e_i); needs at least two images.
- average:      Σ w_i·e_i / Σ w_i — a weighted mean: the weights are relative importances, (1, 1) and (2, 2) agree.
- norm average: the weighted mean of the unit vectors e_i/‖e_i‖ (norm over D), rescaled to the weighted mean
                of the norms ‖e_i‖: every image pulls the direction equally hard whatever its feature magnitude,
                and the result keeps a typical magnitude instead of shrinking as a plain mean of dissimilar
                vectors does.
- max / min:    element-wise over the weighted features w_i·e_i.
Combining before projection differs from projecting each image and averaging the tokens: the heads are not linear
(LayerNorm, attention), so mean-then-project ≠ project-then-mean. Concat of global features, projected with
`project_each`, is the one mode that equals projecting each image and concatenating its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ipadapter.errors import IPAdapterError


def _weighted_mean(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    total = float(w.sum())
    if total == 0.0:
        raise IPAdapterError("the image weights of an average sum to 0; give weights with a non-zero sum")
    return (stack * w).sum(0) / total


def _norm_average(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    norms = stack.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return _weighted_mean(stack / norms, w) * _weighted_mean(norms, w)


def _subtract(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if stack.shape[0] < 2:
        raise IPAdapterError("subtract needs at least two images: the first minus the mean of the others")
    weighted = stack * w
    return weighted[0] - weighted[1:].mean(0)


def _concat(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    weighted = stack * w  # (N, B, ...)
    if weighted.dim() == 3:  # global (N, B, D) → (B, N, D)
        return weighted.transpose(0, 1)
    return torch.cat(list(weighted), dim=1)  # patch (B, N·T, D)


# mode → f(stack (N, B, ...), weights broadcastable to it)
COMBINE_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "concat": _concat,
    "add": lambda stack, w: (stack * w).sum(0),
    "subtract": _subtract,
    "average": _weighted_mean,
    "norm average": _norm_average,
    "max": lambda stack, w: (stack * w).amax(0),
    "min": lambda stack, w: (stack * w).amin(0),
}


def combine(
    embeds: Sequence[torch.Tensor], mode: str = "concat", weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Combine per-image encoder features as defined in this module's docstring."""
    if mode not in COMBINE_MODES:
        raise IPAdapterError(f"unknown combine mode {mode!r}; valid: {', '.join(COMBINE_MODES)}")
    if not embeds:
        raise IPAdapterError("combine needs at least one image's features")
    shapes = {tuple(e.shape) for e in embeds}
    if len(shapes) > 1:
        raise IPAdapterError(f"the images' features differ in shape ({sorted(shapes)}); encode them the same way")
    if embeds[0].dim() not in (2, 3):
        raise IPAdapterError(f"features must be (B, D) or (B, T, D), got shape {tuple(embeds[0].shape)}")
    weights = [1.0] * len(embeds) if weights is None else [float(w) for w in weights]
    if len(weights) != len(embeds):
        raise IPAdapterError(f"got {len(weights)} image weights for {len(embeds)} images; give one per image")
    if not all(math.isfinite(w) for w in weights):
        raise IPAdapterError(f"image weights must be finite numbers, got {weights}")
    stack = torch.stack(list(embeds))  # (N, B, ...)
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *[1] * (stack.dim() - 1))
    return COMBINE_MODES[mode](stack, w)


def project_each(project: Callable[[torch.Tensor], torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    """Project (B, N, D) global features image by image and lay the tokens side by side: (B, N·T, C)."""
    batch, images = embeds.shape[:2]
    tokens = project(embeds.reshape(batch * images, -1))  # (B·N, T, C)
    return tokens.reshape(batch, images * tokens.shape[1], tokens.shape[2])
