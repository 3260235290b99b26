#!/usr/bin/env bash
# Installs ipadapter, editable, into the virtual environment .venv (or $IPADAPTER_VENV), created when missing.
# Arguments: the extras to install besides the core, comma-separated (e.g. `test`, `train,eval`); none: the core.
# The tested versions in constraints.txt are used. A CPU build of torch goes in first when the venv has no torch, so
# that pip does not pull a multi-gigabyte CUDA build on a machine without a GPU (on a GPU machine, install the torch
# you want into the venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${IPADAPTER_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
python="$venv/bin/python"
if ! "$python" -c "import torch" 2>/dev/null; then
  "$python" -m pip install --quiet "torch==2.13.0"
fi
"$python" -m pip install --quiet -c constraints.txt -e ".${1:+[$1]}"
