"""The finished model folder: what a user uploads to a model hub as it is.

`ip-adapter.safetensors` (published layout) and `adapter.ipadapter.safetensors` (the project's own) are written by
the trainer; this module adds `README.md` (a model card: base, encoder, variant, data size, steps, config, samples,
loss), `samples.png` (the last validation grid) and `loss.png` (the loss curve from `logs/losses.csv`, which every
step appends to, so a resumed run draws its whole history; a run starts by dropping the steps after its first one,
so a fresh run into a used folder draws only itself).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ipadapter.atomic import copy_file, save_png, write_text
from ipadapter.variants import get_variant

LOSSES = Path("logs") / "losses.csv"


def append_loss(output: Path, step: int, loss: float) -> None:
    path = output / LOSSES
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{step},{loss!r}\n")


def restart_losses(output: Path, start: int) -> None:
    """Keep only the logged steps up to `start` (0: a fresh run): the steps after it belong to another run, or to the
    part of this one a resume from an earlier checkpoint redoes."""
    path = output / LOSSES
    if path.is_file():
        write_text(path, "".join(f"{step},{loss!r}\n" for step, loss in read_losses(output) if step <= start))


def read_losses(output: Path) -> list[tuple[int, float]]:
    """(step, loss) in step order; a step logged twice (a resumed run redoing it) keeps its last value."""
    path = output / LOSSES
    if not path.is_file():
        return []
    by_step: dict[int, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        step, _, loss = line.partition(",")
        if step.isdigit():
            by_step[int(step)] = float(loss)
    return sorted(by_step.items())


def loss_curve(points: list[tuple[int, float]], size: tuple[int, int] = (640, 360)) -> Image.Image:
    """The loss per step (grey) and its running mean over ~2% of the run (black), with the axes' ranges written."""
    w, h = size
    pad = 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, 8, w - 8, h - pad], outline="black")
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if not finite:
        draw.text((pad + 8, h // 2), "no finite loss recorded", fill="black")
        return image
    steps, values = [s for s, _ in finite], [v for _, v in finite]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (pad + (step - first) / (last - first) * (w - 8 - pad), h - pad - (value - lo) / (hi - lo) * (h - pad - 8))

    draw.line([xy(s, v) for s, v in finite], fill=(170, 170, 170), width=1)
    window = max(1, len(values) // 50)
    smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
              for i in range(len(values))]
    draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill="black", width=2)
    draw.text((4, 8), f"{hi:.4g}", fill="black")
    draw.text((4, h - pad - 10), f"{lo:.4g}", fill="black")
    draw.text((pad, h - pad + 6), f"step {first}", fill="black")
    draw.text((w - 100, h - pad + 6), f"step {last}", fill="black")
    draw.text((w // 2 - 40, h - 20), "training loss", fill="black")
    return image


def write_model_card(output: Path, config: Any, adapter: Any, result: Any, *, data_size: int | None) -> Path:
    """README.md, loss.png and samples.png next to the adapter files."""
    save_png(loss_curve(read_losses(output)), output / "loss.png")
    grids = sorted((output / "validation").glob("step-*.png"))
    if grids:
        copy_file(grids[-1], output / "samples.png")
    return write_text(output / "README.md", model_card(config, adapter, result, data_size=data_size,
                                                      samples=bool(grids)))


def model_card(config: Any, adapter: Any, result: Any, *, data_size: int | None, samples: bool) -> str:
    from ipadapter.dit.train import FAMILIES

    cfg = adapter.config
    trainable = sum(p.numel() for p in adapter.parameters())
    readers = FAMILIES[cfg.base].readers if cfg.base in FAMILIES else \
        "the published layout (diffusers' `load_ip_adapter`, ComfyUI, A1111)"
    files = [f"- `{result.published.name}`: {readers}"
             if result.published else "- (no published layout: the simple-adapter ablation has none)",
             f"- `{result.own.name}`: the project's own format (`ipadapter generate --adapter <this folder> "
             f"--weight-name {result.own.name} ...`)"]
    last_metrics = result.validation[max(result.validation)] if result.validation else {}
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()) or "not measured (no validation judge)"
    lines = [
        "---",
        "library_name: ipadapter",
        "tags: [ip-adapter, image-prompt, diffusers]",
        f"base_model: {config.base or cfg.base}",
        "---",
        "",
        f"# IP-Adapter ({cfg.variant}) for {config.base or cfg.base}",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{config.base or cfg.base}` |",
        f"| image encoder | {_encoder(config, cfg)} |",
        f"| variant | {cfg.variant} (attention: {cfg.attention}; {cfg.projection.tokens or 'one per encoder patch'} tokens per reference; "
        f"{config.references} reference(s) per sample) |",
        f"| trainable parameters | {trainable:,} |",
        f"| training data | {f'{data_size:,} samples' if data_size is not None else 'tar shards'} "
        f"(`{config.data or config.cache}`) |",
        f"| steps | {result.step:,} × batch {config.batch_size} × grad accumulation {config.grad_accum} per process |",
        f"| resolution | {config.resolution} px{' (aspect-ratio buckets)' if config.buckets else ''} |",
        f"| skipped | {sum(result.skipped.values())} samples; {result.nonfinite_steps} non-finite steps |",
        f"| last validation | {metrics} |",
        "",
        "## Files",
        "",
        *files,
        "- `README.md` (this card), `loss.png`" + (", `samples.png`" if samples else ""),
        "",
        "## Use",
        "",
        "```python",
        "import ipadapter",
        f'prompter = ipadapter.load(pipe, "<this folder or repo>", weight_name="{(result.published or result.own).name}")',
        'images = prompter.generate(reference, prompt="...", scale=1.0)',
        "```",
        "",
        "## Samples",
        "",
        "![validation samples](samples.png)" if samples else "No validation ran (`--validate-every 0`).",
        "",
        "## Loss",
        "",
        "![training loss](loss.png)",
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _encoder(config: Any, cfg: Any) -> str:
    """The image encoder by name; a variant that reads no CLIP features has none, and one given to `train` as a model
    in memory has no name to give."""
    named = config.image_encoder or cfg.encoder
    if named:
        return f"`{named}`"
    return "none (ID embeddings only)" if not get_variant(cfg.variant).clip else "an encoder given in memory (no name)"
