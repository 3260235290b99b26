"""report.md of `ipadapter miniature eval`, written from a results dict made by hand: every number where its table
puts it, in the format the report promises (percentages rounded, scores to three places, verdict words), and the
plots written as PNG files."""

from __future__ import annotations

import pytest
from PIL import Image

from ipadapter.miniature.report import render_report, stage_lines
from ipadapter.miniature.world import ATTRIBUTES

ATTRS = list(ATTRIBUTES)  # shape, colour, size, position, bg_colour, pattern
HEADER = "| shape | colour | size | position | bg_colour | pattern |"


def _per_attribute(*values: float) -> dict[str, float]:
    return dict(zip(ATTRS, values, strict=True))


def _results(**changes) -> dict:
    results = {
        "size": {"references": 3, "steps": 4, "guidance": 5.5},
        "models": {"base": "run/adapter-base", "encoder": "run/image_encoder"},
        "rows": {
            "IP-Adapter, image only": {"condition": {"scale": 1.0}, "clip_i": 0.61249, "clip_t": 0.2, "agreement":
                                       _per_attribute(0.904, 0.125, 1.0, 0.0, 0.5, 0.666)},
            "IP-Adapter + text (another shape)": {"condition": {"scale": 0.6}, "clip_i": 0.5, "clip_t": 0.23456,
                                                  "agreement": _per_attribute(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)},
        },
        "skipped": {"ControlNet (mask) + IP-Adapter": "the folder has no controlnet/"},
        "targets": {
            "VAE reconstruction: every attribute >= 95%": {"met": True, "measured": {"colour": 0.96, "shape": 1.0}},
            "image + text at the best scale": {"met": False, "measured": {"scale": 0.6, "shape": 0.5}},
            "decoupled vs simple adapter": {"met": False, "measured": {"clip_i_gap": 0.0312, "composition_gap": -0.1}},
            "ControlNet (mask) + image": {"met": None, "measured": None},
        },
    }
    return results | changes


def _section(report: str, title: str) -> list[str]:
    """The lines of one `## title` section, without the blank lines."""
    lines = report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    return [line for line in lines if line]


def test_the_header_names_the_models_the_settings_and_chance_per_attribute() -> None:
    lines = render_report(_results()).splitlines()
    chance = {a: f"{round(100 / len(v))}%" for a, v in ATTRIBUTES.items()}
    assert lines[:4] == [
        "# Miniature quality report (`ipadapter miniature eval`)", "",
        "Models: `run/adapter-base`; image encoder: `run/image_encoder`. 3 held-out references; DDIM 4 steps, "
        "guidance 5.5; judged by the independent judge CLIP (CLIP-I, CLIP-T) and attribute classifier (agreement "
        "with the asked-for scene).",
        "Chance: " + ", ".join(f"{a} {chance[a]}" for a in ATTRS) + ".",
    ]


def test_each_condition_is_a_row_and_a_skipped_one_says_why() -> None:
    assert _section(render_report(_results()), "Image prompts") == [
        f"| condition | scale | CLIP-I | CLIP-T {HEADER}",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| IP-Adapter, image only | 1.0 | 0.612 | 0.200 | 90% | 12% | 100% | 0% | 50% | 67% |",
        "| IP-Adapter + text (another shape) | 0.6 | 0.500 | 0.235 | 10% | 20% | 30% | 40% | 50% | 60% |",
        "| ControlNet (mask) + IP-Adapter | not run: the folder has no controlnet/" + " |" * 9,  # 10 columns
    ]


def test_each_target_has_its_verdict_and_measured_values_and_a_miss_points_to_the_docs() -> None:
    report = render_report(_results())
    assert _section(report, "Targets")[:4] == [
        "- VAE reconstruction: every attribute >= 95%: **met** (colour 96%, shape 100%)",
        "- image + text at the best scale: **NOT met** (scale 0.6, shape 50%)",
        "- decoupled vs simple adapter: **NOT met** (clip_i_gap +0.031, composition_gap -0.100)",
        "- ControlNet (mask) + image: **not measured** (–)",
    ]
    assert ("For each target not met, what was tried and the next step: docs/miniature.md, \"Targets\"."
            in report.splitlines())
    met = {name: {"met": True, "measured": None} for name in _results()["targets"]}
    assert "what was tried" not in render_report(_results(targets=met))


def test_the_sweep_is_a_table_and_a_plot_only_when_measured() -> None:
    sweep = {"0.3": _per_attribute(0.25, 0.9, 0.0, 0.0, 0.95, 0.5), "1.0": _per_attribute(0.75, 0.5, 0, 0, 0.4, 0.1)}
    report = render_report(_results(sweep=sweep))
    assert _section(report, "Image + text across scales (IP-Adapter + text naming another shape)") == [
        "| scale | shape (text) | colour (image) | bg_colour (image) | pattern (image) |", "|---|---|---|---|---|",
        "| 0.3 | 25% | 90% | 95% | 50% |", "| 1.0 | 75% | 50% | 40% | 10% |",
        "![image + text trade-off](text_image_sweep.png)", "![per-attribute agreement](agreement.png)",
        "![samples](samples.png)",
    ]
    for no_sweep in (_results(), _results(sweep={})):
        text = render_report(no_sweep)
        assert "## Image + text" not in text and "text_image_sweep.png" not in text
    assert render_report(_results()).endswith("![per-attribute agreement](agreement.png)\n\n![samples](samples.png)\n")


def test_stages_come_first_with_one_row_per_measurement() -> None:
    stages = {
        "image_encoder": {"global": _per_attribute(1, 1, 0.5, 0.25, 1, 0.9),
                          "patch": _per_attribute(0.11, 0.21, 0.31, 0.41, 0.51, 0.61)},
        "text_encoder": {"told_apart": _per_attribute(0.95, 1, 1, 1, 1, 1),
                         "told_apart_clip": _per_attribute(0.12, 0.22, 0.32, 0.42, 0.52, 0.62),
                         "state_gap": _per_attribute(0.1234, 0.5, 0.0, 0.001, 0.2, 1.0)},
        "vae": _per_attribute(0.99, 0.98, 0.97, 0.96, 0.955, 0.944),
        "base_full": _per_attribute(0.13, 0.23, 0.33, 0.43, 0.53, 0.63),
        "base_partial": _per_attribute(0.14, 0.24, 0.34, 0.44, 0.54, 0.64),
    }
    report = render_report(_results(stages=stages))
    assert report.index("## Stages") < report.index("## Image prompts")
    assert _section(report, "Stages") == [
        f"| stage (held-out) {HEADER}", "|---|---|---|---|---|---|---|",
        "| image encoder: linear probe, global embedding | 100% | 100% | 50% | 25% | 100% | 90% |",
        "| image encoder: linear probe, patch tokens | 11% | 21% | 31% | 41% | 51% | 61% |",
        "| text encoder: caption vs one slot changed, retrieval (told apart), images by the adapters' encoder "
        "| 95% | 100% | 100% | 100% | 100% | 100% |",
        "| the same, images by the CLIP's own vision tower (8 px patches) | 12% | 22% | 32% | 42% | 52% | 62% |",
        "| text encoder: relative L2 distance of the text states, caption vs one slot changed "
        "| 12.3% | 50.0% | 0.0% | 0.1% | 20.0% | 100.0% |",
        "| VAE reconstructions (ceiling for everything drawn) | 99% | 98% | 97% | 96% | 96% | 94% |",
        "| base model, text only, full caption | 13% | 23% | 33% | 43% | 53% | 63% |",
        "| base model, text only, partial captions (each named attribute) | 14% | 24% | 34% | 44% | 54% | 64% |",
    ]
    assert "## Stages" not in render_report(_results()) and "## Stages" not in render_report(_results(stages={}))


def test_without_retrieval_the_stage_table_says_what_is_measured_instead() -> None:
    lines = stage_lines({"text_encoder": {"state_gap": None}})
    assert lines[-6] == ("| text encoder: relative L2 distance of the text states, caption vs one slot changed "
                         "| – | – | – | – | – | – |")
    assert lines[-2:] == ["", "Retrieval needs the CLIP's text projection, which a bundled pipeline does not keep "
                          "(its text encoder is the tower alone); the relative distance of the text states is "
                          "measured instead."]
    with_retrieval = stage_lines({"text_encoder": {"told_apart": _per_attribute(1, 1, 1, 1, 1, 1)}})
    assert len(with_retrieval) == 10 and not any("Retrieval needs" in line for line in with_retrieval)
    nothing = stage_lines({})  # no stage measured: every cell a dash, and the note on what would be measured
    assert all(line.endswith("| – | – | – | – | – | – |") for line in nothing[2:10])
    assert nothing[-1].startswith("Retrieval needs")


def test_the_samples_grid_is_one_titled_column_per_kind_with_eight_rows(tmp_path) -> None:
    """The grid's layout (docs of `evaluate.grid.image_grid`): 96 px cells under a header of three title lines
    (4 + 12 × 3 px), so column c, row r starts at (96 c, 40 + 96 r)."""
    from ipadapter.miniature.report import samples_grid

    colours = [[(20 * r, 10 * c, 200) for r in range(10)] for c in range(3)]
    columns = [(f"column {c}", [Image.new("RGB", (64, 64), colour) for colour in colours[c]]) for c in range(3)]
    for rows, path in ((8, tmp_path / "default.png"), (2, tmp_path / "two.png")):
        samples_grid(columns, path, **({} if rows == 8 else {"rows": rows}))
        with Image.open(path) as grid:
            assert grid.format == "PNG" and grid.size == (3 * 96, 40 + rows * 96)
            for c in range(3):
                for r in range(rows):
                    assert grid.getpixel((96 * c + 48, 40 + 96 * r + 48)) == colours[c][r]


@pytest.mark.parametrize("sweep", [False, True])
def test_the_plots_are_png_files(tmp_path, sweep) -> None:
    pytest.importorskip("matplotlib")
    from ipadapter.miniature.report import plot_agreement, plot_sweep

    results = _results(stages={"vae": _per_attribute(1, 1, 1, 1, 1, 1)},
                       sweep={"0.3": _per_attribute(0.2, 0.9, 0, 0, 0.9, 0.5), "1.0": _per_attribute(1, 0, 0, 0, 0, 0)})
    path = tmp_path / "plot.png"
    (plot_sweep if sweep else plot_agreement)(results, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height > 100
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # written through a temporary file, then renamed


def test_the_whole_report_is_its_sections_in_order_one_blank_line_apart() -> None:
    stages = {"vae": _per_attribute(1, 1, 1, 1, 1, 1), "text_encoder": {"told_apart": _per_attribute(1, 1, 1, 1, 1, 1)}}
    sweep = {"0.3": _per_attribute(0.25, 0.9, 0.0, 0.0, 0.95, 0.5)}
    report = render_report(_results(stages=stages, sweep=sweep))
    blocks = [block.splitlines() for block in report.split("\n\n")]
    firsts = [block[0] if block else "" for block in blocks]
    assert firsts == [
        "# Miniature quality report (`ipadapter miniature eval`)", blocks[1][0], "## Stages",
        f"| stage (held-out) {HEADER}",
        "## Image prompts", f"| condition | scale | CLIP-I | CLIP-T {HEADER}", "## Targets",
        "- VAE reconstruction: every attribute >= 95%: **met** (colour 96%, shape 100%)",
        "For each target not met, what was tried and the next step: docs/miniature.md, \"Targets\".",
        "## Image + text across scales (IP-Adapter + text naming another shape)",
        "| scale | shape (text) | colour (image) | bg_colour (image) | pattern (image) |",
        "![image + text trade-off](text_image_sweep.png)", "![per-attribute agreement](agreement.png)",
        "![samples](samples.png)"]
    assert blocks[1][0].startswith("Models: ") and blocks[1][1].startswith("Chance: ") and len(blocks[1]) == 2
    assert [len(block) for block in blocks[3:11]] == [10, 1, 5, 1, 4, 1, 1, 3]
    assert report.endswith("![samples](samples.png)\n")


def _drawn(monkeypatch, plot, results) -> object:
    """The figure `plot` draws, taken where it would be written."""
    from ipadapter.miniature import report

    figures = []
    monkeypatch.setattr(report, "_figure_png", lambda fig, path: figures.append(fig))
    plot(results, "unused.png")
    (figure,) = figures
    return figure.axes[0]


def test_the_agreement_plot_draws_each_value_as_a_bar_with_chance_dotted(monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from ipadapter.miniature.report import plot_agreement

    vae, base = _per_attribute(0.9, 0.8, 0.7, 0.6, 0.5, 0.4), _per_attribute(0.1, 0.2, 0.3, 0.35, 0.45, 0.55)
    results = _results(stages={"vae": vae, "base_full": base})
    ax = _drawn(monkeypatch, plot_agreement, results)
    groups = {"stage: VAE": vae, "stage: base, full caption": base,
              **{name: row["agreement"] for name, row in results["rows"].items()}}
    assert [text.get_text() for text in ax.get_legend().get_texts()] == list(groups)
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == [values[a] for values in groups.values() for a in ATTRS]
    lefts = [bar.get_x() for bar in ax.patches]
    width = ax.patches[0].get_width()
    assert width == pytest.approx(0.8 / len(groups))
    assert all(lefts[i * 6 + j] + width / 2 == pytest.approx(j + i * width) for i in range(len(groups))
               for j in range(6))  # attribute j's group starts at j, one bar width per series
    chance = [segment for lines in ax.collections for segment in lines.get_segments()]  # one dotted line each
    assert all(lines.get_linestyle() != [(0, None)] for lines in ax.collections)  # not solid
    assert [y for (_, y0), (_, y1) in chance for y in (y0, y1)] == pytest.approx(
        [1 / len(v) for v in ATTRIBUTES.values() for _ in range(2)])
    for j, ((x0, _), (x1, _)) in enumerate(chance):  # over its attribute's bars: centred on the group
        group = ax.patches[j::6]
        middle = (min(b.get_x() for b in group) + max(b.get_x() + width for b in group)) / 2
        assert abs((x0 + x1) / 2 - middle) < width and x1 - x0 >= 0.8 - width
    assert [label.get_text() for label in ax.get_xticklabels()] == ATTRS
    middles = [(ax.patches[j].get_x() + ax.patches[-6 + j].get_x() + width) / 2 for j in range(6)]
    assert list(ax.get_xticks()) == pytest.approx(middles)  # each name under the middle of its bars
    assert ax.get_ylim() == (0, 1) and ax.get_ylabel() == "judge agrees with the asked-for scene"
    assert ax.get_title() == "Miniature model, 3 held-out references (dotted: chance)"
    assert len(_drawn(monkeypatch, plot_agreement, _results()).get_legend().get_texts()) == 2  # no stages: rows only


def test_the_sweep_plot_draws_each_attribute_against_the_scale(monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from ipadapter.miniature.report import plot_sweep

    sweep = {"0.3": _per_attribute(0.2, 0.9, 0, 0, 0.8, 0.5), "1.0": _per_attribute(0.9, 0.3, 0, 0, 0.4, 0.1)}
    ax = _drawn(monkeypatch, plot_sweep, _results(sweep=sweep))
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
              if not line.get_label().startswith("_")}
    assert curves == {"shape follows the text": ([0.3, 1.0], [0.2, 0.9]),
                      "object colour follows the image": ([0.3, 1.0], [0.9, 0.3]),
                      "background colour follows the image": ([0.3, 1.0], [0.8, 0.4]),
                      "pattern follows the image": ([0.3, 1.0], [0.5, 0.1])}
    (target,) = [line for line in ax.lines if line.get_label().startswith("_")]
    assert list(target.get_ydata()) == [0.7, 0.7] and target.get_linestyle() == ":"
    assert [text.get_text() for text in ax.get_legend().get_texts()] == list(curves)
    assert ax.get_xlabel() == "IP-Adapter scale" and ax.get_ylabel() == "judge agreement" and ax.get_ylim() == (0, 1)
    assert ax.get_title() == "Image + text naming another shape (3 references)"
