"""Bad input, as a careless or hostile user gives it: one line on stderr, a non-zero exit, nothing written or lost.

One table of command lines (generate, encode, train, miniature data) run in-process through `main(argv)`; each row
checks the exit code, that the last stderr line is the one `ipadapter...: error:` message, that no traceback is
printed, and that the output location is byte-for-byte unchanged. Then the training state: `checkpoints/latest`
corrupted in each way, and damaged state files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ipadapter.cli.main import main
from tests import factories

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header declares width × height (the pixel data is that of a 1 × 1 image)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def _embeds(world: Path, name: str, change) -> Path:
    tensors = load_file(str(world / "good.safetensors"))
    from safetensors import safe_open

    with safe_open(str(world / "good.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    tensors, meta = change(tensors, meta)
    save_file(tensors, str(world / name), metadata=meta)
    return world / name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models on disk and every kind of bad file the table refers to."""
    root = tmp_path_factory.mktemp("world")
    factories.save_tiny_sd15_pipeline(root, adapters=("base", "plus"))
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "ref.png")
    _png_declaring(root / "bomb.png", 12000, 12000)
    os.mkfifo(root / "fifo.png")
    (root / "afile").write_text("not a folder")
    state = torch.load(root / "base.bin", weights_only=True)
    state["image_proj"]["proj.weight"][0, 0] = float("nan")
    torch.save(state, root / "nan.bin")
    (root / "truncated.bin").write_bytes((root / "base.bin").read_bytes()[:300])
    assert main(["encode", "--base", str(root / "pipe"), "--adapter", str(root / "plus.bin"), "--image",
                 str(root / "ref.png"), "--out", str(root / "good.safetensors")]) == 0
    _embeds(root, "wrong-shape.safetensors", lambda t, m: ({"cond.0": torch.zeros(1, 3, 5)}, m))
    _embeds(root, "no-cond.safetensors", lambda t, m: ({"other": torch.zeros(1)}, m))
    _embeds(root, "bad-meta.safetensors", lambda t, m: (t, {k: v for k, v in m.items() if k != "encoder"}))
    _embeds(root, "nan.safetensors", lambda t, m: ({k: torch.full_like(v, float("nan")) for k, v in t.items()}, m))
    (root / "empty.safetensors").write_bytes(b"")
    data = factories.write_images(root / "data", 3)
    lines = Path(data).read_text().splitlines()
    (root / "line5.jsonl").write_text("\n".join([lines[0]] * 4 + ["{not json"]) + "\n")
    (root / "latin1.jsonl").write_bytes('{"image_file": "0.png", "text": "café"}\n'.encode("latin-1"))
    factories.write_base(root / "tbase")
    factories.write_image_encoder(root / "tenc")
    return root


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with its content hash (folders as "dir", pipes and the like as "other")."""
    def digest(p: Path) -> str:
        if p.is_dir():
            return "dir"
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"

    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def _one_line_error(capsys, code: int, words: str) -> None:
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and last.startswith("ipadapter"), err
    assert words in last, last


GENERATE = "generate --base {w}/pipe --adapter {w}/base.bin --steps 1 --image {w}/ref.png --out {o}/out.png"
TRAIN = ("train --base {w}/tbase --image-encoder {w}/tenc --data {w}/data/data.jsonl --output {o}/run --resolution 16 "
         "--max-steps 1 --num-workers 0")

CASES = {
    # sizes
    "width 33 with height": (GENERATE + " --width 33 --height 64", "--width 33 does not fit this base model"),
    "width 33 alone": (GENERATE + " --width 33", "--width 33 does not fit this base model"),
    "width 0": (GENERATE + " --width 0", "--width must be a positive number"),
    "negative width": (GENERATE + " --width -64 --height 64", "--width must be a positive number"),
    "negative height alone": (GENERATE + " --height -64", "--height must be a positive number"),
    "more steps than timesteps": (GENERATE.replace("--steps 1", "--steps 1001"),
                                  "--steps 1001 is more than the scheduler's 1000 training timesteps"),
    # references
    "decompression bomb": (GENERATE.replace("ref.png", "bomb.png"),
                           "is 12000x12000 px (144,000,000 pixels); the limit is 16,777,216 pixels"),
    "fifo as image": (GENERATE.replace("ref.png", "fifo.png"), "not a regular file"),
    "folder as image": (GENERATE.replace("{w}/ref.png", "{w}"), "is a folder"),
    "missing image": (GENERATE.replace("ref.png", "nope.png"), "not found"),
    "non-image": (GENERATE.replace("ref.png", "base.bin"), "cannot read"),
    # outputs
    "out parent is a file": (GENERATE.replace("{o}/out.png", "{w}/afile/out.png"),
                             "--out {w}/afile/out.png: {w}/afile is a file, not a folder"),
    "out names a folder": (GENERATE.replace("{o}/out.png", "{o}/folder.png"),
                            "--out {o}/folder.png is a folder; name a file inside it"),
    "out not png": (GENERATE.replace("out.png", "out.jpg"), "--out must name a .png file, got {o}/out.jpg"),
    "second of three outputs is a folder": (GENERATE.replace("out.png", "many.png") + " --num-images 3",
                                            "--out {o}/many-1.png is a folder; name a file inside it"),
    # ranges and combinations
    "huge seed": (GENERATE + " --seed 100000000000000000000000", "--seed must be a whole number"),
    "seed in e-notation": (GENERATE + " --seed 1e23", "invalid int value"),
    "negative seed": (GENERATE + " --seed -1", "--seed must be a whole number"),
    "negative scale": (GENERATE + " --scale -1", "--scale must not be negative"),
    "negative guidance": (GENERATE + " --guidance -5", "--guidance must not be negative"),
    "nan scale": (GENERATE + " --scale nan", "argument --scale: must be a finite number, got 'nan'"),
    "scale not a number": (GENERATE + " --scale abc", "argument --scale: not a number: 'abc'"),
    "combine one image": (GENERATE + " --combine average", "give at least two"),
    "embeds and image": (GENERATE + " --embeds {w}/good.safetensors", "not both"),
    "noise and negative image": (GENERATE + " --noise fade:0.5 --negative-image {w}/ref.png", "not both"),
    "bad window": (GENERATE + " --start 0.9 --end 0.1", "start"),
    "unknown preset": (GENERATE + " --preset nope", "valid"),
    "mask count": (GENERATE + " --mask {w}/ref.png --mask {w}/ref.png", "mask"),
    "no cuda": (GENERATE + " --device cuda", "CUDA is not available"),
    "unknown dtype": (GENERATE + " --dtype float64", "argument --dtype: invalid choice: 'float64' (choose from "),
    "unknown device": (GENERATE + " --device tpu9", "device"),
    # models and files
    "missing local base": (GENERATE.replace("{w}/pipe", "./nonexistent"), "--base not found: ./nonexistent"),
    "missing local encoder": (GENERATE + " --image-encoder ./nope", "--image-encoder not found: ./nope"),
    "missing adapter": (GENERATE.replace("base.bin", "none.bin"), "not found"),
    "text encoder as image encoder": (GENERATE + " --image-encoder {w}/pipe/text_encoder", "not a CLIP vision"),
    "truncated adapter": (GENERATE.replace("base.bin", "truncated.bin"), "truncated or corrupt"),
    "text file as adapter": (GENERATE.replace("base.bin", "afile"),
                             "afile is not a readable checkpoint (not a .safetensors, .bin or .pt file, or truncated)"),
    "image as adapter": (GENERATE.replace("{w}/base.bin", "{w}/ref.png"),
                         "ref.png is not a readable checkpoint (not a .safetensors, .bin or .pt file, or truncated)"),
    "two adapters": (GENERATE + " --adapter {w}/plus.bin", "--adapter given 2 times: one generate prompts one adapter"),
    "nan adapter": (GENERATE.replace("base.bin", "nan.bin"), "image_proj.proj.weight holds NaN or Inf"),
    # saved embeddings
    "embeds wrong shape": (GENERATE.replace("--image {w}/ref.png", "--embeds {w}/wrong-shape.safetensors")
                           .replace("base.bin", "plus.bin"),
                           "{w}/wrong-shape.safetensors: cond.0 has shape (1, 3, 5), but this encoder makes (N, 17, 40)"),
    "embeds empty file": (GENERATE.replace("--image {w}/ref.png", "--embeds {w}/empty.safetensors")
                          .replace("base.bin", "plus.bin"), "cannot read"),
    "embeds bad metadata": (GENERATE.replace("--image {w}/ref.png", "--embeds {w}/bad-meta.safetensors")
                            .replace("base.bin", "plus.bin"), "damaged metadata"),
    "embeds missing key": (GENERATE.replace("--image {w}/ref.png", "--embeds {w}/no-cond.safetensors")
                           .replace("base.bin", "plus.bin"), "holds no image embeddings"),
    "embeds nan": (GENERATE.replace("--image {w}/ref.png", "--embeds {w}/nan.safetensors")
                   .replace("base.bin", "plus.bin"), "cond.0 holds NaN or Inf"),
    "embeds missing": (GENERATE.replace("--image {w}/ref.png", "--embeds {w}/nope.safetensors"), "not found"),
    "embeds with noise": (GENERATE.replace("--image {w}/ref.png", "--embeds {w}/good.safetensors")
                          + " --noise fade:0.5", "--noise makes its negative from --image's pixels"),
    "content text model without content": (GENERATE + " --content-text-encoder {w}/pipe/text_encoder",
                                           "--content-text-encoder is the text model of --content-subtract"),
    "content text model missing": (GENERATE + " --content-subtract cat --content-text-encoder ./nope",
                                   "--content-text-encoder not found: ./nope"),
    "content text model without projection": (GENERATE + " --content-subtract cat --content-text-encoder "
                                              "{w}/pipe/text_encoder", "holds no trained text projection"),
    "encode out not safetensors": ("encode --base {w}/pipe --adapter {w}/plus.bin --image {w}/ref.png --out {o}/e.bin",
                                   "must name a .safetensors file"),
    "encode out is a folder": ("encode --base {w}/pipe --adapter {w}/plus.bin --image {w}/ref.png "
                               "--out {o}/folder.safetensors", "is a folder"),
    # training input
    "manifest syntax error on line 5": (TRAIN.replace("data/data.jsonl", "line5.jsonl"), "at line 5"),
    "manifest not utf-8": (TRAIN.replace("data/data.jsonl", "latin1.jsonl"), "is not UTF-8 text"),
    "train output is a file": (TRAIN.replace("{o}/run", "{w}/afile"), "is a file, not a folder"),
    "train bad resolution": (TRAIN + " --resolution 18", "must be a multiple of 4"),
    "train missing local base": (TRAIN.replace("{w}/tbase", "./nonexistent"), "--base not found: ./nonexistent"),
    "evaluate out is a file": ("evaluate --out {w}/afile --limit 1", "is a file, not a folder"),
    "evaluate huge seed": ("evaluate --out {o}/eval --seed -3", "--seed must be a whole number"),
    "miniature data out is a file": ("miniature data --out {w}/afile --n 2", "is a file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(world, tmp_path, capsys, case) -> None:
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    command, words = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "folder.png").mkdir()
    (out / "folder.safetensors").mkdir()
    (out / "many-1.png").mkdir()
    (out / "keep.txt").write_text("the user's file")
    before, world_before = _snapshot(out), _snapshot(world)
    argv = command.format(w=world, o=out).split()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    _one_line_error(capsys, code, words.format(w=world, o=out))
    assert _snapshot(out) == before
    assert _snapshot(world) == world_before


def test_error_after_loading_models_is_the_only_stderr_line(world, tmp_path) -> None:
    """A separate process, as users run it: the pipeline loads (diffusers' deprecations, loading bars), then the
    image encoder is refused. Without --verbose, the refusal is all of stderr."""
    import subprocess
    import sys

    argv = (GENERATE + " --image-encoder {w}/pipe/text_encoder").format(w=world, o=tmp_path).split()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    quiet = subprocess.run([sys.executable, "-m", "ipadapter.cli.main", *argv], capture_output=True, text=True, env=env)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()], quiet.stderr
    assert "not a CLIP vision model" in quiet.stderr


def test_training_skips_an_image_over_the_pixel_limit(world) -> None:
    from ipadapter.train.data import SkipSample, open_image

    with pytest.raises(SkipSample, match="over the pixel limit"):
        open_image(world / "bomb.png")
    assert open_image(world / "ref.png").size == (60, 40)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_is_refused_before_generating(world, tmp_path, capsys) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        _one_line_error(capsys, main(GENERATE.format(w=world, o=folder).split()), "is not writable")
    finally:
        folder.chmod(0o700)
    assert not list(folder.iterdir())


def test_lone_width_keeps_the_bases_square_aspect(world, tmp_path) -> None:
    """The tiny base's default is square (its UNet sample size × the VAE's 4× downscale, both from its configs)."""
    assert main([*GENERATE.format(w=world, o=tmp_path).split(), "--width", "24"]) == 0
    assert Image.open(tmp_path / "out.png").size == (24, 24)


def test_several_outputs_are_written_all_or_none(tmp_path) -> None:
    from ipadapter.atomic import save_pngs

    (tmp_path / "blocked").write_text("a file where a folder is needed")
    paths = [tmp_path / "a.png", tmp_path / "blocked" / "b.png"]
    with pytest.raises(OSError):
        save_pngs([Image.new("RGB", (4, 4))] * 2, paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]


@pytest.mark.parametrize("images", [1, 3])
def test_more_or_fewer_images_than_paths_write_none(tmp_path, images: int) -> None:
    from ipadapter.atomic import save_pngs

    with pytest.raises(ValueError):
        save_pngs([Image.new("RGB", (4, 4))] * images, [tmp_path / "a.png", tmp_path / "b.png"])
    assert list(tmp_path.iterdir()) == []


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """An export that fails midway leaves the earlier folder as it was; one that succeeds leaves none of its files."""
    from ipadapter.atomic import replacing_folder

    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "old.txt").write_text("earlier")
    with pytest.raises(OSError, match="disk full"):
        with replacing_folder(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    renames = []
    real = Path.rename

    def refused_once(self: Path, to: Path) -> Path:  # the second rename (new into place) fails
        renames.append(self.name)
        if len(renames) == 2:
            raise OSError("rename refused")
        return real(self, to)

    monkeypatch.setattr(Path, "rename", refused_once)
    with pytest.raises(OSError, match="rename refused"):
        with replacing_folder(target) as tmp:
            (tmp / "new.txt").write_text("whole")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    assert [p.name for p in target.iterdir()] == ["old.txt"], "the earlier folder is put back"
    with replacing_folder(target) as tmp:
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    assert {p.name: p.read_text() for p in target.iterdir()} == {"new.txt": "whole"}
    with replacing_folder(tmp_path / "fresh") as tmp:
        (tmp / "a.txt").write_text("first")
    assert (tmp_path / "fresh" / "a.txt").read_text() == "first"
    stale = tmp_path / f".pipeline.old-{os.getpid()}"  # a crash between the two renames left the old folder aside
    stale.mkdir()
    (stale / "older.txt").write_text("a crashed run's")
    with replacing_folder(target) as tmp:
        (tmp / "new.txt").write_text("again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "pipeline"]
    assert {p.name: p.read_text() for p in target.iterdir()} == {"new.txt": "again"}


def test_text_files_are_utf8_whatever_the_locale(tmp_path) -> None:
    """Manifests, reports and model cards carry users' captions and paths: they are UTF-8 even where the locale's
    encoding is not (Windows' cp1252; here the C locale with Python's coercion and UTF-8 mode turned off: ASCII).
    The child runs `ipadapter/atomic.py` alone: the package's own imports took half of its 3.7 s."""
    import subprocess
    import sys

    from ipadapter import atomic

    env = factories.ascii_locale_env()
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('atomic', sys.argv[2])\n"
            "atomic = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(atomic)\n"
            "atomic.write_text(sys.argv[1], 'caf\\u00e9 \\u2713 \\u72ac')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.md"), atomic.__file__], env=env, check=True)
    assert (tmp_path / "t.md").read_bytes() == "café ✓ 犬".encode("utf-8")


def test_a_checkpoint_that_fails_midway_leaves_the_earlier_one(tmp_path) -> None:
    """The miniature runs' checkpoints: a save that fails while pickling (a lambda cannot be) keeps the last one whole,
    with no temporary file beside it."""
    import torch

    from ipadapter.atomic import save_torch

    path = save_torch({"step": 1, "w": torch.ones(3)}, tmp_path / "run.ckpt.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_torch({"step": 2, "w": torch.zeros(3), "hook": lambda: None}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["run.ckpt.pt"]
    assert torch.load(path, weights_only=True)["step"] == 1


def test_outputs_in_folders_not_made_yet_are_written_with_their_folders(tmp_path) -> None:
    from ipadapter.atomic import save_png, save_pngs, write_text

    deep = tmp_path / "a" / "b"
    written = [save_png(Image.new("RGB", (4, 4)), deep / "one.png"), write_text(deep / "c" / "t.md", "text"),
               *save_pngs([Image.new("RGB", (4, 4))] * 2, [deep / "d" / "two.png", tmp_path / "e" / "f" / "three.png"])]
    assert all(p.is_file() for p in written)


def test_a_manifest_whose_records_fail_midway_leaves_the_earlier_one(tmp_path) -> None:
    from ipadapter.evaluate.manifests import write_manifest

    path = write_manifest(tmp_path / "refs.jsonl", [{"image_file": "a.png"}, {"image_file": "b.png"}])
    before = path.read_bytes()

    def records():
        yield {"image_file": "c.png"}
        raise OSError("the captions file went away")

    with pytest.raises(OSError, match="went away"):
        write_manifest(path, records())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs.jsonl"]


def test_written_files_get_the_mode_open_gives(tmp_path) -> None:
    """safetensors writes its files owner-only; a saved adapter must be as readable as any file made with `open`."""
    import torch

    from ipadapter.atomic import save_png, save_pngs, save_safetensors, save_torch, write_text

    (tmp_path / "plain.txt").write_text("made with open")
    usual = (tmp_path / "plain.txt").stat().st_mode & 0o777
    written = [
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "a.safetensors"),
        save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png"),
        write_text(tmp_path / "a.md", "text"),
        save_torch({"w": torch.zeros(2)}, tmp_path / "a.pt"),
        *save_pngs([Image.new("RGB", (4, 4))], [tmp_path / "b.png"]),
    ]
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: usual for p in written}


def test_app_names_a_decompression_bomb(tmp_path) -> None:
    from ipadapter.app.limits import UploadLimits, open_upload
    from ipadapter.errors import IPAdapterError

    bomb = _png_declaring(tmp_path / "bomb.png", 30000, 30000)  # over Pillow's own bomb limit
    with pytest.raises(IPAdapterError, match="declares more pixels than an image may have"):
        open_upload(bomb, UploadLimits(), "reference")


def test_pixel_limit_is_configurable(world, monkeypatch) -> None:
    from ipadapter.conditioning.images import load_image
    from ipadapter.errors import IPAdapterError

    monkeypatch.setenv("IPADAPTER_MAX_PIXELS", str(59 * 40))
    with pytest.raises(IPAdapterError, match="60x40 px"):
        load_image(world / "ref.png")
    monkeypatch.setenv("IPADAPTER_MAX_PIXELS", str(60 * 40))
    assert load_image(world / "ref.png").size == (60, 40)


def test_the_pixel_limit_sentence_gives_exact_counts(world, tmp_path, monkeypatch, capsys) -> None:
    """One pixel over the limit reads as over it (rounded to megapixels, both were 0.0 MP)."""
    monkeypatch.setenv("IPADAPTER_MAX_PIXELS", str(60 * 40 - 1))
    code = main(GENERATE.format(w=world, o=tmp_path).split())
    _one_line_error(capsys, code, f"{world / 'ref.png'} is 60x40 px (2,400 pixels); the limit is 2,399 pixels "
                                  "(set IPADAPTER_MAX_PIXELS to allow more)")
    assert not list(tmp_path.iterdir())


def test_app_and_generate_name_a_missing_adapter_alike(tmp_path, monkeypatch, capsys) -> None:
    """"nothere" is neither a file nor an owner/name Hub id: the app says so in generate's words, before loading."""
    import ipadapter.loading

    def load_prompter(**_: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ipadapter.loading, "load_prompter", load_prompter)
    monkeypatch.chdir(tmp_path)
    for argv in (["generate", "--prompt", "x"], ["app"]):
        code = main([*argv, "--adapter", "nothere"])
        _one_line_error(capsys, code, ": error: --adapter not found: nothere (no such file or folder; a Hub model id "
                                      "has the form owner/name)")
    assert not list(tmp_path.iterdir())


def test_the_app_names_a_bad_model_before_importing_gradio(tmp_path) -> None:
    """Gradio takes seconds to import: a wrong --adapter is reported without it (checked in a fresh interpreter,
    where nothing else has imported gradio)."""
    import subprocess
    import sys

    script = ("import sys; from ipadapter.cli.main import main; "
              "code = main(['app', '--adapter', 'nothere']); print(code, 'gradio' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "--adapter not found: nothere" in done.stderr


# ---- training state -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """A finished run: states at steps 1 and 2, `latest` naming state-00000002."""
    out = tmp_path_factory.mktemp("run")
    argv = TRAIN.format(w=world, o=out).split() + ["--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "3"]
    assert main(argv) == 0
    factories.reset_accelerate()
    return out / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _resume(world: Path, output: Path, *extra: str) -> int:
    argv = TRAIN.format(w=world, o=output.parent).split() + ["--resume", "latest", "--save-every", "1",
                                                            "--keep-checkpoints", "3", *extra]
    return main(argv)


@pytest.mark.parametrize("damage", ["empty", "dangling", "missing", "garbage"])
def test_corrupt_latest_resumes_from_the_newest_complete_state(world, run, tmp_path, caplog, damage) -> None:
    output = _copy(run, tmp_path)
    pointer = output / "checkpoints" / "latest"
    {"empty": lambda: pointer.write_text(""), "dangling": lambda: pointer.write_text("state-99999999\n"),
     "missing": pointer.unlink, "garbage": lambda: pointer.write_bytes(b"\xff\xfe../../etc")}[damage]()
    kept = {p.name: _snapshot(p) for p in (output / "checkpoints").glob("state-*")}
    with caplog.at_level("INFO", logger="ipadapter.train"):
        assert _resume(world, output, "--max-steps", "3") == 0
    assert "resuming from the newest complete state found there, state-00000002" in caplog.text
    assert "state-00000002 at step 2" in caplog.text
    states = output / "checkpoints"
    for name, files in kept.items():  # no earlier state was lost
        assert _snapshot(states / name) == files, name
    assert (states / "latest").read_text().strip() == "state-00000003"


def test_no_complete_state_is_refused_and_nothing_changes(world, run, tmp_path, capsys) -> None:
    output = _copy(run, tmp_path)
    for state in (output / "checkpoints").glob("state-*"):
        (state / "adapter.safetensors").write_bytes(b"")  # truncated
    before = _snapshot(output)
    _one_line_error(capsys, _resume(world, output, "--max-steps", "3"), "no complete state")
    assert _snapshot(output) == before


def test_fresh_run_over_an_existing_run_is_refused(world, run, tmp_path, capsys) -> None:
    output = _copy(run, tmp_path)
    before = _snapshot(output)
    argv = TRAIN.format(w=world, o=output.parent).split()
    _one_line_error(capsys, main(argv), "already holds a training run")
    assert _snapshot(output) == before


def test_refused_resume_leaves_config_json(world, run, tmp_path, capsys) -> None:
    output = _copy(run, tmp_path)
    before = _snapshot(output)
    _one_line_error(capsys, _resume(world, output, "--variant", "plus", "--max-steps", "3"), "variant 'base'")
    assert _snapshot(output) == before


def _flip(path: Path) -> None:
    """One byte changed in the middle of the data, the size kept."""
    data = bytearray(path.read_bytes())
    data[-len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, change, words", [
    ("adapter.safetensors", _flip, "adapter.safetensors differs from what was saved"),
    ("optimizer.bin", _flip, "optimizer.bin differs from what was saved"),
    ("rng-0.safetensors", _flip, "rng-0.safetensors differs from what was saved"),
    ("optimizer.bin", lambda p: p.write_bytes(p.read_bytes()[:100]), "no complete state"),  # truncated
    ("trainer_state.json", lambda p: p.write_text("{"), "no complete state"),
])
def test_damaged_state_file_is_named_in_one_line(world, run, tmp_path, capsys, name, change, words) -> None:
    """keep only the newest state, so there is nothing to fall back on: the damage must be reported, not skipped."""
    output = _copy(run, tmp_path)
    shutil.rmtree(output / "checkpoints" / "state-00000001")
    change(output / "checkpoints" / "state-00000002" / name)
    before = _snapshot(output)
    _one_line_error(capsys, _resume(world, output, "--max-steps", "3"), words)
    assert _snapshot(output) == before


def test_rewritten_state_is_verified_by_content(world, run, tmp_path, capsys) -> None:
    """A state whose manifest was rewritten to match tampered files still fails the content checks."""
    from ipadapter.train.checkpoint import STATE_FILE, file_manifest

    output = _copy(run, tmp_path)
    shutil.rmtree(output / "checkpoints" / "state-00000001")
    state_dir = output / "checkpoints" / "state-00000002"
    weights = load_file(str(state_dir / "adapter.safetensors"))
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], float("inf"))
    save_file(weights, str(state_dir / "adapter.safetensors"))
    save_file({"python": torch.zeros(3, dtype=torch.int64)}, str(state_dir / "rng-0.safetensors"))
    state = json.loads((state_dir / STATE_FILE).read_text())
    state["files"] = file_manifest(state_dir)
    (state_dir / STATE_FILE).write_text(json.dumps(state))
    before = _snapshot(output)
    _one_line_error(capsys, _resume(world, output, "--max-steps", "3"), f"{first} holds NaN or Inf")
    assert _snapshot(output) == before
    weights[first] = torch.zeros_like(weights[first])
    save_file(weights, str(state_dir / "adapter.safetensors"))
    state["files"] = file_manifest(state_dir)
    (state_dir / STATE_FILE).write_text(json.dumps(state))
    _one_line_error(capsys, _resume(world, output, "--max-steps", "3"), "rng-0.safetensors is not a valid RNG state")


def _resume_from(world: Path, output: Path, source: Path, *extra: str) -> int:
    argv = TRAIN.format(w=world, o=output.parent).split() + ["--resume", str(source), "--save-every", "1",
                                                            "--keep-checkpoints", "3", *extra]
    return main(argv)


def test_resume_from_a_named_state_or_run_folder_continues_exactly(world, run, tmp_path, caplog) -> None:
    """`--resume <state folder>` starts from that state, `--resume <run folder>` from the state its `latest` names:
    from step 1 the run redoes step 2 to the bytes the uninterrupted run wrote."""
    output = _copy(run, tmp_path)
    final = (run / "ip-adapter.safetensors").read_bytes()
    (output / "ip-adapter.safetensors").unlink()
    with caplog.at_level("INFO", logger="ipadapter.train"):
        assert _resume_from(world, output, run / "checkpoints" / "state-00000001", "--max-steps", "2") == 0
    assert "state-00000001 at step 1" in caplog.text
    assert (output / "ip-adapter.safetensors").read_bytes() == final
    factories.reset_accelerate()
    caplog.clear()
    other = tmp_path / "other" / "run"
    with caplog.at_level("INFO", logger="ipadapter.train"):
        assert _resume_from(world, other, run, "--max-steps", "3") == 0
    assert f"resumed from {run / 'checkpoints' / 'state-00000002'} at step 2" in caplog.text
    assert (other / "checkpoints" / "latest").read_text().strip() == "state-00000003"


@pytest.mark.parametrize("source, damage, words", [
    ("checkpoints/state-00000002", lambda s: (s / "adapter.safetensors").write_bytes(b""),
     "the state is incomplete (a file is missing or truncated)"),
    ("data", None, "no checkpoint there (expected trainer_state.json or checkpoints/latest)"),
])
def test_resume_from_a_named_folder_that_cannot_be_resumed_is_refused(world, run, tmp_path, capsys, source, damage,
                                                                      words) -> None:
    output = _copy(run, tmp_path)
    folder = (output / source) if damage else world / source
    if damage:
        damage(folder)
    before = _snapshot(output)
    _one_line_error(capsys, _resume_from(world, tmp_path / "new" / "run", folder, "--max-steps", "3"), words)
    assert _snapshot(output) == before and not (tmp_path / "new").exists()


def test_checkpoint_holds_no_pickles_but_tensors(run) -> None:
    state = run / "checkpoints" / "state-00000002"
    assert not list(state.glob("*.pkl"))
    assert set(load_file(str(state / "rng-0.safetensors"))) >= {"python", "numpy_keys", "torch"}
