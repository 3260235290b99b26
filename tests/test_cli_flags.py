"""Flags every subcommand shares, and what each command's --help says."""

from __future__ import annotations

import pytest

from ipadapter.cli.main import main

LEAVES = [["generate"], ["encode"], ["train"], ["evaluate"], ["app"], ["manifest", "coco"], ["manifest", "dreambench"],
          ["miniature", "data"], ["miniature", "train"], ["miniature", "eval"], ["miniature", "export"]]


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [[], *LEAVES], ids=lambda c: " ".join(c) or "ipadapter")
def test_debug_and_verbose_before_or_after_any_subcommand_say_the_same(command, capsys) -> None:
    text = " ".join(_help(capsys, command).split())
    assert "--debug show full tracebacks and library warnings" in text
    assert "--verbose show library warnings and loading bars" in text


def test_the_console_script_reads_the_command_line(monkeypatch, capsys) -> None:
    """`main()` without arguments, as the `ipadapter` script calls it: the words after the program's name."""
    import sys

    monkeypatch.setattr(sys, "argv", ["ipadapter", "encode", "--help"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: ipadapter encode ")


def test_every_option_of_every_command_says_what_it_does() -> None:
    """An option, argument or subcommand without help shows as a bare name in --help; seven options did."""
    import argparse

    from ipadapter.cli.main import _subcommands, build_parser

    parser = build_parser()
    actions = [(command.prog, action) for command in (parser, *_subcommands(parser)) for action in command._actions]
    bare = [f"{prog} {(action.option_strings or [action.dest])[0]}" for prog, action in actions
            if not isinstance(action, argparse._SubParsersAction)
            and not (action.help and action.help != argparse.SUPPRESS)]
    for prog, action in actions:
        if isinstance(action, argparse._SubParsersAction):  # argparse lists a subcommand only if it has help
            helped = {id(action.choices[choice.dest]) for choice in action._choices_actions if choice.help}
            bare += [f"{prog} {name}" for name, sub in action.choices.items() if id(sub) not in helped]
    assert bare == []


def test_the_help_says_what_the_program_is(capsys) -> None:
    assert "\n\nImage prompts for Stable Diffusion (IP-Adapter).\n\n" in _help(capsys, [])


def _command_that(monkeypatch, outcome: object) -> None:
    """`ipadapter miniature data` made to return `outcome`, or raise it."""
    import ipadapter.cli.miniature as miniature

    def run(_: object) -> object:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(miniature, "_data", run)


@pytest.mark.parametrize(("outcome", "code", "err"), [
    (None, 0, ""), (0, 0, ""), (1, 1, ""), (KeyboardInterrupt(), 130, "ipadapter: interrupted\n"),
])
def test_the_exit_code_is_the_commands_own(monkeypatch, capsys, outcome, code, err) -> None:
    """0 for a command that returns nothing, its own code otherwise (`manifest` returns 1 when an item failed); Ctrl-C
    is one line and 130, the shell's code for an interrupt, not a traceback."""
    _command_that(monkeypatch, outcome)
    assert main(["miniature", "data", "--out", "d"]) == code
    assert capsys.readouterr().err == err


@pytest.mark.parametrize(("before", "after", "quiet"), [
    ([], [], True), (["--verbose"], [], False), (["--debug"], [], False), ([], ["--verbose"], False),
    ([], ["--debug"], False),
])
def test_library_chatter_is_off_unless_verbose_or_debug(monkeypatch, before, after, quiet) -> None:
    """Either flag, before the subcommand or after it, leaves the libraries' own warnings and loading bars on."""
    import ipadapter.cli.quiet

    calls: list[int] = []
    monkeypatch.setattr(ipadapter.cli.quiet, "quiet_libraries", lambda: calls.append(1))
    _command_that(monkeypatch, 0)
    assert main([*before, "miniature", "data", "--out", "d", *after]) == 0
    assert calls == ([1] if quiet else [])


def test_debug_after_a_nested_subcommand_raises_the_error(tmp_path) -> None:
    from ipadapter.errors import IPAdapterError

    argv = ["miniature", "data", "--out", str(tmp_path / "d"), "--n", "0"]
    assert main(argv) == 2
    for debug in (["--debug", *argv], [*argv, "--debug"], ["miniature", "--debug", *argv[1:]]):
        with pytest.raises(IPAdapterError, match="--n must be at least 1, got 0"):
            main(debug)


def test_manifest_help_shows_the_manifest_examples_only(capsys) -> None:
    text = _help(capsys, ["manifest"])
    assert "ipadapter manifest coco" in text and "ipadapter evaluate" not in text



def test_a_missing_subcommand_is_named_by_its_choices(capsys) -> None:
    """argparse named the internal dest ("manifest_kind", "command"), or nothing where there is none."""
    with pytest.raises(SystemExit) as caught:
        main(["manifest"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == ("ipadapter manifest: error: the following arguments are required: "
                                       "{coco,dreambench} (see ipadapter manifest --help)\n")
    for parent, prog in (([], "ipadapter"), (["miniature"], "ipadapter miniature")):
        with pytest.raises(SystemExit):
            main(parent)
        err = capsys.readouterr().err
        required = err.split("required: ", 1)[1].split(" (see", 1)[0]
        children = {leaf[len(parent)] for leaf in LEAVES if leaf[: len(parent)] == parent and len(leaf) > len(parent)}
        assert err.startswith(f"{prog}: error: ") and children <= set(required.strip("{}").split(",")), err


@pytest.mark.parametrize(("argv", "message"), [
    (["evaluate", "--out", "{tmp}/eval", "--scales", "-1,1"], "--scales must not be negative, got -1"),
    (["generate", "--prompt", "a", "--guidance", "-1e-3"], "--guidance must not be negative, got -0.001"),
    (["generate", "--prompt", "a", "--true-cfg", "-.5"], "--true-cfg must not be negative, got -0.5"),
])
def test_a_value_starting_with_a_minus_reaches_the_options_own_check(argv, message, capsys, monkeypatch,
                                                                     tmp_path) -> None:
    """argparse took "-1,1" and "-1e-3" for flags ("expected one argument"); they are values, refused by the option's
    own one-line check before any model loads, as `--scales=-1,1` was."""
    import ipadapter.loading

    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ipadapter.loading, "load_prompter", no_loading)
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert capsys.readouterr().err == f"ipadapter: error: {message}\n"


def test_model_flags_are_checked_before_loading_with_hub_subfolders_where_diffusers_takes_them(tmp_path) -> None:
    """`check_model_args`: `--image-encoder` and `--controlnet` take "owner/repo/sub/folder" (both are loaded with a
    subfolder); a missing local ControlNet folder is one sentence; a file name inside a bundled adapter, the default
    one included, is refused naming the flag that gave it."""
    from ipadapter.cli.main import build_parser
    from ipadapter.errors import IPAdapterError
    from ipadapter.loading import check_model_args

    def check(*flags: str) -> str:
        return check_model_args(build_parser().parse_args(["generate", "--image", "x.png", "--device", "cpu",
                                                           *flags]))

    assert check("--image-encoder", "h94/IP-Adapter/models/image_encoder",
                 "--controlnet", "owner/controlnets/canny") == "cpu"
    missing = str(tmp_path / "none")
    for flags, sentence in (
        (["--controlnet", missing], f"ControlNet folder not found: {missing} (no such file or folder; a Hub model "
                                    "id has the form owner/name)"),
        (["--weight-name", "a.bin"], "--weight-name a.bin names a file inside --adapter, but miniature is a bundled "
                                     "adapter"),
        (["--adapter", "miniature-plus", "--subfolder", "models"],
         "--subfolder models names a file inside --adapter, but miniature-plus is a bundled adapter"),
    ):
        with pytest.raises(IPAdapterError) as caught:
            check(*flags)
        assert str(caught.value) == sentence
