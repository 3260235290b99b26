"""`ipadapter generate` end to end on tiny local models, and its one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipadapter.cli.main import main
from ipadapter.errors import IPAdapterError
from tests import factories

FAMILIES = ["base", "plus", "full", "faceid", "faceid-plus"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A saved SD-1.5-layout pipeline folder with its own image_encoder/, as `from_pretrained` reads it."""
    root = tmp_path_factory.mktemp("base")
    factories.save_tiny_sd15_pipeline(root, adapters=tuple(FAMILIES))
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "ref.png")
    np.save(root / "face.npy", np.random.default_rng(0).standard_normal(16).astype(np.float32))
    return root


def _run(tiny_base, *extra: str, out=None) -> int:
    out = out or tiny_base / "out.png"
    return main(["generate", "--base", str(tiny_base / "pipe"), "--image", str(tiny_base / "ref.png"), "--out", str(out),
                 "--steps", "2", "--width", "32", "--height", "32", *extra])


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_each_family(tiny_base, family, tmp_path, capsys) -> None:
    extra = ["--adapter", str(tiny_base / f"{family}.bin")]
    if "faceid" in family:
        extra += ["--face-embed", str(tiny_base / "face.npy")]
    out = tmp_path / "x.png"
    assert _run(tiny_base, *extra, "--num-images", "2", out=out) == 0
    for i in range(2):
        assert Image.open(tmp_path / f"x-{i}.png").size == (32, 32)


def test_generate_with_control_flags(tiny_base, tmp_path) -> None:
    Image.fromarray(np.full((17, 29), 255, np.uint8)).save(tmp_path / "mask.png")
    assert _run(tiny_base, "--adapter", str(tiny_base / "base.bin"), "--mask", str(tmp_path / "mask.png"),
                "--start", "0.2", "--end", "0.8", "--embeds-scaling", "kv", "--noise", "fade:0.3",
                "--preset", "ease in", "--crop", "top", out=tmp_path / "c.png") == 0
    assert (tmp_path / "c.png").is_file()


BAD = {
    "missing image": (["--image", "nope.png"], "not found"),
    "non-image": (["--image", "{root}/face.npy"], "cannot read"),
    "non-finite scale": (["--scale", "nan"], "finite"),
    "bad window": (["--start", "0.9", "--end", "0.1"], "start"),
    "unknown preset": (["--preset", "nope"], "valid"),
    "missing adapter": (["--adapter", "{root}/none.bin"], "not found"),
    "mask count": (["--mask", "{root}/ref.png", "--mask", "{root}/ref.png"], "mask"),
    "out-dir without a manifest": (["--out-dir", "{root}/runs"], "--out-dir is the folder of a --manifest run"),
    "base LoRA scale alone": (["--base-lora-scale", "0.5"], "no --base-lora was given"),
    "control scale alone": (["--control-scale", "0.5"], "no --controlnet was given"),
    "content strength alone": (["--content-strength", "0.8"], "no --content-subtract was given"),
    "LoRA scale, no LoRA": (["--lora-scale", "0.6"], "--lora-scale scales a FaceID adapter's LoRA"),
    "shortcut scale, no shortcut": (["--s-scale", "2"], "no attached adapter (base) has one"),
    "weight name of a bundled adapter": (["--adapter", "miniature", "--weight-name", "foo.bin"],
                                         "miniature is a bundled adapter"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tiny_base, case, tmp_path, capsys) -> None:
    flags, words = BAD[case]
    flags = [f.format(root=tiny_base) for f in flags]
    if "--adapter" not in flags:
        flags = ["--adapter", str(tiny_base / "base.bin"), *flags]
    with pytest.raises(SystemExit) if case == "non-finite scale" else _nothing():
        code = _run(tiny_base, *flags, out=tmp_path / "o.png")
        assert code == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]  # argparse prints its usage line first
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_zero_size_image(tiny_base, tmp_path, capsys) -> None:
    Image.new("RGB", (1, 1)).save(tmp_path / "z.png")
    data = (tmp_path / "z.png").read_bytes()
    (tmp_path / "z.png").write_bytes(data.replace(b"\x00\x00\x00\x01\x00\x00\x00\x01", b"\x00\x00\x00\x00\x00\x00\x00\x00", 1))
    code = main(["generate", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "base.bin"),
                 "--image", str(tmp_path / "z.png"), "--out", str(tmp_path / "o.png")])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("family", ["base", "plus"])  # the global embedding and the patch tokens
def test_encode_then_generate_from_embeds(tiny_base, tmp_path, family) -> None:
    emb = tmp_path / "ref.safetensors"
    base = ["--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / f"{family}.bin")]
    assert main(["encode", *base, "--image", str(tiny_base / "ref.png"), "--out", str(emb)]) == 0
    common = [*base, "--steps", "2", "--width", "32", "--height", "32", "--seed", "3"]
    assert main(["generate", *common, "--embeds", str(emb), "--out", str(tmp_path / "a.png")]) == 0
    assert main(["generate", *common, "--image", str(tiny_base / "ref.png"), "--out", str(tmp_path / "b.png")]) == 0
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert np.array_equal(a, b), "saved embeddings must give the same image as encoding on the fly"


def _encoded(tiny_base, tmp_path) -> Path:
    emb = tmp_path / "ref.safetensors"
    assert main(["encode", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "plus.bin"), "--image",
                 str(tiny_base / "ref.png"), "--out", str(emb)]) == 0
    return emb


@pytest.mark.parametrize("family", ["faceid", "faceid-plus"])
def test_embeds_for_an_adapter_that_reads_faces_are_refused(tiny_base, tmp_path, capsys, family) -> None:
    """FaceID reads no CLIP features at all, FaceID-Plus reads them beside the face embedding: neither takes a file
    of CLIP features as its image prompt."""
    emb = _encoded(tiny_base, tmp_path)
    capsys.readouterr()
    assert main(["generate", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / f"{family}.bin"),
                 "--embeds", str(emb), "--out", str(tmp_path / "o.png")]) == 2
    assert _error_line(capsys) == "--embeds holds CLIP features; this adapter takes face embeddings (--face-embed)"
    assert not (tmp_path / "o.png").exists()


def test_embeds_of_another_encoder_are_refused_naming_both(tiny_base, tmp_path, capsys) -> None:
    """A file whose recorded encoder differs from the run's (same shapes, another config) is refused by generate."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ipadapter.conditioning.embeds_file import load_embeds

    emb = _encoded(tiny_base, tmp_path)
    ours = load_embeds(emb).encoder
    with safe_open(emb, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    other = tmp_path / "other.safetensors"
    save_file(tensors, other, {**metadata, "encoder": "bigg", "encoder_config_hash": "0123abcd"})
    capsys.readouterr()
    assert main(["generate", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "plus.bin"),
                 "--embeds", str(other), "--out", str(tmp_path / "o.png")]) == 2
    assert _error_line(capsys) == (f"{other} was encoded with 'bigg' (config 0123abcd) but this run uses {ours.name!r} "
                                   f"(config {ours.config_hash}); use that encoder or encode the images again")


def test_encode_prints_the_file_and_records_the_encoder_by_name(tiny_base, tmp_path, capsys) -> None:
    """The saved file names the encoder folder that made it (for the refusal when another one reads it)."""
    from ipadapter.conditioning.embeds_file import load_embeds

    emb = tmp_path / "ref.safetensors"
    assert main(["encode", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "plus.bin"), "--image",
                 str(tiny_base / "ref.png"), "--out", str(emb)]) == 0
    assert capsys.readouterr().out == f"{emb}\n"
    assert load_embeds(emb).encoder.name == str(tiny_base / "pipe" / "image_encoder")


def test_encode_refuses_a_faceid_adapter_and_a_non_safetensors_out(tiny_base, tmp_path, capsys) -> None:
    from ipadapter.validation import output_file

    assert main(["encode", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "faceid.bin"), "--image",
                 str(tiny_base / "ref.png"), "--out", str(tmp_path / "f.safetensors")]) == 2
    assert _error_line(capsys) == ("this adapter takes face embeddings, not CLIP features: pass them with "
                                   "--face-embed")
    with pytest.raises(IPAdapterError) as caught:
        output_file(tmp_path / "f.png", "--out", ".safetensors")
    assert main(["encode", "--image", str(tiny_base / "ref.png"), "--out", str(tmp_path / "f.png")]) == 2
    assert _error_line(capsys) == str(caught.value)
    assert not list(tmp_path.iterdir())


def test_encode_help_says_what_it_does_with_an_example(capsys) -> None:
    """The example as written, one command a line; --image is required, and repeatable."""
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    text = capsys.readouterr().out
    assert text.endswith("\n\nexample:\n  ipadapter encode --image ref.png --out ref.embeds.safetensors\n"
                         "  ipadapter generate --embeds ref.embeds.safetensors --out out.png\n")
    assert "--image IMAGE reference image (repeatable) --out OUT output .safetensors file" in " ".join(text.split())
    with pytest.raises(SystemExit):
        main(["encode", "--image", "ref.png"])
    assert capsys.readouterr().err.endswith("error: the following arguments are required: --out (see ipadapter "
                                            "encode --help)\n")
    with pytest.raises(SystemExit) as done:
        main(["encode", "--out", "e.safetensors"])
    assert done.value.code == 2
    assert capsys.readouterr().err.endswith("error: the following arguments are required: --image (see ipadapter "
                                            "encode --help)\n")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the command list to the terminal
    assert "encode encode reference images once and save the embeddings (safetensors)" in text


def _no_loading(monkeypatch) -> None:
    """Any model load fails the test: what is checked here must be refused before one."""
    import ipadapter.loading

    def load_prompter(**_: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ipadapter.loading, "load_prompter", load_prompter)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err.split(": error: ", 1)[1]


@pytest.mark.parametrize("inputs", [["--prompt", "a red circle"], ["--image", "{root}/ref.png"]], ids=["text", "image"])
def test_several_adapters_in_one_generate_are_refused_before_loading(tiny_base, tmp_path, capsys, monkeypatch,
                                                                     inputs) -> None:
    """One generate has no way to say which adapter its --image is for: two --adapter are refused in one line that
    names the ways to use several (a manifest's "adapter" key, the Python API), with or without images."""
    _no_loading(monkeypatch)
    code = main(["generate", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "base.bin"), "--adapter",
                 str(tiny_base / "plus.bin"), *(i.format(root=tiny_base) for i in inputs),
                 "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert _error_line(capsys) == (
        '--adapter given 2 times: one generate prompts one adapter (--image cannot say which its images are for); to '
        'use several, give a --manifest whose jobs each name theirs ("adapter": "0", "1", ... in --adapter order), or '
        "the Python API")
    assert not list(tmp_path.iterdir())


def test_a_manifest_with_several_adapters_needs_a_name_only_for_jobs_with_images(tiny_base, tmp_path, capsys) -> None:
    """Two adapters: the job with images but no "adapter" key fails in one line naming the key (and the others run);
    the text-only job needs no name and makes the image a one-adapter text-only generate makes (no adapter acts on
    a text-only prompt); the job naming adapter "1" runs."""
    ref = str(tiny_base / "ref.png")
    jobs = [{"id": "text", "prompt": "a red circle", "seed": 5},
            {"id": "unnamed", "image": ref},
            {"id": "named", "image": ref, "adapter": "1"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    size = ["--steps", "2", "--width", "32", "--height", "32"]
    base = ["--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "base.bin")]
    code = main(["generate", *base, "--adapter", str(tiny_base / "plus.bin"), *size, "--manifest",
                 str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "out")])
    assert code == 1
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"line": 2, "id": "unnamed", "error": 'several adapters are attached (0, 1 in --adapter order): '
                       'give this job an "adapter" key naming the one its images are for'}]
    assert (tmp_path / "out" / "named-0.png").is_file()
    assert main(["generate", *base, *size, "--prompt", "a red circle", "--seed", "5", "--out",
                 str(tmp_path / "alone.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "text-0.png")),
                          np.asarray(Image.open(tmp_path / "alone.png")))


def test_true_cfg_on_a_local_unet_base_is_refused_before_loading(tiny_base, tmp_path, capsys, monkeypatch) -> None:
    """The base folder's model_index.json names a UNet, no FLUX transformer: known without loading anything."""
    _no_loading(monkeypatch)
    assert main(["generate", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "base.bin"), "--prompt",
                 "x", "--true-cfg", "4", "--out", str(tmp_path / "o.png")]) == 2
    assert _error_line(capsys) == "--true-cfg is FLUX's option; other bases take --guidance"
    assert main(["generate", "--prompt", "x", "--true-cfg", "4", "--out", str(tmp_path / "o.png")]) == 2  # miniature
    assert _error_line(capsys) == "--true-cfg is FLUX's option; other bases take --guidance"
    assert not list(tmp_path.iterdir())


def test_a_text_file_as_face_embedding_says_it_is_no_embedding_file(tiny_base, tmp_path, capsys, monkeypatch) -> None:
    """torch reads "hello" as a pickle and fails with KeyError(101): the line says what the file is not instead,
    before any model loads."""
    _no_loading(monkeypatch)
    (tmp_path / "h.pt").write_text("hello\n")
    (tmp_path / "h.npy").write_text("hello\n")
    for name, why in (("h.pt", "not a torch file (text, an image or another format?), or truncated"),
                      ("h.npy", "not a .npy file (no NumPy header), or empty")):
        code = _run(tiny_base, "--adapter", str(tiny_base / "faceid.bin"), "--face-embed", str(tmp_path / name),
                    out=tmp_path / "o.png")
        assert code == 2
        assert _error_line(capsys) == f"{tmp_path / name} is not a readable face embedding (.npy or tensor .pt): {why}"
    assert not (tmp_path / "o.png").exists()


def test_every_size_the_miniature_suggests_generates(tmp_path, capsys) -> None:
    """The bundled base's VAE downscales by 4, but diffusers' UNet pipelines take only multiples of 8: a size the
    error suggests must be one the pipeline takes (68, a multiple of 4, made the pipeline raise)."""
    out = tmp_path / "o.png"
    assert main(["generate", "--prompt", "a red circle", "--width", "68", "--steps", "1", "--out", str(out)]) == 2
    assert _error_line(capsys) == "--width 68 does not fit this base model: sizes are multiples of 8; try 64 or 72"
    assert not out.exists()
    for width in (64, 72):
        assert main(["generate", "--prompt", "a red circle", "--width", str(width), "--steps", "1", "--out",
                     str(out)]) == 0
        with Image.open(out) as image:
            assert image.size[0] == width


# Each flag QA found silently dropped (or refused for another reason) when a generation has no reference, with a
# value other than its default; none of them has anything to act on without --image, --embeds or --face-embed.
IMAGE_SIDE = {"--negative-image": ["{root}/ref.png"], "--start": ["0.2"], "--end": ["0.8"], "--preset": ["ease in"],
              "--embeds-scaling": ["kv"], "--crop": ["top"], "--tiles": [], "--scale": ["0.5"],
              "--mask": ["{root}/ref.png"], "--image-weight": ["0.5"], "--combine": ["add"], "--noise": ["fade:0.5"],
              "--content-subtract": ["a dog"]}


@pytest.mark.parametrize("flag", list(IMAGE_SIDE))
def test_an_image_side_flag_without_a_reference_is_refused_before_loading(tiny_base, tmp_path, capsys, monkeypatch,
                                                                          flag) -> None:
    _no_loading(monkeypatch)
    values = [v.format(root=tiny_base) for v in IMAGE_SIDE[flag]]
    code = main(["generate", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "base.bin"), "--prompt",
                 "a cat", flag, *values, "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert _error_line(capsys) == (f"{flag} changes the image prompt, and no --image, --embeds or --face-embed was "
                                   "given")
    assert not list(tmp_path.iterdir())


def test_image_side_flags_at_their_defaults_or_with_a_reference_pass_the_checks(tiny_base) -> None:
    """The defaults written out change nothing, so a text-only generation takes them; with --image the changed
    flags act on it."""
    from ipadapter.cli.generate import check_args
    from ipadapter.cli.main import build_parser

    defaults = ["--scale", "1", "--start", "0", "--end", "1", "--embeds-scaling", "v", "--crop", "center", "--combine",
                "concat"]
    check_args(build_parser().parse_args(["generate", "--prompt", "a cat", *defaults]))
    changed = ["--scale", "0.5", "--start", "0.2", "--crop", "top", "--negative-image", str(tiny_base / "ref.png"),
               "--face-embed", str(tiny_base / "face.npy")]
    check_args(build_parser().parse_args(["generate", "--image", str(tiny_base / "ref.png"), *changed]))


@pytest.mark.parametrize("flag", ["--steps", "--num-images"])
def test_a_count_below_one_names_its_flag_and_value(tiny_base, tmp_path, capsys, monkeypatch, flag) -> None:
    _no_loading(monkeypatch)
    code = main(["generate", "--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "base.bin"), "--image",
                 str(tiny_base / "ref.png"), flag, "0", "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert _error_line(capsys) == f"{flag} must be at least 1, got 0"
    assert not list(tmp_path.iterdir())


def test_a_face_embedding_alone_prompts_the_faceid_adapter_that_reads_only_it(tiny_base, tmp_path, capsys) -> None:
    """Basic FaceID reads the ID embedding and nothing else, so `--face-embed` needs no `--image`: the image is the
    one made with a reference image beside the same embedding (which that variant never reads), and not the
    text-only one. The variants that read the face image too, and the others, say so in one line."""
    common = ["generate", "--base", str(tiny_base / "pipe"), "--prompt", "a cat", "--steps", "2", "--width", "32",
              "--height", "32", "--face-embed", str(tiny_base / "face.npy")]
    faceid = ["--adapter", str(tiny_base / "faceid.bin")]
    assert main([*common, *faceid, "--out", str(tmp_path / "alone.png")]) == 0
    assert main([*common, *faceid, "--image", str(tiny_base / "ref.png"), "--out", str(tmp_path / "with.png")]) == 0
    plain = common[:common.index("--face-embed")]
    assert main([*plain, *faceid, "--out", str(tmp_path / "text.png")]) == 0
    alone, with_image, text = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("alone", "with", "text"))
    assert np.array_equal(alone, with_image) and not np.array_equal(alone, text)
    capsys.readouterr()
    for family, message in (("faceid-plus", "--face-embed alone prompts the FaceID adapter that reads only the ID "
                                             "embedding; faceid-plus also needs the face image (--image)"),
                            ("base", "--face-embed is a FaceID adapter's ID embedding; this adapter (base) reads the "
                                     "reference image (--image)")):
        assert main([*common, "--adapter", str(tiny_base / f"{family}.bin"), "--out", str(tmp_path / "x.png")]) == 2
        assert _error_line(capsys) == message
    assert not (tmp_path / "x.png").exists()


CACHED = {"ipadapter-tests/tiny-pipe": "pipe", "ipadapter-tests/tiny-encoder": "pipe/image_encoder",
          "ipadapter-tests/tiny-adapters": "adapters"}


@pytest.fixture
def online_hub_cache(tiny_base, tmp_path, monkeypatch) -> list[str]:
    """The tiny models in a Hugging Face cache as huggingface_hub keeps downloads (`CACHED`), the Hub unreachable
    (`factories.hub_without_network`); returns the URLs of the requests sent."""
    import shutil

    (tiny_base / "adapters" / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_base / "base.bin", tiny_base / "adapters" / "models" / "base.bin")
    for repo, folder in CACHED.items():
        factories.write_hub_cache(tmp_path / "hub", repo, tiny_base / folder)
    return factories.hub_without_network(monkeypatch, tmp_path / "hub")


HUB_FLAGS = ["--base", "ipadapter-tests/tiny-pipe", "--adapter", "ipadapter-tests/tiny-adapters", "--subfolder",
             "models", "--weight-name", "base.bin", "--image-encoder", "ipadapter-tests/tiny-encoder"]


def test_hub_ids_in_the_local_cache_generate_without_a_request(tiny_base, tmp_path, online_hub_cache) -> None:
    """Online (HF_HUB_OFFLINE off), cached ids are read from the cache alone: no request about any of them (the one
    huggingface_hub may send once a process for its own telemetry, /api/agent-harnesses, names no model)."""
    assert main(["generate", *HUB_FLAGS, "--image", str(tiny_base / "ref.png"), "--out", str(tmp_path / "o.png"),
                 "--steps", "2", "--width", "32", "--height", "32"]) == 0
    assert Image.open(tmp_path / "o.png").size == (32, 32)
    assert [url for url in online_hub_cache if "ipadapter-tests" in url] == []


@pytest.mark.parametrize(("flag", "named"), [
    ("--base", "the base model ipadapter-tests/not-cached"),
    ("--adapter", "the adapter ipadapter-tests/not-cached/models/base.bin"),
    ("--image-encoder", "the image encoder ipadapter-tests/not-cached"),
])
def test_an_uncached_hub_id_without_network_is_one_line_after_one_request(tiny_base, tmp_path, capsys,
                                                                         online_hub_cache, flag, named) -> None:
    """The Hub is asked once, without retries (huggingface_hub's own downloads retry for about 50 s, logging every
    try): the one line names the id, the download command and the way out."""
    flags = list(HUB_FLAGS)
    flags[flags.index(flag) + 1] = "ipadapter-tests/not-cached"
    assert main(["generate", *flags, "--image", str(tiny_base / "ref.png"), "--out", str(tmp_path / "o.png"),
                 "--steps", "2", "--width", "32", "--height", "32"]) == 2
    message = _error_line(capsys)
    assert message.startswith(f"{named} is not in the local Hugging Face cache and the Hub cannot be reached; "
                              "download it once with network access (hf download ipadapter-tests/not-cached")
    assert [url for url in online_hub_cache if "ipadapter-tests" in url] == [
        "https://huggingface.co/api/models/ipadapter-tests/not-cached"]
    assert not (tmp_path / "o.png").exists()


def test_steps_and_guidance_left_out_are_the_miniatures_named_in_help_or_the_pipelines_own(tiny_base, monkeypatch,
                                                                                          tmp_path) -> None:
    """Without `--steps`/`--guidance` the miniature runs what `--help` names, another base its pipeline's defaults
    (None); a manifest's jobs that give neither take the same."""
    import re

    from ipadapter.cli.main import build_parser
    from ipadapter.prompter import ImagePrompter

    commands = build_parser()._subparsers._group_actions[0].choices

    def named(flag: str) -> float:
        help_text = next(a.help for a in commands["generate"]._actions if flag in a.option_strings)
        return float(re.search(r"default: ([\d.]+) miniature", help_text).group(1))

    seen = []

    def generate(self, images, **kwargs):
        seen.append((kwargs["steps"], kwargs["guidance"]))
        rows = len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1  # a manifest's batch: a list
        return [Image.new("RGB", (8, 8))] * (rows * kwargs["num_images"])

    monkeypatch.setattr(ImagePrompter, "generate", generate)
    ref = str(tiny_base / "ref.png")
    tiny = ["--base", str(tiny_base / "pipe"), "--adapter", str(tiny_base / "base.bin")]
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"image": ref}) + "\n")
    assert main(["generate", "--image", ref, "--out", str(tmp_path / "a.png")]) == 0
    assert main(["generate", *tiny, "--image", ref, "--out", str(tmp_path / "b.png")]) == 0
    for run, model in (("miniature", []), ("tiny", tiny)):
        assert main(["generate", *model, "--manifest", str(tmp_path / "jobs.jsonl"), "--out-dir",
                     str(tmp_path / run)]) == 0
    assert seen == [(named("--steps"), named("--guidance")), (None, None)] * 2


_ALL_MODEL_FLAGS = ["--base", "B", "--adapter", "A", "--subfolder", "S", "--weight-name", "W", "--image-encoder", "E",
                    "--device", "cpu", "--dtype", "bfloat16", "--scheduler", "DDIMScheduler", "--vae", "V"]


@pytest.mark.parametrize("argv, given", [
    (["generate", *_ALL_MODEL_FLAGS, "--base-lora", "L", "--base-lora-scale", "0.5", "--controlnet", "C",
      "--cache-kv"],
     dict(base="B", adapters=["A"], subfolders=["S"], weight_names=["W"], image_encoder="E", device="cpu",
          dtype="bfloat16", scheduler="DDIMScheduler", vae="V", base_lora="L", base_lora_scale=0.5, controlnet="C",
          cache_kv=True)),
    (["generate"], dict(adapters=(), subfolders=(), weight_names=())),
    (["encode", *_ALL_MODEL_FLAGS, "--image", "r.png", "--out", "e.safetensors"],
     dict(base="B", adapters=["A"], subfolders=["S"], weight_names=["W"], image_encoder="E", device="cpu",
          dtype="bfloat16", scheduler="DDIMScheduler", vae="V")),
    (["app"], dict(adapters=(), subfolders=(), weight_names=(), cache_kv=True)),
    (["app", "--no-cache-kv"], dict(adapters=(), subfolders=(), weight_names=())),
], ids=["generate, every flag", "generate, none", "encode", "app", "app --no-cache-kv"])
def test_each_model_flag_reaches_load_prompter_and_the_rest_are_its_defaults(monkeypatch, argv, given) -> None:
    """Every command that loads passes its model flags on by name; what a command has no flag for (encode: no LoRA,
    ControlNet or K'/V' cache) is load_prompter's own default, as the Python API's user gets it."""
    import inspect

    from ipadapter import loading
    from ipadapter.cli.generate import load_from_flags
    from ipadapter.cli.main import build_parser

    defaults = {name: p.default for name, p in inspect.signature(loading.load_prompter).parameters.items()}
    seen = {}
    monkeypatch.setattr(loading, "check_model_args", lambda args: None)  # the paths are names only here
    monkeypatch.setattr(loading, "load_prompter", lambda **kwargs: seen.update(kwargs))
    load_from_flags(build_parser().parse_args(argv))
    assert seen == {**defaults, **given}


_R = "{root}/ref.png"
# Each refusal of `check_args`, by its whole sentence: what is wrong with the flags, before a file is read.
CHECKS = {
    "no images": (["--num-images", "0", "--prompt", "x"], "--num-images must be at least 1, got 0"),
    "no steps": (["--steps", "0", "--prompt", "x"], "--steps must be at least 1, got 0"),
    "nothing to generate from": ([], "give --image (or --embeds, or --face-embed for FaceID), --prompt, or both"),
    "out-dir": (["--prompt", "x", "--out-dir", "d"],
                "--out-dir is the folder of a --manifest run; one generation writes --out"),
    "base LoRA scale": (["--prompt", "x", "--base-lora-scale", "0.5"],
                        "--base-lora-scale changes what --base-lora does, and no --base-lora was given"),
    "control scale": (["--prompt", "x", "--control-scale", "0.5"],
                      "--control-scale changes what --controlnet does, and no --controlnet was given"),
    "three adapters": (["--prompt", "x", "--adapter", "a", "--adapter", "b", "--adapter", "c"],
                       "--adapter given 3 times: one generate prompts one adapter (--image cannot say which its images "
                       "are for); to use several, give a --manifest whose jobs each name theirs (\"adapter\": \"0\", "
                       "\"1\", ... in --adapter order), or the Python API"),
    "negative seed": (["--prompt", "x", "--seed", "-1"], "--seed must be a whole number from 0 to 2**64-1, got -1"),
    "negative scale": (["--image", _R, "--scale", "-1"], "--scale must not be negative, got -1"),
    "negative guidance": (["--prompt", "x", "--guidance", "-0.5"], "--guidance must not be negative, got -0.5"),
    "negative true CFG": (["--prompt", "x", "--true-cfg", "-2"], "--true-cfg must not be negative, got -2"),
    "negative shortcut": (["--prompt", "x", "--s-scale", "-1"], "--s-scale must not be negative, got -1"),
    "negative control": (["--prompt", "x", "--controlnet", "c", "--control-scale", "-1"],
                         "--control-scale must not be negative, got -1"),
    "negative content": (["--image", _R, "--content-subtract", "a", "--content-strength", "-1"],
                         "--content-strength must not be negative, got -1"),
    "embeds and image": (["--image", _R, "--embeds", "e.safetensors"],
                         "give --image or --embeds, not both (--embeds already holds the images' features)"),
    "embeds tiled": (["--embeds", "e.safetensors", "--tiles"],
                     "--tiles, --mask and --crop act on --image; saved --embeds cannot be re-cropped or tiled"),
    "embeds masked": (["--embeds", "e.safetensors", "--mask", _R],
                      "--tiles, --mask and --crop act on --image; saved --embeds cannot be re-cropped or tiled"),
    "embeds cropped": (["--embeds", "e.safetensors", "--crop", "top"],
                       "--tiles, --mask and --crop act on --image; saved --embeds cannot be re-cropped or tiled"),
    "embeds with noise": (["--embeds", "e.safetensors", "--noise", "fade:0.5"],
                          "--noise makes its negative from --image's pixels, which saved --embeds do not hold; give "
                          "--negative-image instead"),
    "combine one image": (["--image", _R, "--combine", "add"],
                          "--combine add merges several --image references; give at least two"),
    "weights per image": (["--image", _R, "--image", _R, "--image-weight", "1"],
                          "got 1 --image-weight for 2 --image; give one per image"),
    "negative image and noise": (["--image", _R, "--negative-image", _R, "--noise", "fade:0.5"],
                                 "give --negative-image or --noise, not both (each is the negative reference)"),
    "text model alone": (["--image", _R, "--content-text-encoder", "t"],
                         "--content-text-encoder is the text model of --content-subtract; give both"),
    "text model missing": (["--image", _R, "--content-subtract", "a", "--content-text-encoder", "./nope"],
                           "--content-text-encoder not found: ./nope (no such file or folder; a Hub model id has the "
                           "form owner/name)"),
    "embeds missing": (["--embeds", "./nope.safetensors"], "embeddings file not found: ./nope.safetensors"),
    "face embedding missing": (["--face-embed", "./nope.npy"], "face embedding not found: ./nope.npy"),
}


@pytest.mark.parametrize("case", list(CHECKS))
def test_each_flag_mistake_is_its_own_sentence(tiny_base, case) -> None:
    from ipadapter.cli.generate import check_args
    from ipadapter.cli.main import build_parser

    flags, sentence = CHECKS[case]
    with pytest.raises(IPAdapterError) as raised:
        check_args(build_parser().parse_args(["generate", *[f.format(root=tiny_base) for f in flags]]))
    assert str(raised.value) == sentence


@pytest.mark.parametrize("flags", [
    ["--prompt", "x", "--num-images", "1", "--steps", "1", "--seed", "0", "--adapter", "a"],
    ["--image", _R, "--scale", "0", "--guidance", "0", "--s-scale", "0", "--true-cfg", "0", "--content-subtract", "a",
     "--content-strength", "0", "--content-text-encoder", "{root}/pipe/text_encoder"],
    ["--image", _R, "--image", _R, "--combine", "add", "--image-weight", "1", "--image-weight", "2"],
    ["--embeds", "{root}/ref.png", "--combine", "add"],  # saved embeddings may hold several references
    ["--image", _R, "--negative-image", _R, "--tiles", "--crop", "top", "--mask", _R],
    ["--image", _R, "--noise", "fade:0.5", "--controlnet", "c", "--control-scale", "0", "--content-subtract", "a",
     "--content-text-encoder", "h94/IP-Adapter/models/text_encoder"],  # a Hub repository's subfolder
    ["--face-embed", "{root}/face.npy", "--base-lora", "l", "--base-lora-scale", "0.5"],
], ids=["counts of one", "zero scales", "two weighted images", "combined embeds", "image options", "noise",
        "face embedding"])
def test_flags_at_each_limit_pass_the_checks(tiny_base, flags) -> None:
    from ipadapter.cli.generate import check_args
    from ipadapter.cli.main import build_parser

    check_args(build_parser().parse_args(["generate", *[f.format(root=tiny_base) for f in flags]]))


def test_embeds_of_the_other_kind_are_refused_by_kind(tiny_base, tmp_path, capsys) -> None:
    """A base adapter's file holds the global embedding; Plus reads patch tokens."""
    emb = tmp_path / "ref.safetensors"
    pipe = ["--base", str(tiny_base / "pipe")]
    assert main(["encode", *pipe, "--adapter", str(tiny_base / "base.bin"), "--image", str(tiny_base / "ref.png"),
                 "--out", str(emb)]) == 0
    capsys.readouterr()
    assert main(["generate", *pipe, "--adapter", str(tiny_base / "plus.bin"), "--embeds", str(emb), "--out",
                 str(tmp_path / "o.png")]) == 2
    assert _error_line(capsys) == f"{emb} holds global features but this adapter needs patch features"


def test_generate_prints_each_image_it_wrote(tiny_base, tmp_path, capsys) -> None:
    assert _run(tiny_base, "--adapter", str(tiny_base / "base.bin"), "--num-images", "2", out=tmp_path / "x.png") == 0
    assert capsys.readouterr().out == f"{tmp_path / 'x-0.png'}\n{tmp_path / 'x-1.png'}\n"


def test_a_failed_write_says_why_and_that_no_image_was_written(tiny_base, tmp_path, capsys, monkeypatch) -> None:
    import errno

    from ipadapter import atomic

    def full(images, paths):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "save_pngs", full)
    out = tmp_path / "x.png"
    assert _run(tiny_base, "--adapter", str(tiny_base / "base.bin"), out=out) == 2
    last = capsys.readouterr().err.split("\r")[-1]  # after the progress bar's last redraw
    assert last == f"ipadapter: error: could not write {out} (No space left on device); no image was written\n"


def test_a_face_embedding_of_another_width_is_refused_by_the_adapters_width(tiny_base, tmp_path, capsys) -> None:
    """Before loading, a face file need only be readable and finite (any number of values); the adapter then says
    how many values per face it reads (16 for the tiny FaceID adapter)."""
    np.save(tmp_path / "three.npy", np.ones(3, np.float32))
    assert _run(tiny_base, "--adapter", str(tiny_base / "faceid.bin"), "--face-embed", str(tmp_path / "three.npy"),
                out=tmp_path / "o.png") == 2
    assert _error_line(capsys) == "a face embedding must hold 16 values per face, got torch.Size([3])"


def test_content_words_go_to_the_paired_text_model_search_with_the_loaded_pipeline(tiny_base, tmp_path,
                                                                                     monkeypatch) -> None:
    """The search (`paired_text`) looks in the base pipeline's own text models first, then beside the encoder: generate
    hands it the loaded pipeline and encoder, the words and --content-text-encoder."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ipadapter import paired_text
    from ipadapter.encoders import ImageEncoder

    seen = []

    def embed(pipe, encoder, text, source=None):
        seen.append((pipe, encoder, text, source))
        return torch.zeros(1, encoder.global_dim)

    monkeypatch.setattr(paired_text, "paired_text_embeds", embed)
    assert _run(tiny_base, "--adapter", str(tiny_base / "base.bin"), "--content-subtract", "a red",
                "--content-text-encoder", str(tiny_base / "pipe" / "text_encoder"), out=tmp_path / "o.png") == 0
    [(pipe, encoder, text, source)] = seen
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(encoder, ImageEncoder)
    assert (text, source) == ("a red", str(tiny_base / "pipe" / "text_encoder"))


def _generate_parser():
    from ipadapter.cli.main import _subcommands, build_parser

    return next(p for p in _subcommands(build_parser()) if p.prog.endswith(" generate"))


def test_generate_help_states_each_default_the_parser_has() -> None:
    """A flag with a default other than nothing says it in its help, as argparse will apply it."""
    parser = _generate_parser()
    stated = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings
              and not (a.default is None or a.default is False or a.default in ([], "", "==SUPPRESS=="))}
    assert len(stated) == 15
    for flag, text in stated.items():
        assert f"(default {parser.get_default(flag.lstrip('-').replace('-', '_'))}" in text, (flag, text)


@pytest.mark.parametrize("command, state", [("generate", "off, projected at every step as diffusers does"),
                                            ("app", "on")])
def test_the_cache_kv_help_states_the_commands_own_default(command, state) -> None:
    from ipadapter.cli.main import _subcommands, build_parser

    parser = next(p for p in _subcommands(build_parser()) if p.prog.endswith(f" {command}"))
    action = next(a for a in parser._actions if "--cache-kv" in a.option_strings)
    assert action.default is (state == "on")
    assert f"(default: {state}); the images are the same" in action.help


def test_generate_defaults_are_the_python_apis() -> None:
    """What a flag left out means is what the library does with the parameter left out: `ImagePrompter.generate`,
    `GenerationRequest`, `load_prompter`, and diffusers' ControlNet pipeline for --control-scale."""
    import dataclasses
    import inspect

    from diffusers import StableDiffusionControlNetPipeline

    from ipadapter.loading import load_prompter
    from ipadapter.prompter import ImagePrompter
    from ipadapter.request import GenerationRequest

    def signature(function) -> dict:
        return {name: p.default for name, p in inspect.signature(function).parameters.items()}

    library = {f.name: f.default for f in dataclasses.fields(GenerationRequest) if f.default is not dataclasses.MISSING}
    library |= {k: v for k, v in signature(ImagePrompter.generate).items() if k in ("prompt", "negative_prompt",
                                                                                      "num_images")}
    library["base_lora_scale"] = signature(load_prompter)["base_lora_scale"]
    library["control_scale"] = signature(StableDiffusionControlNetPipeline.__call__)["controlnet_conditioning_scale"]
    parser = _generate_parser()
    compared = {name: parser.get_default(name) for name in library if parser.get_default(name) is not None}
    assert set(compared) >= {"prompt", "negative_prompt", "num_images", "scale", "start", "end", "combine",
                             "content_strength", "embeds_scaling", "crop", "tiles", "lora_scale", "seed",
                             "base_lora_scale", "control_scale"}
    assert compared == {name: library[name] for name in compared}


def test_every_example_in_generate_help_is_a_command_it_takes(capsys) -> None:
    """The examples are shown as written (line breaks kept) and each parses."""
    import shlex

    from ipadapter.cli.generate import EXAMPLES
    from ipadapter.cli.main import build_parser

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert capsys.readouterr().out.endswith("\n\n" + EXAMPLES)
    commands = EXAMPLES.removeprefix("examples:\n").replace("\\\n", " ").splitlines()
    assert len(commands) == 10
    for line in commands:
        words = shlex.split(line.split("#")[0])
        argv = words[words.index("generate"):] if words[0] == "accelerate" else words[1:]
        assert argv[0] == "generate"
        build_parser().parse_args(argv)


def test_the_dtype_choices_are_the_dtypes_load_prompter_takes() -> None:
    from ipadapter.loading import DTYPES

    action = next(a for a in _generate_parser()._actions if "--dtype" in a.option_strings)
    assert action.choices == list(DTYPES)
