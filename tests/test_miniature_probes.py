"""The miniature stage probes: linear probes read exactly what the features carry, and caption retrieval through
another image encoder measures the same thing as through the CLIP's own tower when that encoder is the tower."""

from __future__ import annotations

import torch

from ipadapter.miniature import probes, tiny_clip
from ipadapter.miniature import tokenizer as tok
from ipadapter.miniature.world import ATTRIBUTES, make_batch


def test_linear_probe_reads_each_attribute_from_its_own_features() -> None:
    """Features that are the one-hot shape label and noise: shape is read perfectly, the rest near chance."""
    torch.manual_seed(0)

    def features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, attrs = make_batch(seed, n)
        y = tiny_clip.labels(attrs)
        x = torch.cat([torch.nn.functional.one_hot(y[:, 0], len(ATTRIBUTES["shape"])).float(),
                       torch.randn(n, 4)], dim=1)
        return x, y

    report = probes.linear_probe(*features(600, 1), *features(300, 2), iters=200)
    assert report["shape"] == 1.0
    assert all(report[a] < 0.5 for a in ("colour", "position", "bg_colour"))


def test_told_apart_through_an_encoder_equal_to_the_clip_tower_equals_the_clip(tmp_path) -> None:
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(tiny_clip.clip_config(tiny_clip.ClipSize(hidden=32, layers=1, heads=2, projection=16))).eval()
    tokenizer = tok.load_tokenizer(tok.save_tokenizer(tmp_path / "tokenizer"))
    own = probes.text_told_apart(clip, tokenizer, n=12)
    through = probes.text_told_apart(clip, tokenizer, n=12, image_encoder=tiny_clip.vision_tower(clip).eval())
    assert own == through and set(own) == set(ATTRIBUTES)
    other = tiny_clip.vision_tower(clip).eval()
    torch.nn.init.normal_(other.visual_projection.weight)
    assert probes.text_told_apart(clip, tokenizer, n=12, image_encoder=other) != own
