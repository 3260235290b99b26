"""The research scripts under scripts/ (the numbers in docs/miniature.md and the pictures come from them) still load:
every name they import from the package exists, so a rename in the library cannot leave one broken unnoticed."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def test_the_scripts_folder_is_found() -> None:
    assert len(SCRIPTS) >= 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_script_loads_and_has_an_entry_point(script: Path) -> None:
    names = runpy.run_path(str(script), run_name="imported")  # its imports and definitions, not its main()
    assert callable(names.get("main")), f"{script.name} has no main()"
