"""The commands' own INFO lines (stages, resumes, checkpoints) reach stderr while library chatter stays off."""

from __future__ import annotations

import logging
import os
import re
import warnings

import pytest

from ipadapter.cli.quiet import ENVIRONMENT, LIBRARIES, quiet_libraries, show_own_logs


def test_own_log_lines_survive_accelerates_root_level(monkeypatch, caplog) -> None:
    """accelerate sets the root logger's level from ACCELERATE_LOG_LEVEL each time it makes a logger, and the CLI
    sets that to "error": a level set on the root hid every INFO line of `ipadapter train` and `miniature`."""
    from accelerate.logging import get_logger

    monkeypatch.setenv("ACCELERATE_LOG_LEVEL", "error")
    own = logging.getLogger("ipadapter")
    own_level, root_level = own.level, logging.root.level
    own.setLevel(logging.NOTSET)  # as in a fresh process (setLevel also clears the loggers' cached levels)
    try:
        show_own_logs()
        get_logger("tests.made_by_accelerate")
        assert logging.root.level == logging.ERROR  # what the bug needs; without it this test would prove nothing
        logging.getLogger("ipadapter.train").info("resumed from state-00000002 at step 2")
        logging.getLogger("ipadapter.miniature").info("miniature eval: VAE ceiling")
    finally:
        logging.root.setLevel(root_level)
        own.setLevel(own_level)
    assert "resumed from state-00000002 at step 2" in caplog.text
    assert "miniature eval: VAE ceiling" in caplog.text


def test_own_log_lines_are_the_time_then_the_message() -> None:
    """The handler `show_own_logs` installs on a process without one (pytest's own are set aside meanwhile)."""
    handlers, root_level = logging.root.handlers[:], logging.root.level
    own = logging.getLogger("ipadapter")
    own_level = own.level
    logging.root.handlers.clear()
    try:
        show_own_logs()
        installed = logging.root.handlers[:]
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(root_level)
        own.setLevel(own_level)
    assert len(installed) == 1 and isinstance(installed[0], logging.StreamHandler)
    record = logging.LogRecord("ipadapter.train", logging.INFO, __file__, 1, "saved state-00000004", None, None)
    assert re.fullmatch(r"\d\d:\d\d:\d\d saved state-00000004", installed[0].format(record))


@pytest.fixture
def library_settings(monkeypatch):
    """Every setting `quiet_libraries` changes, put back afterwards; the environment starts without its variables."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    for key in ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    levels = {name: logging.getLogger(name).level for name in LIBRARIES}
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (transformers_logging, diffusers_logging)]
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for lib, verbosity, bars in saved:
        lib.set_verbosity(verbosity)
        (lib.enable_progress_bar if bars else lib.disable_progress_bar)()
    (hub_utils.disable_progress_bars if hub_bars_off else hub_utils.enable_progress_bars)()


def test_quiet_libraries_leaves_errors_only_and_no_loading_bars(library_settings, monkeypatch) -> None:
    """Read back through each library's own API; a variable the user set is kept."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")
    for lib in (transformers_logging, diffusers_logging):
        lib.set_verbosity_info()
        lib.enable_progress_bar()
    hub_utils.enable_progress_bars()
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET)  # as in a fresh process; the CLI tests ran it before
    quiet_libraries()
    for lib in (transformers_logging, diffusers_logging):
        assert lib.get_verbosity() == logging.ERROR and not lib.is_progress_bar_enabled()
    assert hub_utils.are_progress_bars_disabled()
    assert all(logging.getLogger(name).level == logging.ERROR
               for name in ("transformers", "diffusers", "accelerate", "huggingface_hub", "torch", "PIL", "httpx",
                            "gradio"))
    assert warnings.filters[0][0] == "ignore"
    assert os.environ["DIFFUSERS_VERBOSITY"] == "info"
    expected = {"TRANSFORMERS_VERBOSITY": "error", "ACCELERATE_LOG_LEVEL": "error", "PYTHONWARNINGS": "ignore",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    assert {key: os.environ.get(key) for key in expected} == expected
