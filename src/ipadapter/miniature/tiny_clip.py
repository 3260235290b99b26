"""A tiny `transformers.CLIPModel` for the shapes world, trained contrastively on (image, caption) pairs.

Its vision tower is the adapters' image encoder and its text tower the base model's text encoder; a second one,
trained from another seed at another size, is the judge's CLIP. Each caption also gets a "colour-swapped" hard
negative (object and background colours exchanged): without it, nothing forces either tower to bind a colour
to its role, and a text-to-image model conditioned on it swaps the two colours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ipadapter.miniature import tokenizer as tok
from ipadapter.miniature.runloop import TrainRun, log
from ipadapter.miniature.world import SIZE_PX, Attrs, caption, make_batch

PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ClipSize:
    """Width/depth of both towers (kept equal: the UNet's cross-attention width is the text hidden size)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    projection: int = 128
    patch: int = 8


def clip_config(size: ClipSize):
    """A `CLIPConfig`: 64 px images in 8 px patches (65 tokens), word-level text of `tok.MAX_LENGTH` tokens."""
    from transformers import CLIPConfig

    common = dict(
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        projection_dim=size.projection,
        hidden_act="gelu",
    )
    text = dict(
        common,
        vocab_size=tok.vocab_size(),
        max_position_embeddings=tok.MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(common, image_size=SIZE_PX, patch_size=size.patch, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=size.projection)


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 64, 64, 3] -> normalised float [N, 3, 64, 64], identical to the exported CLIPImageProcessor."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def image_processor():
    """The `CLIPImageProcessor` that maps any image to what the tiny CLIP was trained on."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": SIZE_PX},
        do_center_crop=True,
        crop_size={"height": SIZE_PX, "width": SIZE_PX},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(PIXEL_MEAN),
        image_std=list(PIXEL_STD),
        do_convert_rgb=True,
    )


def _swapped(a: Attrs) -> Attrs:
    return Attrs(a.shape, a.bg_colour, a.size, a.position, a.colour, a.pattern)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tok.MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def embed(model, images: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-norm projected embeddings of images or token ids (the same numbers CLIP*WithProjection return)."""
    if images is not None:
        features = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
    else:
        features = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return F.normalize(features, dim=-1)


def contrastive_loss(model, images: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Symmetric InfoNCE over the `n` true pairs; rows n.. of `ids` are extra hard-negative captions for images."""
    image_emb = embed(model, images=images)
    text_emb = embed(model, ids=ids)
    logits = model.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.t()
    target = torch.arange(n)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].t(), target))


def train_clip(
    out_dir: str | Path,
    name: str = "clip",
    steps: int = 600,
    seed: int = 0,
    size: ClipSize = ClipSize(),
    batch: int = 128,
    lr: float = 1e-3,
    resume: bool = False,
):
    """Train a tiny CLIP on fresh world batches (train split only) and save it to `out_dir/name/`; returns it."""
    from transformers import CLIPModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok_dir = tok.save_tokenizer(out / f"{name}_tokenizer")
    tokenizer = tok.load_tokenizer(tok_dir)
    model = CLIPModel(clip_config(size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    run = TrainRun(out, name, steps, {"model": model}, optimizer, resume=resume)
    log.info("%s: %d parameters, size %s", name, sum(p.numel() for p in model.parameters()), asdict(size))
    model.train()
    for step in range(run.start_step, steps):
        images, attrs = make_batch(seed * 1_000_003 + step, batch)
        ids = tokenize(tokenizer, [caption(a) for a in attrs] + [caption(_swapped(a)) for a in attrs])
        loss = contrastive_loss(model, pixels(images), ids, batch)
        run.optimize(step, loss, lr, model.parameters())
        run.step_done(step + 1, loss.item())
    model.eval()
    final = out / name
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    image_processor().save_pretrained(final)
    log.info("%s: saved to %s (final loss %.4f, %.1f min)", name, final, run.last_loss, run.elapsed_s() / 60)
    return model


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, seed: int, n: int = 256, split: str = "heldout") -> dict[str, float]:
    """Image->caption top-1 among `n` captions plus each image's colour-swapped caption (binding check)."""
    images, attrs = make_batch(seed, n, split)
    ids = tokenize(tokenizer, [caption(a) for a in attrs] + [caption(_swapped(a)) for a in attrs])
    sims = embed(model, images=pixels(images)) @ embed(model, ids=ids).t()
    top1 = (sims.argmax(dim=1) == torch.arange(n)).float().mean().item()
    own, swapped = sims.diagonal(), sims[:, n:].diagonal()
    binding = (own > swapped).float().mean().item()
    return {"top1": top1, "binding": binding}
