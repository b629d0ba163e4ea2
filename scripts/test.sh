#!/usr/bin/env bash
# The test command: set up the machine, then lint, type-check and run the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff" && ruff check cuju_libvirt tests benchmarks
echo "== mypy --strict" && mypy
echo "== pytest"
exec pytest "$@"
