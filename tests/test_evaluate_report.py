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
