#!/usr/bin/env bash
# Installs the core into .venv (or $IPADAPTER_VENV) and runs the main job: image-prompted generation on the bundled
# miniature model (CPU, offline), with its Plus adapter: the report's best CLIP-I and shape (docs/miniature.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source "${IPADAPTER_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p out
ipadapter generate --adapter miniature-plus --image examples/reference.png --num-images 4 --out out/demo.png
ipadapter generate --adapter miniature-plus --image examples/reference.png \
  --prompt "a small green cross at the bottom right" --scale 0.6 --num-images 4 --out out/demo-text.png
echo "wrote out/demo-*.png"
