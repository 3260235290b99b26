"""Entry point: wires the subcommands, maps user errors to one line on stderr."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Iterator
from typing import Any

# Each module exposes `register(subparsers)`; the subcommand it adds sets `func(args) -> int`.
COMMANDS = ("generate", "encode", "train", "evaluate", "miniature", "app")
# Flags every command takes, before its name or after it: (flag, help).
SHARED_FLAGS = (("--debug", "show full tracebacks and library warnings"),
                ("--verbose", "show library warnings and loading bars"))


class Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one line too (the usage is one `--help` away), and whose option values may
    start with a minus: argparse reads only plain negative numbers ("-1", "-.5") as values, so `--scales -1,1` or
    `--scale -1e-3` failed as a missing argument instead of reaching the option's own check ("must not be
    negative"). No option here is spelt "-" then a digit, so such a word is always a value."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ipadapter", description="Image prompts for Stable Diffusion (IP-Adapter).")
    for flag, text in SHARED_FLAGS:
        parser.add_argument(flag, action="store_true", help=text)
    sub = parser.add_subparsers(required=True)
    for name in COMMANDS:
        importlib.import_module(f"ipadapter.cli.{name}").register(sub)
    add_shared_flags(parser)
    name_subcommands(parser)
    return parser


def name_subcommands(parser: argparse.ArgumentParser) -> None:
    """A missing subcommand is named by its choices, as the usage line shows them ("required: {coco,dreambench}"),
    not by the internal dest argparse would print ("required: manifest_kind")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.metavar = action.metavar or "{" + ",".join(action.choices) + "}"
            for command in action.choices.values():
                name_subcommands(command)


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
    """`--debug` and `--verbose` after any subcommand, nested ones too (`miniature data ... --debug`). SUPPRESS leaves
    them unset unless given: argparse copies only what a subcommand's parser set, so the top-level default False
    stands, and no nested parser's default can undo a flag given before it."""
    for command in {id(p): p for p in _subcommands(parser)}.values():
        for flag, text in SHARED_FLAGS:
            command.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield command
                yield from _subcommands(command)


def main(argv: list[str] | None = None) -> int:
    from ipadapter.errors import IPAdapterError
    from ipadapter.extras import missing

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if message := missing(args):
        print(message, file=sys.stderr)
        return 2
    debug = args.debug
    if not (debug or args.verbose):
        from ipadapter.cli.quiet import quiet_libraries

        quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except IPAdapterError as err:
        if debug:
            raise
        print(f"ipadapter: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ipadapter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
