"""The judge: an attribute classifier (small CNN, one head per attribute) and an independently trained judge CLIP.

Both are used only to measure generated images, never to train what they measure: the classifier gives
per-attribute accuracy, the judge CLIP gives CLIP-I / CLIP-T style similarities with weights the adapters never saw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ipadapter.atomic import save_safetensors, write_text
from ipadapter.evaluate.judges import ClipJudge
from ipadapter.miniature import tiny_clip
from ipadapter.miniature.runloop import TrainRun, log
from ipadapter.miniature.world import ATTRIBUTES, SIZE_PX, Attrs, caption, make_batch

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
JUDGE_CLIP_SIZE = tiny_clip.ClipSize(hidden=96, layers=3, heads=4, projection=96)


class AttributeClassifier(nn.Module):
    """Four strided conv blocks keep a 4x4 spatial map (position and size need it), then one linear head each."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(chans[-1] * 16, 256), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in ATTRIBUTES.items()})
        self.width = width

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(pixel_values)
        return {name: head(h) for name, head in self.heads.items()}


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur half the batch and add mild noise (more than the CLIPs train with): generated images are softer than
    drawn ones, and the judge must not care."""
    return tiny_clip.augment(x, g, soften=0.5, noise=0.05)


def train_classifier(
    out_dir: str | Path, steps: int = 600, seed: int = 11, batch: int = 128, lr: float = 2e-3, resume: bool = False,
    name: str = "classifier",
) -> AttributeClassifier:
    """Cross-entropy summed over the six heads, on fresh train-split batches; saves `out_dir/judge/classifier.*`."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    run = TrainRun(out, name, steps, {"model": model}, optimizer, resume=resume)
    log.info("%s: %d parameters", name, sum(p.numel() for p in model.parameters()))
    model.train()
    for step in range(run.start_step, steps):
        images, attrs = make_batch(seed * 1_000_003 + step, batch)
        logits = model(_degrade(tiny_clip.pixels(images), g=torch.Generator().manual_seed(step)))
        labels = tiny_clip.labels(attrs)
        loss = sum(F.cross_entropy(logits[n], labels[:, i]) for i, n in enumerate(ATTRIBUTES))
        run.optimize(step, loss, lr)
        run.step_done(step + 1, loss.item())
    model.eval()
    final = out / "judge"
    save_safetensors(model.state_dict(), final / CLASSIFIER_WEIGHTS)
    write_text(final / CLASSIFIER_CONFIG, json.dumps({"width": model.width, "attributes": ATTRIBUTES}, indent=2))
    log.info("%s: saved to %s (final loss %.4f, %.1f min)", name, final, run.last_loss, run.elapsed_s() / 60)
    return model


def train_judge(out_dir: str | Path, steps: int = 500, resume: bool = False) -> dict[str, float]:
    """Judge CLIP (seed 10, smaller than the adapters' CLIP) for `steps`, the classifier for 3x as many (its
    steps are ~5x cheaper and small shapes need them); returns held-out accuracies."""
    out = Path(out_dir)
    tiny_clip.train_clip(out, name="judge_clip", steps=steps, seed=10, size=JUDGE_CLIP_SIZE, resume=resume)
    train_classifier(out, steps=3 * steps, resume=resume)
    return evaluate_judge(out)


def evaluate_judge(out_dir: str | Path) -> dict[str, float]:
    """Classifier accuracy on 2,048 held-out scenes -> `judge_eval.json`."""
    out = Path(out_dir)
    judge = Judge.load(out / "judge", clip_dir=out / "judge_clip")
    images, attrs = make_batch(12345, 2048, "heldout")
    report = judge.accuracy(images, attrs)
    write_text(out / "judge_eval.json", json.dumps({"heldout_n": 2048, "accuracy": report}, indent=2))
    log.info("judge: held-out accuracy %s", report)
    return report


def to_uint8(images) -> np.ndarray:
    """PIL images, a list of arrays, or an array ([N,H,W,3] uint8 or float in [0,1]) -> uint8 [N, 64, 64, 3]."""
    from PIL import Image

    arr = np.stack([
        np.asarray(im.convert("RGB").resize((SIZE_PX, SIZE_PX), Image.BICUBIC)) if isinstance(im, Image.Image)
        else np.asarray(im)
        for im in images
    ])
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.shape[1:3] != (SIZE_PX, SIZE_PX):
        arr = np.stack([np.asarray(Image.fromarray(a).resize((SIZE_PX, SIZE_PX), Image.BICUBIC)) for a in arr])
    return arr


class Judge:
    """Loaded judge: `predict`/`accuracy` from the classifier (an `AttributeJudge` of `ipadapter evaluate`),
    `image_similarity`/`text_score` (CLIP-I / CLIP-T) from the judge CLIP, a `ClipJudge` like the paper's."""

    def __init__(self, classifier: AttributeClassifier, clip: ClipJudge) -> None:
        self.classifier = classifier.eval()
        self.clip = clip

    @classmethod
    def load(cls, judge_dir: str | Path, clip_dir: str | Path | None = None) -> "Judge":
        """`judge_dir` holds classifier.* and (unless `clip_dir` is given) the judge CLIP in `clip/`."""
        from safetensors.torch import load_file

        judge_dir = Path(judge_dir)
        config = json.loads((judge_dir / CLASSIFIER_CONFIG).read_text())
        classifier = AttributeClassifier(width=config["width"])
        classifier.load_state_dict(load_file(judge_dir / CLASSIFIER_WEIGHTS))  # copied into its fp32 weights
        clip_dir = Path(clip_dir) if clip_dir is not None else judge_dir / "clip"
        return cls(classifier, ClipJudge.load(clip_dir, processor=tiny_clip.image_processor()))

    @torch.no_grad()
    def predict(self, images) -> list[dict[str, str]]:
        logits = self.classifier(tiny_clip.pixels(to_uint8(images)))
        index = {n: logits[n].argmax(dim=1).tolist() for n in ATTRIBUTES}
        return [{n: ATTRIBUTES[n][index[n][i]] for n in ATTRIBUTES} for i in range(len(index["shape"]))]

    def correct(self, images, attrs: Sequence[Attrs | Mapping[str, str]]) -> list[dict[str, bool]]:
        """Per image, whether each attribute is read as asked: what paired comparisons of two rows count. One truth per
        image: a list of another length is refused rather than scored on the shorter of the two."""
        truth = [a if isinstance(a, Mapping) else asdict(a) for a in attrs]
        return [{n: p[n] == t[n] for n in ATTRIBUTES} for p, t in zip(self.predict(images), truth, strict=True)]

    def accuracy(self, images, attrs: Sequence[Attrs | Mapping[str, str]]) -> dict[str, float]:
        """Fraction correct per attribute, plus "all" (every attribute right); `attrs` as `Attrs` or dicts."""
        right = self.correct(images, attrs)
        report = {n: float(np.mean([r[n] for r in right])) for n in ATTRIBUTES}
        report["all"] = float(np.mean([all(r.values()) for r in right]))
        return report

    def image_similarity(self, images_a, images_b) -> torch.Tensor:
        """CLIP-I pairwise by position (`ipadapter.evaluate.metrics.clip_i`)."""
        from ipadapter.evaluate.metrics import clip_i  # needs the eval extra (scipy)

        return clip_i(self.clip, as_pil(images_a), as_pil(images_b))

    def text_score(self, images, texts: list[str]) -> torch.Tensor:
        """Raw CLIP-T cosine pairwise by position (`ipadapter.evaluate.metrics.clip_t`)."""
        from ipadapter.evaluate.metrics import clip_t

        return clip_t(self.clip, as_pil(images), texts)


def as_pil(images) -> list:
    """Any image form `to_uint8` takes, as PIL images (what the judge CLIP's processor reads)."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]


def caption_batch(seed: int, n: int, split: str) -> tuple[list[str], list[Attrs]]:
    """Captions and attributes of `n` scenes (the images are not needed to prompt a text-to-image model)."""
    _, attrs = make_batch(seed, n, split)
    return [caption(a) for a in attrs], attrs
