#!/usr/bin/env bash
# The one-GPU check (docs/gpu.md) on a machine without network access whose image has CUDA torch:
# installs this project from the wheels of scripts/gpu_wheels.sh (only what the environment lacks,
# never torch), then runs benchmarks/gpu_check.py: one JSON line per check on stdout, exit status 1
# if a check failed. Options after WHEEL_DIR go to gpu_check.py (--tiny: toy sizes, CPU too).
#
#   bash scripts/gpu_check.sh [WHEEL_DIR] [--tiny] [--only NAME] [--workdir DIR]   # WHEEL_DIR: .whl/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  WHEELS="$1"
  shift
fi
PY="${PYTHON:-python3}"
cd "$ROOT"

if "$PY" -c "import megatron.core, megatron_minillm" 2>/dev/null; then
  echo "[gpu_check] megatron-core and megatron_minillm import: nothing to install" >&2
else
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "error: no wheels in $WHEELS: run scripts/gpu_wheels.sh on a machine with network access" \
      "and copy the folder here" >&2
    exit 2
  fi
  # The wheels whose distribution is not installed, each without dependencies: torch and whatever
  # the image ships stay as they are.
  mapfile -t missing < <("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata
import pathlib
import sys

for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        importlib.metadata.version(wheel.name.split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
  )
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "[gpu_check] installing ${#missing[@]} wheels from $WHEELS" >&2
    "$PY" -m pip install --quiet --no-index --no-deps "${missing[@]}"
  fi
  # Editable, with the environment's setuptools (no build isolation: it would fetch one).
  "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e "$ROOT"
fi

if [[ " $* " != *" --tiny "* ]]; then
  "$PY" - <<'EOF' || exit 2
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(
        f"error: torch {torch.__version__}: torch.cuda.is_available() is False; this check needs an NVIDIA "
        "GPU and a CUDA build of torch (--tiny runs toy sizes on CPU)"
    )
EOF
fi
exec "$PY" benchmarks/gpu_check.py "$@"
