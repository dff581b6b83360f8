#!/usr/bin/env bash
# Install everything pgbridge needs on a Debian 12 machine, idempotently.
#   - Debian packages: PostgreSQL 15 (+contrib), etcd 3.4, HAProxy, PgBouncer, pgBackRest, the system Python's venv module,
#     and a C compiler with Python's headers (pgbridge builds two small extensions: cdc/_copybin.c, cdc/_rowwalk.c)
#   - a virtual environment (default /opt/pgbridge/venv) made from the *system* Python, so the
#     unprivileged OS user that runs the servers can execute it (a pyenv Python under /root cannot)
#   - pgbridge itself with its pinned dependencies (Patroni 4.1.5, psycopg, DuckDB, ...)
# Prints the venv's bin folder as the last line.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${PGBRIDGE_VENV:-/opt/pgbridge/venv}"
PACKAGES=(postgresql-15 postgresql-contrib postgresql-client-15 etcd-server haproxy pgbouncer pgbackrest python3 python3-venv python3-dev gcc ca-certificates)

log() { echo "[setup] $*" >&2; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]} (run this script as root, or: sudo apt-get install -y ${missing[*]})"
    exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  # pgbridge runs its own clusters and etcd members on the ports a spec chooses: keep Debian from
  # creating a default cluster or starting services that would take 5432/2379 during install.
  mkdir -p /etc/postgresql-common
  if ! grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
    echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf
  fi
  policy_created=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    policy_created=1
  fi
  trap '[[ $policy_created == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV (system Python)"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
fi
chmod 755 "$(dirname "$VENV")" "$VENV"

log "installing pgbridge into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check ".[dev]" >&2
# The C extensions are optional for pip (without them the load reads text, and Python and numpy
# split the stream), but this script installed their compiler: a build that failed here is a fault to report, not skip.
if ! (cd / && "$VENV/bin/python" -c "import pgbridge.cdc._copybin, pgbridge.cdc._rowwalk") 2>/dev/null; then
  log "pgbridge's C extensions did not build (gcc and python3-dev are installed): see \`$VENV/bin/pip install -v .\`"
  exit 1
fi
echo "$VENV/bin"
