"""`ipadapter evaluate` end to end on a tiny local pipeline with a tiny judge CLIP; its one-line errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ipadapter.cli.main import main
from ipadapter.errors import IPAdapterError
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
    "no samples": (["--samples", "0"], "--samples must be at least 1, got 0"),
    "no steps": (["--steps", "0"], "--steps must be at least 1, got 0"),
    "no references": (["--limit", "0"], "--limit must be at least 1, got 0"),
    "negative guidance": (["--guidance", "-1"], "--guidance must not be negative, got -1"),
    "output inside a file": (["--out", "{root}/refs.jsonl/run"], "--out {root}/refs.jsonl/run: {root}/refs.jsonl is a "
                             "file, not a folder"),
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
    assert judge.text_embeds(["a red circle"]).shape == (1, 24) and [url for url in sent if UNCACHED in url] == []


def test_a_sample_is_the_generate_command_with_the_runs_settings(setup, tmp_path, capsys) -> None:
    """Sample k of reference i is `ipadapter generate` of that reference with seed + 10000·i + k and the run's steps,
    guidance, size, scheduler (the protocol's DDIM) and prompt (its text under --prompt-mode text). plan.json pins
    what makes the images under the flags' names, results.json's settings say what was measured, and the printed
    lines give each run's metrics to 4 decimals, the skipped references and the files written."""
    import hashlib

    import numpy as np

    from ipadapter.evaluate.protocols import protocol

    out = tmp_path / "run"
    flags = ["--scales", "0.5", "--samples", "1", "--seed", "3", "--guidance", "4", "--prompt-mode", "text",
             "--height", "40"]
    assert main(_args(setup, out, *flags)) == 0
    captured = capsys.readouterr()
    printed = captured.out.splitlines()
    bars = {line.split(":")[0] for line in captured.err.replace("\r", "\n").splitlines() if line.strip()}
    assert bars == {"generating"}, "one progress bar: the samples', not the pipeline's steps"
    assert main(["generate", "--base", str(setup / "pipe"), "--adapter", str(setup / "base.bin"), "--image",
                 str(setup / "ref1.png"), "--prompt", "a blue square", "--scale", "0.5", "--seed", str(3 + 10000 * 2),
                 "--steps", "2", "--guidance", "4", "--width", "32", "--height", "40", "--scheduler",
                 protocol("paper-table1").scheduler, "--out", str(tmp_path / "single.png")]) == 0
    sample = np.asarray(Image.open(out / "samples" / "base" / "scale-0.5" / "00002-00.png"), dtype=np.int16)
    single = np.asarray(Image.open(tmp_path / "single.png"), dtype=np.int16)
    assert sample.shape == (40, 32, 3) and np.abs(sample - single).max() <= 1
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan.pop("adapter_weights")) == 16 and len(plan.pop("base_weights")) == 16
    assert plan == {"manifest_sha256": hashlib.sha256((setup / "refs.jsonl").read_bytes()).hexdigest()[:16],
                    "base": str(setup / "pipe"), "adapters": [str(setup / "base.bin")], "weight_names": None,
                    "image_encoder": None, "steps": 2, "guidance": 4.0, "scheduler": "DDIMScheduler", "width": 32,
                    "height": 40, "dtype": None, "seed": 3, "empty_prompt": False}
    results = json.loads((out / "results.json").read_text())
    assert results["settings"] == {"samples": 1, "scales": [0.5], "steps": 2, "guidance": 4.0,
                                   "scheduler": "DDIMScheduler", "empty_prompt": False, "judge": str(setup / "judge"),
                                   "references": 2, "seed": 3, "methods": ["base"]}
    [run] = results["runs"]
    metrics = {k: round(v, 4) for k, v in run.items() if k in ("clip_i", "clip_t", "clip_t_cos")}
    assert printed == [f"base @ 0.5: {metrics}", f"skipped 1 reference(s); listed in {out / 'report.md'}",
                       f"wrote {out / 'results.json'} and {out / 'report.md'}"]


@pytest.mark.parametrize(("mode", "empty"), [("empty", True), ("text", False), (None, True)])
def test_prompt_mode_chooses_the_empty_prompt_or_the_text(setup, tmp_path, monkeypatch, mode, empty) -> None:
    """paper-table1 prompts with the image alone; --prompt-mode overrides it either way."""
    from ipadapter.evaluate import runner

    seen = []

    def generate(plan, *args, **kwargs):
        seen.append(plan.empty_prompt)
        raise IPAdapterError("stopped at generating")

    monkeypatch.setattr(runner, "generate", generate)
    assert main(_args(setup, tmp_path / "o", "--scales", "1", *(["--prompt-mode", mode] if mode else []))) == 2
    assert seen == [empty]


def _stop_before_measuring(monkeypatch) -> list:
    """`_measure` replaced by a recorder of what the checks hand it (its arguments; the run's flags as they stand)."""
    from ipadapter.cli import evaluate

    seen = []

    def measure(args, chosen, out, names, scales, given, shard):
        seen.append({"width": args.width, "height": args.height, "names": names, "given": given, "out": out})
        raise IPAdapterError("stopped before measuring")

    monkeypatch.setattr(evaluate, "_measure", measure)
    return seen


@pytest.mark.parametrize(("flags", "size"), [(["--width", "48"], (48, 48)), (["--height", "40"], (40, 40)),
                                             (["--width", "24", "--height", "40"], (24, 40)), ([], (None, None))])
def test_one_side_given_the_other_follows_the_bases_square_aspect(setup, tmp_path, monkeypatch, flags, size) -> None:
    """The tiny base's default size is square (its UNet's sample size times the VAE's factor, both sides)."""
    seen = _stop_before_measuring(monkeypatch)
    args = [a for a in _args(setup, tmp_path / "o") if a not in ("--width", "--height", "32")]
    assert main([*args, *flags]) == 2
    assert (seen[0]["width"], seen[0]["height"]) == size


@pytest.mark.parametrize(("flags", "size"), [(["--width", "32"], (32, 16)), (["--height", "32"], (64, 32))])
def test_one_side_given_the_other_follows_a_wide_bases_aspect(setup, tmp_path, monkeypatch, flags, size) -> None:
    """A copy of the tiny base whose UNet samples twice as wide as high (its default 64 × 32 pixels): the other side
    keeps that aspect, read from this base's configs."""
    import shutil

    shutil.copytree(setup / "pipe", tmp_path / "pipe")
    config = tmp_path / "pipe" / "unet" / "config.json"
    sample = json.loads(config.read_text())["sample_size"]
    config.write_text(json.dumps({**json.loads(config.read_text()), "sample_size": [sample, 2 * sample]}))
    seen = _stop_before_measuring(monkeypatch)
    args = [a for a in _args(setup, tmp_path / "o") if a not in ("--width", "--height", "32")]
    args[args.index(str(setup / "pipe"))] = str(tmp_path / "pipe")
    assert main([*args, *flags]) == 2
    assert (seen[0]["width"], seen[0]["height"]) == size


def test_limit_takes_the_manifests_first_references(setup, tmp_path, monkeypatch) -> None:
    """--limit 1: the first usable reference."""
    seen = _stop_before_measuring(monkeypatch)
    assert main(_args(setup, tmp_path / "o", "--limit", "1")) == 2
    given = seen[0]["given"]
    assert [e.image_file.name for e in given.entries] == ["ref0.png"]


def test_adapters_are_named_by_name_or_by_file_told_apart_by_position(setup, tmp_path, monkeypatch) -> None:
    import shutil

    seen = _stop_before_measuring(monkeypatch)
    (tmp_path / "a").mkdir()
    shutil.copy(setup / "base.bin", tmp_path / "a" / "base.bin")
    shutil.copy(setup / "base.bin", tmp_path / "other.bin")
    more = ["--adapter", str(tmp_path / "a" / "base.bin"), "--adapter", str(tmp_path / "other.bin")]
    assert main([*_args(setup, tmp_path / "o"), *more]) == 2
    assert main([*_args(setup, tmp_path / "o"), "--name", "mine"]) == 2
    assert [s["names"] for s in seen] == [["base (0)", "base (1)", "other"], ["mine"]]


def _stop_measuring(monkeypatch, tmp_path, *, samples: bool) -> None:
    """`_measure` that fails after making the output folder, with or without a finished sample in it."""
    from ipadapter.cli import evaluate

    def measure(args, chosen, out, *rest):
        folder = out / "samples" / "base" / "scale-1"
        folder.mkdir(parents=True)
        if samples:
            factories.reference_image(0).save(folder / "00000-00.png")
        raise IPAdapterError("--steps 1001 is more than the scheduler's 1000 training timesteps")

    monkeypatch.setattr(evaluate, "_measure", measure)


@pytest.mark.parametrize(("existing", "samples", "processes", "kept"), [
    (False, False, 1, False), (False, True, 1, True), (True, False, 1, True), (False, False, 2, True)])
def test_a_failed_run_removes_only_a_folder_it_made_with_nothing_in_it(setup, tmp_path, monkeypatch, existing,
                                                                      samples, processes, kept) -> None:
    """A failure removes the --out folder only if this run created it, made no sample, and is the only process (the
    others may still be writing); a folder that was there keeps what it held."""
    from ipadapter.batch import launch
    from ipadapter.batch.shards import Shard

    shard = Shard()
    shard.count = processes
    monkeypatch.setattr(launch, "current", lambda: shard)
    _stop_measuring(monkeypatch, tmp_path, samples=samples)
    out = tmp_path / "run"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert main(_args(setup, out)) == 2
    assert out.exists() == kept
    assert not existing or (out / "notes.txt").read_text() == "mine"


# (the process's device under accelerate, --device, the device the measuring models load on)
DEVICES = [("cuda:1", None, "cuda:1"), ("cuda:1", "cuda", "cuda:1"), ("cuda:1", "cpu", "cpu"),
           ("cuda:1", "cuda:0", "cuda:0"), (None, "cuda", "cuda"), (None, None, "cpu")]


@pytest.mark.parametrize(("process", "flag", "expected"), DEVICES)
def test_the_models_load_on_the_processs_gpu_unless_device_names_another(
        setup, tmp_path, monkeypatch, capsys, process, flag, expected) -> None:
    """As generate's: `--device` unset or plain `cuda` takes the process's GPU; without one the CPU. The machine is
    given two GPUs; the judge, DINO and the generating models record the device they are given, and loading the
    generating models stops the run."""
    from ipadapter.cli import generate
    from ipadapter.evaluate import extractors
    from ipadapter.evaluate.judges import ClipJudge

    factories.process_with_gpu(monkeypatch, process)
    seen = []

    def load(args):
        seen.append(("generation", args.device))
        raise IPAdapterError("stopped at loading")

    monkeypatch.setattr(ClipJudge, "load", lambda source, device="cpu": seen.append(("judge", device)))
    monkeypatch.setattr(extractors, "dino_embedder", lambda source, device: seen.append(("dino", device)))
    monkeypatch.setattr(generate, "load_from_flags", load)
    flags = ["--protocol", "dreambench", "--dino", str(tmp_path / "dino"), *(["--device", flag] if flag else [])]
    assert main([*_args(setup, tmp_path / "o"), *flags]) == 2
    assert seen == [("judge", expected), ("dino", expected), ("generation", expected if process or flag else None)]
    assert capsys.readouterr().err == "ipadapter: error: stopped at loading\n"


def test_a_manifest_without_attributes_skips_the_attribute_agreement(setup, bundled_miniature, tmp_path) -> None:
    """The miniature protocol's attribute agreement reads each reference's attrs: with a given manifest that has
    none, the metric is skipped with its reason (the attribute judge is not loaded)."""
    out = tmp_path / "run"
    assert main(["evaluate", "--out", str(out), "--manifest", str(setup / "refs.jsonl"), "--samples", "1", "--scales",
                 "1", "--steps", "2"]) == 0
    skipped = json.loads((out / "results.json").read_text())["skipped_metrics"]
    assert skipped == {"attributes": "per-attribute agreement needs an attribute judge and a manifest with attrs"}


@pytest.mark.parametrize(("chosen", "flag"), [("dreambench", "--dino"), ("face", "--inception")])
def test_the_dino_and_inception_flags_reach_the_metrics(setup, tmp_path, monkeypatch, chosen, flag) -> None:
    """The file each flag names is the one its metric loads (here absent, so the metric is skipped, its reason in
    the command line's words)."""
    from ipadapter.evaluate import extractors

    seen = {}

    def dino(source, device):
        seen["--dino"] = (source, device)
        raise extractors.MetricUnavailable("DINO-I needs ... or give dino=FOLDER")

    def inception(source, device):
        seen["--inception"] = (source, device)
        raise extractors.MetricUnavailable("FID needs ... or give inception=FILE")

    monkeypatch.setattr(extractors, "dino_embedder", dino)
    monkeypatch.setattr(extractors, "inception_features", inception)
    monkeypatch.setattr(extractors, "lpips_distance", lambda device: None)
    monkeypatch.setattr(extractors, "arcface_embedder", lambda: None)
    from ipadapter.evaluate import runner, scoring

    def score(plan, entries, out, box):
        seen["skipped"] = box.skipped
        raise IPAdapterError("stopped at scoring")

    monkeypatch.setattr(runner, "generate", lambda *args, **kwargs: None)
    monkeypatch.setattr(scoring, "score", score)
    given = str(tmp_path / "model")
    args = _args(setup, tmp_path / "o", "--protocol", chosen, flag, given)
    if chosen == "face":  # measures no CLIP score: --judge is refused
        args = [a for a in args if a not in ("--judge", str(setup / "judge"))]
    assert main(args) == 2
    skipped = seen.pop("skipped")
    assert seen == {flag: (given, "cpu")}
    assert list(skipped.values()) == [f"{'DINO-I' if flag == '--dino' else 'FID'} needs ... or give {flag} "
                                      f"{'FOLDER' if flag == '--dino' else 'FILE'}"]


def test_a_judge_the_protocol_never_uses_is_refused_naming_the_protocols_that_would(setup, tmp_path, capsys) -> None:
    assert main(_args(setup, tmp_path / "o", "--protocol", "face")) == 2
    assert capsys.readouterr().err == (
        "ipadapter: error: --judge is not used by the face protocol (it measures face_id, fid, lpips); it serves "
        "--protocol paper-table1 or dreambench or miniature\n")
    assert not (tmp_path / "o").exists()


def test_a_second_process_reads_the_main_ones_references_and_makes_only_its_share(
        setup, bundled_miniature, tmp_path, monkeypatch, capsys) -> None:
    """Under `accelerate launch` the main process builds the miniature references and the others read them back.
    Here the processes run one after another: the references built first (as the main process does before the
    others go on), then the second of two processes, which makes every second (method, scale, reference) cell and
    reports nothing, then a one-process rerun that makes the rest: the samples and results are a one-process run's."""
    import numpy as np

    from ipadapter.batch import launch
    from ipadapter.batch.shards import Shard
    from ipadapter.cli.evaluate import miniature_references
    from ipadapter.evaluate.protocols import protocol as named
    from ipadapter.miniature import protocol

    flags = ["--limit", "2", "--samples", "1", "--scales", "0,1", "--steps", "2"]
    alone, out = tmp_path / "alone", tmp_path / "shared"
    assert main(["evaluate", "--out", str(alone), *flags]) == 0
    cells = [p.relative_to(alone) for scale in ("0", "1")  # the cells' order: scales, then references
             for p in sorted((alone / "samples").glob(f"*/scale-{scale}/*.png"))]
    miniature_references(out, 2)
    second = Shard()
    second.index, second.count = 1, 2
    monkeypatch.setattr(launch, "current", lambda: second)
    built, real = [], (protocol.clip_judge, protocol.miniature_manifest)
    # The measuring models and the references are the main process's: the second builds neither.
    monkeypatch.setattr(protocol, "clip_judge", lambda: built.append("judge"))
    monkeypatch.setattr(protocol, "miniature_manifest", lambda *args: built.append("references"))
    capsys.readouterr()
    assert main(["evaluate", "--out", str(out), *flags]) == 0
    assert capsys.readouterr().out == "" and built == []
    assert sorted(p.relative_to(out) for p in (out / "samples").rglob("*.png")) == sorted(cells[1::2])
    monkeypatch.setattr(protocol, "clip_judge", real[0])
    monkeypatch.setattr(protocol, "miniature_manifest", real[1])
    monkeypatch.setattr(launch, "current", Shard)
    assert main(["evaluate", "--out", str(out), *flags]) == 0
    for cell in cells:
        assert np.array_equal(np.asarray(Image.open(out / cell)), np.asarray(Image.open(alone / cell)))
    runs = [json.loads((folder / "results.json").read_text())["runs"] for folder in (alone, out)]
    assert runs[0] == runs[1]
    assert json.loads((out / "plan.json").read_text())["guidance"] == named("miniature").guidance  # no --guidance


def test_the_defaults_the_help_names_are_the_ones_used() -> None:
    from ipadapter.cli.evaluate import HELP, MANIFEST_HELP
    from ipadapter.cli.main import build_parser
    from ipadapter.evaluate.extractors import DINO_DEFAULT
    from ipadapter.evaluate.protocols import protocol

    parser = build_parser()
    args = parser.parse_args(["evaluate", "--out", "x"])
    assert HELP["--seed"].endswith(f"(default {args.seed})")
    assert HELP["--limit"].endswith(f"default {protocol('miniature').reference_count})")
    assert HELP["--dino"].endswith(f"(default {DINO_DEFAULT})")
    dream = parser.parse_args(["manifest", "dreambench", "f", "--out", "m.jsonl"])
    assert MANIFEST_HELP["--images-per-subject"].endswith(f"(default {dream.images_per_subject})")


@pytest.mark.parametrize("argv", [["evaluate"], ["manifest", "coco", "c.json", "val"], ["manifest", "dreambench", "f"]])
def test_out_is_required(capsys, argv) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    prog = "ipadapter " + " ".join(argv[:2] if argv[0] == "manifest" else argv[:1])
    assert capsys.readouterr().err == f"{prog}: error: the following arguments are required: --out (see {prog} --help)\n"


def test_the_prompt_mode_is_empty_or_text(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["evaluate", "--out", str(tmp_path / "o"), "--prompt-mode", "image"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("ipadapter evaluate: error: argument --prompt-mode: invalid choice: "
                                              "'image' (choose from ")


def test_the_protocol_is_one_of_the_protocols(capsys, tmp_path) -> None:
    from ipadapter.evaluate.protocols import PROTOCOLS

    with pytest.raises(SystemExit) as caught:
        main(["evaluate", "--out", str(tmp_path / "o"), "--protocol", "table1"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ipadapter evaluate: error: argument --protocol: invalid choice: 'table1' (choose from ")
    assert [err.index(f"'{name}'") for name in sorted(PROTOCOLS)] == sorted(err.index(f"'{n}'") for n in PROTOCOLS)


@pytest.mark.parametrize("command", ["evaluate", "manifest"])
def test_the_help_ends_with_the_examples_as_written(capsys, command) -> None:
    from ipadapter.cli.evaluate import EXAMPLES, MANIFEST_EXAMPLES

    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert capsys.readouterr().out.endswith("\n\n" + (EXAMPLES if command == "evaluate" else MANIFEST_EXAMPLES))
