"""The batch-generation benchmark's smoke run on tiny models: both rows are there, and batching changes no image
beyond float rounding. No timing assertions: the numbers of a smoke run on toy models mean nothing."""

from __future__ import annotations

from benchmarks import batch_generation


def test_quick_run_has_both_rows_and_the_same_images() -> None:
    rows, setting = batch_generation.benchmark(batch_generation.parse_args(["--quick"]))
    assert [r["batch"] for r in rows] == [1, 4] and setting["jobs"] == 4
    assert all(r["per_image"] > 0 for r in rows) and rows[0]["ratio"] == 1.0
    assert all(r["diff"] <= 2 for r in rows)
    text = batch_generation.render(rows, setting)
    assert "| 4 |" in text and "speed-up" in text
