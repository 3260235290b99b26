"""`ipadapter miniature eval`: every stage of the miniature model measured on held-out scenes, then the adapters.

A stage below its ceiling caps every stage after it, so the report measures them in order: the image encoder
(linear probes on its features), the text encoder (are captions that differ in one slot told apart), the VAE
(the judge on reconstructions: the ceiling of everything drawn), the base model from text alone (full and partial
captions), then the IP-Adapter conditions. Each condition generates one image per held-out reference and is scored
against the scene it asked for: image-only conditions ask for the reference itself; "+ text" asks for the reference
with the shape the text names; ControlNet asks for the reference's colours with the shape, size and position of the
control mask's scene; PIL-drawn references (any size, not drawn by the world) ask for what was drawn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ipadapter.errors import IPAdapterError
from ipadapter.loading import MINIATURE_GUIDANCE, MINIATURE_STEPS
from ipadapter.miniature import probes
from ipadapter.miniature.models import Loaded, Models
from ipadapter.miniature.runloop import log
from ipadapter.miniature.world import (
    ATTRIBUTES, PALETTE, POSITIONS, SHAPES, Attrs, caption, make_batch, make_masked_batch, mask_image,
)

REFERENCE_SEED, MASK_SEED, SHAPE_SEED, PIL_SEED = 9100, 9200, 9300, 9400
# The text of the "+ text" condition names only the new shape: naming colours would make colour agreement trivial.
SHAPE_PROMPT = "a {shape}"
CHANCE = {name: 1.0 / len(values) for name, values in ATTRIBUTES.items()}
# The image + text trade-off: shape from the text against colours from the image, across adapter scales.
SWEEP_CONDITION = "IP-Adapter + text (another shape)"
SWEEP_SCALES = (0.3, 0.6, 1.0)
PIL_SIDES = (48, 96, 128, 200)  # reference sizes in pixels: the encoder's preprocessing must handle any


@dataclass(frozen=True)
class Condition:
    """One row: which model and adapter, what text, which references, which attributes are scored."""

    name: str
    adapter: str  # key of `Models.adapters`
    prompt: str = "none"  # "shape" (SHAPE_PROMPT naming another shape) or "none"
    scale: float = 1.0
    model: str = "base"  # "base" or "custom" (the base UNet with the custom-style LoRA fused)
    control: bool = False  # the object mask of another scene through the miniature ControlNet
    references: str = "world"  # "world" (held-out scenes) or "pil" (drawn with PIL at several sizes)


CONDITIONS: tuple[Condition, ...] = (
    Condition("IP-Adapter, image only", adapter="base"),
    Condition("IP-Adapter Plus, image only", adapter="plus"),
    Condition("IP-Adapter + text (another shape)", adapter="base", prompt="shape", scale=0.6),
    Condition("simple adapter (ablation), image only", adapter="simple"),
    Condition("simple adapter (ablation) + text (another shape)", adapter="simple", prompt="shape", scale=0.6),
    Condition("IP-Adapter on the custom model, image only", adapter="base", model="custom"),
    # At the "+ text" row's scale: at full scale the image prompt also asks for the reference's position (the adapter
    # carries it 99%), which competes with the mask's (position 84% at 1.0, 92% at 0.8, 97% at 0.6).
    Condition("ControlNet (mask) + IP-Adapter", adapter="base", control=True, scale=0.6),
    Condition("IP-Adapter, image only, PIL-drawn references", adapter="base", references="pil"),
)


@dataclass(frozen=True)
class Size:
    """How many scenes each measurement uses; `QUICK` runs the whole report in seconds (a smoke test, not a result)."""

    references: int = 48
    probe_train: int = 3072
    probe_test: int = 1024
    probe_iters: int = 300
    text: int = 256
    vae: int = 512
    base: int = 64
    steps: int = MINIATURE_STEPS  # the settings `ipadapter generate` uses on the miniature
    guidance: float = MINIATURE_GUIDANCE
    batch: int = 16
    sweep: bool = True


QUICK = Size(references=2, probe_train=48, probe_test=16, probe_iters=10, text=2, vae=4, base=2, steps=2, batch=4,
             sweep=False)


def asked_for(condition: Condition, ref: Attrs, shape: str, mask_scene: Attrs) -> Attrs:
    """The scene a condition should produce, given the reference, the text's shape and the mask's scene."""
    if condition.prompt == "shape":
        return replace(ref, shape=shape)
    if condition.control:
        return replace(ref, shape=mask_scene.shape, size=mask_scene.size, position=mask_scene.position)
    return ref


def other_shapes(refs: list[Attrs], seed: int = SHAPE_SEED) -> list[str]:
    """For each reference another shape, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    return [[s for s in SHAPES if s != r.shape][rng.integers(len(SHAPES) - 1)] for r in refs]


def prompt_for(condition: Condition, shape: str) -> str:
    """The condition's text: the other shape for "+ text" rows, else empty (the image alone)."""
    return SHAPE_PROMPT.format(shape=shape) if condition.prompt == "shape" else ""


def draw_with_pil(attrs: Attrs, side: int) -> Image.Image:
    """The scene as a plain PNG made with PIL, not the world's renderer: the object of `attrs` (centred in its grid
    cell, the world's half-extents scaled to `side`) on a plain background of `attrs.bg_colour`."""
    from PIL import ImageDraw

    image = Image.new("RGB", (side, side), PALETTE[attrs.bg_colour])
    draw = ImageDraw.Draw(image)
    k = side / 64
    r = {"small": 6.0, "medium": 10.0, "large": 14.0}[attrs.size] * k
    row, col = divmod(POSITIONS.index(attrs.position), 3)
    cx, cy = (16 + 16 * col) * k, (16 + 16 * row) * k
    fill = PALETTE[attrs.colour]
    if attrs.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif attrs.shape == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif attrs.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif attrs.shape == "diamond":
        d = 1.1 * r
        draw.polygon([(cx, cy - d), (cx + d, cy), (cx, cy + d), (cx - d, cy)], fill=fill)
    elif attrs.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.45 * r)))
    else:
        arm = 0.33 * r
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
    return image


def pil_references(n: int, seed: int = PIL_SEED) -> tuple[list[Image.Image], list[Attrs]]:
    """`n` held-out scenes (plain backgrounds) drawn with PIL at the sizes of `PIL_SIDES` in turn."""
    _, attrs = make_batch(seed, n, "heldout")
    attrs = [replace(a, pattern="plain") for a in attrs]
    return [draw_with_pil(a, PIL_SIDES[i % len(PIL_SIDES)]) for i, a in enumerate(attrs)], attrs


@dataclass
class Inputs:
    """The references, texts and masks every condition draws from (fixed seeds, so rows are comparable)."""

    images: list[Image.Image]
    attrs: list[Attrs]
    shapes: list[str]
    masks: list[Image.Image]
    mask_scenes: list[Attrs]
    pil_images: list[Image.Image] = field(default_factory=list)
    pil_attrs: list[Attrs] = field(default_factory=list)

    @classmethod
    def build(cls, n: int, split: str = "heldout") -> "Inputs":
        """The report's inputs; `split="train"` draws the references from the training combinations instead, to
        tell what does not generalise to unseen (shape, colour, background) triples from what is not learnt."""
        arrays, attrs = make_batch(REFERENCE_SEED, n, split)
        _, mask_arrays, mask_scenes = make_masked_batch(MASK_SEED, n, "train")
        pil_images, pil_attrs = pil_references(n)
        return cls([Image.fromarray(a) for a in arrays], attrs, other_shapes(attrs),
                   [mask_image(m) for m in mask_arrays], mask_scenes, pil_images, pil_attrs)

    def for_condition(self, condition: Condition) -> tuple[list[Image.Image], list[str], list[Attrs]]:
        """(references, texts, asked-for scenes) of a condition."""
        if condition.references == "pil":
            return self.pil_images, [""] * len(self.pil_images), self.pil_attrs
        prompts = [prompt_for(condition, s) for s in self.shapes]
        truth = [asked_for(condition, r, s, m) for r, s, m in zip(self.attrs, self.shapes, self.mask_scenes)]
        return self.images, prompts, truth


@torch.no_grad()
def generate(loaded: Loaded, condition: Condition, refs: list[Image.Image], prompts: list[str],
             masks: list[Image.Image], size: Size, seed: int = REFERENCE_SEED) -> list[Image.Image]:
    """One image per reference, in batches; the adapter is attached for this condition only and detached after."""
    from ipadapter.prompter import ImagePrompter
    from ipadapter.runtime import AdapterPrompt, Reference

    pipe = loaded.pipeline(condition.model, control=condition.control)
    images: list[Image.Image] = []
    with ImagePrompter(pipe, loaded.adapter(condition.adapter, pipe.unet), loaded.encoder) as prompter:
        for start in range(0, len(refs), size.batch):
            chunk = slice(start, start + size.batch)
            per_image = prompter.references(refs[chunk])
            rows = Reference(cond=torch.cat([r.cond for r in per_image]), uncond=torch.cat([r.uncond for r in per_image]))
            kwargs: dict[str, Any] = {"image": masks[chunk]} if condition.control else {}
            images += prompter.generate(AdapterPrompt([rows], scale=condition.scale), prompt=prompts[chunk],
                                        steps=size.steps, guidance=size.guidance, seed=seed + start, **kwargs)
    return images


def measure_stages(loaded: Loaded, judge, size: Size) -> dict[str, Any]:
    """The stage rows: encoder probes, text told apart, VAE ceiling, base model from full and partial captions."""
    stages: dict[str, Any] = {}
    log.info("miniature eval: image encoder probes")
    stages["image_encoder"] = probes.encoder_probes(loaded.encoder.model, size.probe_train, size.probe_test,
                                                    size.probe_iters)
    log.info("miniature eval: text encoder")
    text: dict[str, Any] = {"state_gap": probes.text_state_gap(loaded.text_encoder, loaded.tokenizer, size.text)}
    if loaded.clip is not None:
        text["told_apart_clip"] = probes.text_told_apart(loaded.clip, loaded.tokenizer, size.text)
        text["told_apart"] = probes.text_told_apart(loaded.clip, loaded.tokenizer, size.text,
                                                    image_encoder=loaded.encoder.model)
    stages["text_encoder"] = text
    log.info("miniature eval: VAE ceiling")
    stages["vae"] = probes.vae_ceiling(loaded.vae, judge, size.vae)
    base = loaded.pipeline("base")
    for key, partial in (("base_full", False), ("base_partial", True)):
        log.info("miniature eval: %s", key)
        stages[key] = probes.base_text_only(base, judge, size.base, partial=partial, steps=size.steps,
                                            guidance=size.guidance)
    return stages


def evaluate(out: Path, models: Models | None = None, size: Size = Size(),
             conditions: tuple[Condition, ...] = CONDITIONS, stages: bool = True) -> dict[str, Any]:
    """Measure, judge and write `results.json`, `report.md`, `agreement.png`, `samples.png` and (with the sweep)
    `text_image_sweep.png` into `out`."""
    from ipadapter.atomic import write_text
    from ipadapter.miniature.report import plot_agreement, plot_sweep, render_report, samples_grid

    models = models or Models.bundled()
    if size.references < 1:
        raise IPAdapterError(f"the number of references must be at least 1, got {size.references}")
    skipped = {c.name: why for c in conditions if (why := models.missing(c.adapter, c.model, c.control))}
    runnable = [c for c in conditions if c.name not in skipped]
    loaded = Loaded(models)
    judge = loaded.judge()
    inputs = Inputs.build(size.references)
    results: dict[str, Any] = {"size": asdict(size), "models": models.described(), "rows": {}, "skipped": skipped}
    if stages:
        results["stages"] = measure_stages(loaded, judge, size)
    samples: dict[str, list[Image.Image]] = {}
    for condition in runnable:
        log.info("miniature eval: %s", condition.name)
        refs, prompts, truth = inputs.for_condition(condition)
        images = generate(loaded, condition, refs, prompts, inputs.masks, size)
        agreement = judge.accuracy(images, truth)
        results["rows"][condition.name] = {
            "condition": asdict(condition),
            "clip_i": float(judge.image_similarity(images, refs).mean()),
            "clip_t": float(judge.text_score(images, [caption(t) for t in truth]).mean()),
            "agreement": {k: v for k, v in agreement.items() if k in ATTRIBUTES},
        }
        samples[condition.name] = images
    sweep_base = next((c for c in runnable if c.name == SWEEP_CONDITION), None)
    if sweep_base is not None and size.sweep:
        results["sweep"] = {}
        for scale in SWEEP_SCALES:
            if scale == sweep_base.scale:  # the table's row: same prompts, seed and scale, so the same images
                results["sweep"][str(scale)] = results["rows"][sweep_base.name]["agreement"]
                continue
            condition = replace(sweep_base, scale=scale)
            refs, prompts, truth = inputs.for_condition(condition)
            images = generate(loaded, condition, refs, prompts, inputs.masks, size)
            results["sweep"][str(scale)] = {k: v for k, v in judge.accuracy(images, truth).items() if k in ATTRIBUTES}
    results["targets"] = check_targets(results)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "report.md", render_report(results))
    plot_agreement(results, out / "agreement.png")
    if results.get("sweep"):
        plot_sweep(results, out / "text_image_sweep.png")
    inputs_shown = [("reference", inputs.images), ("control mask", inputs.masks), ("PIL reference", inputs.pil_images)]
    samples_grid(inputs_shown + list(samples.items()), out / "samples.png")
    return results


def _agreement(results: dict[str, Any], row: str) -> dict[str, float] | None:
    found = results["rows"].get(row)
    return None if found is None else found["agreement"]


def _composition(agreement: dict[str, float] | None) -> float | None:
    """Image + text: the weakest of shape (from the text) and object and background colour (from the image)."""
    return None if agreement is None else min(agreement[a] for a in ("shape", "colour", "bg_colour"))


def _floor(values: dict[str, float | None] | None, floors: dict[str, float]) -> dict[str, Any]:
    """Each attribute at or above its floor; not judged (None) while any attribute is unmeasured."""
    if values is None:
        return {"measured": None, "met": None}
    measured = {a: values[a] for a in floors}
    if None in measured.values():
        return {"measured": measured, "met": None}
    return {"measured": measured, "met": all(measured[a] >= f for a, f in floors.items())}


def check_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's stage table, each target with its measured values and whether it is met (None: not measured)."""
    stages = results.get("stages", {})
    targets: dict[str, dict[str, Any]] = {
        "image encoder: linear probe on the global embedding, every attribute >= 90%":
            _floor(stages.get("image_encoder", {}).get("global"), dict.fromkeys(ATTRIBUTES, 0.9)),
        "text encoder: caption vs one slot changed told apart >= 95% (retrieval)":
            _floor(stages.get("text_encoder", {}).get("told_apart"), dict.fromkeys(ATTRIBUTES, 0.95)),
        "VAE reconstruction: every attribute >= 95%": _floor(stages.get("vae"), dict.fromkeys(ATTRIBUTES, 0.95)),
        "base, text only, full caption: shape, position >= 80%, colours/size/pattern >= 90%":
            _floor(stages.get("base_full"), {"shape": 0.8, "position": 0.8, "colour": 0.9, "size": 0.9,
                                             "bg_colour": 0.9, "pattern": 0.9}),
        "base, partial captions: each named attribute >= 80%":
            _floor(stages.get("base_partial"), dict.fromkeys(ATTRIBUTES, 0.8)),
        "IP-Adapter, image only: colours and pattern >= 85%, shape and size >= 70%":
            _floor(_agreement(results, "IP-Adapter, image only"),
                   {"colour": 0.85, "bg_colour": 0.85, "pattern": 0.85, "shape": 0.7, "size": 0.7}),
    }
    base, plus = _agreement(results, "IP-Adapter, image only"), _agreement(results, "IP-Adapter Plus, image only")
    targets["Plus, image only: >= the base adapter on every attribute"] = (
        {"measured": None, "met": None} if base is None or plus is None else
        {"measured": {a: plus[a] - base[a] for a in ATTRIBUTES},
         "met": all(plus[a] >= base[a] for a in ATTRIBUTES)})
    sweep = results.get("sweep") or ({"0.6": _agreement(results, SWEEP_CONDITION)}
                                     if _agreement(results, SWEEP_CONDITION) else {})
    best = max(sweep.items(), key=lambda kv: _composition(kv[1]), default=None)
    targets["image + text at the best scale: shape follows the text, colours the image, >= 70% each"] = (
        {"measured": None, "met": None} if best is None else
        {"measured": {"scale": float(best[0]), **{a: best[1][a] for a in ("shape", "colour", "bg_colour")}},
         "met": _composition(best[1]) >= 0.7})
    rows = results["rows"]
    decoupled, simple = rows.get("IP-Adapter, image only"), rows.get("simple adapter (ablation), image only")
    compose = (_composition(_agreement(results, SWEEP_CONDITION)),
               _composition(_agreement(results, "simple adapter (ablation) + text (another shape)")))
    targets["decoupled vs simple adapter: CLIP-I ahead by >= 0.03, and ahead on image + text"] = (
        {"measured": None, "met": None} if decoupled is None or simple is None or None in compose else
        {"measured": {"clip_i_gap": decoupled["clip_i"] - simple["clip_i"], "composition_gap": compose[0] - compose[1]},
         "met": decoupled["clip_i"] - simple["clip_i"] >= 0.03 and compose[0] > compose[1]})
    custom = _agreement(results, "IP-Adapter on the custom model, image only")
    targets["same adapter on the custom model: within 5 points of the base model on every attribute"] = (
        {"measured": None, "met": None} if base is None or custom is None else
        {"measured": {a: custom[a] - base[a] for a in ATTRIBUTES},
         "met": all(abs(custom[a] - base[a]) <= 0.05 for a in ATTRIBUTES)})
    targets["ControlNet (mask) + image: position >= 85%, colours kept >= 80%"] = _floor(
        _agreement(results, "ControlNet (mask) + IP-Adapter"), {"position": 0.85, "colour": 0.8, "bg_colour": 0.8})
    drawn = _agreement(results, "IP-Adapter, image only, PIL-drawn references")
    targets["PIL-drawn references: colours carried within 5 points of drawn-by-the-world references"] = (
        {"measured": None, "met": None} if base is None or drawn is None else
        {"measured": {a: drawn[a] - base[a] for a in ("colour", "bg_colour")},
         "met": all(drawn[a] >= base[a] - 0.05 for a in ("colour", "bg_colour"))})
    return targets
