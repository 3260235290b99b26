"""Aspect-ratio buckets: sizes of about resolution² pixels, each side a multiple of what the base can take, from
1:2 to 2:1. An image goes to the bucket whose aspect ratio is closest to its own (in log ratio), is scaled to cover
it and centre-cropped; SDXL's size/crop conditioning then says (original size, crop top-left, bucket size).

A batch has one size. For manifests the epoch order is arranged so that each process's batches come from one
bucket (the samples of a bucket in permutation order, cut into batches, the batches in a seeded order); a batch
that a skipped sample leaves short is completed by the next samples, resized to the batch's bucket. Shards are
streamed, so there each batch takes the bucket of its first sample.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

MAX_RATIO = 2.0


def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """(height, width) pairs, widest last, with h·w ≤ resolution², sides multiples of `multiple`, ratio ≤ 2:1. Each
    landscape size comes with its portrait transpose: rounding the height down to `multiple` for each width alone
    would give the two orientations different ratios (1024 px: 704×1408 but no 1408×704)."""
    sizes = {(resolution, resolution)}
    area = resolution * resolution
    for width in range(multiple, 2 * resolution + 1, multiple):
        height = area // width // multiple * multiple
        if height >= multiple and 1 <= width / height <= MAX_RATIO:
            sizes |= {(height, width), (width, height)}
    return sorted(sizes, key=lambda s: s[1] / s[0])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket for an image of (height, width)."""
    ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from a manifest image's header, None when it cannot be read (the sample is skipped later)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except Exception:  # missing or broken: decoding skips and counts it, with its reason
        return None


def grouped_order(order: list[int], groups: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """`order` rearranged so that every `batch_size` consecutive items share a group: each group's items in their
    order, cut into batches, the batches shuffled by `generator`."""
    by_group: dict[int, list[int]] = {}
    for i in order:
        by_group.setdefault(groups[i], []).append(i)
    chunks = [items[j : j + batch_size] for items in by_group.values() for j in range(0, len(items), batch_size)]
    full = [c for c in chunks if len(c) == batch_size]
    short = [c for c in chunks if len(c) < batch_size]  # the groups' remainders go last, together
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for chunk in shuffled + short for i in chunk]
