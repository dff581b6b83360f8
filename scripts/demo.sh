#!/usr/bin/env bash
# The README's first command: set up this machine, bring up the example deployment, prove it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(bash scripts/setup.sh | tail -n 1)"
SPEC="${1:-examples/shop.yaml}"
"$BIN/pgbridge" -f "$SPEC" validate
"$BIN/pgbridge" -f "$SPEC" up
"$BIN/pgbridge" -f "$SPEC" status
"$BIN/pgbridge" -f "$SPEC" check
