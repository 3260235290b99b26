#!/usr/bin/env bash
# Installs ipadapter with the test extra (everything the suite needs) into .venv (or $IPADAPTER_VENV), then runs the
# test suite there (offline, CPU), one worker process per core (pytest-xdist; each test file stays in one worker, so
# a file's module fixtures are built once). Arguments go to pytest (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/ci-browser.sh  # Debian chromium for the web app's browser test
source "${IPADAPTER_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -n auto --dist loadfile "$@"
