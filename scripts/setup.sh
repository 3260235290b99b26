#!/usr/bin/env bash
# Installs ipadapter and its dependencies. A CPU build of torch is installed first when no torch is present,
# so that pip does not pull a multi-gigabyte CUDA build on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  pip install --quiet "torch==2.13.0"
fi
pip install --quiet -c constraints.txt -e ".[test,app,e2e]"
