"""`ipadapter miniature data|train|eval|export` run as a user types them: each command hands its flags to the library
function it wraps (tested on its own) and prints what that function returned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ipadapter.cli.main import main


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags, n, seed, split, masks", [
    (["--n", "1"], 1, 0, "train", False), (["--n", "2", "--split", "train"], 2, 0, "train", False),
    (["--n", "3", "--seed", "5", "--split", "heldout", "--masks"], 3, 5, "heldout", True)])
def test_data_writes_what_write_dataset_writes(tmp_path, capsys, flags, n, seed, split, masks) -> None:
    from ipadapter.miniature.world import write_dataset

    out = tmp_path / "cli"
    assert main(["miniature", "data", "--out", str(out), *flags]) == 0
    manifest = write_dataset(tmp_path / "direct", n, seed, split, masks=masks)
    assert _files(out) == _files(tmp_path / "direct")
    assert capsys.readouterr().out == f"wrote {n} {split} images and {out / manifest.name}\n"


@pytest.mark.parametrize("command, flags, message", [
    ("data", ["--n", "0"], "--n must be at least 1, got 0"),
    ("data", ["--out", "{tmp}/file"], "--out {tmp}/file is a file; the dataset needs a folder"),
    ("eval", ["--n", "0"], "--n must be at least 1, got 0"),
    ("eval", ["--steps", "-2"], "--steps must be at least 1, got -2"),
    ("eval", ["--models", "{tmp}/file"], "--models {tmp}/file is not a folder"),
    ("train", ["adapter", "--steps", "0"], "--steps must be at least 1, got 0"),
    ("eval", ["--out", "/proc/zz"], "--out /proc/zz: the folder /proc is not writable"),
])
def test_refusals_are_one_sentence(tmp_path, capsys, monkeypatch, command, flags, message) -> None:
    (tmp_path / "file").write_text("not a folder")
    argv = ["miniature", command, "--out", str(tmp_path / "out"), *[f.format(tmp=tmp_path) for f in flags]]
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert main(argv) == 2
    assert capsys.readouterr().err == f"ipadapter: error: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "out").exists()


def test_eval_quick_prints_the_reports_rows_and_targets(tmp_path, capsys, monkeypatch) -> None:
    """`--n` and `--steps` replace the quick size's; the printed lines are results.json's rows and targets."""
    from dataclasses import replace

    from ipadapter.miniature import quality

    sizes = []
    real = quality.evaluate
    monkeypatch.setattr(quality, "evaluate", lambda out, models, size: sizes.append(size) or real(out, models, size))
    threads = []  # recorded, not set: more threads in a forked child (mutation testing) can hang it
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["miniature", "eval", "--quick", "--n", "3", "--steps", "1", "--threads", "2", "--out",
                 str(tmp_path / "q")]) == 0
    assert threads == [2]
    assert sizes == [replace(quality.QUICK, references=3, steps=1)]
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    met = {True: "met", False: "NOT met", None: "not measured"}
    expected = [f"{name}: CLIP-I {row['clip_i']:.3f} {({k: round(v, 2) for k, v in row['agreement'].items()})}"
                for name, row in results["rows"].items()]
    expected += [f"{met[target['met']]} - {name}" for name, target in results["targets"].items()]
    assert capsys.readouterr().out.splitlines() == [*expected, f"report: {tmp_path / 'q' / 'report.md'}"]


def test_train_runs_the_recipe_with_the_flags(tmp_path, capsys, monkeypatch) -> None:
    from ipadapter.miniature import recipes

    seen, threads = [], []
    monkeypatch.setattr(recipes, "run_recipe", lambda *args: seen.append(args))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["miniature", "train", "adapter", "--out", str(tmp_path), "--steps", "1", "--resume", "--threads",
                 "2"]) == 0
    assert main(["miniature", "train", "adapter-simple"]) == 0
    assert seen == [("adapter", tmp_path, 1, True), ("adapter-simple", recipes.DEFAULT_OUT, None, False)]
    assert threads == [2], "no --threads: torch's own count"
    with pytest.raises(SystemExit):
        main(["miniature", "train", "adapters"])
    assert "argument recipe: invalid choice: 'adapters'" in capsys.readouterr().err


def test_export_prints_the_sizes_it_wrote(tmp_path, capsys, monkeypatch) -> None:
    from ipadapter.miniature import recipes

    seen = []
    monkeypatch.setattr(recipes, "export", lambda out: seen.append(out) or {"pipeline": 1.2345, "adapters": 0.5})
    assert main(["miniature", "export", "--out", str(tmp_path)]) == 0
    assert seen == [tmp_path]
    assert capsys.readouterr().out == "exported (MB): {'pipeline': 1.23, 'adapters': 0.5}\n"


def test_eval_without_quick_measures_at_the_reports_own_size_into_its_own_folder(tmp_path, monkeypatch) -> None:
    """`evaluate` is `eval`'s other name; without --out the report goes to eval/miniature-quality (README's
    pictures come from there), with --models that folder's models."""
    from ipadapter.miniature import quality
    from ipadapter.miniature.models import Models

    seen = []
    monkeypatch.setattr(quality, "evaluate", lambda out, models, size: seen.append((out, models, size)) or
                        {"rows": {}, "targets": {}})
    monkeypatch.setattr(Models, "from_folder", lambda folder: ("models of", folder))
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.chdir(tmp_path)
    assert main(["miniature", "evaluate"]) == 0
    assert threads == [], "no --threads: torch's own count"
    assert main(["miniature", "eval", "--models", str(tmp_path), "--out", "q"]) == 0
    assert seen == [(Path("eval/miniature-quality"), None, quality.Size()),
                    (Path("q"), ("models of", str(tmp_path)), quality.Size())]


def test_eval_says_which_targets_were_met(tmp_path, capsys, monkeypatch) -> None:
    from ipadapter.miniature import quality

    targets = {"a": {"met": True}, "b": {"met": False}, "c": {"met": None}}
    monkeypatch.setattr(quality, "evaluate", lambda *args, **kwargs: {"rows": {}, "targets": targets})
    assert main(["miniature", "eval", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["met - a", "NOT met - b", "not measured - c",
                                                    f"report: {tmp_path / 'report.md'}"]


def test_the_defaults_the_help_names_are_the_ones_used(capsys) -> None:
    from ipadapter.cli.main import build_parser
    from ipadapter.cli.miniature import HELP
    from ipadapter.miniature.quality import Size

    data = build_parser().parse_args(["miniature", "data", "--out", "d"])
    assert HELP["data --n"].endswith(f"(default {data.n})") and HELP["data --seed"].endswith(f"(default {data.seed})")
    assert HELP["data --split"].endswith(f"(default {data.split})")
    assert HELP["eval --n"].endswith(f"(default {Size().references})")
    assert HELP["eval --steps"].endswith(f"(default {Size().steps})")
    with pytest.raises(SystemExit):
        main(["miniature", "data", "--out", "d", "--split", "test"])
    assert "argument --split: invalid choice: 'test'" in capsys.readouterr().err


def test_data_needs_an_output_folder(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["miniature", "data", "--n", "1"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == ("ipadapter miniature data: error: the following arguments are required: --out "
                                       "(see ipadapter miniature data --help)\n")
