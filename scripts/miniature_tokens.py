"""Where an adapter loses a scene slot: in its image tokens, or after them (the UNet's use of them).

For each adapter of a miniature run folder: how far its tokens move when exactly one slot of a held-out scene
changes (mean L2 change of the flattened tokens over their mean distance from the mean: 0 = the slot is ignored), and
a linear probe of every slot on the tokens (held-out scenes). A slot the tokens carry but the images do not follow is
lost in the attention layers, not in the encoder or the projection. docs/miniature.md, "v4 in training".

    python scripts/miniature_tokens.py runs/v4 base plus
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ipadapter.checkpoint import load_adapter
from ipadapter.encoders import ImageEncoder
from ipadapter.miniature import probes, tiny_clip, world
from ipadapter.miniature.world import ATTRIBUTES, Attrs


def images(scenes: list[Attrs], seed: int) -> list[Image.Image]:
    """Each scene drawn with its own fixed seed, so two scene lists differing in one slot differ only there."""
    return [Image.fromarray(world.draw(a, np.random.default_rng(seed + i))) for i, a in enumerate(scenes)]


@torch.no_grad()
def tokens(adapter: torch.nn.Module, encoder: ImageEncoder, pictures: list[Image.Image]) -> torch.Tensor:
    features = "patch" if adapter.variant.features == "patch" else "global"
    return torch.cat([adapter.project(encoder.encode(pictures[s:s + 128], features)).flatten(1)
                      for s in range(0, len(pictures), 128)])


def movement(adapter: torch.nn.Module, encoder: ImageEncoder, n: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    scenes = [world.sample_attrs(rng, "heldout") for _ in range(n)]
    base = tokens(adapter, encoder, images(scenes, 1))
    spread = (base - base.mean(0)).norm(dim=1).mean()
    moved = {}
    for slot in ATTRIBUTES:
        other = np.random.default_rng(5)
        changed = tokens(adapter, encoder, images([world.with_slot(a, slot, other) for a in scenes], 1))
        moved[slot] = round(float((changed - base).norm(dim=1).mean() / spread), 3)
    return moved


def probe(adapter: torch.nn.Module, encoder: ImageEncoder, train: int, test: int) -> dict[str, float]:
    train_images, train_attrs = world.make_batch(2024, train, "train")
    test_images, test_attrs = world.make_batch(2025, test, "heldout")
    as_pil = lambda batch: [Image.fromarray(x) for x in batch]  # noqa: E731
    return probes.linear_probe(tokens(adapter, encoder, as_pil(train_images)), tiny_clip.labels(train_attrs),
                               tokens(adapter, encoder, as_pil(test_images)), tiny_clip.labels(test_attrs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a miniature run folder (pipeline/, adapter-<name>/)")
    parser.add_argument("adapters", nargs="+", help="base, plus or simple")
    parser.add_argument("--moved", type=int, default=64, help="held-out scenes for the movement")
    parser.add_argument("--train", type=int, default=2048, help="probe training scenes")
    parser.add_argument("--test", type=int, default=512, help="probe held-out scenes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(args.run / "pipeline" / "unet")
    encoder = ImageEncoder.from_pretrained(args.run / "pipeline" / "image_encoder")
    for name in args.adapters:
        adapter = load_adapter(args.run / f"adapter-{name}" / "adapter.ipadapter.safetensors", unet).eval()
        result = {"moved": movement(adapter, encoder, args.moved), "probe": probe(adapter, encoder, args.train, args.test)}
        print(name, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
