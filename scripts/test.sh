#!/usr/bin/env bash
# The README's second command: set up this machine, then lint, type-check and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(bash scripts/setup.sh | tail -n 1)"
"$BIN/ruff" check src tests bench scripts
"$BIN/ruff" format --check src tests bench scripts
"$BIN/mypy"
"$BIN/pytest" -q -p no:cacheprovider "$@"
