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
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ipadapter.atomic import replacing  # noqa: E402
from tests.app_process import CHROMIUM, CHROMIUM_FLAGS, serving  # noqa: E402  (shared with the e2e test)

REFERENCE = ROOT / "examples" / "reference.png"
STARTUP_TIMEOUT_S = 90
GENERATED = """() => [...document.querySelectorAll('#gallery img')].some(i => i.naturalWidth > 0)
                     && (document.querySelector('#command')?.innerText ?? '').includes('ipadapter generate')"""


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
        env = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": f"{workdir}/uploads"}
        try:
            with serving(["--device", "cpu"], Path(workdir), env, STARTUP_TIMEOUT_S, args.port) as url:
                png = screenshot(url)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
    with replacing(args.out) as tmp:
        tmp.write_bytes(png)
    print(f"wrote {args.out} ({len(png) / 1024:.0f} KiB) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
