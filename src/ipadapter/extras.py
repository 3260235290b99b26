"""The optional parts of ipadapter: which pip extra brings which modules (README "Install"), checked up front.

`pip install ipadapter` is enough to generate, encode and load every checkpoint; training, evaluation and the app
need more. A command that needs an extra says so before it starts, in one line, instead of failing deep inside a
library hours later (or, for TensorBoard, training without writing a single log).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

# The top-level modules each extra installs. tests/test_dependencies.py checks that these are exactly the modules
# the extra's code imports (plus what a library loads by name, such as accelerate's TensorBoard tracker).
MODULES: dict[str, tuple[str, ...]] = {
    "train": ("accelerate", "braceexpand", "tensorboard", "yaml", *(("tomli",) if sys.version_info < (3, 11) else ())),
    "eval": ("matplotlib", "scipy"),
    "app": ("gradio",),
}


def needs(parser: argparse.ArgumentParser, extra: str) -> None:
    """Marks the (sub)command `parser` as needing `extra`; `ipadapter.cli.main` checks it before running it."""
    if extra not in MODULES:
        raise ValueError(f"unknown extra {extra!r}")
    parser.set_defaults(needs_extra=(parser.prog, extra))


def missing(args: argparse.Namespace) -> str | None:
    """The one-line message for a command whose extra is not installed, else None."""
    command, extra = getattr(args, "needs_extra", (None, None))
    if extra is None or all(importlib.util.find_spec(name) is not None for name in MODULES[extra]):
        return None
    return f"{command} needs the {extra} extra: pip install 'ipadapter[{extra}]'"
