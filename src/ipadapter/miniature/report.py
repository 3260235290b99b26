"""What `ipadapter miniature eval` writes for people: report.md (stage table, conditions, targets), two plots and
the sample grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ipadapter.miniature.world import ATTRIBUTES

VERDICT = {True: "met", False: "NOT met", None: "not measured"}


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _cells(values: dict[str, float] | None) -> str:
    return " | ".join(pct(None if values is None else values.get(a)) for a in ATTRIBUTES)


def _measured(values: dict[str, float] | None) -> str:
    if values is None:
        return "–"
    return ", ".join(f"{k} {v:g}" if k == "scale" else f"{k} {v:+.3f}" if k.endswith("gap") else f"{k} {pct(v)}"
                     for k, v in values.items())


def stage_lines(stages: dict[str, Any]) -> list[str]:
    """One table row per stage measurement, attributes as columns."""
    attrs = list(ATTRIBUTES)
    text = stages.get("text_encoder", {})
    gap = text.get("state_gap")
    rows = [
        ("image encoder: linear probe, global embedding", _cells(stages.get("image_encoder", {}).get("global"))),
        ("image encoder: linear probe, patch tokens", _cells(stages.get("image_encoder", {}).get("patch"))),
        ("text encoder: caption vs one slot changed, retrieval (told apart), images by the adapters' encoder",
         _cells(text.get("told_apart"))),
        ("the same, images by the CLIP's own vision tower (8 px patches)", _cells(text.get("told_apart_clip"))),
        ("text encoder: relative L2 distance of the text states, caption vs one slot changed",
         " | ".join("–" if gap is None else f"{100 * gap[a]:.1f}%" for a in attrs)),
        ("VAE reconstructions (ceiling for everything drawn)", _cells(stages.get("vae"))),
        ("base model, text only, full caption", _cells(stages.get("base_full"))),
        ("base model, text only, partial captions (each named attribute)", _cells(stages.get("base_partial"))),
    ]
    lines = ["| stage (held-out) | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs)]
    lines += [f"| {name} | {cells} |" for name, cells in rows]
    if "told_apart" not in text:
        lines += ["", "Retrieval needs the CLIP's text projection, which a bundled pipeline does not keep (its text "
                  "encoder is the tower alone); the relative distance of the text states is measured instead."]
    return lines


def render_report(results: dict[str, Any]) -> str:
    size = results["size"]
    attrs = list(ATTRIBUTES)
    lines = [
        "# Miniature quality report (`ipadapter miniature eval`)", "",
        f"Models: `{results['models']['base']}`; image encoder: `{results['models']['encoder']}`. {size['references']} "
        f"held-out references; DDIM {size['steps']} steps, guidance {size['guidance']}; judged by the independent "
        "judge CLIP (CLIP-I, CLIP-T) and attribute classifier (agreement with the asked-for scene).",
        "Chance: " + ", ".join(f"{a} {pct(c)}" for a, c in {n: 1 / len(v) for n, v in ATTRIBUTES.items()}.items())
        + ".", "",
    ]
    if results.get("stages"):
        lines += ["## Stages", "", *stage_lines(results["stages"]), ""]
    lines += ["## Image prompts", "", "| condition | scale | CLIP-I | CLIP-T | " + " | ".join(attrs) + " |",
              "|---|---|---|---|" + "---|" * len(attrs)]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {row['condition']['scale']} | {row['clip_i']:.3f} | {row['clip_t']:.3f} | "
                     f"{_cells(row['agreement'])} |")
    for name, why in results["skipped"].items():
        lines.append(f"| {name} | not run: {why} |" + " |" * (len(attrs) + 2))
    lines += ["", "## Targets", ""]
    for name, target in results["targets"].items():
        lines.append(f"- {name}: **{VERDICT[target['met']]}** ({_measured(target['measured'])})")
    if any(target["met"] is False for target in results["targets"].values()):
        lines += ["", "For each target not met, what was tried and the next step: docs/miniature.md, \"Targets\"."]
    if results.get("sweep"):
        lines += ["", "## Image + text across scales (IP-Adapter + text naming another shape)", "",
                  "| scale | shape (text) | colour (image) | bg_colour (image) | pattern (image) |", "|---|---|---|---|---|"]
        for scale, agreement in results["sweep"].items():
            lines.append(f"| {scale} | " + " | ".join(pct(agreement[a]) for a in ("shape", "colour", "bg_colour",
                                                                                    "pattern")) + " |")
        lines += ["", "![image + text trade-off](text_image_sweep.png)"]
    lines += ["", "![per-attribute agreement](agreement.png)", "", "![samples](samples.png)", ""]
    return "\n".join(lines)


def _figure_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from ipadapter.atomic import replacing

    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_agreement(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: per-attribute agreement of every stage and condition, chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = list(ATTRIBUTES)
    stages = results.get("stages") or {}
    bars = {f"stage: {k}": v for k, v in (("VAE", stages.get("vae")), ("base, full caption", stages.get("base_full")))
            if v}
    bars.update({name: row["agreement"] for name, row in results["rows"].items()})
    fig, ax = plt.subplots(figsize=(12, 4.4))
    width = 0.8 / max(1, len(bars))
    for i, (name, values) in enumerate(bars.items()):
        ax.bar(np.arange(len(attrs)) + i * width, [values[a] for a in attrs], width, label=name)
    for j, a in enumerate(attrs):
        ax.hlines(1 / len(ATTRIBUTES[a]), j - 0.05, j + 0.85, colors="black", linestyles="dotted")
    ax.set_xticks(np.arange(len(attrs)) + 0.4 - width / 2, attrs)
    ax.set_ylim(0, 1)
    ax.set_ylabel("judge agrees with the asked-for scene")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Miniature model, {results['size']['references']} held-out references (dotted: chance)")
    _figure_png(fig, path)


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """Shape-from-text and colours-from-image agreement against the adapter scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [float(s) for s in results["sweep"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for attr, label in (("shape", "shape follows the text"), ("colour", "object colour follows the image"),
                        ("bg_colour", "background colour follows the image"), ("pattern", "pattern follows the image")):
        ax.plot(scales, [v[attr] for v in results["sweep"].values()], marker="o", label=label)
    ax.axhline(0.7, color="grey", linestyle="dotted")
    ax.set_xlabel("IP-Adapter scale")
    ax.set_ylim(0, 1)
    ax.set_ylabel("judge agreement")
    ax.set_title(f"Image + text naming another shape ({results['size']['references']} references)")
    ax.legend(fontsize=7)
    _figure_png(fig, path)


def samples_grid(columns: list[tuple[str, list[Image.Image]]], path: Path, rows: int = 8) -> None:
    """One titled column per input kind and condition, `rows` references."""
    from ipadapter.atomic import save_png
    from ipadapter.evaluate.grid import image_grid

    save_png(image_grid(columns, rows=rows, cell=96, title_lines=3), path)
