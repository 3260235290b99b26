"""`ipadapter generate --manifest` end to end on tiny local models: batched rows equal one-request generations, bad
jobs are recorded while the rest runs, a killed run resumes to the same bytes, 2 processes equal 1 (gloo), and
`ipadapter evaluate` under 2 processes writes the results of 1."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.cli.main import main
from ipadapter.evaluate.manifests import write_manifest
from tests import factories
from tests.test_train_distributed import _free_port, _launch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
JOBS = [
    {"image": "ref0.png", "seed": 1},
    {"image": "ref1.png", "seed": 2, "prompt": "a red circle"},
    {"image": "ref2.png", "seed": 3, "negative_prompt": "blue"},
    {"image": "ref3.png", "seed": 4, "scale": 0.5},
    {"id": "two", "image": "ref4.png", "seed": 5, "num_images": 2},
    {"image": "missing.png"},
    {"image": "truncated.png", "seed": 6},  # its header reads: it fails in its batch, beside job 3
    {"image": "ref0.png", "seed": 1},  # job 1 again
]


@contextlib.contextmanager
def _one_thread():
    """The subprocesses run with OMP_NUM_THREADS=1; the in-process runs they are compared with do too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model_flags(root: Path) -> list[str]:
    return ["--base", str(root / "pipe"), "--adapter", str(root / "base.bin"), "--steps", "2", "--width", "32",
            "--height", "32"]


def _generate_args(root: Path, out: Path) -> list[str]:
    return ["generate", *_model_flags(root), "--manifest", str(root / "jobs.jsonl"), "--out-dir", str(out),
            "--batch-size", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    factories.save_tiny_sd15_pipeline(root)
    for i in range(5):
        factories.reference_image(i).save(root / f"ref{i}.png")
    factories.reference_image(9).save(root / "whole.png")
    data = (root / "whole.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    write_manifest(root / "jobs.jsonl", JOBS)
    return root


@pytest.fixture(scope="module")
def clean(setup):
    """One uninterrupted run in this process: the images every other run must reproduce."""
    out = setup / "clean"
    with _one_thread():
        code = main(_generate_args(setup, out))
    return code, out


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.glob("*.png")}


def _index(out: Path) -> list[dict]:
    lines = (out / "index.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds_per_image"} for line in lines]


def test_bad_jobs_are_recorded_and_the_rest_completes(clean) -> None:
    code, out = clean
    assert code == 1  # some jobs failed
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [6, 7]
    assert "not found" in errors[0]["error"] and "truncated.png" in errors[1]["error"]
    index = _index(out)
    assert [r["line"] for r in index] == [1, 2, 3, 4, 5]  # the repeated job 8 is job 1
    files = [f for r in index for f in r["files"]]
    assert sorted(files) == sorted(_pngs(out)) and "two-1.png" in files
    for name in files:
        with Image.open(out / name) as image:
            image.load()
            assert image.size == (32, 32)
    assert not list(out.glob(".*.tmp-*"))


def test_a_job_asking_more_steps_than_the_scheduler_has_fails_alone(setup, tmp_path) -> None:
    """Steps beyond the scheduler's training timesteps make the scheduler raise inside the pipeline: that job is
    recorded as failed in one line and the other job is made."""
    jobs = [{"image": str(setup / "ref0.png"), "seed": 1}, {"image": str(setup / "ref1.png"), "seed": 2, "steps": 1001}]
    write_manifest(tmp_path / "jobs.jsonl", jobs)
    out = tmp_path / "out"
    code = main(["generate", *_model_flags(setup), "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir", str(out)])
    assert code == 1
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["error"]) for e in errors] == [
        (2, "steps=1001 is more than the scheduler's 1000 training timesteps")]
    assert [r["line"] for r in _index(out)] == [1]


def test_a_jobs_lora_scale_for_an_adapter_without_lora_fails_alone(setup, tmp_path, capsys) -> None:
    """`lora_scale` scales a FaceID adapter's LoRA: for one without, the value would be silently dropped, so the job
    fails as `ipadapter generate --lora-scale` does, and the other job is made."""
    jobs = [{"image": str(setup / "ref0.png"), "seed": 1, "lora_scale": 0.6}, {"image": str(setup / "ref1.png")}]
    write_manifest(tmp_path / "jobs.jsonl", jobs)
    out = tmp_path / "out"
    assert main(["generate", *_model_flags(setup), "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir",
                 str(out)]) == 1
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["error"]) for e in errors] == [
        (1, "lora_scale= scales a FaceID adapter's LoRA; this adapter (base) has none")]
    assert [r["line"] for r in _index(out)] == [2]
    assert main(["generate", *_model_flags(setup), "--image", str(setup / "ref0.png"), "--lora-scale", "0.6", "--out",
                 str(tmp_path / "one.png")]) == 2
    assert capsys.readouterr().err.endswith("--lora-scale scales a FaceID adapter's LoRA; this adapter (base) has "
                                            "none\n")


# One UNet batch of four rows (batch size 4), each with its own reference, seed and per-row option, then a job of two
# images. Its own run, not the module's `clean` one: mutation testing credits a fixture's work to its first test only.
ROWS = [
    {"image": "ref0.png", "seed": 1},
    {"image": "ref2.png", "seed": 3, "negative_prompt": "blue"},
    {"image": "ref3.png", "seed": 4, "negative_image": "ref1.png"},
    {"image": "ref1.png", "seed": 2, "prompt": "a red circle"},
    {"id": "two", "image": "ref4.png", "seed": 5, "num_images": 2},
]
ROW_FLAGS = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "negative_image": "--negative-image"}


def test_a_batched_row_is_the_one_request_generation_of_its_job(setup, tmp_path) -> None:
    """Each row of a UNet batch has its own reference, prompt, negative prompt or image and seed: `ipadapter generate`
    of that job alone (one request, one image, the image's seed) gives the same picture, up to the batch's float
    rounding."""
    write_manifest(tmp_path / "jobs.jsonl", [{**job, **{k: str(setup / v) for k, v in job.items()
                                                         if k in ("image", "negative_image")}} for job in ROWS])
    out = tmp_path / "out"
    with _one_thread():
        assert main(["generate", *_model_flags(setup), "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir",
                     str(out), "--batch-size", "4"]) == 0
    index = _index(out)
    assert [r["batch"] for r in index] == [4, 4, 4, 4, 1]
    for record, job in zip(index, ROWS):
        k = job.get("num_images", 1) - 1  # the last image of each job
        extra = [a for key, flag in ROW_FLAGS.items() if key in job
                 for a in (flag, str(setup / job[key]) if key == "negative_image" else job[key])]
        single = tmp_path / f"{record['id']}-{k}.png"
        with _one_thread():
            assert main(["generate", *_model_flags(setup), "--image", str(setup / job["image"]), "--seed",
                         str(record["seeds"][k]), "--out", str(single), *extra]) == 0
        batched = np.asarray(Image.open(out / record["files"][k]), dtype=np.int16)
        alone = np.asarray(Image.open(single), dtype=np.int16)
        assert np.abs(batched - alone).max() <= 2, record["line"]
    # rows are not interchangeable: the two first rows differ
    first, second = (np.asarray(Image.open(out / index[n]["files"][0]), dtype=np.int16) for n in (0, 1))
    assert np.abs(first - second).max() > 10


def test_a_deleted_image_of_a_finished_job_is_made_again(setup, clean, tmp_path, capsys) -> None:
    """A job is finished when its record and every one of its images exist: an image removed by hand is generated
    again (its whole batch, so the bytes are the uninterrupted run's), and nothing else changes. The progress bar
    starts from the finished images: the valid lines of JOBS ask 7 (job 7's reference reads, it fails only when
    generated), and 4 are finished (job "two" is not)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(clean[1], out)
    (out / "two-1.png").unlink()
    with _one_thread():
        assert main(_generate_args(setup, out)) == 1  # the two bad jobs of the manifest fail again
    assert _pngs(out) == _pngs(clean[1])
    assert _index(out) == _index(clean[1])
    bars = [part for part in re.split(r"[\r\n]", capsys.readouterr().err) if part.startswith("generating:")]
    assert "4/7" in bars[0] and "6/7" in bars[-1], bars  # the failed job's image is not counted


def test_a_folder_made_with_other_settings_is_refused_naming_each_and_left_as_it_was(setup, clean, tmp_path,
                                                                                      capsys) -> None:
    """A setting changed since the folder's run, or recorded then and no longer (an older version's), is named."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(clean[1], out)
    recorded = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**recorded, "s_scale": 2.0, "retired": True}))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_generate_args(setup, out)) == 2
    assert capsys.readouterr().err == (f"ipadapter: error: {out} holds images made with other settings (retired, "
                                       "s_scale); use another --out-dir or remove it\n")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_index_records_each_jobs_settings_and_its_share_of_its_batchs_time(setup, tmp_path, monkeypatch) -> None:
    """Each index line holds the documented keys; `seconds_per_image` is its batch's time over the batch's images,
    to 4 digits. The pipeline is stood in for: each call takes one second of a clock that only it advances, and
    records the steps and guidance it was given. The first job's reference fails to load inside its batch: the
    batch's other rows are still written."""
    from types import SimpleNamespace

    from ipadapter.batch import jobs, run
    from ipadapter.cli.main import build_parser
    from ipadapter.loading import base_geometry
    from ipadapter.prompter import ImagePrompter

    clock, calls = [0.0], []

    def generate(self, prompts, **kwargs):
        clock[0] += 1.0
        calls.append((kwargs["steps"], kwargs["guidance"], len(kwargs["prompt"])))
        return [Image.new("RGB", (32, 32))] * (len(kwargs["prompt"]) * kwargs["num_images"])

    monkeypatch.setattr(ImagePrompter, "generate", generate)
    monkeypatch.setattr(run, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    lines = [{"image": str(setup / "truncated.png")}, *({"image": str(setup / f"ref{i}.png"), "seed": i}
                                                         for i in range(3)),
             {"image": str(setup / "ref3.png"), "guidance": 3.0, "steps": 4}]
    write_manifest(tmp_path / "jobs.jsonl", lines)
    argv = ["generate", *_model_flags(setup), "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir",
            str(tmp_path / "out"), "--batch-size", "4"]
    assert main(argv) == 1
    assert calls == [(2, None, 3), (4, 3.0, 1)]
    flags = build_parser().parse_args(argv)
    expected = jobs.read_jobs(flags.manifest, {n: getattr(flags, n) for n in jobs.OPTIONS}, ["0"],
                              lambda: base_geometry(flags.base)).jobs
    index = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert [r["line"] for r in index] == [2, 3, 4, 5]
    for record, job in zip(index, expected[1:]):
        assert set(record) == {"line", "id", "key", "adapter", "seeds", "files", "settings", "seconds_per_image",
                               "batch"}
        assert (record["id"], record["key"], record["adapter"], record["seeds"], record["files"]) == (
            job.id, job.key, None, job.seeds, job.files)
        assert record["settings"] == job.settings
    assert [(r["batch"], r["seconds_per_image"]) for r in index] == [(3, 0.3333)] * 3 + [(1, 1.0)]


def test_a_killed_run_resumes_to_the_images_of_an_uninterrupted_one(setup, clean, tmp_path) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "ipadapter.cli.main", *_generate_args(setup, out)]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if list((out / ".records").glob("*.json")):
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list((out / ".records").glob("*.json")), "the run wrote no job before it was killed"
    stale = out / ".two-0.png.tmp-999999"  # what a write cut short leaves
    stale.write_bytes(b"\x89PNG half")
    with _one_thread():
        assert main(_generate_args(setup, out)) == 1
    assert _pngs(out) == _pngs(clean[1])
    assert _index(out) == _index(clean[1])
    assert not stale.exists() and not list(out.glob(".*.tmp-*"))


def _evaluate_args(root: Path, out: Path) -> list[str]:
    return ["evaluate", *_model_flags(root), "--manifest", str(root / "refs.jsonl"), "--out", str(out), "--judge",
            str(root / "judge"), "--scales", "0,1", "--samples", "1"]


@dataclass
class Launch:
    """What one `accelerate launch` of `tests.cli_sequence` left: command n's exit code and output in each process."""

    folder: Path
    output: str  # the launcher's own stdout and stderr

    def codes(self, n: int) -> list[int | None]:
        """Command n's exit code in processes 0 and 1 (None: it did not return)."""
        files = [self.folder / f"plan-{n}-rank{rank}.code" for rank in range(2)]
        return [int(f.read_text()) if f.is_file() else None for f in files]

    def output_of(self, n: int) -> str:
        """Command n's stdout and stderr in both processes."""
        files = [self.folder / f"plan-{n}-rank{rank}.log" for rank in range(2)]
        return "".join(f.read_text() for f in files if f.is_file())

    def why(self, n: int) -> str:
        return (self.output_of(n) + self.output)[-3000:]


@pytest.fixture(scope="module")
def two_processes(setup) -> Launch:
    """`ipadapter generate --manifest` (into `generate/`), then `ipadapter evaluate` (into `evaluate/`), in the same
    2 processes of one `accelerate launch` (`tests.cli_sequence`): each launch starts three interpreters, and the two
    tests that hold a 2-process run against its 1-process one share this launch. Only the children's work is shared:
    each test makes and checks its own 1-process run; mutation testing sees nothing of child processes
    (scripts/mutation.sh leaves such tests out), so no work is credited to the wrong test."""
    factories.save_judge(setup / "judge")
    write_manifest(setup / "refs.jsonl", [{"image_file": f"ref{i}.png", "text": t}
                                          for i, t in enumerate(["a red circle", "a blue square", "a cat"])])
    folder = setup / "two"
    folder.mkdir()
    plan = folder / "plan.json"
    commands = [_generate_args(setup, folder / "generate"), _evaluate_args(setup, folder / "evaluate")]
    plan.write_text(json.dumps(commands))
    proc = _launch(_accelerate(["-m", "tests.cli_sequence", str(plan)]), ENV, cwd=folder)
    return Launch(folder, proc.stdout)


def test_two_processes_write_the_images_and_index_of_one(setup, clean, two_processes) -> None:
    out = two_processes.folder / "generate"
    codes, why = two_processes.codes(0), two_processes.why(0)
    assert None not in codes and codes != [0, 0], why  # two jobs of the manifest fail
    assert (out / "errors.jsonl").read_text() == (clean[1] / "errors.jsonl").read_text(), why
    assert _pngs(out) == _pngs(clean[1])
    assert _index(out) == _index(clean[1])
    assert two_processes.output_of(0).count("jobs done in") == 1  # only the main process reports


def _accelerate(program: list[str]) -> list[str]:
    """`accelerate launch` of 2 processes on the CPU running `program` (`-m module args...`)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *program]


def test_evaluate_under_two_processes_writes_the_results_of_one(setup, two_processes, tmp_path) -> None:
    with _one_thread():
        assert main(_evaluate_args(setup, tmp_path / "one")) == 0
    assert two_processes.codes(1) == [0, 0], two_processes.why(1)
    runs = {"one": tmp_path / "one", "two": two_processes.folder / "evaluate"}
    one, two = (json.loads((runs[run] / "results.json").read_text()) for run in ("one", "two"))
    for a, b in zip(one.pop("runs"), two.pop("runs")):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == pytest.approx(value, abs=1e-6), key
    assert one == two
    one, two = ({p.relative_to(runs[run]): p.read_bytes() for p in (runs[run] / "samples").rglob("*.png")}
                for run in ("one", "two"))
    assert one == two and len(one) == 6
    assert two_processes.output_of(1).count("wrote ") == 1  # only the main process writes the report


BAD = {
    "no out dir": (["--out-dir", ""], "needs --out-dir"),
    "image flag": (["--image", "{root}/ref0.png"], "--image names one request"),
    "missing manifest": (["--manifest", "{root}/none.jsonl"], "manifest not found"),
    "batch size": (["--batch-size", "0"], "--batch-size"),
    "true CFG on a UNet base": (["--true-cfg", "4"], "--true-cfg is FLUX's option; other bases take --guidance"),
    "other model settings": (["--out-dir", "{root}/clean", "--base-lora-scale", "0.5"], "other settings (base_lora_scale)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(setup, clean, case, tmp_path, capsys) -> None:
    flags, words = BAD[case]
    out = tmp_path / "o"
    before = _pngs(clean[1])
    code = main([*_generate_args(setup, out), *[f.format(root=setup) for f in flags]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not out.exists() and _pngs(clean[1]) == before


EXACT = {
    "no out dir": (["--out-dir", ""], "--manifest needs --out-dir (the folder for the images, index.jsonl and "
                                      "errors.jsonl)"),
    "mask flag": (["--mask", "m.png"], "--mask names one request's input; with --manifest give it per job (image, "
                                       "mask, image_weight), as --embeds and --face-embed have no manifest form"),
    "batch size": (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    "out dir a file": (["--out-dir", "{root}/jobs.jsonl"],
                       "--out-dir {root}/jobs.jsonl: {root}/jobs.jsonl is a file, not a folder"),
    "content text model missing": (["--content-text-encoder", "./no-text-model"],
                                   "--content-text-encoder not found: ./no-text-model (no such file or folder; a Hub "
                                   "model id has the form owner/name)"),
    "shortcut scale, no shortcut": (["--s-scale", "0.5"], "--s-scale scales a FaceID adapter's shortcut "
                                                          "(FaceID-PlusV2); no attached adapter (base) has one"),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_manifest_flag_mistakes_are_their_sentence(setup, case, tmp_path, capsys) -> None:
    flags, message = EXACT[case]
    out = tmp_path / "o"
    assert main([*_generate_args(setup, out), *[f.format(root=setup) for f in flags]]) == 2
    assert capsys.readouterr().err == f"ipadapter: error: {message.format(root=setup)}\n"


def test_the_summary_names_what_was_done_and_the_first_failure(setup, tmp_path, capsys) -> None:
    """One job made, one failed: the counts on stdout, the failures' file and the first one on stderr; batch size 1
    is allowed. run.json records the model settings as the command line gave them."""
    from ipadapter.cli.main import build_parser

    jobs = [{"image": str(setup / "ref0.png"), "seed": 1}, {"image": str(setup / "missing.png")}]
    write_manifest(tmp_path / "jobs.jsonl", jobs)
    out = tmp_path / "out"
    argv = ["generate", *_model_flags(setup), "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir", str(out),
            "--batch-size", "1", "--dtype", "float32", "--scheduler", "DDIMScheduler"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    error = json.loads((out / "errors.jsonl").read_text())["error"]
    assert captured.out == f"1 of 2 jobs done in {out} (index.jsonl)\n"
    assert captured.err.endswith(f"\n1 failed, listed in {out / 'errors.jsonl'}; first: line 2: {error}\n")
    flags = build_parser().parse_args(argv)
    recorded = json.loads((out / "run.json").read_text())
    assert recorded == {name: getattr(flags, name) for name in recorded}
    assert {"base", "adapter", "subfolder", "weight_name", "image_encoder", "dtype", "scheduler", "base_lora",
            "base_lora_scale", "controlnet", "control_image", "control_scale", "s_scale", "content_text_encoder",
            "true_cfg"} == set(recorded)
    assert (recorded["adapter"], recorded["dtype"], recorded["scheduler"]) == ([str(setup / "base.bin")], "float32",
                                                                              "DDIMScheduler")
    assert (out / "run.json").read_text() == json.dumps(recorded, indent=2) + "\n"  # for people to read


def _content_jobs(root: Path) -> list[dict]:
    """A tiny pipeline whose encoder has its paired text model beside it (`clip_text/`), two references, and a
    manifest (root/jobs.jsonl) of jobs with and without content words."""
    factories.save_tiny_sd15_pipeline(root)
    text = root / "pipe" / "image_encoder" / "clip_text"
    factories.tiny_text_encoder(32, 7, projection=24).save_pretrained(text)
    factories.write_tokenizer(text, max_length=16)
    for i in range(2):
        factories.reference_image(i).save(root / f"ref{i}.png")
    jobs = [{"image": "ref0.png", "seed": 1, "content_subtract": "a red", "content_strength": 0.5},
            {"image": "ref1.png", "seed": 2},
            {"image": "ref0.png", "seed": 1, "content_subtract": "blue"}]
    write_manifest(root / "jobs.jsonl", jobs)
    return jobs


def test_content_subtraction_per_job_equals_the_one_request_generation(tmp_path) -> None:
    """Jobs with and without content words share one UNet batch; each row is `ipadapter generate --content-subtract`
    of that job alone. The paired text model sits beside the encoder (`clip_text/`)."""
    root = tmp_path
    jobs = _content_jobs(root)
    out = root / "out"
    with _one_thread():
        assert main(["generate", *_model_flags(root), "--manifest", str(root / "jobs.jsonl"), "--out-dir", str(out),
                     "--batch-size", "3"]) == 0
    index = _index(out)
    assert {r["batch"] for r in index} == {3}
    for record, job in zip(index, jobs):
        extra = ["--content-subtract", job["content_subtract"]] if "content_subtract" in job else []
        extra += ["--content-strength", str(job["content_strength"])] if "content_strength" in job else []
        single = tmp_path / f"single-{record['line']}.png"
        with _one_thread():
            assert main(["generate", *_model_flags(root), "--image", str(root / job["image"]), "--seed",
                         str(job["seed"]), "--out", str(single), *extra]) == 0
        batched = np.asarray(Image.open(out / record["files"][0]), dtype=np.int16)
        alone = np.asarray(Image.open(single), dtype=np.int16)
        assert np.abs(batched - alone).max() <= 2, record["line"]
    plain, subtracted = (np.asarray(Image.open(out / index[n]["files"][0]), dtype=np.int16) for n in (0, 2))
    assert np.abs(plain - subtracted).max() > 10  # same reference and seed, other content words


def test_a_run_without_a_named_text_model_finds_the_paired_one_once(tmp_path, monkeypatch) -> None:
    """`run_manifest` called as a library (no `Defaults.content_text`) looks for the paired text model once per run,
    not once per job: every search loads a model from disk."""
    from ipadapter import paired_text
    from ipadapter.batch.jobs import OPTIONS, read_jobs
    from ipadapter.batch.run import Defaults, run_manifest
    from ipadapter.batch.shards import Shard
    from ipadapter.cli.generate import load_from_flags
    from ipadapter.cli.main import build_parser
    from ipadapter.loading import base_geometry

    _content_jobs(tmp_path)
    searches = []
    find = paired_text.PairedText._find
    monkeypatch.setattr(paired_text.PairedText, "_find", lambda self: searches.append(1) or find(self))
    cli = build_parser().parse_args(["generate", *_model_flags(tmp_path), "--manifest", str(tmp_path / "jobs.jsonl"),
                                     "--out-dir", str(tmp_path / "out")])
    loaded = load_from_flags(cli)
    manifest = read_jobs(cli.manifest, {n: getattr(cli, n) for n in OPTIONS}, ["0"], lambda: base_geometry(cli.base))
    failures = run_manifest(loaded.prompter, manifest, tmp_path / "out", batch_size=1, shard=Shard(),
                            defaults=Defaults(2), settings={})
    assert not failures and len(_index(tmp_path / "out")) == 3
    assert len(searches) == 1


def _named_text_model(root: Path) -> tuple[Path, list[dict]]:
    """A tiny pipeline (root/pipe) with nothing beside its encoder, its encoder's text model in root/text/clip, a
    reference, and a manifest (root/jobs.jsonl) of one job with content words and one without."""
    factories.save_tiny_sd15_pipeline(root)
    text = root / "text" / "clip"
    factories.tiny_text_encoder(32, 7, projection=24).save_pretrained(text)
    factories.write_tokenizer(text, max_length=16)
    factories.reference_image(0).save(root / "ref0.png")
    jobs = [{"image": "ref0.png", "seed": 1, "content_subtract": "a red", "content_strength": 0.5},
            {"image": "ref0.png", "seed": 1}]
    write_manifest(root / "jobs.jsonl", jobs)
    return text, jobs


def test_a_named_content_text_model_serves_every_job_from_a_folder_or_the_hub_cache(tmp_path, monkeypatch) -> None:
    """`--content-text-encoder` names the text model when none is beside the encoder: a folder, or a Hub id with a
    subfolder read from the cache without a request; a job with content words is then the one-request generation
    with the same flag. Without it, that job alone fails, saying what to name."""
    text, jobs = _named_text_model(tmp_path)
    factories.write_hub_cache(tmp_path / "cache", "ipadapter-tests/text-models", tmp_path / "text")
    sent = factories.hub_without_network(monkeypatch, tmp_path / "cache")
    runs = {"folder": str(text), "hub": "ipadapter-tests/text-models/clip", "none": None}
    for run, source in runs.items():
        named = ["--content-text-encoder", source] if source else []
        with _one_thread():
            code = main(["generate", *_model_flags(tmp_path), "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir",
                         str(tmp_path / run), *named])
        assert code == (1 if run == "none" else 0), run
    assert not [url for url in sent if "ipadapter-tests" in url]
    assert _pngs(tmp_path / "hub") == _pngs(tmp_path / "folder")
    error = json.loads((tmp_path / "none" / "errors.jsonl").read_text())
    assert error["line"] == 1 and "name it with --content-text-encoder" in error["error"]
    single = tmp_path / "single.png"
    with _one_thread():
        assert main(["generate", *_model_flags(tmp_path), "--image", str(tmp_path / "ref0.png"), "--seed", "1",
                     "--content-subtract", "a red", "--content-strength", "0.5", "--content-text-encoder", str(text),
                     "--out", str(single)]) == 0
    index = _index(tmp_path / "folder")
    batched, plain = (np.asarray(Image.open(tmp_path / "folder" / r["files"][0]), dtype=np.int16) for r in index)
    assert np.abs(batched - np.asarray(Image.open(single), dtype=np.int16)).max() <= 2
    assert np.abs(batched - plain).max() > 10


def test_an_sdxl_run_embeds_content_words_with_the_bases_own_text_model(tmp_path) -> None:
    """SDXL's `text_encoder_2` is the text tower paired with its image encoder (here both 32-d): a manifest finds it
    in the base, as the one-request generation does, with nothing beside the encoder."""
    pipe = factories.tiny_sdxl_pipeline(tmp_path)
    encoder, processor = factories.tiny_image_encoder(projection_dim=32)
    folder = tmp_path / "xl"
    pipe.save_pretrained(folder)
    encoder.save_pretrained(folder / "image_encoder")
    processor.save_pretrained(folder / "feature_extractor")
    torch.save({"image_proj": factories.image_proj_state("base", factories.SDXL_CROSS, embed_dim=32),
                "ip_adapter": factories.ip_adapter_state(pipe.unet)}, tmp_path / "xl.bin")
    factories.reference_image(0).save(tmp_path / "ref0.png")
    jobs = [{"image": "ref0.png", "seed": 1, "content_subtract": "a red"}, {"image": "ref0.png", "seed": 1}]
    write_manifest(tmp_path / "jobs.jsonl", jobs)
    model = ["generate", "--base", str(folder), "--adapter", str(tmp_path / "xl.bin"), "--steps", "2", "--width", "32",
             "--height", "32"]
    with _one_thread():
        assert main([*model, "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "out")]) == 0
        assert main([*model, "--image", str(tmp_path / "ref0.png"), "--seed", "1", "--content-subtract", "a red",
                     "--out", str(tmp_path / "single.png")]) == 0
    batched, plain = (np.asarray(Image.open(tmp_path / "out" / r["files"][0]), dtype=np.int16)
                      for r in _index(tmp_path / "out"))
    assert np.abs(batched - np.asarray(Image.open(tmp_path / "single.png"), dtype=np.int16)).max() <= 2
    assert np.abs(batched - plain).max() > 10
    # The library's own default (no `Defaults.content_text`) finds it too, into a folder not made yet.
    from ipadapter.batch.jobs import OPTIONS, read_jobs
    from ipadapter.batch.run import Defaults, run_manifest
    from ipadapter.batch.shards import Shard
    from ipadapter.cli.generate import load_from_flags
    from ipadapter.cli.main import build_parser

    flags = build_parser().parse_args([*model, "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir", "unused"])
    manifest = read_jobs(flags.manifest, {n: getattr(flags, n) for n in OPTIONS}, ["0"], lambda: (8, (32, 32)))
    library = tmp_path / "new" / "library"
    with _one_thread():
        assert run_manifest(load_from_flags(flags).prompter, manifest, library, batch_size=2, shard=Shard(),
                            defaults=Defaults(), settings={}) == []
    assert _pngs(library) == _pngs(tmp_path / "out")


# (the process's device under accelerate, --device, the device the models load on)
DEVICES = [("cuda:1", None, "cuda:1"), ("cuda:1", "cuda", "cuda:1"), ("cuda:1", "cpu", "cpu"),
           ("cuda:1", "cuda:0", "cuda:0"), (None, "cuda", "cuda"), (None, None, None)]


@pytest.mark.parametrize(("process", "flag", "expected"), DEVICES)
def test_each_process_loads_on_its_own_gpu_unless_device_names_another(setup, process, flag, expected, tmp_path,
                                                                       capsys, monkeypatch) -> None:
    """Under `accelerate launch` each process has its own GPU: `--device` unset or plain `cuda` takes it, any other
    device is kept. The machine is given two GPUs; loading is where the device is read, and stops the run."""
    from ipadapter.cli import generate
    from ipadapter.errors import IPAdapterError

    factories.process_with_gpu(monkeypatch, process)
    seen = []

    def load(args):
        seen.append(args.device)
        raise IPAdapterError("stopped at loading")

    monkeypatch.setattr(generate, "load_from_flags", load)
    assert main([*_generate_args(setup, tmp_path / "o"), *(["--device", flag] if flag else [])]) == 2
    assert seen == [expected]
    assert capsys.readouterr().err == "ipadapter: error: stopped at loading\n"


def test_jobs_name_their_adapter_and_take_the_bases_own_size(tmp_path, capsys) -> None:
    """With two adapters attached each job names its own by --adapter position ("0", "1"); only that one acts, so the
    job is the one-request generation with that adapter alone. A job that gives no size gets the base's default, as
    diffusers computes it: the UNet's sample size times the VAE's downscale."""
    factories.save_tiny_sd15_pipeline(tmp_path, adapters=("base", "plus"))
    factories.reference_image(0).save(tmp_path / "ref0.png")
    jobs = [{"id": "plus", "image": "ref0.png", "seed": 1, "adapter": "1"},
            {"id": "base", "image": "ref0.png", "seed": 1, "adapter": "0"}]
    write_manifest(tmp_path / "jobs.jsonl", jobs)
    base = ["generate", "--base", str(tmp_path / "pipe"), "--steps", "2"]
    with _one_thread():
        assert main([*base, "--adapter", str(tmp_path / "base.bin"), "--adapter", str(tmp_path / "plus.bin"),
                     "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "out")]) == 0
        assert main([*base, "--adapter", str(tmp_path / "plus.bin"), "--image", str(tmp_path / "ref0.png"), "--seed",
                     "1", "--out", str(tmp_path / "single.png")]) == 0
    unet = json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())
    vae = json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    images = {name: np.asarray(Image.open(tmp_path / "out" / f"{name}-0.png"), dtype=np.int16)
              for name in ("plus", "base")}
    assert all(image.shape == (side, side, 3) for image in images.values())
    assert np.abs(images["plus"] - np.asarray(Image.open(tmp_path / "single.png"), dtype=np.int16)).max() <= 2
    assert np.abs(images["plus"] - images["base"]).max() > 10
    assert main([*base, "--adapter", str(tmp_path / "base.bin"), "--adapter", str(tmp_path / "plus.bin"),
                 "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "scaled"), "--s-scale",
                 "0.5"]) == 2
    assert capsys.readouterr().err.endswith("--s-scale scales a FaceID adapter's shortcut (FaceID-PlusV2); no attached "
                                            "adapter (base, plus) has one\n")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_terminal_a_run_shows_its_own_progress_bar_and_not_the_pipelines(setup, tmp_path, monkeypatch) -> None:
    """One bar counts the run's images; the pipeline's per-generation step bars would interleave with it."""
    write_manifest(tmp_path / "jobs.jsonl", [{"image": str(setup / "ref0.png"), "seed": 1}])
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["generate", *_model_flags(setup), "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir",
                 str(tmp_path / "out")]) == 0
    bars = [part for part in re.split(r"[\r\n]", terminal.getvalue()) if "%|" in part]
    assert bars and all(bar.startswith("generating:") for bar in bars), bars


def test_faceid_plusv2_jobs_take_the_runs_shortcut_scale(tmp_path, monkeypatch) -> None:
    """`--s-scale` sets FaceID-PlusV2's shortcut for every job: a job is the one-request generation with the same
    scale, which differs from the default's. Face analysis (insightface) is stood in for: it gives the saved
    embedding and the image as its crop, as `--face-embed` with `--image` does."""
    from ipadapter import prompter

    factories.save_tiny_sd15_pipeline(tmp_path, adapters=("faceid-plusv2",))
    factories.reference_image(0).save(tmp_path / "ref0.png")
    face = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    np.save(tmp_path / "face.npy", face)

    class Faces:
        def analyze(self, image, source: str = "the image"):
            return torch.from_numpy(face)[None], image

    monkeypatch.setattr(prompter, "FaceAnalyzer", Faces)
    write_manifest(tmp_path / "jobs.jsonl", [{"image": "ref0.png", "seed": 1}])
    model = ["generate", "--base", str(tmp_path / "pipe"), "--adapter", str(tmp_path / "faceid-plusv2.bin"), "--steps",
             "2", "--width", "32", "--height", "32"]
    with _one_thread():
        assert main([*model, "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "out"),
                     "--s-scale", "0.25"]) == 0
        for scale in ("0.25", "1"):
            assert main([*model, "--image", str(tmp_path / "ref0.png"), "--face-embed", str(tmp_path / "face.npy"),
                         "--seed", "1", "--s-scale", scale, "--out", str(tmp_path / f"single-{scale}.png")]) == 0
    batched = np.asarray(Image.open(tmp_path / "out" / _index(tmp_path / "out")[0]["files"][0]), dtype=np.int16)
    scaled, default = (np.asarray(Image.open(tmp_path / f"single-{s}.png"), dtype=np.int16) for s in ("0.25", "1"))
    assert np.abs(batched - scaled).max() <= 2
    assert np.abs(batched - default).max() > 10
