"""Where the bundled miniature model's weights live: each path when its marker file is there, and otherwise one
sentence whose rebuild commands are commands `ipadapter` itself accepts."""

from __future__ import annotations

import pytest

import ipadapter.bundled as bundled
from ipadapter.cli.main import build_parser
from ipadapter.errors import IPAdapterError

CASES = {  # function: (folder attribute, marker file relative to it, what the message calls it)
    "pipeline_path": ("PIPELINE_DIR", "model_index.json", "pipeline"),
    "image_encoder_path": ("PIPELINE_DIR", "image_encoder/config.json", "pipeline"),
    "judge_path": ("JUDGE_DIR", "classifier.safetensors", "judge"),
    "controlnet_path": ("CONTROLNET_DIR", "config.json", "controlnet"),
    "custom_lora_path": ("CUSTOM_LORA_DIR", "pytorch_lora_weights.safetensors", "custom LoRA"),
}


@pytest.mark.parametrize("function", list(CASES))
def test_a_missing_asset_names_the_file_and_commands_that_rebuild_it(function, tmp_path, monkeypatch) -> None:
    attr, marker, what = CASES[function]
    folder = tmp_path / "assets"
    monkeypatch.setattr(bundled, attr, folder)
    if function == "image_encoder_path":  # the pipeline is there, its encoder is not
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
    with pytest.raises(IPAdapterError) as caught:
        getattr(bundled, function)()
    message = str(caught.value)
    head = f"The miniature {what} is missing ({folder / marker} not found); rebuild it with `"
    assert message.startswith(head) and message.endswith("`.")
    commands = message[len(head):-2].split(" && ")
    assert commands[-1] == "ipadapter miniature export"
    for command in commands:
        words = command.split()
        assert words[0] == "ipadapter"
        build_parser().parse_args(words[1:])  # exits (fails the test) on anything the CLI would refuse


@pytest.mark.parametrize("function", list(CASES))
def test_an_asset_that_is_there_is_its_path(function, tmp_path, monkeypatch) -> None:
    attr, marker, _ = CASES[function]
    monkeypatch.setattr(bundled, attr, tmp_path)
    (tmp_path / marker).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / marker).write_text("{}")
    (tmp_path / "model_index.json").write_text("{}")
    expected = tmp_path / marker if function == "custom_lora_path" else (tmp_path / marker).parent
    assert getattr(bundled, function)() == expected
