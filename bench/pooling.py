"""Benchmark: the PgBouncer writer endpoint and the reader endpoint, against PostgreSQL reached directly.

Not a test. Run from the repository root as root (the servers run as the service user, postgres):

    /opt/pgbridge/venv/bin/python bench/pooling.py [--scale 5] [--clients 8] [--jobs 2] [--seconds 15]
        [--rounds 1]

It brings up one deployment through the CLI (``pgbridge up``, a spec with one read replica,
``replicas: [{name: r1}]``, which turns the endpoints on: HAProxy writer/reader behind PgBouncer in
transaction mode, in a temporary PGBRIDGE_HOME_BASE, on a free port) and destroys it at the end, also
after a failure or Ctrl-C (``pgbridge destroy --yes``, then the process trees of its pid files, never by
name). ``pgbench -i -s SCALE`` initialises its tables as the application role (shop_app) against the
instance; the tables land in the first schema of that role's search_path (printed). Every run is
``pgbench -n -M simple`` (PgBouncer 1.18 in transaction mode cannot hold prepared statements), the
password in PGPASSWORD and the rest of the connection (TLS: sslmode=verify-full with the deployment's
CA) in a conninfo string given as pgbench's dbname argument, with ``-c CLIENTS -j JOBS -T SECONDS``:

  (1) connection churn: select-only with a new connection per transaction (``-S -C``) through the
      writer endpoint (PgBouncer -> HAProxy -> primary) against the instance directly
      (``endpoints.instance``: a TLS handshake and a backend fork per transaction);
  (2) read scale-out: select-only on persistent connections (``-S``) through the reader endpoint
      (``<db>_ro``: the replica) against the writer endpoint (the primary alone).

It prints tps of each run (the best of ``--rounds``, the two sides of a pair alternating) and the ratios
pooled/direct and reader/primary from the same run. The anchor from the issue: "pgbench -C 16x faster
through PgBouncer". Both sides share this host's CPUs with pgbench and with each other (a replica on the
same two CPUs adds no capacity, so reader/primary near 1 is what to expect here); the load average is
printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for the shared rig

from rig import Rig, deployment, say

PGBENCH = Path("/usr/lib/postgresql/15/bin/pgbench")
APP_ROLE = "shop_app"
ANCHOR_POOLED_DIRECT = 16.0
_CHECK = "SELECT pg_is_in_recovery() || ', ' || (SELECT count(*) FROM pgbench_branches)"


# -- pgbench -------------------------------------------------------------------------------------------
@dataclass
class Target:
    label: str
    dsn: str  # a conninfo string without the password


def psql(rig: Rig, target: Target, password: str, sql: str) -> str:
    proc = subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, target.dsn],
        capture_output=True,
        text=True,
        timeout=60,
        env={**rig.env(), "PGPASSWORD": password},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"psql via {target.label} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def pgbench(rig: Rig, target: Target, password: str, *opts: str, timeout: float = 600) -> tuple[str, float]:
    """pgbench's output and the CPU seconds it used itself (the client's share of the work)."""
    argv = [str(PGBENCH), *opts, target.dsn]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**rig.env(), "PGPASSWORD": password},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"pgbench {' '.join(opts)} via {target.label} exited {proc.returncode}\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.stdout + proc.stderr, cpu_s


@dataclass
class Run:
    tps: float
    latency_ms: float | None
    connect_ms: float | None
    failed: int
    client_cpu_ms: float | None = None  # pgbench's own CPU per transaction


def parse(output: str, cpu_s: float = 0.0) -> Run:
    tps = re.search(r"^tps = ([\d.]+)", output, re.M)
    if tps is None:
        raise RuntimeError(f"no tps in the pgbench output:\n{output[-2000:]}")
    lat = re.search(r"^latency average = ([\d.]+) ms", output, re.M)
    conn = re.search(r"^average connection time = ([\d.]+) ms", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.M)
    done = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    return Run(
        float(tps.group(1)),
        float(lat.group(1)) if lat else None,
        float(conn.group(1)) if conn else None,
        int(failed.group(1)) if failed else 0,
        1000 * cpu_s / int(done.group(1)) if done and int(done.group(1)) else None,
    )


def compare(rig: Rig, password: str, a: Target, b: Target, opts: list[str], rounds: int) -> tuple[list[Run], list[Run]]:
    """``rounds`` runs of each of a and b, alternating (a, b, b, a, ...), so drift hits both alike."""
    runs: dict[str, list[Run]] = {a.label: [], b.label: []}
    for i in range(rounds):
        for t in (a, b) if i % 2 == 0 else (b, a):
            r = parse(*pgbench(rig, t, password, *opts))
            runs[t.label].append(r)
            extra = f", connect {r.connect_ms:.2f} ms" if r.connect_ms is not None else ""
            extra += f", pgbench CPU {r.client_cpu_ms:.2f} ms/tx" if r.client_cpu_ms is not None else ""
            lat = f"{r.latency_ms:.2f} ms" if r.latency_ms is not None else "?"
            say(f"  {' '.join(opts)} via {t.label}: {r.tps:,.1f} tps (latency {lat}{extra}, failed {r.failed})")
    return runs[a.label], runs[b.label]


def wait_reader(rig: Rig, reader: Target, password: str, scale: int, timeout: float = 180) -> None:
    """Until the reader endpoint reaches a replica that has replayed the pgbench tables."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            last = psql(rig, reader, password, "SELECT pg_is_in_recovery(), (SELECT count(*) FROM pgbench_branches)")
            if last == f"t|{scale}":
                return
        except RuntimeError as e:
            last = str(e)
        time.sleep(1)
    raise RuntimeError(f"the reader endpoint did not reach an up-to-date replica in {timeout:.0f}s: {last}")


# -- main ------------------------------------------------------------------------------------------------
def best(runs: list[Run]) -> Run:
    return max(runs, key=lambda r: r.tps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=5, help="pgbench -i -s")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    parser.add_argument("--seconds", type=int, default=15, help="pgbench -T, per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs per side of each comparison; the best counts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the deployment's servers run as the service user")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    load_before = os.getloadavg()[0]
    common = ["-n", "-M", "simple", "-c", str(args.clients), "-j", str(args.jobs), "-T", str(args.seconds)]
    try:
        with deployment("replicas:\n  - {name: r1}\n") as rig:
            status = rig.status()
            ep = status["endpoints"]
            writer, reader = Target("writer (PgBouncer)", ep["writer"]), Target("reader (PgBouncer)", ep["reader"])
            direct = Target("instance (direct)", ep["instance"])
            members = ", ".join(f"{m['name']}={m['role']}" for m in status["members"])
            say(f"members: {members}")
            say(f"ports: {json.dumps(status.get('ports', {}))}")
            for t in (writer, reader, direct):
                say(f"{t.label}: {t.dsn}")
            password = rig.cli("secrets", "get", APP_ROLE).strip()

            say(f"pgbench -i -s {args.scale} as {APP_ROLE} via {direct.label} ...")
            pgbench(rig, direct, password, "-i", "-s", str(args.scale), "-q")
            where = psql(
                rig,
                direct,
                password,
                "SELECT current_setting('search_path') || ' -> ' || relnamespace::regnamespace || '.' || relname"
                " FROM pg_class WHERE oid = 'pgbench_accounts'::regclass",
            )
            say(f"search_path -> table: {where}")
            for t in (writer, direct):
                say(f"{t.label}: in recovery, branches = {psql(rig, t, password, _CHECK)}")
            wait_reader(rig, reader, password, args.scale)
            say(f"{reader.label}: in recovery, branches = {psql(rig, reader, password, _CHECK)}")

            say(f"(1) select-only, a new connection per transaction ({args.rounds} round(s)) ...")
            pooled, plain = compare(rig, password, writer, direct, ["-S", "-C", *common], args.rounds)
            say(f"(2) select-only, persistent connections ({args.rounds} round(s)) ...")
            on_reader, on_primary = compare(rig, password, reader, writer, ["-S", *common], args.rounds)
    except KeyboardInterrupt:
        say("interrupted; the deployment was destroyed")
        sys.exit(130)

    p, d, r, w = best(pooled), best(plain), best(on_reader), best(on_primary)
    say()
    say(f"pgbridge pooling benchmark: PostgreSQL 15, PgBouncer (transaction mode), {os.cpu_count()} CPUs")
    say(f"host load average (1 min) at the start {load_before:.2f}, at the end {os.getloadavg()[0]:.2f}")
    say(
        f"pgbench scale {args.scale}, -M simple -c {args.clients} -j {args.jobs} -T {args.seconds},"
        f" best of {args.rounds} round(s)"
    )
    say()
    say(f"  {'run':<58} {'tps':>10}")
    say(f"  {'(1) -S -C via the writer endpoint (PgBouncer)':<58} {p.tps:>10,.1f}")
    say(f"  {'(1) -S -C directly to the instance':<58} {d.tps:>10,.1f}")
    say(f"  {'(2) -S via the reader endpoint (replica)':<58} {r.tps:>10,.1f}")
    say(f"  {'(2) -S via the writer endpoint (primary alone)':<58} {w.tps:>10,.1f}")
    say()
    ratio1, ratio2 = p.tps / d.tps, r.tps / w.tps
    say(f"  pooled/direct (connection per transaction): {ratio1:.2f}x   (anchor: {ANCHOR_POOLED_DIRECT:g}x)")
    say(f"  reader/primary (select-only):               {ratio2:.2f}x")
    if p.client_cpu_ms and d.client_cpu_ms:
        # The client's own part of a new connection (TLS handshake, SCRAM's salted-password rounds)
        # is the same either way; pooling removes only the server's part (a backend fork, its TLS).
        cap = (os.cpu_count() or 1) * 1000 / p.client_cpu_ms
        say(
            f"  pgbench's own CPU per connection: {p.client_cpu_ms:.2f} ms via the pooler,"
            f" {d.client_cpu_ms:.2f} ms direct; on {os.cpu_count()} CPUs the client alone caps (1) at {cap:,.0f} tps"
        )
    failed = sum(x.failed for x in (*pooled, *plain, *on_reader, *on_primary))
    if failed:
        say(f"  note: {failed} failed transactions over all runs")


if __name__ == "__main__":
    main()
