"""Protocols and published numbers as data; the report puts published numbers beside ours only when comparable."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ipadapter.errors import IPAdapterError
from ipadapter.evaluate import extractors
from ipadapter.evaluate.manifests import read_manifest, write_manifest
from ipadapter.evaluate.protocols import PROTOCOLS, deviations, protocol
from ipadapter.evaluate.published import PUBLISHED, published
from ipadapter.evaluate.report import Report, write_report
from ipadapter.evaluate.runner import Plan, sample_path
from ipadapter.evaluate.scoring import METRICS, build_toolbox


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_protocols_name_known_metrics_and_published_tables(name) -> None:
    p = protocol(name)
    assert set(p.metrics) <= set(METRICS) and p.samples >= 1 and p.scales
    assert p.published is None or published(p.published)
    assert deviations(p, p.settings()) == []


def test_paper_protocol_and_table_are_the_papers() -> None:
    p = protocol("paper-table1")
    assert (p.samples, p.steps, p.guidance, p.scales, p.empty_prompt) == (4, 50, 7.5, (1.0,), True)
    assert p.judge == "openai/clip-vit-large-patch14" and p.scheduler == "DDIMScheduler"
    ours = next(r for r in PUBLISHED if r.benchmark == "paper-table1" and r.method == "IP-Adapter")
    assert ours.values == {"params_m": 22, "clip_t": 0.588, "clip_i": 0.828}
    assert len(published("paper-table1")) == 9 and all(r.source for r in PUBLISHED)
    with pytest.raises(IPAdapterError, match="unknown protocol"):
        protocol("nope")


def test_the_miniature_protocols_steps_guidance_and_reference_count_are_its_own() -> None:
    """docs/evaluation.md: 12 held-out scenes, 25 steps, guidance 7.5; a run that changes any of them deviates."""
    p = protocol("miniature")
    used = {**p.settings(), "steps": 4, "guidance": 5.0, "references": 2}
    assert sorted(deviations(p, used)) == ["guidance: 5.0 (protocol: 7.5)", "references: 2 (protocol: 12)",
                                           "steps: 4 (protocol: 25)"]
    assert deviations(p, {**p.settings(), "steps": 25, "guidance": 7.5, "references": 12}) == []


def test_absent_networks_skip_their_metric_and_keep_the_others(tmp_path) -> None:
    box = build_toolbox(("clip_i", "dino_i", "fid", "attributes"), judge=lambda: "judge", dino=str(tmp_path / "none"),
                        inception=str(tmp_path / "none.pt"))
    assert box.judge == "judge" and set(box.skipped) == {"dino_i", "fid", "attributes"}
    assert extractors.INCEPTION_FILE in box.skipped["fid"] and "dinov2" in box.skipped["dino_i"].lower()

    def missing_judge():
        raise IPAdapterError("The miniature judge is missing")

    box = build_toolbox(("attributes",), judge=lambda: None, attributes=missing_judge)
    assert box.skipped == {"attributes": "The miniature judge is missing"}


def _run_folder(tmp_path, plan):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "r.png")
    entries = read_manifest(write_manifest(tmp_path / "m.jsonl", [{"image_file": "r.png", "text": "t"}])).entries
    for s in plan.scales:
        for k in range(plan.samples):
            sample_path(tmp_path, "ip", s, 0, k).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), "blue").save(sample_path(tmp_path, "ip", s, 0, k))
    return entries


def test_comparable_run_puts_ours_beside_the_published_rows(tmp_path) -> None:
    p = protocol("paper-table1")
    plan = Plan(("ip",), p.scales, p.samples, 0, True, {})
    entries = _run_folder(tmp_path, plan)
    rows = [{"name": "ip", "scale": 1.0, "samples": 4, "clip_i": 0.8, "clip_t": 0.55, "clip_t_cos": 0.22}]
    report = Report(p, p.settings(), deviations(p, p.settings()), p.judge, rows)
    paths = write_report(report, plan, entries, tmp_path)
    text = paths["markdown"].read_text()
    assert "Measured under the same protocol" in text and "**ours: ip @ 1**" in text and "| 0.828 |" in text
    assert json.loads(paths["results"].read_text())["comparable"] is True
    fewer = {**p.settings(), "references": 500}
    assert deviations(p, fewer) == ["references: 500 (protocol: 5000)"]
    assert Image.open(tmp_path / "scale_sweep.png").size[0] > 100


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Each markdown table under the heading or sentence above it: rows of cells (header first), the separator row
    checked against the header's width as a markdown reader needs it."""
    tables, title, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and not lines[i - 1].startswith("|"):
            title = next(lines[j] for j in range(i - 1, -1, -1) if lines[j].strip())
            header = [c.strip() for c in line.strip("|").split(" | ")]
            assert lines[i + 1] == "|" + "---|" * len(header), lines[i + 1]
            tables[title] = [header]
        elif line.startswith("|---"):
            continue
        elif line.startswith("|"):
            row = [c.strip() for c in line.strip("|").split(" | ")]
            assert len(row) == len(tables[title][0]), line
            tables[title].append(row)
    return tables


def test_report_files_hold_every_row_as_documented(tmp_path) -> None:
    """results.json holds the report as docs/evaluation.md lays it out; report.md has one table per method (the
    columns some row of that method has, '–' where a row lacks one, FID to 2 digits, the rest to 3), the judge's
    agreement, the deviations, at most 20 skipped references with their count, and the metrics not computed."""
    p = protocol("dreambench")
    rows = [
        {"name": "ip", "scale": 0.5, "samples": 4, "clip_i": 0.8, "clip_t": 0.61234, "fid": 12.345,
         "attributes": {"shape": 0.5, "color": 0.25}},
        {"name": "ip", "scale": 1.0, "samples": 4, "clip_i": 0.9, "clip_t": None, "fid": 10.0,
         "attributes": {"shape": 0.75, "color": 1.0}},
        {"name": "plus", "scale": 0.5, "samples": 3, "dino_i": 0.4567},
    ]
    skipped = [f"line {i}: unreadable" for i in range(25)]
    settings = {**p.settings(), "steps": 30}
    report = Report(p, settings, deviations(p, settings), "judge-clip", rows, skipped_references=skipped,
                    skipped_metrics={"lpips": "no LPIPS network"})
    plan = Plan(("ip", "plus"), (0.5, 1.0), 2, 0, False, {})
    (tmp_path / "refs").mkdir()
    records = []
    for i in range(7):
        Image.new("RGB", (16, 16), "red").save(tmp_path / "refs" / f"{i}.png")
        records.append({"image_file": f"refs/{i}.png", "text": "t"})
        for method in plan.methods:
            for s in plan.scales:
                for k, color in enumerate(("blue", "lime")):
                    sample_path(tmp_path, method, s, i, k).parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (16, 16), color).save(sample_path(tmp_path, method, s, i, k))
    entries = read_manifest(write_manifest(tmp_path / "m.jsonl", records)).entries
    paths = write_report(report, plan, entries, tmp_path)

    assert json.loads(paths["results"].read_text()) == {
        "protocol": "dreambench", "judge": "judge-clip",
        "clip_t_form": "CLIP-T is CLIPScore = 2.5·max(cos, 0) (the paper's form); clip_t_cos is the raw cosine",
        "settings": settings, "deviations": ["steps: 30 (protocol: 50)"], "comparable": False,
        "skipped_references": skipped, "skipped_metrics": {"lpips": "no LPIPS network"}, "runs": rows,
    }
    text = paths["markdown"].read_text()
    tables = _tables(text)
    assert tables["### ip"] == [["scale", "samples", "CLIP-I", "CLIP-T (CLIPScore)", "FID"],
                                ["0.5", "4", "0.800", "0.612", "12.35"], ["1", "4", "0.900", "–", "10.00"]]
    assert tables["Judge-classifier agreement with the asked-for scene (fraction of samples):"] == [
        ["scale", "shape", "color"], ["0.5", "0.50", "0.25"], ["1", "0.75", "1.00"]]
    assert tables["### plus"] == [["scale", "samples", "DINO-I"], ["0.5", "3", "0.457"]]
    assert "Deviations from the protocol:\n\n- steps: 30 (protocol: 50)\n" in text
    listed = [line for line in text.splitlines() if line.startswith("- line ")]
    assert "Skipped references (25):" in text and listed == [f"- {s}" for s in skipped[:20]]
    assert "Metrics not computed:\n\n- lpips: no LPIPS network\n" in text
    assert "- judge CLIP: `judge-clip`;" in text and "Context only: these were measured with other" in text
    assert "![scale_sweep.png](scale_sweep.png)" in text
    assert "![grid-ip.png](grid-ip.png)" in text and "![grid-plus.png](grid-plus.png)" in text

    grid = Image.open(paths["grid-ip.png"]).convert("RGB")
    header = 16
    assert grid.size == (3 * 128, header + 6 * 128)  # the reference and each scale; the first 6 references
    for r in range(6):
        y = header + r * 128 + 64
        assert [grid.getpixel((c * 128 + 64, y)) for c in range(3)] == [(255, 0, 0), (0, 0, 255), (0, 0, 255)]


def test_the_sweep_plots_clip_i_against_clip_t_in_scale_order(tmp_path) -> None:
    """Each method is a line through its (CLIP-T, CLIP-I) points by increasing scale, methods in the rows' order; rows
    lacking either metric are left out; the published points join only a comparable run, and a run with no row that
    has both metrics draws no plot."""
    from ipadapter.evaluate.report import sweep_plot, sweep_points

    p = protocol("paper-table1")
    rows = [{"name": "plus", "scale": 1.0, "clip_i": 0.9, "clip_t": 0.5},
            {"name": "ip", "scale": 1.0, "clip_i": 0.8, "clip_t": 0.55},
            {"name": "ip", "scale": 0.25, "clip_i": 0.6, "clip_t": 0.7},
            {"name": "ip", "scale": 0.5, "clip_i": 0.7, "clip_t": None},
            {"name": "plus", "scale": 0.5, "clip_t": 0.6}]
    comparable = Report(p, p.settings(), [], p.judge, rows)
    lines, others = sweep_points(comparable)
    assert list(lines) == ["plus", "ip"]
    assert lines == {"plus": [("1", 0.5, 0.9)], "ip": [("0.25", 0.7, 0.6), ("1", 0.55, 0.8)]}
    expected = [(r.method, r.values["clip_t"], r.values["clip_i"]) for r in PUBLISHED
                if r.benchmark == "paper-table1" and {"clip_i", "clip_t"} <= set(r.values)]
    assert others == expected and ("IP-Adapter", 0.588, 0.828) in others
    deviating = Report(p, p.settings(), ["steps: 30 (protocol: 50)"], p.judge, rows)
    assert sweep_points(deviating) == (lines, [])
    other = protocol("dreambench")
    assert sweep_points(Report(other, other.settings(), [], other.judge, rows))[1] == []

    none = Report(p, p.settings(), [], p.judge, [{"name": "ip", "scale": 1.0, "clip_i": 0.8}])
    assert sweep_points(none)[0] == {}
    assert sweep_plot(none, tmp_path / "sweep.png") is False and not list(tmp_path.iterdir())
