"""Commands that need an extra say so in one line when it is missing; the core commands need none of the extras.

A missing package is simulated with `sys.modules[name] = None`, which makes Python (and `importlib.util.find_spec`)
treat it as not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from ipadapter import extras
from ipadapter.cli.main import main
from tests.test_dependencies import OPTIONAL, ROOT, distribution, normalize, requirements

COMMANDS = [
    (["train", "--config", "run.yaml"], "ipadapter train", "train"),
    (["evaluate", "--out", "OUT"], "ipadapter evaluate", "eval"),
    (["app"], "ipadapter app", "app"),
    (["miniature", "train", "adapter", "--out", "OUT"], "ipadapter miniature train", "train"),
    (["miniature", "eval", "--out", "OUT"], "ipadapter miniature eval", "eval"),
]


@pytest.mark.parametrize(("argv", "command", "extra"), COMMANDS, ids=[" ".join(c[0][:2]) for c in COMMANDS])
@pytest.mark.parametrize("position", [0, -1], ids=["first", "last"])
def test_missing_extra_is_one_line(argv, command, extra, position, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, extras.MODULES[extra][position], None)
    out = tmp_path / "out"
    code = main([str(out) if a == "OUT" else a for a in argv])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"{command} needs the {extra} extra: pip install 'ipadapter[{extra}]'\n"
    assert captured.out == "" and not out.exists()


def test_an_extra_not_in_the_table_is_a_programming_error() -> None:
    import argparse

    with pytest.raises(ValueError) as caught:
        extras.needs(argparse.ArgumentParser(prog="ipadapter gpu"), "gpu")
    assert str(caught.value) == "unknown extra 'gpu'"


def test_installed_extra_says_nothing(capsys) -> None:
    """With the extra installed the check lets the command run: here it stops at its own validation."""
    assert main(["app", "--port", "0"]) == 2
    assert "--port must be between" in capsys.readouterr().err


def core_closure() -> set[str]:
    """The distributions a core-only `pip install ipadapter` brings: the core requirements and theirs, recursively
    (read from the installed packages' metadata, extras of those packages excluded)."""
    todo = [normalize(r.name) for r in requirements()[None] if r.marker is None or r.marker.evaluate()]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for req in map(Requirement, requires):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return seen


def test_core_commands_run_without_the_extras(tmp_path) -> None:
    """encode, then generate (with the bundled custom-model LoRA) on the miniature model, in a fresh interpreter where
    every module that only an extra installs is missing: neither command imports one."""
    core = core_closure()
    absent = sorted({m for modules in extras.MODULES.values() for m in modules if distribution(m) not in core} | OPTIONAL)
    assert {"scipy", "matplotlib", "tensorboard", "gradio"} <= set(absent)
    ref = str(ROOT / "examples" / "reference.png")
    runs = [
        ["encode", "--image", ref, "--out", str(tmp_path / "ref.safetensors")],
        ["generate", "--embeds", str(tmp_path / "ref.safetensors"), "--base-lora", "miniature-custom", "--steps", "2",
         "--out", str(tmp_path / "out.png")],
    ]
    code = (
        "import json, sys\n"
        f"for name in {absent!r}:\n    sys.modules[name] = None\n"
        "from ipadapter.cli.main import main\n"
        "for argv in json.loads(sys.argv[1]):\n    assert main(argv) == 0, argv\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.png").is_file()
