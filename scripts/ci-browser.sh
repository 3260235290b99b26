#!/usr/bin/env bash
# Installs the browser the app's browser test drives: Debian's chromium. Playwright, the driver, is a Python package
# of the e2e extra (in the test extra too); no browser is ever downloaded (`playwright install` is never run).
# Idempotent and quiet, so CI can call it on every run.
set -euo pipefail
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
if ! command -v chromium >/dev/null 2>&1; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
