"""Stage checks of the miniature models: what each stage carries, measured before the next one is trained on it.

A stage below its ceiling caps every stage after it, so each recipe's output is measured on held-out scenes:
linear probes on the image encoder's features, caption-vs-one-slot-changed retrieval for the text tower, the judge
on VAE reconstructions, and the judge on text-to-image samples (full and partial captions).

Each probe reads its own scenes, so the numbers in docs/miniature.md can be measured again: the encoder probes train
on `make_batch(2024, 3072, "train")` and test on `make_batch(2025, 1024, "heldout")`, the text probes read
`make_batch(2026, n, "heldout")` and the VAE's ceiling `make_batch(2027, 512, "heldout")`; the base model's text-only
check samples 64 captions of `make_batch(778, 64, "heldout")` with 25 DDIM steps at guidance 5.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ipadapter.miniature import tiny_clip
from ipadapter.miniature.world import (
    ATTRIBUTES, SLOTS, Attrs, caption, make_batch, partial_caption, random_slots,
)


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, iters: int = 300,
) -> dict[str, float]:
    """Held-out accuracy of one multinomial logistic regression per attribute (standardised features, L2)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    report = {}
    for i, (name, values) in enumerate(ATTRIBUTES.items()):
        torch.manual_seed(0)
        head = torch.nn.Linear(train_x.shape[1], len(values))
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(iters):
            optimizer.zero_grad()
            F.cross_entropy(head(train_x), train_y[:, i]).backward()
            optimizer.step()
        with torch.no_grad():
            report[name] = float((head(test_x).argmax(1) == test_y[:, i]).float().mean())
    return report


@torch.no_grad()
def image_features(encoder, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(global `image_embeds`, flattened penultimate patch tokens) of a `CLIPVisionModelWithProjection`, in batches
    (a 257-token encoder's attention maps for thousands of images at once would not fit in memory)."""
    globals_, patches = [], []
    for start in range(0, len(images), batch):
        out = encoder(pixel_values=tiny_clip.pixels(images[start : start + batch]), output_hidden_states=True)
        globals_.append(out.image_embeds)
        patches.append(out.hidden_states[-2].flatten(1))
    return torch.cat(globals_), torch.cat(patches)


def encoder_probes(encoder, n_train: int = 3072, n_test: int = 1024, iters: int = 300) -> dict[str, dict[str, float]]:
    """Linear probes trained on train-split scenes, tested on held-out scenes: global embedding and patch tokens."""
    train_images, train_attrs = make_batch(2024, n_train, "train")
    test_images, test_attrs = make_batch(2025, n_test, "heldout")
    train_g, train_p = image_features(encoder, train_images)
    test_g, test_p = image_features(encoder, test_images)
    ytr, yte = tiny_clip.labels(train_attrs), tiny_clip.labels(test_attrs)
    return {"global": linear_probe(train_g, ytr, test_g, yte, iters),
            "patch": linear_probe(train_p, ytr, test_p, yte, iters)}


@torch.no_grad()
def text_state_gap(text_encoder, tokenizer, n: int = 64) -> dict[str, float]:
    """Per slot: the mean relative L2 distance between the text states (`last_hidden_state`, what the UNet reads) of
    a held-out caption and of the same caption with only that slot changed, over every other value. Near 0: the
    UNet is not told which value the caption names."""
    _, attrs = make_batch(2026, n, "heldout")
    report = {}
    for slot in SLOTS:
        gaps = []
        for a in attrs:
            own = getattr(a, slot)
            texts = [caption(a)] + [caption(replace(a, **{slot: v})) for v in ATTRIBUTES[slot] if v != own]
            states = text_encoder(input_ids=tiny_clip.tokenize(tokenizer, texts)).last_hidden_state.flatten(1)
            gaps += ((states[1:] - states[0]).norm(dim=1) / states[0].norm()).tolist()
        report[slot] = float(np.mean(gaps))
    return report


@torch.no_grad()
def text_told_apart(clip, tokenizer, n: int = 256, image_encoder=None) -> dict[str, float]:
    """Per slot: how often a held-out image is closer to its own caption than to every caption that changes only
    that slot (all other values). Images are embedded by the CLIP's own vision tower, or by `image_encoder` (the
    adapters' encoder, trained into this text tower's embedding space): a caption pair the text tower collapsed
    cannot be told apart by any image side, so the sharper image side measures the text tower more closely."""
    images, attrs = make_batch(2026, n, "heldout")
    encoder = image_encoder if image_encoder is not None else tiny_clip.vision_tower(clip).eval()
    image_emb = F.normalize(encoder(pixel_values=tiny_clip.pixels(images)).image_embeds, dim=-1)
    report = {}
    for slot in SLOTS:
        wins = 0
        for emb, a in zip(image_emb, attrs):
            own = getattr(a, slot)
            texts = [caption(a)] + [caption(replace(a, **{slot: v})) for v in ATTRIBUTES[slot] if v != own]
            sims = tiny_clip.embed(clip, ids=tiny_clip.tokenize(tokenizer, texts)) @ emb
            wins += int(sims.argmax() == 0)
        report[slot] = wins / n
    return report


@torch.no_grad()
def vae_ceiling(vae, judge, n: int = 512) -> dict[str, float]:
    """Judge accuracy on VAE reconstructions (latent means) of held-out scenes: the ceiling of every later stage."""
    from ipadapter.miniature.base_model import to_model_range

    images, attrs = make_batch(2027, n, "heldout")
    recon = []
    for start in range(0, n, 128):
        x = to_model_range(images[start : start + 128])
        recon.append(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1))
    pixels = ((torch.cat(recon).permute(0, 2, 3, 1).numpy() + 1) * 127.5 + 0.5).astype(np.uint8)
    return judge.accuracy(pixels, attrs)


def partial_accuracy(
    judge, images: np.ndarray, attrs: list[Attrs], keeps: list[frozenset[str]],
) -> dict[str, float | None]:
    """Per attribute, judge accuracy over the samples whose caption named it (None: no caption named it)."""
    predictions = judge.predict(images)
    report = {}
    for slot in SLOTS:
        hits = [p[slot] == getattr(a, slot) for p, a, k in zip(predictions, attrs, keeps) if slot in k]
        report[slot] = float(np.mean(hits)) if hits else None
    return report


def base_text_only(pipe, judge, n: int = 64, partial: bool = False, seed: int = 778, steps: int = 25,
                   guidance: float = 5.0) -> dict[str, float | None]:
    """Judge accuracy of text-to-image samples for held-out scenes, from full captions or random partial ones
    (then scored only on the slots each caption names)."""
    from ipadapter.miniature.base_model import sample

    _, attrs = make_batch(seed, n, "heldout")
    rng = np.random.default_rng(seed)
    keeps = [random_slots(rng, full=0.0) if partial else frozenset(SLOTS) for _ in attrs]
    images = sample(pipe, [partial_caption(a, k) for a, k in zip(attrs, keeps)], seed=seed, steps=steps,
                    guidance=guidance)
    return partial_accuracy(judge, images, attrs, keeps)
