"""Refresh the web app's screenshot (docs/images/app.png) from the app as a user first sees it.

The README and docs/app.md show `ipadapter app` started without --base, i.e. on the bundled miniature model, so the
picture must come from that model and not from a random-weight test pipeline. This script starts the app on a free
loopback port, uploads examples/reference.png in Debian's headless Chromium (driven by Playwright), generates with
the page's default settings and saves a full-page screenshot.

    python scripts/app_screenshot.py [--out docs/images/app.png] [--port PORT]

Needs `pip install -e '.[app,e2e]'` and /usr/bin/chromium (`bash scripts/ci-browser.sh`); runs offline, on the CPU.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "examples" / "reference.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_TIMEOUT_S = 90
GENERATED = """() => [...document.querySelectorAll('#gallery img')].some(i => i.naturalWidth > 0)
                     && (document.querySelector('#command')?.innerText ?? '').includes('ipadapter generate')"""


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
def running_app(port: int, workdir: Path) -> Iterator[str]:
    """`ipadapter app` on the miniature model in its own process; yields its URL once it serves, always stops it."""
    log_path = workdir / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(workdir / "uploads")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ipadapter.cli.main", "app", "--port", str(port),
                                 "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        # Our process must say it serves this port: another server that took the port meanwhile must not pass.
        while f"127.0.0.1:{port}" not in log_path.read_text() or not answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-3000:]
                raise SystemExit(f"the app did not come up on {url}; end of its log:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def screenshot(url: str) -> bytes:
    """Upload the example reference, generate with the defaults, and return a full-page PNG of the result."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(url)
            page.locator("#references input[type=file]").set_input_files(str(REFERENCE))
            page.locator("#previews img").first.wait_for()
            page.locator("#generate").click()
            page.wait_for_function(GENERATED, timeout=180_000)
            page.evaluate("window.scrollTo(0, 0)")
            return page.screenshot(full_page=True, type="png")
        finally:
            browser.close()


def write_atomically(data: bytes, out: Path) -> None:
    """Write beside `out`, then rename, so `out` is the old picture or the new one, never half of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "app.png",
                        help="where to write the PNG (default: docs/images/app.png)")
    parser.add_argument("--port", type=int, default=None, help="port for the app (default: a free port)")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).is_file():
        parser.error(f"no {CHROMIUM}: run scripts/ci-browser.sh (Debian's chromium package)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="app-screenshot-") as workdir:
        with running_app(args.port or free_port(), Path(workdir)) as url:
            png = screenshot(url)
    write_atomically(png, args.out)
    print(f"wrote {args.out} ({len(png) / 1024:.0f} KiB) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
