"""`ipadapter evaluate` end to end on a tiny local pipeline with a tiny judge CLIP; its one-line errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ipadapter.cli.main import main
from ipadapter.evaluate.manifests import write_manifest
from tests import factories


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    factories.save_tiny_sd15_pipeline(root)
    factories.save_judge(root / "judge")
    for i in range(2):
        factories.reference_image(i).save(root / f"ref{i}.png")
    write_manifest(root / "refs.jsonl", [{"image_file": "ref0.png", "text": "a red circle"},
                                         {"image_file": "missing.png", "text": "x"},
                                         {"image_file": "ref1.png", "text": "a blue square"}])
    return root


def _args(root, out, *extra):
    return ["evaluate", "--base", str(root / "pipe"), "--adapter", str(root / "base.bin"), "--manifest",
            str(root / "refs.jsonl"), "--out", str(out), "--judge", str(root / "judge"), "--steps", "2",
            "--width", "32", "--height", "32", *extra]


def test_evaluate_writes_results_markdown_and_pngs_and_resumes(setup, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_args(setup, out, "--scales", "0,1", "--samples", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "paper-table1" and not results["comparable"]
    assert [(r["name"], r["scale"], r["samples"]) for r in results["runs"]] == [("base", 0.0, 4), ("base", 1.0, 4)]
    assert json.loads((out / "plan.json").read_text())["base"] == str(setup / "pipe"), "the base is pinned"
    for run in results["runs"]:
        assert -1 <= run["clip_i"] <= 1 and -1 <= run["clip_t_cos"] <= 1 and 0 <= run["clip_t"] <= 2.5
    assert len(results["skipped_references"]) == 1 and "missing.png" in results["skipped_references"][0]
    report = (out / "report.md").read_text()
    assert "| scale |" in report and "Not comparable" in report and "steps: 2 (protocol: 50)" in report
    assert "Open unCLIP" in report and "missing.png" in report
    for png in ("scale_sweep.png", "grid-base.png"):
        assert Image.open(out / png).size[0] > 100
    samples = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")}
    assert len(samples) == 8
    assert main(_args(setup, out, "--scales", "0,1", "--samples", "2")) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")} == samples
    assert "wrote" in capsys.readouterr().out


BAD = {
    "judge not a CLIP": (["--judge", "{root}/pipe/image_encoder"], "must be a CLIP"),
    "empty manifest": (["--manifest", "{root}/empty.jsonl"], "no usable references"),
    "bad scales": (["--scales", "0,x"], "--scales"),
    "negative scale": (["--scales", "0,-1"], "--scales must not be negative, got -1"),
    "negative first scale": (["--scales", "-1,1"], "--scales must not be negative, got -1"),
    "no manifest for paper protocol": (["--manifest", ""], "needs --manifest"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(setup, case, tmp_path, capsys) -> None:
    (setup / "empty.jsonl").write_text("")
    flags, words = BAD[case]
    code = main(_args(setup, tmp_path / "o", *[f.format(root=setup) for f in flags]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "o" / "samples").exists()


def _deviations(report: str) -> set[str]:
    """The items of report.md's "Deviations from the protocol:" list."""
    lines = report.split("Deviations from the protocol:\n\n", 1)[1].splitlines()
    return {line[2:] for line in lines[: lines.index("")]}


def test_without_model_flags_it_evaluates_the_bundled_miniature_with_its_judge(setup, tmp_path, monkeypatch, capsys) -> None:
    from ipadapter import bundled

    pipe = factories.tiny_sd15_pipeline(tmp_path)
    factories.fake_miniature_assets(tmp_path / "assets", setup / "pipe",
                                         factories.published(pipe.unet, "base", factories.SD15_CROSS))
    monkeypatch.setattr(bundled, "ASSETS_DIR", tmp_path / "assets")
    monkeypatch.setattr(bundled, "PIPELINE_DIR", tmp_path / "assets" / "pipeline")
    monkeypatch.setattr(bundled, "JUDGE_DIR", tmp_path / "assets" / "judge")
    out = tmp_path / "mini"
    assert main(["evaluate", "--out", str(out), "--limit", "2", "--samples", "1", "--scales", "0,1", "--steps", "2",
                 "--guidance", "5"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "miniature" and results["judge"] == "miniature"
    # Every flag that overrides the protocol (12 references, 2 samples, 5 scales, 25 steps, guidance 7.5, as
    # docs/evaluation.md states it) is listed in the report.
    assert _deviations((out / "report.md").read_text()) == {
        "references: 2 (protocol: 12)", "samples: 1 (protocol: 2)", "steps: 2 (protocol: 25)",
        "guidance: 5.0 (protocol: 7.5)", "scales: [0.0, 1.0] (protocol: [0.0, 0.25, 0.5, 0.75, 1.0])"}
    assert [r["scale"] for r in results["runs"]] == [0.0, 1.0]
    assert all({"clip_i", "clip_t", "attributes"} <= set(r) for r in results["runs"])
    assert (out / "references" / "manifest.jsonl").is_file() and (out / "scale_sweep.png").is_file()
    assert "Judge-classifier agreement" in (out / "report.md").read_text()


def _retrained_in_place_is_refused(setup, tmp_path, capsys, name: str, retrain, pinned: str) -> None:
    """Evaluate with a copy of `setup/name`, change it in place with `retrain(path)`, rerun into the same folder: the
    rerun is refused in one line naming the `pinned` setting, and the old samples stay as they were."""
    import shutil

    model = tmp_path / name
    (shutil.copytree if (setup / name).is_dir() else shutil.copy)(setup / name, model)
    out = tmp_path / "run"
    args = [a if a != str(setup / name) else str(model) for a in _args(setup, out, "--scales", "1")]
    assert main(args) == 0
    samples = {p: p.read_bytes() for p in (out / "samples").rglob("*.png")}
    retrain(model)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"other settings ({pinned})" in err
    assert {p: p.read_bytes() for p in (out / "samples").rglob("*.png")} == samples


def test_a_retrained_base_under_the_same_path_is_not_mixed_into_old_samples(setup, tmp_path, capsys) -> None:
    """The plan names the base by its path too; a VAE decoder fine-tuned in place (as the miniature's was) makes
    other images."""
    import torch
    from diffusers import AutoencoderKL

    def fine_tune_decoder(base) -> None:
        vae = AutoencoderKL.from_pretrained(base / "vae")
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(1.01)
        vae.save_pretrained(base / "vae")

    _retrained_in_place_is_refused(setup, tmp_path, capsys, "pipe", fine_tune_decoder, "base_weights")


def test_a_retrained_adapter_under_the_same_path_is_not_mixed_into_old_samples(setup, tmp_path, capsys) -> None:
    """The plan names the adapter by its path; a file retrained under that path makes other images."""
    import torch

    def retrain(adapter) -> None:
        state = torch.load(adapter, weights_only=True)
        first = next(iter(state["image_proj"]))
        state["image_proj"][first] = state["image_proj"][first] + 1.0
        torch.save(state, adapter)

    _retrained_in_place_is_refused(setup, tmp_path, capsys, "base.bin", retrain, "adapter_weights")


@pytest.fixture(scope="module")
def miniature_assets(setup, tmp_path_factory):
    """Tiny stand-ins for the bundled miniature model and judge (the miniature protocol's default models)."""
    root = tmp_path_factory.mktemp("assets")
    pipe = factories.tiny_sd15_pipeline(root)
    factories.fake_miniature_assets(root / "assets", setup / "pipe",
                                    factories.published(pipe.unet, "base", factories.SD15_CROSS))
    return root / "assets"


@pytest.fixture
def bundled_miniature(miniature_assets, monkeypatch):
    from ipadapter import bundled

    monkeypatch.setattr(bundled, "ASSETS_DIR", miniature_assets)
    monkeypatch.setattr(bundled, "PIPELINE_DIR", miniature_assets / "pipeline")
    monkeypatch.setattr(bundled, "JUDGE_DIR", miniature_assets / "judge")


MINIATURE_REFUSED = {  # flags under the miniature protocol, and the whole one-line error
    "a --name per adapter": (["--name", "a", "--name", "b"], "give --name once per adapter (1), not 2 times"),
    "missing judge folder": (["--judge", "{tmp}/nonexistent/judge"], "--judge not found: {tmp}/nonexistent/judge "
                             "(no such file or folder; a Hub model id has the form owner/name)"),
    "judge not a CLIP": (["--judge", "{root}/pipe/image_encoder"], "the judge must be a CLIP with image and text "
                         "towers (CLIPModel), but {root}/pipe/image_encoder is a CLIPVision model"),
    "DINO unused": (["--dino", "/nope"], "--dino is not used by the miniature protocol (it measures clip_i, clip_t, "
                    "attributes); it serves --protocol dreambench"),
    "Inception unused": (["--inception", "/nope.pt"], "--inception is not used by the miniature protocol (it "
                         "measures clip_i, clip_t, attributes); it serves --protocol face"),
}


@pytest.mark.parametrize("case", list(MINIATURE_REFUSED))
def test_refused_miniature_runs_leave_no_output_folder(setup, bundled_miniature, tmp_path, capsys, case) -> None:
    """The miniature protocol builds its references into the output folder: every check runs before that."""
    flags, message = MINIATURE_REFUSED[case]
    out = tmp_path / "run"
    fill = {"tmp": tmp_path, "root": setup}
    code = main(["evaluate", "--out", str(out), "--limit", "2", "--samples", "1", "--scales", "1", "--steps", "2",
                 *[f.format(**fill) for f in flags]])
    assert (code, capsys.readouterr().err.strip()) == (2, f"ipadapter: error: {message.format(**fill)}")
    assert not out.exists()


def test_a_run_failing_in_generation_leaves_nothing_that_stops_a_rerun(setup, tmp_path, monkeypatch, capsys) -> None:
    """A user error found only when generating (a step count the scheduler refuses): a new folder is removed, and a
    folder that was there keeps no plan that would refuse the corrected rerun."""
    from ipadapter.errors import IPAdapterError
    from ipadapter.evaluate import runner

    def refusing_sampler(*args, **kwargs):
        def sample(job, reference):
            raise IPAdapterError("--steps 1001 is more than the scheduler's 1000 training timesteps")
        return sample

    working = runner.prompter_sampler
    monkeypatch.setattr(runner, "prompter_sampler", refusing_sampler)
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    for out in (fresh, existing):
        assert main(_args(setup, out, "--scales", "1", "--samples", "1")) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, which had started
        assert last.endswith("ipadapter: error: --steps 1001 is more than the scheduler's 1000 training timesteps")
    assert not fresh.exists()
    monkeypatch.setattr(runner, "prompter_sampler", working)
    assert main([*_args(setup, existing, "--scales", "1", "--samples", "1"), "--steps", "1"]) == 0
    assert len(list((existing / "samples").rglob("*.png"))) == 2  # two usable references, one sample each


UNCACHED = "ipadapter-tests/no-such-judge"


def test_an_uncached_hub_judge_unreachable_is_one_line_after_one_request(setup, tmp_path, monkeypatch, capsys) -> None:
    """The Hub is asked once, without retries, and only after the local cache: without network that is one sentence at
    once. Offline mode off, `model_info` stands in for the Hub, failing as a machine without network does."""
    import huggingface_hub
    from huggingface_hub import constants

    asked = []

    def unreachable(repo_id, **kwargs):
        asked.append(repo_id)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "run"
    assert main(_args(setup, out, "--judge", UNCACHED)) == 2
    assert capsys.readouterr().err.strip() == (
        f"ipadapter: error: the judge {UNCACHED} is not in the local Hugging Face cache and the Hub cannot be reached; "
        f"download it once with network access (hf download {UNCACHED}) or give a local folder")
    assert asked == [UNCACHED] and not out.exists()


def test_a_judge_in_the_local_hub_cache_is_read_without_asking_the_hub(setup, tmp_path, monkeypatch) -> None:
    """Online (HF_HUB_OFFLINE off), a cached judge is still read from the cache: no request about it is sent (the one
    huggingface_hub may send once a process for its own telemetry, /api/agent-harnesses, names no model)."""
    from ipadapter.evaluate.judges import ClipJudge

    factories.write_hub_cache(tmp_path / "hub", UNCACHED, setup / "judge")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "hub")
    judge = ClipJudge.load(UNCACHED)
    assert judge.name == UNCACHED and [url for url in sent if UNCACHED in url] == []
