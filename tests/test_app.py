"""The web app: upload limits, masks, the reproducing command and the service on a tiny model; then the real page
in headless Chromium (skipped with a reason when gradio, Playwright or Debian's chromium is missing)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.app.command import generate_argv, generate_command, model_flags
from ipadapter.app.form import Form
from ipadapter.app.limits import UploadLimits, open_upload
from ipadapter.app.masks import fit_mask, full_mask, mask_from_editor
from ipadapter.app.service import GenerationService
from ipadapter.cli.main import build_parser, main
from ipadapter.errors import IPAdapterError
from ipadapter.cli.generate import load_from_flags
from tests import factories
from tests.app_process import CHROMIUM, CHROMIUM_FLAGS, answers, serving

MODEL_ARGS = {"adapter": None, "weight_name": None, "subfolder": None, "image_encoder": None, "device": "cpu",
              "dtype": None, "scheduler": None, "vae": None, "text_encoder": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A saved SD-1.5-layout pipeline with its image encoder, a base adapter, and a few upload files."""
    root = tmp_path_factory.mktemp("app")
    factories.save_tiny_sd15_pipeline(root)
    paired = root / "pipe" / "image_encoder" / "clip_text"  # the encoder's CLIP text tower, for content subtraction
    factories.tiny_text_encoder(32, 7, projection=24).save_pretrained(paired)
    factories.write_tokenizer(paired, max_length=16)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "ref.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "other.png")
    Image.new("RGB", (80, 80)).save(root / "big.png")
    (root / "notes.txt").write_text("not a picture\n")
    return root


@pytest.fixture(scope="module")
def service(tiny, tmp_path_factory) -> Iterator[GenerationService]:
    """As `ipadapter app` loads it: K'/V' kept (`--cache-kv`, its default); the reproducing commands run without."""
    args = argparse.Namespace(base=str(tiny / "pipe"), cache_kv=True,
                              **{**MODEL_ARGS, "adapter": [str(tiny / "base.bin")]})
    service = GenerationService(load_from_flags(args), model_flags(args),
                                limits=UploadLimits(max_bytes=50_000, max_side=64), workdir=tmp_path_factory.mktemp("work"))
    yield service
    service.loaded.prompter.detach()


def _form(tiny: Path, **kw) -> Form:
    return Form(**{"references": [str(tiny / "ref.png")], "prompt": "a cat", "steps": 2, **kw})


# --- limits ----------------------------------------------------------------------------------------------------

def test_upload_within_limits_is_rgb(tiny) -> None:
    image = open_upload(tiny / "ref.png", UploadLimits(), "reference 1")
    assert image.mode == "RGB" and image.size == (60, 40)


REFUSED = {
    "non-image": ("notes.txt", UploadLimits(), "reference 1 (notes.txt) is not an image"),
    "too many bytes": ("ref.png", UploadLimits(max_bytes=100), "uploads are limited to"),
    "too wide": ("ref.png", UploadLimits(max_side=50), "60x40 px; images are limited to 50 px"),
    "gone": ("missing.png", UploadLimits(), "upload it again"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_uploads_say_why_in_one_sentence(tiny, case) -> None:
    name, limits, words = REFUSED[case]
    with pytest.raises(IPAdapterError, match=re.escape(words)) as info:
        open_upload(tiny / name, limits, "reference 1")
    assert "\n" not in str(info.value) and str(tiny) not in str(info.value), "name the file, not the server's path"


MB = 2**20


def test_an_upload_at_the_byte_limit_passes_and_one_over_it_says_both_sizes(tmp_path) -> None:
    """The size is checked before the file is opened, so any bytes will do; the sizes are MiB as the page shows."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * int(2.5 * MB))
    with pytest.raises(IPAdapterError) as caught:
        open_upload(path, UploadLimits(max_bytes=int(1.5 * MB)), "reference 1")
    assert str(caught.value) == "reference 1 (big.bin) is 2.5 MB; uploads are limited to 1.5 MB"
    with pytest.raises(IPAdapterError) as caught:  # exactly at the limit: on to the next check
        open_upload(path, UploadLimits(max_bytes=path.stat().st_size), "reference 1")
    assert str(caught.value) == "reference 1 (big.bin) is not an image; upload a PNG, JPEG or WebP file"


def test_an_upload_at_the_side_limit_passes(tiny) -> None:
    assert open_upload(tiny / "ref.png", UploadLimits(max_side=60), "reference 1").size == (60, 40)
    with pytest.raises(IPAdapterError) as caught:
        open_upload(tiny / "ref.png", UploadLimits(max_side=59), "reference 1")
    assert str(caught.value) == "reference 1 (ref.png) is 60x40 px; images are limited to 59 px per side"


def test_an_upload_over_the_pixel_limit_names_the_file_and_the_setting(tiny, monkeypatch) -> None:
    monkeypatch.setenv("IPADAPTER_MAX_PIXELS", "2000")
    with pytest.raises(IPAdapterError) as caught:
        open_upload(tiny / "ref.png", UploadLimits(), "reference 1")
    assert str(caught.value) == ("reference 1 (ref.png) is 60x40 px (2,400 pixels); the limit is 2,000 pixels (set "
                                 "IPADAPTER_MAX_PIXELS to allow more)")


def test_an_upload_whose_header_reads_but_whose_pixels_do_not_is_damaged(tiny, tmp_path) -> None:
    data = (tiny / "ref.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(IPAdapterError) as caught:
        open_upload(tmp_path / "cut.png", UploadLimits(), "reference 2")
    assert str(caught.value) == "reference 2 (cut.png) could not be decoded as an image; it may be damaged"


def test_limits_of_one_are_allowed() -> None:
    limits = UploadLimits(max_bytes=1, max_side=1)
    assert (limits.max_bytes, limits.max_side) == (1, 1)


def test_limits_must_be_positive() -> None:
    with pytest.raises(IPAdapterError) as caught:
        UploadLimits(max_bytes=0)
    assert str(caught.value) == "the upload limit max_bytes must be at least 1 byte, got 0"
    with pytest.raises(IPAdapterError) as caught:
        UploadLimits(max_side=-3)
    assert str(caught.value) == "the upload limit max_side must be at least 1 pixel, got -3"


# --- form and masks ---------------------------------------------------------------------------------------------

FORM_ERRORS = {
    "nothing to go on": ({"references": [], "prompt": "  "}, "upload a reference image, type a prompt, or both"),
    "zero steps": ({"steps": 0}, "steps must be at least 1, got 0"),
    "no images": ({"num_images": 0}, "the number of images must be between 1 and 8, got 0"),
    "too many images": ({"num_images": 9}, "the number of images must be between 1 and 8, got 9"),
    "negative seed": ({"seed": -1}, "the seed must not be negative, got -1"),
    "infinite content strength": ({"content_subtract": "a cat", "content_strength": float("inf")},
                                  "the content strength must be a number from 0 up, got inf"),
    "mask without reference": ({"masks": [None, Image.new("L", (8, 8))]},
                               "mask 2 has no reference image; upload reference 2 or clear the mask"),
    "content strength without words": ({"content_strength": 0.5, "content_subtract": " "},
                                       "Content strength acts on the words of Take out content: type them, or set "
                                       "Content strength back to 1"),
    "content strength, empty words": ({"content_strength": 0.5, "content_subtract": ""},
                                      "Content strength acts on the words of Take out content: type them, or set "
                                      "Content strength back to 1"),
}


@pytest.mark.parametrize("case", list(FORM_ERRORS))
def test_form_mistakes(tiny, case) -> None:
    changes, message = FORM_ERRORS[case]
    with pytest.raises(IPAdapterError) as caught:
        _form(tiny, **changes).check()
    assert str(caught.value) == message


def test_the_form_limits_are_inclusive(tiny) -> None:
    for changes in ({"steps": 1}, {"num_images": 1}, {"num_images": 8}, {"seed": 0},
                    {"content_subtract": "a cat", "content_strength": 0.0}):
        _form(tiny, **changes).check()


def test_strokes_are_the_mask_whatever_their_colour() -> None:
    background = Image.new("RGB", (20, 10), "white")
    layer = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    layer.paste((200, 30, 30, 255), (0, 0, 5, 10))
    mask = np.asarray(mask_from_editor({"background": background, "layers": [layer], "composite": background}))
    assert mask.shape == (10, 20) and mask[:, :5].min() == 255 and mask[:, 5:].max() == 0


def test_several_stroke_layers_are_their_union() -> None:
    """Each pixel takes the strongest stroke over it, on whichever layer (ImageChops.lighter: the maximum)."""
    layers = [Image.new("RGBA", (6, 1), (0, 0, 0, 0)) for _ in range(2)]
    layers[0].putdata([(9, 9, 9, a) for a in (255, 100, 0, 0, 30, 0)])
    layers[1].putdata([(200, 0, 0, a) for a in (0, 150, 0, 80, 20, 0)])
    mask = mask_from_editor({"background": None, "layers": layers, "composite": None})
    assert np.asarray(mask).tolist() == [[255, 150, 0, 80, 30, 0]]


def test_transparent_parts_of_an_uploaded_mask_do_not_act() -> None:
    """As the CLI reads a mask file: transparent pixels count as black."""
    picture = Image.new("RGBA", (4, 1), (255, 255, 255, 255))
    picture.putpixel((2, 0), (255, 255, 255, 0))
    picture.putpixel((3, 0), (255, 255, 255, 0))
    mask = mask_from_editor({"background": picture, "layers": [], "composite": picture})
    assert np.asarray(mask).tolist() == [[255, 255, 0, 0]]


def test_a_reference_without_a_mask_acts_everywhere() -> None:
    mask = full_mask((5, 3))
    assert mask.mode == "L" and mask.size == (5, 3) and np.asarray(mask).min() == 255


def test_uploaded_picture_is_the_mask_without_strokes() -> None:
    picture = Image.new("RGB", (8, 8), (255, 255, 255))
    empty = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    mask = mask_from_editor({"background": picture, "layers": [empty], "composite": picture})
    assert mask.mode == "L" and np.asarray(mask).min() == 255


@pytest.mark.parametrize("value", [None, {}, {"background": None, "layers": [], "composite": None}])
def test_empty_editor_is_no_mask(value) -> None:
    assert mask_from_editor(value) is None


def test_mask_is_stretched_to_its_reference() -> None:
    assert fit_mask(Image.new("L", (7, 3)), (60, 40)).size == (60, 40)


def test_a_stretched_mask_is_interpolated_linearly_and_kept_grey() -> None:
    """Bilinear with pixel centres: [0, 255] on 2 pixels becomes 0, 255/4, 3·255/4, 255 on 4 (soft edges stay soft,
    no overshoot); a colour mask becomes its grey levels, one of the right size is returned as is."""
    two = Image.fromarray(np.array([[0, 255]], np.uint8))
    assert np.asarray(fit_mask(two, (4, 1))).tolist() == [[0, 64, 191, 255]]
    colour = Image.new("RGB", (4, 1), (255, 255, 255))
    fitted = fit_mask(colour, (4, 1))
    assert fitted.mode == "L" and np.asarray(fitted).tolist() == [[255, 255, 255, 255]]


# --- the reproducing command ------------------------------------------------------------------------------------

def test_command_quotes_what_a_shell_would_expand(tiny) -> None:
    form = _form(tiny, prompt="it's $(rm -rf ~) `x` \"quoted\"", negative_prompt="a; b", preset="style transfer",
                 start=0.2, end=0.8, combine="average", negative_image="/up/neg ative.png", seed=7, num_images=2)
    argv = generate_argv(["--base", "/m y/pipe"], form, ["/w/mask-1.png"])
    assert shlex.split(generate_command(["--base", "/m y/pipe"], form, ["/w/mask-1.png"])) == argv
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags["--prompt"] == form.prompt and flags["--negative-image"] == "/up/neg ative.png"
    assert (flags["--start"], flags["--end"], flags["--num-images"]) == ("0.2", "0.8", "2")


def test_the_command_read_by_the_clis_parser_is_the_page(tiny) -> None:
    """Every setting of the page comes back from `ipadapter generate`'s own parser; what equals the CLI's default is
    left out of the line."""
    form = _form(tiny, references=[str(tiny / "ref.png"), str(tiny / "other.png")], negative_prompt="blurry",
                 scale=0.6, preset="style transfer", start=0.1, end=0.9, combine="average",
                 negative_image=str(tiny / "big.png"), content_subtract="a red", content_strength=0.3, seed=11, steps=4,
                 num_images=3)
    argv = generate_argv(["--base", "/pipe"], form, ["/w/mask-1.png", "/w/mask-2.png"], out="/o.png")
    args = build_parser().parse_args(argv[1:])
    masks = ["/w/mask-1.png", "/w/mask-2.png"]
    assert (args.base, args.image, args.mask, args.out) == ("/pipe", form.references, masks, "/o.png")
    assert (args.prompt, args.negative_prompt, args.scale, args.preset, args.start, args.end, args.combine) == (
        form.prompt, "blurry", 0.6, "style transfer", 0.1, 0.9, "average")
    assert (args.negative_image, args.content_subtract, args.content_strength) == (str(tiny / "big.png"), "a red", 0.3)
    assert (args.seed, args.steps, args.num_images) == (11, 4, 3)
    plain = generate_argv([], _form(tiny), [])
    defaults = build_parser().parse_args(plain[1:])
    assert not {"--preset", "--start", "--end", "--combine", "--negative-prompt", "--negative-image",
                "--content-subtract"} & set(plain)
    assert (defaults.start, defaults.end, defaults.combine) == (Form.start, Form.end, Form.combine)


def test_the_command_writes_out_png_in_the_current_folder(tiny) -> None:
    assert generate_command([], _form(tiny), []).endswith(" --out out.png")


def test_model_flags_leave_out_what_the_app_was_not_given() -> None:
    assert model_flags(argparse.Namespace(base="b")) == ["--base", "b"]


def test_model_flags_repeat_per_adapter() -> None:
    args = argparse.Namespace(base="b", **{**MODEL_ARGS, "adapter": ["a1", "a2"], "weight_name": ["w1", "w2"]})
    assert model_flags(args) == ["--base", "b", "--adapter", "a1", "--adapter", "a2", "--weight-name", "w1",
                                 "--weight-name", "w2", "--device", "cpu"]


def test_the_reproducing_command_carries_every_model_flag_the_app_was_started_with() -> None:
    """Each flag of `add_model_flags` given to `app` reaches `generate` with its value (argparse reads both)."""
    from ipadapter.cli.generate import MODEL_HELP

    given = {flag: [f"value-of-{flag[2:]}"] for flag in MODEL_HELP}
    given["--dtype"], given["--adapter"], given["--text-encoder"] = ["bfloat16"], ["a1", "a2"], ["t1", "t2"]
    argv = [item for flag, values in given.items() for value in values for item in (flag, value)]
    app = build_parser().parse_args(["app", *argv])
    again = build_parser().parse_args(["generate", *model_flags(app)])
    for flag in MODEL_HELP:
        attribute = flag[2:].replace("-", "_")
        assert getattr(again, attribute) == getattr(app, attribute), flag


def test_app_binds_to_loopback_by_default() -> None:
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)


def test_app_help_states_each_default_and_the_examples(capsys) -> None:
    from ipadapter.cli.app import EXAMPLES

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    text = capsys.readouterr().out
    assert text.endswith("\n\n" + EXAMPLES)  # as written: one example a line
    flat = " ".join(text.split())
    for line in ("--host HOST address to bind (default 127.0.0.1: this machine only)",
                 "--port PORT port to serve on (default 7860)",
                 "--max-upload-mb MAX_UPLOAD_MB largest accepted upload in MB (default 20)",
                 "--max-side MAX_SIDE largest accepted image side in pixels (default 4096)",
                 "--cache-mb CACHE_MB MB for reference embeddings and projected tokens, reused while the app runs "
                 "(default 256; 0: off)"):
        assert line in flat
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "app start the local web app" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("flags", "message"), [
    (["--port", "0"], "--port must be between 1 and 65535, got 0"),
    (["--port", "65536"], "--port must be between 1 and 65535, got 65536"),
    (["--cache-mb", "-1"], "--cache-mb must be 0 (off) or more, got -1.0"),
])
def test_app_refuses_a_bad_port_or_cache(capsys, flags, message) -> None:
    assert main(["app", *flags]) == 2
    assert capsys.readouterr().err == f"ipadapter: error: {message}\n"


def _launched(monkeypatch, tiny: Path, *flags: str) -> dict:
    """`ipadapter app` on the tiny model up to the point it would serve: what it hands to `ui.launch`."""
    import ipadapter.app.ui as ui

    seen: dict = {}
    monkeypatch.setattr(ui, "build_ui", lambda service: seen.setdefault("service", service))
    monkeypatch.setattr(ui, "launch", lambda page, **kw: seen.update(page=page, serving=page.workdir.is_dir(), **kw))
    assert main(["app", "--base", str(tiny / "pipe"), "--adapter", str(tiny / "base.bin"), "--device", "cpu",
                 *flags]) == 0
    seen["service"].loaded.prompter.detach()
    return seen


def test_the_app_serves_the_page_with_the_flags_values(monkeypatch, tiny) -> None:
    """Each edge value accepted: port 1 and 65535, one byte of upload (1/2^20 MB), a cache of 0 (off) or half a MB."""
    own_handling = signal.getsignal(signal.SIGTERM)
    seen = _launched(monkeypatch, tiny, "--host", "0.0.0.0", "--port", "65535", "--max-upload-mb", repr(1 / 2**20),
                     "--max-side", "1", "--cache-mb", "0.5")
    service = seen["service"]
    assert seen["page"] is service and (seen["host"], seen["port"]) == ("0.0.0.0", 65535)
    assert seen["limits"] == UploadLimits(max_bytes=1, max_side=1) and service.limits is seen["limits"]
    assert service.loaded.prompter.cache.max_bytes == 2**19
    assert seen["serving"] and service.workdir.name.startswith("ipadapter-app-")  # its files while it serves
    assert not service.workdir.exists()  # and none left once it stops
    assert signal.getsignal(signal.SIGTERM) is own_handling  # the process's own handling back
    assert service.model == ["--base", str(tiny / "pipe"), "--adapter", str(tiny / "base.bin"), "--device", "cpu"]
    seen = _launched(monkeypatch, tiny, "--port", "1", "--cache-mb", "0")
    assert (seen["port"], seen["service"].loaded.prompter.cache.max_bytes) == (1, 0)
    defaults = _launched(monkeypatch, tiny)  # as the help and the examples state them
    assert (defaults["host"], defaults["port"]) == ("127.0.0.1", 7860)
    assert defaults["limits"] == UploadLimits(max_bytes=20 * 2**20, max_side=4096)
    assert defaults["service"].loaded.prompter.cache.max_bytes == 256 * 2**20


@pytest.mark.parametrize(("flag", "value", "why"), [
    ("--max-upload-mb", "-1", "must be a positive number of MB, got -1"),
    ("--max-upload-mb", "1e-9", "must be a positive number of MB, got 1e-09"),  # rounds to 0 bytes
    ("--max-upload-mb", "1e308", "must be a positive number of MB, got 1e+308"),  # more bytes than a float holds
    ("--max-side", "0", "must be at least 1 pixel, got 0"),
])
def test_app_names_the_upload_limit_flag_and_value_given(capsys, flag, value, why) -> None:
    assert main(["app", flag, value]) == 2
    assert capsys.readouterr().err == f"ipadapter: error: {flag} {why}\n"


@pytest.mark.parametrize("side", ["0", "-3"])
def test_the_max_side_flag_is_refused_by_the_limits_own_rule(capsys, side) -> None:
    """One rule for the side limit (`UploadLimits`): the command line words the limits' refusal with its flag."""
    with pytest.raises(IPAdapterError) as caught:
        UploadLimits(max_side=int(side))
    assert main(["app", "--max-side", side]) == 2
    flagged = str(caught.value).replace("the upload limit max_side", "--max-side")
    assert capsys.readouterr().err == f"ipadapter: error: {flagged}\n"


# --- the service on a tiny model -------------------------------------------------------------------------------

def test_command_reproduces_the_result(service, tiny, tmp_path) -> None:
    odd_mask = Image.new("L", (17, 29), 0)
    odd_mask.paste(255, (0, 0, 9, 29))
    form = _form(tiny, references=[str(tiny / "ref.png"), str(tiny / "other.png")], masks=[odd_mask],
                 negative_image=str(tiny / "other.png"), start=0.0, end=0.5, scale=0.7, seed=3,
                 negative_prompt="blurry", preset=service.presets[-1])
    steps_seen: list[tuple[int, int]] = []
    result = service.generate(form, lambda done, total: steps_seen.append((done, total)))
    assert steps_seen == [(1, 2), (2, 2)]
    assert result.notes == ["mask 1 (17x29) was stretched to its reference's 60x40"]
    argv = shlex.split(result.command)
    assert argv[:2] == ["ipadapter", "generate"] and argv.count("--mask") == 2
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    assert main(argv[1:]) == 0
    again = np.asarray(Image.open(tmp_path / "cli.png"))
    assert np.array_equal(np.asarray(result.images[0]), again), "the command must give the page's pixels"


def test_content_subtraction_on_the_page_is_the_commands(service, tiny, tmp_path) -> None:
    form = _form(tiny, content_subtract="a red", content_strength=0.7, seed=5)
    result = service.generate(form)
    argv = shlex.split(result.command)
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert (flags["--content-subtract"], flags["--content-strength"]) == ("a red", "0.7")
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    assert main(argv[1:]) == 0
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(Image.open(tmp_path / "cli.png")))
    plain = service.generate(_form(tiny, seed=5))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


def test_a_text_only_page_with_image_settings_gives_a_command_the_cli_runs(service, tiny, tmp_path) -> None:
    """Without a reference the page's image settings change nothing, and the CLI refuses them: the command leaves them
    out and still gives the page's pixels."""
    form = _form(tiny, references=[], prompt="a red circle", scale=0.7, start=0.2, end=0.8, preset="ease in",
                 negative_image=str(tiny / "other.png"), content_subtract="a red", seed=4)
    result = service.generate(form)
    argv = shlex.split(result.command)
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    assert main(argv[1:]) == 0
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(Image.open(tmp_path / "cli.png")))


def test_references_are_encoded_once(service, tiny) -> None:
    cache = service.loaded.prompter.encoder.cache
    service.generate(_form(tiny))
    misses = cache.misses
    assert len(service.generate(_form(tiny, seed=1, num_images=2)).images) == 2
    assert cache.misses == misses and cache.hits > 0


def test_the_app_keeps_k_and_v_so_a_rerun_projects_none(service, tiny) -> None:
    """The page's common case, the same reference again with another seed and scale: with the app's `--cache-kv` no
    layer projects the image tokens again (the seed changes the latents, the scale weighs the attention's output; the
    tokens stay). `generate` keeps diffusers' default (projected at every step) unless asked."""
    parse = build_parser().parse_args
    assert parse(["app"]).cache_kv and not parse(["app", "--no-cache-kv"]).cache_kv
    assert not parse(["generate"]).cache_kv and parse(["generate", "--cache-kv"]).cache_kv
    projections = [m for _, layer in service.loaded.prompter.adapters["0"].named_layers()
                   for m in (layer.to_k_ip, layer.to_v_ip)]
    service.loaded.prompter.attachment.clear_cache()  # whatever the tests before left
    with factories.calls_of(projections) as calls:
        service.generate(_form(tiny, seed=7))
        first = len(calls)
        service.generate(_form(tiny, seed=8, scale=0.5))
    assert first == len(projections) > 0  # once a layer for the generation's two steps, not once a step
    assert len(calls) == first


def test_the_page_starts_at_the_models_own_steps_and_offers_its_unets_presets(service) -> None:
    """30 steps for a base without a default of its own (the miniature's is 25); every preset this UNet's layout has."""
    from dataclasses import replace

    from ipadapter.conditioning.presets import available_presets

    assert service.default_steps == 30 and service.loaded.default_steps is None
    assert service.presets == available_presets(service.loaded.prompter.pipe.unet)
    assert "style transfer" in service.presets
    own = GenerationService(replace(service.loaded, default_steps=25), [], limits=UploadLimits(), workdir=".")
    assert own.default_steps == 25


def test_a_service_from_the_apps_flags_is_the_fixtures(service, tiny, tmp_path) -> None:
    """`from_args`, as `ipadapter app` builds its service: the same model flags, limits and work folder, and the same
    pixels, content subtraction included (its text model is found through the loaded pipeline and encoder)."""
    args = argparse.Namespace(base=str(tiny / "pipe"), cache_kv=True,
                              **{**MODEL_ARGS, "adapter": [str(tiny / "base.bin")]})
    limits = UploadLimits(max_bytes=50_000, max_side=64)
    built = GenerationService.from_args(args, limits=limits, workdir=tmp_path / "work")
    try:
        assert (built.model, built.limits, built.workdir) == (service.model, limits, tmp_path / "work")
        form = _form(tiny, content_subtract="a red", content_strength=0.7, seed=5)
        assert np.array_equal(np.asarray(built.generate(form).images[0]), np.asarray(service.generate(form).images[0]))
    finally:
        built.loaded.prompter.detach()


def test_content_words_are_embedded_by_the_base_models_own_paired_text_model_first(service, tmp_path) -> None:
    """An SDXL-like base whose second text encoder is the image encoder's CLIP text model (with its projection) is
    used before any folder beside the encoder (`paired_text`'s order); the service hands it the loaded pipeline."""
    from dataclasses import replace
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    model = factories.tiny_text_encoder(32, 9, projection=24)
    tokenizer = CLIPTokenizer.from_pretrained(factories.write_tokenizer(tmp_path / "tok", max_length=16))
    encoder = service.loaded.prompter.encoder
    prompter = SimpleNamespace(pipe=SimpleNamespace(text_encoder_2=model, tokenizer_2=tokenizer), encoder=encoder)
    built = GenerationService(replace(service.loaded, prompter=prompter), [], limits=UploadLimits(), workdir=".")
    ids = tokenizer(["a red"], padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).text_embeds
    torch.testing.assert_close(built._content_text("a red"), expected.to(encoder.dtype), rtol=0, atol=0)


def test_a_base_without_a_unet_offers_no_presets(service) -> None:
    """FLUX and SD 3.5 pipelines have a transformer, not a UNet: their layers take per-block weights instead."""
    from dataclasses import replace
    from types import SimpleNamespace

    transformer_only = SimpleNamespace(pipe=SimpleNamespace(transformer=object()), encoder=None)
    built = GenerationService(replace(service.loaded, prompter=transformer_only), [], limits=UploadLimits(),
                              workdir=".")
    assert built.presets == ()


def test_the_models_own_guidance_is_used(service, tiny) -> None:
    """The miniature's guidance (7.5) or a base's own: what `Loaded` says, as `ipadapter generate` uses it."""
    from dataclasses import replace

    from ipadapter.request import GenerationRequest, build_prompt

    own = GenerationService(replace(service.loaded, default_guidance=2.0), [], limits=UploadLimits(), workdir=".")
    got = own.generate(_form(tiny, references=[], seed=6)).images[0]
    prompter = service.loaded.prompter
    truth = prompter.generate(build_prompt(prompter, GenerationRequest(images=[])), prompt="a cat", steps=2,
                              guidance=2.0, seed=6)[0]
    assert np.array_equal(np.asarray(got), np.asarray(truth))
    default = service.generate(_form(tiny, references=[], seed=6)).images[0]
    assert not np.array_equal(np.asarray(got), np.asarray(default))


def test_mask_files_are_numbered_by_their_reference(service, tiny, tmp_path) -> None:
    """A mask on the second reference only: the first acts everywhere; files and messages count from 1, in a work
    folder made on first use."""
    fresh = GenerationService(service.loaded, service.model, limits=service.limits, workdir=tmp_path / "new" / "work")
    mask = Image.new("L", (40, 40), 255)
    form = _form(tiny, references=[str(tiny / "ref.png"), str(tiny / "other.png")], masks=[None, mask])
    result = fresh.generate(form)
    argv = shlex.split(result.command)
    paths = [Path(argv[i + 1]) for i, word in enumerate(argv) if word == "--mask"]
    assert [p.name for p in paths] == ["mask-1.png", "mask-2.png"]
    assert np.asarray(Image.open(paths[0])).min() == 255
    assert result.notes == ["mask 2 (40x40) was stretched to its reference's 32x32"]
    with pytest.raises(IPAdapterError) as caught:
        fresh.generate(_form(tiny, references=form.references, masks=[None, Image.new("L", (100, 10))]))
    assert str(caught.value) == "mask 2 is 100x10 px; images are limited to 64 px per side"


SERVICE_ERRORS = {
    "non-image": ({"references": ["notes.txt"]}, "reference 1 (notes.txt) is not an image"),
    "oversized": ({"references": ["ref.png"], "negative_image": "big.png"}, "the negative image (big.png) is 80x80 px"),
    "empty": ({"references": [], "prompt": ""}, "upload a reference image, type a prompt"),
    "masks with combine": ({"references": ["ref.png", "other.png"], "masks": [Image.new("L", (4, 4))],
                            "combine": "average"}, "masked references cannot be combined"),
    "bad window": ({"start": 0.9, "end": 0.1}, "start"),
    "negative content strength": ({"content_subtract": "a cat", "content_strength": -0.5},
                                  "the content strength must be a number from 0 up, got -0.5"),
}


@pytest.mark.parametrize("case", list(SERVICE_ERRORS))
def test_service_refuses_with_a_message(service, tiny, case) -> None:
    changes, words = dict(SERVICE_ERRORS[case][0]), SERVICE_ERRORS[case][1]
    if "references" in changes:
        changes["references"] = [str(tiny / name) for name in changes["references"]]
    if "negative_image" in changes:
        changes["negative_image"] = str(tiny / changes["negative_image"])
    with pytest.raises(IPAdapterError, match=re.escape(words)):
        service.generate(_form(tiny, **changes))


def test_concurrent_requests_take_turns(service, tiny, monkeypatch) -> None:
    prompter = service.loaded.prompter
    running, overlap, original = [0], [False], prompter.generate

    def watched(*args, **kwargs):
        running[0] += 1
        overlap[0] |= running[0] > 1
        time.sleep(0.05)
        try:
            return original(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(prompter, "generate", watched)
    results: list[object] = []
    threads = [threading.Thread(target=lambda s=s: results.append(service.generate(_form(tiny, seed=s))))
               for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and not overlap[0]


def test_page_previews_images_and_names_the_rest(tiny) -> None:
    pytest.importorskip("gradio")
    from ipadapter.app.ui import check_references

    previews, message = check_references([str(tiny / "ref.png"), str(tiny / "notes.txt")], UploadLimits())
    assert len(previews) == 1 and "reference 2 (notes.txt) is not an image" in message


# --- end to end in headless Chromium ----------------------------------------------------------------------------

@pytest.fixture
def app_url(tiny, tmp_path):
    """`ipadapter app` on a free loopback port, in its own process, stopped after the test (its start, gradio's
    import mostly, took over 40 s on two cores shared with training jobs: the limits only catch a hang)."""
    pytest.importorskip("gradio")
    env = {"GRADIO_TEMP_DIR": str(tmp_path / "uploads"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    app_args = ["--base", str(tiny / "pipe"), "--adapter", str(tiny / "base.bin"), "--device", "cpu"]
    env["TMPDIR"] = str(tmp_path / "tmp")  # where the app keeps its page's files while it serves
    (tmp_path / "tmp").mkdir()
    with ExitStack() as stack:
        try:
            url = stack.enter_context(serving(app_args, tmp_path, env, timeout_s=180))
        except RuntimeError as err:
            pytest.fail(str(err))
        assert len(list((tmp_path / "tmp").glob("ipadapter-app-*"))) == 1
        yield url
    assert not list((tmp_path / "tmp").glob("ipadapter-app-*")), "the app, stopped by SIGTERM, left its files"


@pytest.fixture
def browser():
    """Debian's chromium under Playwright (never a downloaded browser); a fresh profile each launch."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the e2e test drives Chromium with Playwright")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no {CHROMIUM}: run scripts/ci-browser.sh (Debian's chromium package)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=120_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.slow
def test_page_generates_and_refuses_a_non_image(browser, app_url, tiny) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(20_000)
    page.goto(app_url)
    page.locator("#references input[type=file]").set_input_files(str(tiny / "ref.png"))
    page.locator("#previews img").first.wait_for()
    page.get_by_text("Control", exact=True).click()  # the slider takes input only with content words to act on
    strength = page.locator("#content-strength input[type=range]")
    assert strength.is_disabled()
    page.locator("#content textarea").fill("a red ball")
    page.wait_for_function("() => !document.querySelector('#content-strength input[type=range]').disabled")
    strength.fill("0.5")
    page.locator("#content textarea").fill("")  # back to 1 as it is disabled: the form would refuse 0.5 without words
    page.wait_for_function("() => { const s = document.querySelector('#content-strength input[type=range]');"
                           " return s.disabled && Number(s.value) === 1; }")
    page.locator("#prompt textarea").fill("a cat")
    page.locator("#steps input[type=number]").fill("2")
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].some(i => i.naturalWidth > 0)")
    command = page.locator("#command").inner_text()
    assert "ipadapter generate" in command and "ref.png" in command and "--steps 2" in command

    page.locator("#references input[type=file]").set_input_files(str(tiny / "notes.txt"))
    page.locator("#message").get_by_text("reference 2 (notes.txt) is not an image").wait_for()
    assert answers(app_url), "the app must keep serving after a refused upload"
    page.locator("#references button[aria-label=Clear]").click()
    page.locator("#references input[type=file]").set_input_files(str(tiny / "ref.png"))
    page.locator("#message").get_by_text("is not an image").wait_for(state="detached")
    page.locator("#previews img").first.wait_for()
    page.locator("#seed input").fill("1")
    page.locator("#generate").click()
    page.locator("#command").get_by_text("--seed 1").wait_for()
    page.close()


# --- the page's handlers, called in this process ----------------------------------------------------------------

class _RecordingService:
    """What the page needs of a GenerationService; `generate` keeps the form it was given and reports progress."""

    default_steps, presets, limits = 17, ["style", "composition"], UploadLimits(max_side=48)

    def __init__(self, refuse: str = "") -> None:
        self.forms: list[Form] = []
        self.refuse = refuse

    def generate(self, form, progress):
        self.forms.append(form)
        if self.refuse:
            raise IPAdapterError(self.refuse)
        progress(1, 2)
        return argparse.Namespace(images=["image-1"], command="ipadapter generate ...", notes=["first", "second"])


def _handler(page, name: str):
    """The function the page runs for an event, with its input components by elem_id or label."""
    (fn,) = [f for f in page.fns.values() if f.name == name]
    return fn.fn, {c.elem_id or c.label: c for c in fn.inputs}


def test_every_control_of_the_page_reaches_its_field_of_the_form(tiny) -> None:
    """Each control set to a value of its own (none the default), so a control wired to another field is caught."""
    pytest.importorskip("gradio")
    from ipadapter.app.ui import build_ui

    service = _RecordingService()
    generate, controls = _handler(build_ui(service), "on_generate")
    painted = Image.new("RGBA", (8, 8))
    painted.putpixel((2, 3), (255, 0, 0, 255))
    editor = {"background": None, "layers": [painted], "composite": None}
    values = {"references": [str(tiny / "ref.png"), str(tiny / "other.png")], "prompt": "a cat",
              "negative-prompt": "blurry", "scale": 0.35, "seed": 7.0, "steps": 3.0, "num-images": 2.0,
              "Layer preset": "composition", "Start (fraction of the steps)": 0.1, "End": 0.85,
              "Combine references": "average", "negative-image": str(tiny / "big.png"), "content": "a red ball",
              "content-strength": 0.4, "mask-1": None, "mask-2": editor, "mask-3": None, "mask-4": None}
    assert set(values) == set(controls)
    calls = []
    images, command, message = generate({controls[k]: v for k, v in values.items()},
                                        lambda value, desc: calls.append((value, desc)))
    assert (images, command, message) == (["image-1"], "ipadapter generate ...", "first\n\nsecond")
    assert calls == [(0, "preparing"), ((1, 2), "denoising")]
    (form,) = service.forms
    masks, form.masks = form.masks, []
    assert form == Form(references=values["references"], prompt="a cat", negative_prompt="blurry", scale=0.35,
                        preset="composition", start=0.1, end=0.85, combine="average",
                        negative_image=str(tiny / "big.png"), content_subtract="a red ball", content_strength=0.4,
                        seed=7, steps=3, num_images=2)
    assert [m is None for m in masks] == [True, False, True, True]
    assert masks[1].tobytes() == mask_from_editor(editor).tobytes()


def test_a_page_left_empty_is_a_form_of_defaults_and_a_refusal_leaves_the_results(tiny) -> None:
    """Gradio sends None for an untouched textbox, number or file; the preset "none" is no preset. A refused form puts
    the sentence in the message area and leaves the gallery and command as they were."""
    pytest.importorskip("gradio")
    import gradio as gr

    from ipadapter.app.ui import NO_PRESET, build_ui

    service = _RecordingService(refuse="upload a reference image, type a prompt, or both")
    generate, controls = _handler(build_ui(service), "on_generate")
    values = {"references": None, "prompt": None, "negative-prompt": None, "scale": 1.0, "seed": None, "steps": 25,
              "num-images": 1, "Layer preset": NO_PRESET, "Start (fraction of the steps)": 0.0, "End": 1.0,
              "Combine references": "concat", "negative-image": None, "content": None, "content-strength": 1.0,
              **{f"mask-{i}": None for i in range(1, 5)}}
    result = generate({controls[k]: v for k, v in values.items()}, lambda value, desc: None)
    assert result == (gr.update(), gr.update(), "**Cannot do that:** upload a reference image, type a prompt, or both")
    assert service.forms == [Form(masks=[None] * 4)]


def test_the_page_starts_from_the_services_steps_and_presets_and_checks_uploads_by_its_limits(tiny) -> None:
    pytest.importorskip("gradio")
    from ipadapter.app.ui import NO_PRESET, build_ui

    service = _RecordingService()
    page = build_ui(service)
    _, controls = _handler(page, "on_generate")
    assert controls["steps"].value == 17
    assert [choice[0] for choice in controls["Layer preset"].choices] == [NO_PRESET, "style", "composition"]
    check, _ = _handler(page, "<lambda>")
    previews, message = check([str(tiny / "ref.png"), str(tiny / "other.png")])
    assert len(previews) == 1 and previews[0].size == (32, 32)
    assert message.startswith("**Cannot do that:** reference 1 (ref.png)") and "48" in message


@pytest.mark.parametrize("words, interactive", [("a red ball", True), ("  ", False), (None, False)])
def test_content_strength_takes_input_only_with_words_and_goes_back_to_one_without(words, interactive) -> None:
    pytest.importorskip("gradio")
    import gradio as gr

    from ipadapter.app.ui import strength_for

    assert strength_for(words) == (gr.update(interactive=True) if interactive else
                                   gr.update(interactive=False, value=1.0))


def _components(page) -> dict:
    """The page's components by elem_id, else by label."""
    return {b.elem_id or getattr(b, "label", None): b for b in page.blocks.values()
            if b.elem_id or getattr(b, "label", None)}


def test_the_page_as_it_opens_sends_the_forms_defaults(tiny) -> None:
    """Every control starts where the form (and so `ipadapter generate`) starts: generating from the untouched page
    asks for the form's defaults, at the model's own number of steps."""
    pytest.importorskip("gradio")
    from ipadapter.app.ui import build_ui

    service = _RecordingService()
    generate, controls = _handler(build_ui(service), "on_generate")
    generate({c: c.value for c in controls.values()}, lambda value, desc: None)
    assert service.forms == [Form(masks=[None] * 4, steps=service.default_steps)]


def test_each_control_offers_what_the_form_accepts(tiny) -> None:
    pytest.importorskip("gradio")
    from ipadapter.app.form import MAX_IMAGES
    from ipadapter.app.ui import NO_PRESET, build_ui
    from ipadapter.conditioning.combine import COMBINE_MODES

    def refused(**values) -> bool:
        try:
            _form(tiny, **values).check()
        except IPAdapterError:
            return True
        return False

    service = _RecordingService()
    c = _components(build_ui(service))
    images, seed, steps = c["num-images"], c["seed"], c["steps"]
    assert (images.minimum, images.maximum, images.step) == (1, MAX_IMAGES, 1)
    assert refused(num_images=0) and not refused(num_images=MAX_IMAGES) and refused(num_images=MAX_IMAGES + 1)
    assert (seed.minimum, seed.precision) == (0, 0) and refused(seed=-1) and not refused(seed=0)
    assert (steps.minimum, steps.step) == (1, 1) and refused(steps=0) and steps.maximum >= service.default_steps
    for window in (c["Start (fraction of the steps)"], c["End"]):  # fractions of the steps, both ends reachable
        assert (window.minimum, window.maximum) == (0.0, 1.0) and (1 / window.step).is_integer()
    scale, strength = c["scale"], c["content-strength"]
    for slider in (scale, strength):  # off (0) and full (1) both on the slider's grid
        assert slider.minimum == 0.0 and slider.maximum >= 1.0 and (1 / slider.step).is_integer()
    assert strength.interactive is False and strength.value == 1.0  # as strength_for leaves it without words
    assert [choice[0] for choice in c["Combine references"].choices] == list(COMBINE_MODES)
    assert [choice[0] for choice in c["Layer preset"].choices] == [NO_PRESET, *service.presets]
    assert (c["references"].file_count, c["negative-image"].file_count) == ("multiple", "single")
    assert c["gallery"].format == "png" and c["command"].language == "shell"


def test_mask_i_belongs_to_reference_i_and_the_extras_start_closed() -> None:
    pytest.importorskip("gradio")
    import gradio as gr

    from ipadapter.app.ui import MASK_SLOTS, build_ui

    page = build_ui(_RecordingService())
    tabs = [b.label for b in page.blocks.values() if isinstance(b, gr.Tab)]
    editors = [b for b in page.blocks.values() if isinstance(b, gr.ImageEditor)]
    assert tabs == [f"Reference {i}" for i in range(1, MASK_SLOTS + 1)]
    assert [(e.label, e.elem_id) for e in editors] == [(f"Mask for reference {i}", f"mask-{i}")
                                                       for i in range(1, MASK_SLOTS + 1)]
    assert all(e.type == "pil" and "upload" in e.sources for e in editors)  # what mask_from_editor reads
    assert [b.open for b in page.blocks.values() if isinstance(b, gr.Accordion)] == [False, False]
    inputs = [b for b in page.blocks.values() if isinstance(b, (gr.Textbox, gr.Slider, gr.Number, gr.Dropdown,
                                                                gr.File, gr.ImageEditor))]
    assert all(b.label for b in inputs)  # each named, for screen readers and for the browser test


def test_the_events_go_to_their_handlers_and_outputs() -> None:
    pytest.importorskip("gradio")
    from ipadapter.app.ui import build_ui, strength_for

    page = build_ui(_RecordingService())
    events = {f.name: f for f in page.fns.values()}
    generate = events["on_generate"]
    assert [o.elem_id for o in generate.outputs] == ["gallery", "command", "message"]
    assert generate.concurrency_limit == 1  # one generation at a time on the one model
    strength = events["strength_for"]
    assert strength.fn is strength_for
    assert [i.elem_id for i in strength.inputs] == ["content"]
    assert [o.elem_id for o in strength.outputs] == ["content-strength"]
    previews = events["<lambda>"]
    assert [i.elem_id for i in previews.inputs] == ["references"]
    assert [o.elem_id for o in previews.outputs] == ["previews", "message"]


def test_launch_serves_one_request_at_a_time_with_the_upload_limit() -> None:
    pytest.importorskip("gradio")
    from ipadapter.app.ui import launch

    calls = []

    class Page:
        def queue(self, **kwargs):
            calls.append(("queue", kwargs))

        def launch(self, **kwargs):
            calls.append(("launch", kwargs))

    launch(Page(), host="127.0.0.1", port=7861, limits=UploadLimits(max_bytes=12_345))
    assert calls == [("queue", {"default_concurrency_limit": 1}),
                     ("launch", {"server_name": "127.0.0.1", "server_port": 7861, "max_file_size": 12_345,
                                 "ssr_mode": False})]


def test_the_page_sends_no_analytics_and_opens_with_its_instructions(monkeypatch) -> None:
    """Whatever gradio's environment says: the app runs offline and tells nobody about its use."""
    pytest.importorskip("gradio")
    import gradio as gr

    from ipadapter.app.ui import INTRO, build_ui

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    page = build_ui(_RecordingService())
    assert page.analytics_enabled is False
    markdown = [b.value for b in page.blocks.values() if isinstance(b, gr.Markdown) and b.value]
    assert INTRO in markdown[0]
    assert _components(page)["previews"].interactive is False  # shows the uploads; nothing is dropped on it


def test_each_refused_upload_is_its_own_paragraph(tiny, tmp_path) -> None:
    pytest.importorskip("gradio")
    from ipadapter.app.ui import check_references

    (tmp_path / "a.txt").write_text("no")
    (tmp_path / "b.txt").write_text("no")
    previews, message = check_references([str(tmp_path / "a.txt"), str(tiny / "ref.png"), str(tmp_path / "b.txt")],
                                         UploadLimits())
    first, second = message.split("\n\n")
    assert len(previews) == 1 and "reference 1 (a.txt)" in first and "reference 3 (b.txt)" in second
    assert first.startswith("**Cannot do that:** ") and second.startswith("**Cannot do that:** ")


def test_the_page_keeps_the_names_the_browser_test_finds_it_by() -> None:
    """`test_page_generates_and_refuses_a_non_image` (and any user's script) finds the page's parts by these ids,
    the Generate button by its id, and opens the controls by the text "Control"."""
    pytest.importorskip("gradio")
    import gradio as gr

    from ipadapter.app.ui import build_ui

    page = build_ui(_RecordingService())
    ids = {b.elem_id for b in page.blocks.values() if b.elem_id}
    assert ids == {"references", "previews", "prompt", "negative-prompt", "scale", "seed", "steps", "num-images",
                   "negative-image", "content", "content-strength", "mask-1", "mask-2", "mask-3", "mask-4", "generate",
                   "message", "gallery", "command"}
    (button,) = [b for b in page.blocks.values() if isinstance(b, gr.Button)]
    assert (button.elem_id, button.value, button.variant) == ("generate", "Generate", "primary")
    accordions = [b.label for b in page.blocks.values() if isinstance(b, gr.Accordion)]
    assert accordions[0] == "Control" and accordions[1].startswith("Masks")
