#!/usr/bin/env bash
# Installs what the app's browser test needs: Debian's chromium and Playwright's Python package. Playwright is only
# the driver here: the test launches /usr/bin/chromium, and no browser is ever downloaded (`playwright install` is
# never run). Idempotent and quiet, so CI can call it on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
if ! command -v chromium >/dev/null 2>&1; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
if ! python -c "import playwright.sync_api" 2>/dev/null; then
  PIP_ROOT_USER_ACTION=ignore pip install --quiet --disable-pip-version-check "playwright>=1.65"
fi
