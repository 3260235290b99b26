"""The metrics, each as its definition: cosines of embeddings, CLIPScore, the Fréchet distance, pairwise diversity.

Embedding models are passed in (the judge CLIP, DINOv2, Inception, LPIPS, ArcFace), so every definition here is
tested on small inputs with tiny or hand-made feature functions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from ipadapter.evaluate.judges import ClipJudge

T = TypeVar("T")
EmbedFn = Callable[[Sequence[Image.Image]], torch.Tensor]
CLIP_SCORE_WEIGHT = 2.5


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two [N, D] batches of the same shape: broadcasting one row against N would pair every
    generation with one reference without saying so."""
    if a.shape != b.shape:
        raise ValueError(f"cosine of row batches of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def clip_score(cos: torch.Tensor) -> torch.Tensor:
    """CLIPScore (Hessel et al. 2021): w·max(cos, 0) with w = 2.5; the paper's Table 1 CLIP-T values use this form."""
    return CLIP_SCORE_WEIGHT * cos.clamp(min=0)


def _repeat(embeds: torch.Tensor, per_item: int) -> torch.Tensor:
    return embeds.repeat_interleave(per_item, dim=0)


def clip_i(judge: ClipJudge, generated: Sequence[Image.Image], references: Sequence[Image.Image],
           per_reference: int = 1) -> torch.Tensor:
    """Per generation: cosine of the judge's image embeddings of it and of its reference image.

    `generated` holds `per_reference` samples of each reference in turn; each reference is embedded once.
    """
    return cosine(judge.image_embeds(generated), _repeat(judge.image_embeds(references), per_reference))


def clip_t(judge: ClipJudge, generated: Sequence[Image.Image], texts: Sequence[str], per_text: int = 1) -> torch.Tensor:
    """Per generation: raw cosine of the judge's image embedding of it and the text embedding of its caption."""
    return cosine(judge.image_embeds(generated), _repeat(judge.text_embeds(texts), per_text))


def embedding_cosine(embed: EmbedFn, generated: Sequence[Image.Image], references: Sequence[Image.Image],
                     per_reference: int = 1) -> torch.Tensor:
    """Per generation cosine under any image embedder: DINO-I with DINOv2's CLS token, face-ID with ArcFace."""
    return cosine(embed(generated), _repeat(embed(references), per_reference))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, as FID uses them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), the distance between two Gaussians (Heusel et al. 2017).

    With fewer samples than dimensions the product is singular and `sqrtm` can fail; a small ridge (eps·I) on both
    covariances then makes it defined. The tiny imaginary part numerical error leaves is dropped.
    """
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        ridge = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two sets of Inception pool features [N, 2048] (any feature width works)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def mean_pairwise(items: Sequence[T], distance: Callable[[T, T], float]) -> float | None:
    """Mean distance over all unordered pairs; None with fewer than two items."""
    pairs = list(itertools.combinations(items, 2))
    return float(np.mean([distance(a, b) for a, b in pairs])) if pairs else None


def diversity(groups: Sequence[Sequence[T]], distance: Callable[[T, T], float]) -> float | None:
    """LPIPS diversity: mean pairwise distance among the samples of one reference, averaged over references."""
    per_group = [d for d in (mean_pairwise(g, distance) for g in groups) if d is not None]
    return float(np.mean(per_group)) if per_group else None
