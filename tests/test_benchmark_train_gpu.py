"""benchmarks/train_gpu.py on the tests' tiny models: every row trains. The GPU run is one prepared command
(scripts/gpu_checks.sh) for the rare session that is lent a GPU, so its wiring is kept working here, on the CPU.

No timing assertions: the numbers of a smoke run on toy models mean nothing.
"""

from __future__ import annotations

import torch

from benchmarks import train_gpu


def test_tiny_run_trains_every_row(tmp_path, fresh_accelerate_state) -> None:
    args = train_gpu.parse_args(["--tiny", "--steps", "2", "--out", str(tmp_path / "train.md")])
    sd15, sdxl, _ = train_gpu.settings_of(args)
    rows, notes = train_gpu.benchmark(args)
    assert [r.label for r in rows] == [train_gpu.label_of(s, args) for s in sd15 + sdxl]
    expected = {"no", "fp16", "bf16"} if torch.cuda.is_available() else {"no", "bf16"}  # fp16: CUDA only
    assert {s.mixed_precision for s in sd15} == expected
    for r in rows:
        assert r.step_s is not None and r.step_s > 0 and r.nonfinite == 0, f"{r.label}: {r.note}"
    assert any(n.startswith("- SDXL feature cache built") for n in notes), notes
    text = train_gpu.render("python benchmarks/train_gpu.py --tiny", args, rows, notes)
    assert all(f"| {r.label} | {r.step_s:.3f} |" in text for r in rows)
