"""The run's outputs people read: results.json, report.md (tables, published numbers, deviations), grids, plots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ipadapter.atomic import replacing, save_png, write_text
from ipadapter.evaluate.files import slug, write_json
from ipadapter.evaluate.grid import image_grid
from ipadapter.evaluate.manifests import Entry
from ipadapter.evaluate.protocols import Protocol
from ipadapter.evaluate.published import PROTOCOLS as PUBLISHED_PROTOCOLS
from ipadapter.evaluate.published import published
from ipadapter.evaluate.runner import Plan, sample_path

CLIP_T_FORM = "CLIP-T is CLIPScore = 2.5·max(cos, 0) (the paper's form); clip_t_cos is the raw cosine"
# results key -> (column title, digits); the table shows the columns some row has
COLUMNS = {
    "clip_i": ("CLIP-I", 3), "clip_t": ("CLIP-T (CLIPScore)", 3), "clip_t_cos": ("CLIP-T cos", 3),
    "dino_i": ("DINO-I", 3), "fid": ("FID", 2), "lpips": ("LPIPS div.", 3), "face_id": ("face ID cos", 3),
}
PUBLISHED_COLUMNS = {"params_m": "params (M)", "clip_t": "CLIP-T", "clip_i": "CLIP-I", "cp": "CP", "pf": "PF",
                     "face_id": "ID cos", "fid": "FID", "lpips": "LPIPS div."}
GRID_REFERENCES, CELL = 6, 128


@dataclass
class Report:
    """Everything the report needs besides the samples on disk."""

    protocol: Protocol
    settings: dict
    deviations: list[str]
    judge: str
    rows: list[dict]
    skipped_references: list[str] = field(default_factory=list)
    skipped_metrics: dict[str, str] = field(default_factory=dict)

    @property
    def comparable(self) -> bool:
        return self.protocol.comparable and not self.deviations


def _fmt(value: object, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def results_tables(rows: list[dict]) -> list[str]:
    lines = []
    for method in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == method]
        keys = [k for k in COLUMNS if any(k in r for r in mine)]
        lines += [f"### {method}", ""]
        lines += _table(["scale", "samples", *(COLUMNS[k][0] for k in keys)],
                        [[f"{r['scale']:g}", str(r["samples"]), *(_fmt(r.get(k), COLUMNS[k][1]) for k in keys)]
                         for r in mine])
        attrs = [r for r in mine if r.get("attributes")]
        if attrs:
            names = list(attrs[0]["attributes"])
            lines += ["", "Judge-classifier agreement with the asked-for scene (fraction of samples):", ""]
            lines += _table(["scale", *names], [[f"{r['scale']:g}", *(f"{r['attributes'][n]:.2f}" for n in names)]
                                                for r in attrs])
        lines.append("")
    return lines


def published_section(report: Report) -> list[str]:
    key = report.protocol.published
    if key is None:
        return []
    rows = published(key)
    keys = [k for k in PUBLISHED_COLUMNS if any(k in p.values for p in rows)]
    lines = ["## Published numbers", "", f"{PUBLISHED_PROTOCOLS[key]}. Source: {rows[0].source}.", ""]
    if report.comparable:
        lines += [f"Measured under the same protocol, provided the manifest is {report.protocol.references}: "
                  "our rows are comparable (ours at the bottom).", ""]
    elif report.protocol.comparable:
        lines += ["Not comparable: this run deviates from the protocol (see above); shown for context only.", ""]
    else:
        lines += ["Context only: these were measured with other metrics or data than this run.", ""]
    table = [[p.method, *(_fmt(p.values.get(k), 3 if k != "params_m" else 0) for k in keys)] for p in rows]
    if report.comparable:
        table += [[f"**ours: {r['name']} @ {r['scale']:g}**", *(_fmt(r.get(k), 3) if k != "params_m" else "–"
                                                                  for k in keys)] for r in report.rows]
    return lines + _table(["method", *(PUBLISHED_COLUMNS[k] for k in keys)], table) + [""]


def write_markdown(report: Report, out: Path, images: dict[str, list[str]]) -> Path:
    p = report.protocol
    lines = [f"# Evaluation: {p.name}", "", f"{p.description}.", "", f"- reference set: {p.references}",
             f"- judge CLIP: `{report.judge}`; {CLIP_T_FORM}",
             *(f"- {k}: {v}" for k, v in report.settings.items()), ""]
    if report.deviations:
        lines += ["Deviations from the protocol:", "", *(f"- {d}" for d in report.deviations), ""]
    if report.skipped_references:
        lines += [f"Skipped references ({len(report.skipped_references)}):", "",
                  *(f"- {s}" for s in report.skipped_references[:20]), ""]
    if report.skipped_metrics:
        lines += ["Metrics not computed:", "", *(f"- {m}: {why}" for m, why in report.skipped_metrics.items()), ""]
    lines += ["## Results", "", *results_tables(report.rows), *published_section(report)]
    for title, files in (("Scale sweep", images["plots"]), ("Samples", images["grids"])):
        if files:
            lines += [f"## {title}", "", *(f"![{f}]({f})" for f in files), ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


def sample_grid(plan: Plan, entries: Sequence[Entry], out: Path, method: str) -> Image.Image:
    """Rows: references; columns: the reference, then its first sample at each scale (header: the scale)."""
    shown = entries[:GRID_REFERENCES]
    columns = [("reference", [e.image() for e in shown])]
    columns += [(f"scale {s:g}", [Image.open(sample_path(out, method, s, e.index, 0)) for e in shown])
                for s in plan.scales]
    return image_grid(columns, cell=CELL)


Point = tuple[str, float, float]  # (label, CLIP-T, CLIP-I)


def sweep_points(report: Report) -> tuple[dict[str, list[Point]], list[Point]]:
    """What the scale-sweep plot draws: each method (in the rows' order) with its points labelled by scale, in scale
    order (rows with both CLIP-T and CLIP-I), and the published methods' points when the run is comparable."""
    rows = [r for r in report.rows if r.get("clip_i") is not None and r.get("clip_t") is not None]
    lines: dict[str, list[Point]] = {r["name"]: [] for r in rows}
    for r in sorted(rows, key=lambda r: r["scale"]):
        lines[r["name"]].append((f"{r['scale']:g}", r["clip_t"], r["clip_i"]))
    shown = published(report.protocol.published) if report.comparable and report.protocol.published else []
    return lines, [(p.method, p.values["clip_t"], p.values["clip_i"]) for p in shown
                   if "clip_i" in p.values and "clip_t" in p.values]


def sweep_plot(report: Report, path: Path) -> bool:
    """CLIP-I against CLIP-T over the scales, one line per method (plus the published points when comparable)."""
    lines, others = sweep_points(report)
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for method, points in lines.items():
        ax.plot([t for _, t, _ in points], [i for _, _, i in points], marker="o", label=method)
        for label, t, i in points:
            ax.annotate(label, (t, i), textcoords="offset points", xytext=(4, 4))
    for label, t, i in others:
        ax.scatter(t, i, marker="x", color="grey")
        ax.annotate(label, (t, i), fontsize=6, color="grey")
    ax.set_xlabel("CLIP-T (CLIPScore) — follows the text →")
    ax.set_ylabel("CLIP-I — copies the reference →")
    ax.set_title(f"image prompt scale sweep ({report.protocol.name}; labels: scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def write_report(report: Report, plan: Plan, entries: Sequence[Entry], out: Path) -> dict[str, Path]:
    """results.json, report.md, one sample grid per method and the scale-sweep plot; returns their paths."""
    write_json(out / "results.json", {
        "protocol": report.protocol.name, "judge": report.judge, "clip_t_form": CLIP_T_FORM,
        "settings": report.settings, "deviations": report.deviations, "comparable": report.comparable,
        "skipped_references": report.skipped_references, "skipped_metrics": report.skipped_metrics,
        "runs": report.rows,
    })
    images: dict[str, list[str]] = {"plots": [], "grids": []}
    if sweep_plot(report, out / "scale_sweep.png"):
        images["plots"].append("scale_sweep.png")
    for method in plan.methods:
        name = f"grid-{slug(method)}.png"
        save_png(sample_grid(plan, entries, out, method), out / name)
        images["grids"].append(name)
    paths = {"results": out / "results.json", "markdown": write_markdown(report, out, images)}
    paths.update({name: out / name for name in images["plots"] + images["grids"]})
    return paths
