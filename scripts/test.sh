#!/usr/bin/env bash
# Lint, format check, then the test suite, in .venv/ (created if missing). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
# Lint and format check first (ruff.toml): seconds, and a failure names the file and line.
ruff check .
ruff format --check .
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$status"
