"""Benchmark: the analytics offload, measured - the shop's analytics pack on the OLTP PostgreSQL
against the same pack on the warehouse, and what each does to the OLTP workload's latency.

Not a test. Run from the repository root as root (the servers run as the service user, postgres):

    /opt/pgbridge/venv/bin/python bench/offload.py [--scale 1] [--rate 150] [--seconds 30] [--repeat 5]

It brings up one deployment through the CLI (``pgbridge up`` of the test spec plus a pipeline, in a
temporary PGBRIDGE_HOME_BASE on a free port) and destroys it at the end, also after a failure or
Ctrl-C. Then, on that one deployment and the same data:

  (1) ``pgbridge workload load --scale S`` (timed), and waits until the warehouse holds every row;
  (2) per query of the pack ``shop``: the median of ``--repeat`` runs on PostgreSQL (the read-only
      user over TLS, as `query --pack --source` runs it) and on the warehouse (through the pipeline
      daemon's socket, as `query --pack` runs it), and the ratio PostgreSQL / warehouse;
  (3) the workload at ``--rate`` for ``--seconds`` five times: alone; with the pack started every
      ``--pack-every`` seconds (a dashboard's refresh: the same analytics demand on both sides) on
      PostgreSQL, then on the warehouse; and with the pack back to back (as much analytics as each
      side can answer) on PostgreSQL, then on the warehouse - tps, p50 and p99 of the OLTP
      transactions in each, and how many pack runs completed alongside.

Everything shares this host's CPUs (PostgreSQL, the pipeline with its DuckDB, the workload's
client threads), so (3) measures contention on one machine; a warehouse on its own host would
take the analytics' CPU away from the OLTP server entirely.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for the shared rig

from pgbridge.errors import PgbridgeError
from pgbridge.home import Home
from pgbridge.ops import workload as wl
from pgbridge.ops.context import Deployment
from pgbridge.settings import load_settings
from pgbridge.workload import analytics
from pgbridge.workload.generator import connect
from rig import Rig, deployment, say

PIPELINE = "pipeline:\n  name: analytics\n  batch: {max_wait_ms: 200}\n"
COUNTS = "SELECT " + ", ".join(
    f"(SELECT count(*) FROM shop.{t})" for t in ("customers", "orders", "order_items", "payments", "search_log")
)


def in_process(rig: Rig) -> Deployment:
    os.environ.update({k: v for k, v in rig.env().items() if k.startswith("PGBRIDGE_")})
    return Deployment(load_settings(), Home(rig.home))


def wait_caught_up(dep: Deployment, timeout: float = 600) -> float:
    started = time.perf_counter()
    t = wl.target(dep)
    with connect(t) as c:
        row = c.execute(COUNTS.encode()).fetchone()
    want = [str(v) for v in row or ()]
    from pgbridge.ops import pipeline as pipeline_ops

    while True:
        try:
            got = [str(v) for v in pipeline_ops.query(dep, COUNTS)["rows"][0]]
        except PgbridgeError:  # the tables are not in the warehouse yet
            got = []
        if got == want:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the warehouse did not catch up: {got} != {want}")
        time.sleep(0.5)


def per_query(dep: Deployment, repeat: int) -> list[tuple[str, float, float]]:
    """Median seconds per query on PostgreSQL and on the warehouse, alternating sides."""
    names = [q.name for q in analytics.load_pack("shop")]
    pg: dict[str, list[float]] = {n: [] for n in names}
    wh: dict[str, list[float]] = {n: [] for n in names}
    wl.run_pack(dep, "shop", on="source")  # warm both caches once
    wl.run_pack(dep, "shop")
    for _ in range(repeat):
        for side, into in (("source", pg), ("warehouse", wh)):
            for r in wl.run_pack(dep, "shop", on=side):
                if r.error:
                    raise RuntimeError(f"{r.name} on {side}: {r.error}")
                into[r.name].append(r.seconds)
    return [(n, statistics.median(pg[n]), statistics.median(wh[n])) for n in names]


def phase(
    dep: Deployment, label: str, rate: float, seconds: float, analytics_on: str | None, every: float = 0
) -> dict[str, Any]:
    """The workload for `seconds`; alongside, the pack back to back (`every` 0) or started every `every` s."""
    stop = threading.Event()
    runs = [0]
    failed: list[str] = []

    def loop() -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            results = wl.run_pack(dep, "shop", on=analytics_on or "warehouse")
            if any(r.error for r in results):
                failed.append(str([r.error for r in results if r.error]))
                return
            runs[0] += 1
            next_at += every
            if every:
                stop.wait(max(0.0, next_at - time.monotonic()))

    run = wl.workload(dep, rate, seconds, workers=4, seed=11)
    t = threading.Thread(target=loop, daemon=True) if analytics_on else None
    if t:
        t.start()
    run.run()
    stop.set()
    if t:
        t.join(120)
    if failed:
        raise RuntimeError(f"the analytics pack failed during {label}: {failed[0]}")
    s = run.recorder.summary()
    return {"label": label, "tps": s.tps, "p50": s.p50_ms, "p99": s.p99_ms, "pack_runs": runs[0], "errors": s.errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=150)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--instance-class", default="db.small")
    ap.add_argument("--pack-every", type=float, default=2.0, help="paced phases: one pack run started every N s")
    a = ap.parse_args()
    with deployment(PIPELINE, label="offload", instance_class=a.instance_class, size_gb=20) as rig:
        dep = in_process(rig)
        started = time.perf_counter()
        out = rig.cli("workload", "load", "--scale", str(a.scale), timeout=1800)
        say(f"load: {out.strip()} (CLI wall time {time.perf_counter() - started:.1f}s)")
        say(f"the warehouse caught up {wait_caught_up(dep):.1f}s after the load returned")
        say(f"\n(2) the pack, same data: median of {a.repeat} runs (scale {a.scale:g}, {a.instance_class})")
        say(f"{'query':<20} {'PostgreSQL ms':>14} {'warehouse ms':>13} {'PG / warehouse':>15}")
        rows = per_query(dep, a.repeat)
        for name, pg, wh in rows:
            say(f"{name:<20} {pg * 1000:>14.1f} {wh * 1000:>13.1f} {pg / wh:>14.1f}x")
        tot_pg, tot_wh = sum(r[1] for r in rows), sum(r[2] for r in rows)
        say(f"{'whole pack':<20} {tot_pg * 1000:>14.1f} {tot_wh * 1000:>13.1f} {tot_pg / tot_wh:>14.1f}x")
        say(f"\n(3) OLTP at {a.rate:g} tps offered for {a.seconds:g}s, 4 connections; the pack in a loop alongside")
        say(f"{'analytics':<28} {'tps':>7} {'p50 ms':>8} {'p99 ms':>8} {'pack runs':>10}")
        paced = f"every {a.pack_every:g}s"
        results = [
            phase(dep, "none", a.rate, a.seconds, None),
            phase(dep, f"PostgreSQL, {paced}", a.rate, a.seconds, "source", a.pack_every),
            phase(dep, f"warehouse, {paced}", a.rate, a.seconds, "warehouse", a.pack_every),
            phase(dep, "PostgreSQL, back to back", a.rate, a.seconds, "source"),
            phase(dep, "warehouse, back to back", a.rate, a.seconds, "warehouse"),
        ]
        for r in results:
            say(f"{r['label']:<28} {r['tps']:>7.1f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['pack_runs']:>10}")
            if r["errors"]:
                say(f"  errors: {r['errors']}")
        base = results[0]["p99"]
        for kind, pg_r, wh_r in (("paced", results[1], results[2]), ("back to back", results[3], results[4])):
            say(
                f"OLTP p99 ({kind}): {pg_r['p99'] / base:.1f}x the baseline with the pack on PostgreSQL,"
                f" {wh_r['p99'] / base:.1f}x with it on the warehouse; pack runs per second"
                f" {pg_r['pack_runs'] / a.seconds:.2f} vs {wh_r['pack_runs'] / a.seconds:.2f}"
            )
        say(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
