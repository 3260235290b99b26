#!/usr/bin/env bash
# The test suite against the oldest versions pyproject.toml allows: for every `>=` floor of the core's and the extras'
# requirements, the oldest release at or above it (`pip index versions`), installed exactly, in a virtual environment
# of its own (.venv-oldest, or $IPADAPTER_VENV), then the suite (arguments go to pytest). torch is the exception: the
# CPU build scripts/setup.sh installs (tests/test_dependencies.py checks its floor against the torch APIs the code
# calls). A floor below what another requirement needs makes pip refuse the set, naming the conflict: raise that
# floor. A developer's periodic check, not CI (a second environment; Python 3.11+): docs/testing.md has the result.
set -euo pipefail
cd "$(dirname "$0")/.."
export IPADAPTER_VENV="${IPADAPTER_VENV:-.venv-oldest}"
python="$IPADAPTER_VENV/bin/python"
[ -x "$python" ] || "${PYTHON:-python3}" -m venv "$IPADAPTER_VENV"
"$python" -c "import torch" 2>/dev/null || "$python" -m pip install --quiet "torch==2.13.0"
"$python" -m pip install --quiet packaging
floors="$IPADAPTER_VENV/floors.txt"
"$python" - pyproject.toml > "$floors" <<'PY'
import re
import subprocess
import sys

import tomllib
from packaging.version import Version

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = list(project["dependencies"])
for extra, requirements in project["optional-dependencies"].items():
    wanted += [r for r in requirements if not r.startswith("ipadapter")] if extra != "mutation" else []
for requirement in wanted:
    floor = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", requirement.split(";")[0])
    if floor and floor.group(1) != "torch":
        name, lowest = floor.group(1), Version(floor.group(2))
        listed = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True,
                                text=True).stdout
        releases = re.search(r"Available versions: (.*)", listed)
        found = [Version(v) for v in releases.group(1).split(", ")] if releases else []
        print(f"{name}=={min((v for v in found if v >= lowest and not v.is_prerelease), default=lowest)}")
PY
echo "floors: $(tr '\n' ' ' < "$floors")"
"$python" -m pip install --quiet -c "$floors" -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$python" -m pytest -n auto --dist loadfile "$@"
