#!/usr/bin/env bash
# The README's first command: set up this machine, bring up the example deployment, prove it, then
# show it at work: the shop's workload on PostgreSQL, CDC into the warehouse, analytics live.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(bash scripts/setup.sh | tail -n 1)"
SPEC="${1:-examples/shop.yaml}"
"$BIN/pgbridge" -f "$SPEC" validate
"$BIN/pgbridge" -f "$SPEC" up
"$BIN/pgbridge" -f "$SPEC" status
"$BIN/pgbridge" -f "$SPEC" check
# On a terminal the dashboard runs until Ctrl-C; otherwise (CI, a pipe) for a bounded time with
# plain output. Either way the deployment stays up afterwards.
if [[ -t 1 ]]; then
  "$BIN/pgbridge" -f "$SPEC" demo
else
  "$BIN/pgbridge" -f "$SPEC" demo --duration "${PGBRIDGE_DEMO_SECONDS:-60}" --every 5
fi
