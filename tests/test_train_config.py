"""TrainConfig (files, flags, validation), the adapter shapes per variant, and the CLI's one-line errors."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ipadapter import IPAdapter, IPAdapterError
from ipadapter.cli.main import main
from ipadapter.train.config import TrainConfig
from ipadapter.train.trainer import adapter_config_for
from tests import factories

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_yaml_and_toml_load_and_flags_override(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("base: b\nvariant: plus\nlearning_rate: 2e-4\nvalidation_prompts: [a, b]\n")
    (tmp_path / "c.toml").write_text('base = "b"\nvariant = "plus"\nlearning-rate = 2e-4\ngradient_checkpointing = true\n')
    y = TrainConfig.load(tmp_path / "c.yaml", {"batch_size": 2, "variant": None})
    t = TrainConfig.load(tmp_path / "c.toml")
    assert (y.variant, y.learning_rate, y.batch_size, y.validation_prompts) == ("plus", 2e-4, 2, ["a", "b"])
    assert (t.learning_rate, t.gradient_checkpointing) == (2e-4, True)
    assert TrainConfig().weight_decay == 0.01 and TrainConfig().learning_rate == 1e-4  # the paper's recipe


@pytest.mark.parametrize("name, content, message", [
    ("c.json", b'{"base": "b", "batch_size": 3}', None),
    ("c.yml", b"batch_size: 3", None),
    ("c.yaml", b"batch_size: many", r"c\.yaml: batch_size must be int, not 'many'"),
    ("c.ini", b"base = b", "must end in .yaml, .yml, .json or .toml"),
    ("c.yaml", b"base: [unclosed", "cannot parse"),
    ("c.toml", b"base = ", "cannot parse"),
    ("c.yaml", b"- a list\n- of fields", "must hold a mapping of field: value, not a list"),
    ("c.yaml", "base: caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    ("missing.yaml", None, "config file not found"),
])
def test_config_files_load_or_fail_with_a_sentence(tmp_path, name, content, message) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    if message is None:
        assert TrainConfig.load(tmp_path / name).batch_size == 3
        return
    with pytest.raises(IPAdapterError, match=message):
        TrainConfig.load(tmp_path / name)


def test_a_bad_flag_value_is_said_to_come_from_the_flags(tmp_path) -> None:
    """Named by the flag, with a config file or without one (the file's name was given to a flag's value)."""
    (tmp_path / "c.yaml").write_text("batch_size: 2\n")
    for path in ("", tmp_path / "c.yaml"):
        with pytest.raises(IPAdapterError, match="^--batch-size must be int, not 'x'$"):
            TrainConfig.load(path, {"batch_size": "x"})


@pytest.mark.parametrize(("file", "flags", "message"), [
    ("", ["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    ("max_steps: 0\n", [], "max_steps must be at least 1, got 0"),
    ("max_steps: 5\n", ["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    ("max_steps: 0\n", ["--batch-size", "2"], "max_steps must be at least 1, got 0"),
    ("", ["--learning-rate", "0"], "--learning-rate must be > 0, got 0.0"),
    ("", ["--drop-image", "1.5"], "--drop-image must be a probability in [0, 1], got 1.5"),
    ("ema_decay: 1.0\n", [], "ema_decay must be in [0, 1), got 1.0"),
    ("", ["--stages", "512:0"], "--stages must be RESOLUTION:STEPS with positive integers (e.g. 512:8000), not "
                                "'512:0'"),
    ("drop_image: 0.5\n", ["--drop-text", "0.6"], "drop_image + --drop-text + drop_both must be <= 1, got 1.15"),
    ("cache: c\n", ["--buckets"], "--buckets cannot be used with a feature cache (its rows have one size)"),
])
def test_a_bad_value_is_named_as_the_user_gave_it(tmp_path, capsys, file, flags, message) -> None:
    """A value from a flag is named by the flag, one from the config file by its field, in one line each."""
    config = []
    if file:
        (tmp_path / "c.yaml").write_text(file)
        config = ["--config", str(tmp_path / "c.yaml")]
    assert main(["train", *config, *flags]) == 2
    assert capsys.readouterr().err == f"ipadapter: error: {message}\n"


@pytest.mark.parametrize("values, message", [
    ({"variant": "huge"}, "unknown variant 'huge'"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number >= 0, got nan"),
    ({"drop_image": 1.5}, "drop_image must be a probability in \\[0, 1\\], got 1.5"),
    ({"drop_image": 0.5, "drop_text": 0.5, "drop_both": 0.5}, "must be <= 1, got 1.5"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of no, fp16, bf16, not 'fp8'"),
    ({"ema_decay": 1.0}, "ema_decay must be in \\[0, 1\\), got 1.0"),
    ({"num_workers": -1}, "num_workers must not be negative, got -1"),
    ({"max_steps": "many"}, "max_steps must be int, not 'many'"),
    ({"colour": 1}, "unknown field 'colour'"),
    ({"optimizer": "sgd"}, "optimizer must be one of adamw, adamw8bit, not 'sgd'"),
    ({"references": 0}, "references must be at least 1, got 0"),
    ({"validate_every": 10, "cache": "c"}, "validation needs --validation-images or --data"),
    ({"stages": ["512:0"]}, "stages must be RESOLUTION:STEPS with positive integers .*not '512:0'"),
    ({"stages": ["0:100"]}, "not '0:100'"),
    ({"stages": ["512:100:5"]}, "not '512:100:5'"),
    ({"buckets": "maybe"}, "buckets must be bool, not 'maybe'"),
    ({"max_steps": 2.5}, "max_steps must be int, not 2.5"),
    ({"learning_rate": "fast"}, "learning_rate must be float, not 'fast'"),
    ({"colour": 1}, "valid fields: base, image_encoder, data, "),
])
def test_validation_names_the_bad_value(values, message) -> None:
    with pytest.raises(IPAdapterError, match=message):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize("values, expected", [
    ({"buckets": "yes"}, {"buckets": True}), ({"buckets": "No"}, {"buckets": False}),
    ({"buckets": "TRUE"}, {"buckets": True}), ({"buckets": "false"}, {"buckets": False}),
    ({"buckets": "1"}, {"buckets": True}), ({"buckets": "0"}, {"buckets": False}), ({"buckets": 1}, {"buckets": True}),
    ({"max_steps": 2.0}, {"max_steps": 2}), ({"max_steps": "7"}, {"max_steps": 7}),
    ({"learning_rate": "3e-4"}, {"learning_rate": 3e-4}),
    ({"stages": "512:10"}, {"stages": ["512:10"]}), ({"validation_prompts": [1, "a"]}, {"validation_prompts": ["1", "a"]}),
    ({"base": None, "image_encoder": 7}, {"base": "", "image_encoder": "7"}),
])
def test_values_from_a_file_take_their_fields_type(values, expected) -> None:
    """What YAML/TOML/JSON give (quoted booleans, whole floats, one string for a list, null) becomes the field's
    type, with the field types and spellings of YAML 1.1's booleans that people write."""
    config = TrainConfig.from_dict(values)
    got = {name: getattr(config, name) for name in expected}
    assert got == expected and all(type(got[n]) is type(v) for n, v in expected.items())


@pytest.mark.parametrize("values, message", [
    ({}, "no base model: give --base"),
    ({"base": "./nowhere"}, "--base not found: ./nowhere"),
    ({"base": "{base}", "image_encoder": "./nowhere"}, "--image-encoder not found: ./nowhere"),
    ({"base": "{base}", "image_encoder": "{encoder}"}, "no training data: give --data"),
    ({"base": "{base}", "data": "d.jsonl"}, "variant 'base' needs --image-encoder"),
    ({"base": "{base}", "data": "d.jsonl", "image_encoder": "{encoder}"}, None),
    ({"base": "{base}", "image_encoder": "{encoder}", "cache": "{cache}"}, None),  # a finished cache needs no data
    ({"base": "{base}", "image_encoder": "h94/IP-Adapter/models/image_encoder", "data": "d.jsonl"}, None),  # Hub subfolder
])
def test_a_run_names_what_it_still_lacks(tmp_path, values, message) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "encoder").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.json").write_text("{}")
    config = TrainConfig.from_dict({k: v.format(**{n: str(tmp_path / n) for n in ("base", "encoder", "cache")})
                                    for k, v in values.items()})
    if message is None:
        config.check_ready()
        return
    with pytest.raises(IPAdapterError, match=message):
        config.check_ready()


def test_adapter_shapes_per_variant_table() -> None:
    """SD 1.5 + ViT-H widths give the published shapes (docs/checkpoints.md §1)."""
    vit_h = dict(embed_dim=1024, hidden_dim=1280, patch_tokens=257)
    table = {
        ("base", 768): ("linear", 4, 0, 0, 0),
        ("plus", 768): ("resampler", 16, 768, 12, 0),
        ("plus", 2048): ("resampler", 16, 1280, 20, 0),  # SDXL plus vit-h: dim 1280, 20 heads
        ("full", 768): ("token_mlp", 257, 0, 0, 0),
        ("faceid", 768): ("faceid", 4, 0, 0, 128),
        ("faceid-plusv2", 768): ("faceid_plus", 4, 768, 12, 128),
    }
    for (variant, cross), (head, tokens, dim, heads, rank) in table.items():
        c = adapter_config_for(variant, cross_dim=cross, **vit_h)
        assert (c.projection.head, c.projection.tokens, c.projection.dim, c.projection.heads, c.lora_rank) == \
            (head, tokens, dim, heads, rank), variant
    assert adapter_config_for("faceid", cross_dim=768).projection.hidden_dim == 1024


def test_sd15_base_adapter_has_the_papers_22m_trainable_parameters() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD 1.5's real UNet config, no memory
        unet = UNet2DConditionModel(cross_attention_dim=768)
        adapter = IPAdapter.for_unet(unet, adapter_config_for("base", cross_dim=768, embed_dim=1024))
    assert sum(p.numel() for p in adapter.parameters()) == 22_319_616


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return factories.write_base(root / "base"), factories.write_image_encoder(root / "enc"), factories.write_images(root / "data", 3)


@pytest.mark.parametrize("extra, message", [
    (["--resolution", "18"], "--resolution 18 does not fit this base model: it must be a multiple of 4"),
    (["--data", "{empty}"], "is empty: no training samples"),
    (["--data", "{wrong}"], "entry 1 has no 'text' field"),
    (["--data", "{shards}"], "no tar shards matched"),
    (["--variant", "faceid"], "has no 'id_embed_file' field"),
    (["--base", "{missing}"], "not found"),
    (["--learning-rate", "-1"], "--learning-rate must be a finite number >= 0, got -1.0"),
])
def test_cli_bad_input_is_one_line(base_folder, tmp_path, capsys, extra, message) -> None:
    base, encoder, data = base_folder
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "wrong.jsonl").write_text('{"image_file": "a.png", "caption": "x"}\n')
    names = {"{empty}": tmp_path / "empty.jsonl", "{wrong}": tmp_path / "wrong.jsonl",
             "{shards}": tmp_path / "s-{000..009}.tar", "{missing}": tmp_path / "nowhere"}
    extra = [str(names.get(e, e)) for e in extra]
    argv = ["train", "--base", str(base), "--image-encoder", str(encoder), "--data", str(data), "--output",
            str(tmp_path / "out"), "--resolution", "16", "--max-steps", "1", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ipadapter: error: ") and message in err[0], err


# The tiny base halves in its VAE and again in its UNet: a resolution must be a multiple of 4, 18 is not.
UNFIT = "18 does not fit this base model: it must be a multiple of 4 (VAE downscale × UNet downscale); try 16 or 20"


@pytest.mark.parametrize("flags, file, message", [
    (["--resolution", "18"], "", f"--resolution {UNFIT}"),
    ([], "resolution: 18\n", f"resolution {UNFIT}"),
    (["--resolution", "18"], "resolution: 16\n", f"--resolution {UNFIT}"),
    (["--stages", "18:1"], "", f"--stages entry 18:1: resolution {UNFIT}"),
    ([], "stages: ['18:1']\n", f"stages entry 18:1: resolution {UNFIT}"),
])
def test_cli_names_an_unfit_resolution_as_the_user_gave_it(base_folder, tmp_path, capsys, flags, file,
                                                           message) -> None:
    """The base model refuses the resolution only once it is read: the one line calls the value by the flag typed, or
    by the config file's key, and a stage's resolution by its `stages` entry."""
    base, encoder, data = base_folder
    argv = ["train", "--base", str(base), "--image-encoder", str(encoder), "--data", str(data), "--output",
            str(tmp_path / "out"), "--max-steps", "1", "--num-workers", "0", *flags]
    if file:
        (tmp_path / "run.yaml").write_text(file)
        argv += ["--config", str(tmp_path / "run.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ipadapter: error: {message}"]


def test_cli_config_file_with_flag_override_trains(base_folder, tmp_path) -> None:
    base, encoder, data = base_folder
    config = tmp_path / "run.yaml"
    config.write_text(f"base: {base}\nimage_encoder: {encoder}\ndata: {data}\nresolution: 16\nbatch_size: 2\n"
                      f"max_steps: 5\noutput: {tmp_path / 'out'}\n")
    assert main(["train", "--config", str(config), "--max-steps", "1", "--num-workers", "0"]) == 0
    out = tmp_path / "out"
    assert (out / "ip-adapter.safetensors").is_file() and (out / "adapter.ipadapter.safetensors").is_file()
    assert '"max_steps": 1' in (out / "config.json").read_text()
    assert list((out / "logs").rglob("events.out.tfevents*"))  # TensorBoard
    with safe_open(str(out / "adapter.ipadapter.safetensors"), framework="pt") as f:  # where the adapter came from
        meta = f.metadata()
    assert (meta["base"], meta["encoder"], meta["variant"]) == (str(base), str(encoder), "base")


def test_the_bundled_model_trains_by_its_keyword(tmp_path) -> None:
    """`ipadapter train --base miniature` is the bundled pipeline with its own image encoder, as generate reads the
    keyword: the run's config names their folders, and its adapter loads on the bundled UNet."""
    from ipadapter import bundled, load_adapter
    from ipadapter.miniature.world import write_dataset
    from ipadapter.pipelines import load_pipeline

    manifest = write_dataset(tmp_path / "data", 4, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--base", "miniature", "--data", str(manifest), "--variant", "base", "--resolution", "64",
                 "--batch-size", "2", "--max-steps", "1", "--num-workers", "0", "--output", str(out)]) == 0
    config = TrainConfig.load(str(out / "config.json"), {})
    assert (config.base, config.image_encoder) == (str(bundled.pipeline_path()), str(bundled.image_encoder_path()))
    load_adapter(out / "adapter.ipadapter.safetensors", load_pipeline(bundled.pipeline_path()).unet)


def _train_parser():
    from ipadapter.cli.main import _subcommands, build_parser

    return next(p for p in _subcommands(build_parser()) if p.prog == "ipadapter train")


def test_every_config_field_is_a_flag_whose_help_says_what_it_is_and_its_default() -> None:
    from dataclasses import MISSING, fields

    helps = {action.dest: action.help for action in _train_parser()._actions}
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        words, _, stated = helps[f.name].rpartition(" (default: ")
        assert words and stated == f"{default!r})", f.name


def test_adams_defaults_are_torchs() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    defaults = torch.optim.AdamW(params).defaults
    config = TrainConfig()
    assert ((config.adam_beta1, config.adam_beta2), config.adam_epsilon) == (defaults["betas"], defaults["eps"])


@pytest.mark.parametrize("flag, value, kind", [("--max-steps", "1.5", "int"), ("--learning-rate", "fast", "float"),
                                               ("--seed", "x", "int"), ("--drop-image", "half", "float")])
def test_a_number_flag_refuses_another_type_in_argparses_words(capsys, flag, value, kind) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["train", flag, value])
    assert caught.value.code == 2
    assert f"error: argument {flag}: invalid {kind} value: '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, accepted", [
    ("--variant", ("base", "plus", "faceid")), ("--attention", ("decoupled", "concat")),
    ("--mixed-precision", ("no", "fp16", "bf16")), ("--prediction-type", ("", "epsilon", "v_prediction")),
    ("--cache-dtype", ("float16", "bfloat16", "float32")), ("--optimizer", ("adamw", "adamw8bit")),
])
def test_a_choice_flag_takes_its_values_and_refuses_others(capsys, flag, accepted) -> None:
    """Each value a run takes parses; anything else is argparse's one line, before any model is read."""
    parser = _train_parser()
    dest = flag[2:].replace("-", "_")
    for value in accepted:
        assert getattr(parser.parse_args([flag, value]), dest) == value
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "other"])
    assert f"argument {flag}: invalid choice: 'other'" in capsys.readouterr().err


def test_switches_and_lists_leave_the_files_value_unless_given() -> None:
    parser = _train_parser()
    assert parser.parse_args([]).gradient_checkpointing is None and parser.parse_args([]).validation_prompts is None
    assert parser.parse_args(["--gradient-checkpointing"]).gradient_checkpointing is True
    assert parser.parse_args(["--no-gradient-checkpointing"]).gradient_checkpointing is False
    assert parser.parse_args(["--validation-prompts", "a", ""]).validation_prompts == ["a", ""]


def test_the_help_describes_the_command_and_ends_with_its_examples(capsys) -> None:
    from ipadapter.cli.train import DESCRIPTION, EXAMPLES

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert f"\n\n{DESCRIPTION}\n\n" in text and text.endswith("\n\n" + EXAMPLES)
