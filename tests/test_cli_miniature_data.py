"""`ipadapter miniature data`: bad seeds and output folders are one line, and a refused or failed run leaves no folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipadapter.cli.main import main


@pytest.mark.parametrize("out, flags, message", [
    ("{tmp}/d", ["--seed", "-1"], "--seed must be a whole number from 0 to 2**64-1, got -1"),
    ("/proc/zz", [], "--out /proc/zz: the folder /proc is not writable"),  # not even for root: refused before any write
])
def test_bad_seed_or_output_folder_is_one_line_and_writes_nothing(tmp_path, capsys, out, flags, message) -> None:
    out = Path(out.format(tmp=tmp_path))
    assert main(["miniature", "data", "--out", str(out), "--n", "2", *flags]) == 2
    assert capsys.readouterr().err == f"ipadapter: error: {message}\n"
    assert not out.exists()


def test_a_write_that_fails_midway_removes_the_folder_it_created(tmp_path, capsys, monkeypatch) -> None:
    from ipadapter.miniature import world

    def disk_full(out_dir, *args, **kwargs):
        (out_dir / "images").mkdir()
        (out_dir / "images" / "train_000000.png").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(world, "write_dataset", disk_full)
    out = tmp_path / "new" / "d"
    assert main(["miniature", "data", "--out", str(out), "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    assert list(tmp_path.iterdir()) == []
