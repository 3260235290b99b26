"""`ipadapter app` in its own process on a free loopback port, for the e2e test and scripts/app_screenshot.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def serving(
    app_args: list[str], workdir: Path, env: dict[str, str], timeout_s: float, port: int | None = None
) -> Iterator[str]:
    """Start `ipadapter app ARGS --port P` (default P: a free port; log in `workdir/app.log`), yield its URL once it
    serves, always stop it.

    Raises RuntimeError with the log's end when the app exits or does not come up within `timeout_s`."""
    port = port or free_port()
    log_path = workdir / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ipadapter.cli.main", "app", *app_args, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=workdir)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout_s
        # Our process must say it serves this port: another server that took the port meanwhile must not pass.
        while f"127.0.0.1:{port}" not in log_path.read_text() or not answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not come up on {url}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
