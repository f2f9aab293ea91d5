#!/usr/bin/env bash
# Run the demo on CPU: a teacher and a student, each TP=2 x PP=2, over 4 gloo processes.
# Extra arguments go to `python -m megatron_minillm.demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
NPROC="${NPROC:-4}"
exec torchrun --nproc-per-node "$NPROC" -m megatron_minillm.demo "$@"
