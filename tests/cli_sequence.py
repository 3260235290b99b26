"""`python -m tests.cli_sequence PLAN`: the `ipadapter` commands listed in the JSON file PLAN run one after another in
this process. Command n's stdout and stderr (file descriptors 1 and 2, so that what libraries write is caught too) go
to `PLAN-n-rankR.log` beside PLAN and its exit code to `PLAN-n-rankR.code`, R being the process's rank under
`accelerate launch` (0 alone).

The 2-process tests of test_batch_generate.py share one `accelerate launch` this way: each launch starts three
interpreters (the launcher and two workers), each importing torch, over 10 s of a two-core machine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run(plan: Path) -> None:
    """Each command of `plan` in turn, its output and exit code in files of its own (see the module's docstring)."""
    from ipadapter.cli.main import main

    rank = os.environ.get("RANK", "0")
    for n, argv in enumerate(json.loads(plan.read_text())):
        stem = plan.with_name(f"{plan.stem}-{n}-rank{rank}")
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(stem.with_suffix(".log"), "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                code = main(argv)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        stem.with_suffix(".code").write_text(str(code))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
