"""Imported by each of `inference.py`'s memory processes before it measures; importing it is the warm-up.

Each implementation loads a small adapter once here (the `--quick` models: SD 1.5 with a Plus adapter, SDXL with a
base one), so the first use of its loading code happens before the baseline is read: the code pages read in, the
objects made once at first use, the allocator's arenas. The "models loaded" row then counts the models built. Measured at the `--quick` sizes, a first load cost beyond its 0.5 MiB of weights 2.2 MiB for
ipadapter and 1 MiB for diffusers; a second load cost 0.45 MiB.
"""

from __future__ import annotations

from benchmarks import inference


def warm() -> None:
    inference.quiet()
    for arch in ("sd15", "sdxl"):
        setting = inference.settings_of(inference.parse_args(["--quick", "--archs", arch]))[0]
        inference.Bench(setting, ("ipadapter", "diffusers")).close()


warm()
