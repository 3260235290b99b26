"""Metrics over the samples on disk, per (method, scale), streamed in chunks of references to bound memory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ipadapter.errors import IPAdapterError
from ipadapter.evaluate import extractors, metrics
from ipadapter.evaluate.judges import AttributeJudge, ClipJudge
from ipadapter.evaluate.manifests import Entry
from ipadapter.evaluate.runner import Plan, load_samples

log = logging.getLogger(__name__)
METRICS = ("clip_i", "clip_t", "dino_i", "fid", "lpips", "face_id", "attributes")


@dataclass
class Toolbox:
    """The measuring models a run has; `skipped` says, per metric, why it could not be computed."""

    judge: ClipJudge | None = None
    dino: metrics.EmbedFn | None = None
    inception: extractors.FeatureFn | None = None
    lpips: extractors.Distance | None = None
    face: metrics.EmbedFn | None = None
    attributes: AttributeJudge | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def build_toolbox(
    wanted: Sequence[str], judge: Callable[[], ClipJudge], *, dino: str | None = None, inception: str | None = None,
    attributes: Callable[[], AttributeJudge] | None = None, device: str = "cpu",
) -> Toolbox:
    """Load what `wanted` needs; an absent optional network becomes a `skipped` message, never a failed run."""
    box = Toolbox()
    if {"clip_i", "clip_t"} & set(wanted):
        box.judge = judge()
    loaders = {
        "dino_i": ("dino", lambda: extractors.dino_embedder(dino or extractors.DINO_DEFAULT, device)),
        "fid": ("inception", lambda: extractors.inception_features(inception, device)),
        "lpips": ("lpips", lambda: extractors.lpips_distance(device)),
        "face_id": ("face", extractors.arcface_embedder),
    }
    for metric, (slot, load) in loaders.items():
        if metric in wanted:
            try:
                setattr(box, slot, load())
            except extractors.MetricUnavailable as err:
                box.skipped[metric] = str(err)
                log.warning("skipping %s: %s", metric, err)
    if "attributes" in wanted:
        if attributes is None:
            box.skipped["attributes"] = "per-attribute agreement needs an attribute judge and a manifest with attrs"
        else:
            try:
                box.attributes = attributes()
            except IPAdapterError as err:
                box.skipped["attributes"] = str(err)
    return box


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def score_run(plan: Plan, entries: Sequence[Entry], out: Path, method: str, scale: float, box: Toolbox,
              chunk: int = 32) -> dict:
    """One results row: means over every (reference, sample) pair; FID between the generated and reference sets."""
    k = plan.samples
    pairs: dict[str, list[float]] = {m: [] for m in ("clip_i", "clip_t_cos", "dino_i", "face_id")}
    features: dict[str, list[np.ndarray]] = {"generated": [], "references": []}
    # per chunk: (value, weight) — LPIPS per reference, attribute agreement per sample; chunk means weighted back
    diversity: list[tuple[dict[str, float], int]] = []
    agreement: list[tuple[dict[str, float], int]] = []
    for start in range(0, len(entries), chunk):
        part = entries[start : start + chunk]
        refs = [e.image() for e in part]
        gens = [im for e in part for im in load_samples(plan, e, method, scale, out)]
        if box.judge is not None:
            pairs["clip_i"] += metrics.clip_i(box.judge, gens, refs, k).tolist()
            pairs["clip_t_cos"] += metrics.clip_t(box.judge, gens, [e.text for e in part], k).tolist()
        if box.dino is not None:
            pairs["dino_i"] += metrics.embedding_cosine(box.dino, gens, refs, k).tolist()
        if box.face is not None:
            pairs["face_id"] += metrics.embedding_cosine(box.face, gens, refs, k).tolist()
        if box.inception is not None:
            features["generated"].append(box.inception(gens))
            features["references"].append(box.inception(refs))
        if box.lpips is not None and k > 1:
            groups = [gens[i * k : (i + 1) * k] for i in range(len(part))]
            diversity.append(({"lpips": metrics.diversity(groups, box.lpips)}, len(part)))
        if box.attributes is not None:
            asked = [(im, e.attrs) for i, e in enumerate(part) if e.attrs for im in gens[i * k : (i + 1) * k]]
            if asked:
                images, attrs = zip(*asked)
                agreement.append((box.attributes.accuracy(list(images), list(attrs)), len(asked)))
    row: dict = {"name": method, "scale": scale, "references": len(entries), "samples": len(entries) * k}
    if box.judge is not None:
        cos = torch.tensor(pairs["clip_t_cos"])
        row.update(clip_i=_mean(pairs["clip_i"]), clip_t=float(metrics.clip_score(cos).mean()),
                   clip_t_cos=float(cos.mean()))
    if box.dino is not None:
        row["dino_i"] = _mean(pairs["dino_i"])
    if box.face is not None:
        row["face_id"] = _mean(pairs["face_id"])
        row["face_missing"] = int(sum(not np.isfinite(v) for v in pairs["face_id"]))
    if box.inception is not None:  # a covariance needs two references at least
        row["fid"] = (metrics.fid(np.concatenate(features["generated"]), np.concatenate(features["references"]))
                      if len(entries) > 1 else None)
    if box.lpips is not None:
        row["lpips"] = _weighted(diversity).get("lpips")
    if agreement:
        row["attributes"] = _weighted(agreement)
    return row


def _weighted(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Means of per-chunk means, weighted by the chunk sizes (equal to the mean over all items)."""
    total = sum(n for _, n in parts)
    return {key: sum(values[key] * n for values, n in parts) / total for key in (parts[0][0] if parts else {})}


def score(plan: Plan, entries: Sequence[Entry], out: Path, box: Toolbox) -> list[dict]:
    return [score_run(plan, entries, out, method, scale, box) for method in plan.methods for scale in plan.scales]
