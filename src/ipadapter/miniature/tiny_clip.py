"""A tiny `transformers.CLIPModel` for the shapes world, trained contrastively on (image, caption) pairs.

Its vision tower is the adapters' image encoder and its text tower the base model's text encoder; a second one,
trained from another seed at another size, is the judge's CLIP. Every caption gets hard negatives that change one
slot (shape, colour, size, position, background colour, pattern) or swap the two colours, and linear read-out heads
on both towers must recover every slot: without them the towers keep only what in-batch negatives need (colours) and
a text-to-image model conditioned on them cannot tell "top left" from "top right".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ipadapter.miniature import tokenizer as tok
from ipadapter.miniature.runloop import TrainRun, log
from ipadapter.miniature.world import (
    ATTRIBUTES, SIZE_PX, SLOTS, Attrs, caption, make_batch, make_masked_batch, partial_caption, random_slots,
    with_slot,
)

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


def vision_config(size: ClipSize, patch: int):
    """A `CLIPVisionConfig` of the tower's width at another patch size (4 px: 16x16 patches + class = 257 tokens,
    the token count of the published ViT-H encoders)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=size.hidden, intermediate_size=4 * size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, projection_dim=size.projection, hidden_act="gelu", image_size=SIZE_PX,
        patch_size=patch, num_channels=3,
    )


def vision_tower(clip):
    """A `CLIPModel`'s vision tower and projection as the `CLIPVisionModelWithProjection` adapters read."""
    from transformers import CLIPVisionModelWithProjection

    config = clip.config.vision_config
    config.projection_dim = clip.config.projection_dim
    encoder = CLIPVisionModelWithProjection(config)
    encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
    encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return encoder


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


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tok.MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def embed(model, images: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-norm projected embeddings of images or token ids (the same numbers CLIP*WithProjection return)."""
    if images is not None:
        features = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
    else:
        features = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return F.normalize(features, dim=-1)


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of every slot from one kind of feature; `absent` adds a class for a slot a caption omits.

    Contrastive training alone lets whatever it does not need fade (a CLIP trained only against colour-swapped
    captions kept colours and lost shape and position); these heads make every slot linearly readable from the
    features the UNet and the adapters consume.
    """

    def __init__(self, dim: int, absent: bool = False) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(dim, len(v) + int(absent)) for n, v in ATTRIBUTES.items()})

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the slots; `labels` [N, slots] (the absent class is `len(values)`)."""
        return sum(F.cross_entropy(head(features), labels[:, i]) for i, head in enumerate(self.heads.values())) / len(
            self.heads
        )


class ClipObjective(torch.nn.Module):
    """The read-out heads trained with the CLIP (image embedding, mean patch token, text embedding, mean text
    state); they are not part of the saved CLIP."""

    def __init__(self, size: ClipSize) -> None:
        super().__init__()
        self.image = AttributeHeads(size.projection)
        self.patches = AttributeHeads(size.hidden)
        self.text = AttributeHeads(size.projection, absent=True)
        self.text_states = AttributeHeads(size.hidden, absent=True)


class PatchHeads(torch.nn.Module):
    """Per-token read-outs on the patch tokens IP-Adapter Plus reads: is this patch on the object, which grid cell is
    it, and, on the object's patches, every slot of the scene.

    The mean-patch read-out alone left the tokens carrying content but little of where they are: Plus's resampler
    pooled them into nearly the same tokens when the object moved (position 26% against the base adapter's 99%).
    """

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.mask = torch.nn.Linear(dim, 1)
        self.row = torch.nn.Linear(dim, grid)
        self.col = torch.nn.Linear(dim, grid)
        self.scene = AttributeHeads(dim)

    def loss(self, tokens: torch.Tensor, masks: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """`tokens` [N, grid*grid, dim] (row-major, no class token), `masks` [N, 64, 64] object masks in [0, 1],
        `full` [N, slots] class indices."""
        n, count, _ = tokens.shape
        cover = F.avg_pool2d(masks.unsqueeze(1), SIZE_PX // self.grid).flatten(1)
        cell = torch.arange(count)
        objectness = F.binary_cross_entropy_with_logits(self.mask(tokens).squeeze(-1), cover)
        where = F.cross_entropy(self.row(tokens).flatten(0, 1), (cell // self.grid).repeat(n)) + F.cross_entropy(
            self.col(tokens).flatten(0, 1), (cell % self.grid).repeat(n)
        )
        on = cover > 0.25
        scene = self.scene.loss(tokens[on], full.unsqueeze(1).expand(n, count, -1)[on])
        return objectness + 0.5 * where + scene


def labels(attrs: list[Attrs], keep: list[frozenset[str]] | None = None) -> torch.Tensor:
    """Class indices per slot; a slot not in `keep` gets the absent class."""
    rows = []
    for i, a in enumerate(attrs):
        rows.append([
            values.index(getattr(a, slot)) if keep is None or slot in keep[i] else len(values)
            for slot, values in ATTRIBUTES.items()
        ])
    return torch.tensor(rows)


def hard_negatives(attrs: list[Attrs], rng: np.random.Generator, k: int = 3) -> list[str]:
    """Per scene, `k` captions: its caption with one random slot changed, or (one draw in seven) with object and
    background colours swapped; grouped by scene."""
    out = []
    for a in attrs:
        for _ in range(k):
            slot = int(rng.integers(len(SLOTS) + 1))
            changed = with_slot(a, SLOTS[slot], rng) if slot < len(SLOTS) else replace(a, colour=a.bg_colour, bg_colour=a.colour)
            out.append(caption(changed))
    return out


def augment(images: torch.Tensor, g: torch.Generator, soften: float = 0.25, noise: float = 0.02) -> torch.Tensor:
    """Soften a share `soften` of the batch (2x2 means spread back bilinearly) and add Gaussian noise of standard
    deviation `noise`: references may be resized drawings or generated images."""
    soft = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="bilinear", align_corners=False)
    pick = (torch.rand(len(images), 1, 1, 1, generator=g) < soften).float()
    return pick * soft + (1 - pick) * images + noise * torch.randn(images.shape, generator=g)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over n unit-norm image embeddings and text_emb = [their n captions; k hard negatives per
    image, grouped by image]: each image against every caption and its own negatives, each caption against every
    image."""
    n = len(image_emb)
    scale = log_scale.exp().clamp(max=100)
    in_batch = image_emb @ text_emb[:n].t()
    own = torch.einsum("nd,nkd->nk", image_emb, text_emb[n:].view(n, (len(text_emb) - n) // n, -1))
    target = torch.arange(n)
    return 0.5 * (
        F.cross_entropy(scale * torch.cat([in_batch, own], dim=1), target) + F.cross_entropy(scale * in_batch.t(), target)
    )


def clip_loss(model, heads: ClipObjective, images: torch.Tensor, attrs: list[Attrs], tokenizer,
              rng: np.random.Generator) -> torch.Tensor:
    """InfoNCE with every scene's one-slot-changed captions as extra negatives for its image, plus the read-out
    losses on both towers (text heads also on partial captions, with omitted slots as the absent class)."""
    n = len(attrs)
    negatives = hard_negatives(attrs, rng)
    keep = [random_slots(rng, full=0.0) for _ in attrs]
    partial = [partial_caption(a, k) for a, k in zip(attrs, keep)]
    ids = tokenize(tokenizer, [caption(a) for a in attrs] + negatives + partial)
    vision = model.vision_model(pixel_values=images, output_hidden_states=True)
    image_features = model.visual_projection(vision.pooler_output)
    text = model.text_model(input_ids=ids)
    text_features = model.text_projection(text.pooler_output)
    contrastive = contrastive_loss(
        F.normalize(image_features, dim=-1), F.normalize(text_features[: -n], dim=-1), model.logit_scale
    )
    full, some = labels(attrs), labels(attrs, keep)
    text_labels = torch.cat([full, some])
    text_rows = torch.cat([text_features[:n], text_features[-n:]])
    state_rows = torch.cat([text.last_hidden_state[:n], text.last_hidden_state[-n:]]).mean(dim=1)
    readout = (
        heads.image.loss(image_features, full)
        + heads.patches.loss(vision.hidden_states[-2][:, 1:].mean(dim=1), full)
        + heads.text.loss(text_rows, text_labels)
        + heads.text_states.loss(state_rows, text_labels)
    )
    return contrastive + readout


def train_clip(
    out_dir: str | Path,
    name: str = "clip",
    steps: int = 1200,
    seed: int = 0,
    size: ClipSize = ClipSize(),
    batch: int = 64,
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
    heads = ClipObjective(size)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    run = TrainRun(out, name, steps, {"model": model, "heads": heads}, optimizer, resume=resume)
    log.info("%s: %d parameters, size %s", name, sum(p.numel() for p in model.parameters()), asdict(size))
    model.train()
    for step in range(run.start_step, steps):
        images, attrs = make_batch(seed * 1_000_003 + step, batch)
        rng = np.random.default_rng(seed * 1_000_003 + step)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss = clip_loss(model, heads, augment(pixels(images), g), attrs, tokenizer, rng)
        run.optimize(step, loss, lr, params)
        run.step_done(step + 1, loss.item())
    model.eval()
    final = out / name
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    image_processor().save_pretrained(final)
    log.info("%s: saved to %s (final loss %.4f, %.1f min)", name, final, run.last_loss, run.elapsed_s() / 60)
    return model


def train_image_encoder(
    out_dir: str | Path,
    clip_dir: str | Path,
    name: str = "image_encoder",
    steps: int = 3000,
    seed: int = 20,
    patch: int = 4,
    batch: int = 32,
    lr: float = 1e-3,
    resume: bool = False,
    per_patch: bool = True,
):
    """The adapters' image encoder: a `CLIPVisionModelWithProjection` with 4 px patches, trained against the frozen
    text tower of `clip_dir` (InfoNCE with one-slot hard negatives) plus read-out heads on its embedding and mean
    patch token and, with `per_patch`, on every patch token (`PatchHeads`). 8 px patches could not resolve the shape
    of small objects (a linear probe read 31%)."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    out = Path(out_dir)
    clip = CLIPModel.from_pretrained(clip_dir).eval().requires_grad_(False)
    tokenizer = tok.load_tokenizer(clip_dir)
    size = ClipSize(
        hidden=clip.config.vision_config.hidden_size, layers=clip.config.vision_config.num_hidden_layers,
        heads=clip.config.vision_config.num_attention_heads, projection=clip.config.projection_dim,
    )
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(vision_config(size, patch))
    heads = ClipObjective(size)
    # The learnt temperature starts at the CLIP's and is checkpointed with the rest: a resume that restarted it would
    # not continue the run it resumes.
    temperature = torch.nn.ParameterDict({"logit_scale": clip.logit_scale.detach().clone()})
    scale = temperature["logit_scale"]
    modules: dict[str, torch.nn.Module] = {"encoder": encoder, "heads": heads, "temperature": temperature}
    params = [*encoder.parameters(), *heads.image.parameters(), *heads.patches.parameters(), scale]
    patch_heads = PatchHeads(size.hidden, SIZE_PX // patch) if per_patch else None
    if patch_heads is not None:
        modules["patch_heads"] = patch_heads
        params += list(patch_heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    run = TrainRun(out, name, steps, modules, optimizer, resume=resume)
    log.info("%s: %d parameters, patch %d, per-patch read-outs %s", name,
             sum(p.numel() for p in encoder.parameters()), patch, per_patch)
    encoder.train()
    for step in range(run.start_step, steps):
        images, masks, attrs = make_masked_batch(seed * 1_000_003 + step, batch)
        rng = np.random.default_rng(seed * 1_000_003 + step)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        negatives = hard_negatives(attrs, rng)
        with torch.no_grad():
            ids = tokenize(tokenizer, [caption(a) for a in attrs] + negatives)
            text_emb = F.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output), dim=-1)
        out_v = encoder(pixel_values=augment(pixels(images), g), output_hidden_states=True)
        contrastive = contrastive_loss(F.normalize(out_v.image_embeds, dim=-1), text_emb, scale)
        full = labels(attrs)
        tokens = out_v.hidden_states[-2][:, 1:]
        loss = contrastive + heads.image.loss(out_v.image_embeds, full) + heads.patches.loss(tokens.mean(dim=1), full)
        if patch_heads is not None:
            loss = loss + patch_heads.loss(tokens, torch.from_numpy(masks), full)
        run.optimize(step, loss, lr, params)
        run.step_done(step + 1, loss.item())
    encoder.eval()
    final = out / name
    encoder.save_pretrained(final)
    image_processor().save_pretrained(final)
    log.info("%s: saved to %s (final loss %.4f, %.1f min)", name, final, run.last_loss, run.elapsed_s() / 60)
    return encoder
