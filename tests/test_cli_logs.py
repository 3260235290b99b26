"""The commands' own INFO lines (stages, resumes, checkpoints) reach stderr while library chatter stays off."""

from __future__ import annotations

import logging

from ipadapter.cli.quiet import show_own_logs


def test_own_log_lines_survive_accelerates_root_level(monkeypatch, caplog) -> None:
    """accelerate sets the root logger's level from ACCELERATE_LOG_LEVEL each time it makes a logger, and the CLI
    sets that to "error": a level set on the root hid every INFO line of `ipadapter train` and `miniature`."""
    from accelerate.logging import get_logger

    monkeypatch.setenv("ACCELERATE_LOG_LEVEL", "error")
    own = logging.getLogger("ipadapter")
    monkeypatch.setattr(own, "level", own.level)
    root_level = logging.root.level
    try:
        show_own_logs()
        get_logger("tests.made_by_accelerate")
        assert logging.root.level == logging.ERROR  # what the bug needs; without it this test would prove nothing
        logging.getLogger("ipadapter.train").info("resumed from state-00000002 at step 2")
        logging.getLogger("ipadapter.miniature").info("miniature eval: VAE ceiling")
    finally:
        logging.root.setLevel(root_level)
    assert "resumed from state-00000002 at step 2" in caplog.text
    assert "miniature eval: VAE ceiling" in caplog.text
