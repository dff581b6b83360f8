"""Benchmark: the initial load (``load_snapshot`` into a DuckDB file) against a plain COPY into /dev/null.

Not a test. Run from the repository root (as root or as a user that can run PostgreSQL):

    PYTHONPATH=src python bench/snapshot_load.py [--rows 2000000] [--rounds 3] [--workers 2] [--dsn DSN]

Without ``--dsn`` it starts a throwaway PostgreSQL 15 (wal_level=logical, unix socket only) in a
temporary folder and removes it afterwards. It creates an order_items-like table (id bigint primary
key, order_id bigint, product_id int, qty int, price numeric(12,2), created_at timestamptz, note text
with 10% NULLs), VACUUM ANALYZEs it, reads it once to warm the cache, then times, interleaved,
``--rounds`` times each:

  (a) ``psql -c "COPY (SELECT * FROM t) TO STDOUT" > /dev/null``
  (b) psycopg 3 ``for data in cursor.copy(...)``, reading and discarding
  (c) ``load_snapshot`` under a fresh temporary slot's snapshot into a new DuckDB file

and prints the best rows/s and MB/s (of COPY text) of each and the ratios c/a and c/b.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.pgserver

from tests.pgserver import bare_server

from pgbridge.cdc.catalog import discover_tables
from pgbridge.cdc.sinks.duckdb import DuckDBSink
from pgbridge.cdc.snapshot import load_snapshot
from pgbridge.cdc.source import SnapshotSlot
from pgbridge.cdc.typemap import PG_SESSION_OPTIONS

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SCHEMA = "bench"
TABLE = f"{SCHEMA}.order_items"
COPY_SQL = f"COPY (SELECT * FROM {TABLE}) TO STDOUT"


def prepare(dsn: str, rows: int) -> int:
    """Create and fill the table; returns the size of its COPY text in bytes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, order_id bigint, product_id int, qty int,"
            " price numeric(12,2), created_at timestamptz, note text)"
        )
        started = time.perf_counter()
        conn.execute(
            f"INSERT INTO {TABLE} SELECT g, g / 4, (g * 7919) %% 100000, 1 + g %% 5, ((g * 31) %% 100000) / 100.0,"
            " timestamptz '2024-01-01' + g * interval '1 second',"
            " CASE WHEN g %% 10 = 0 THEN NULL ELSE 'note for item ' || g END"
            " FROM generate_series(1::bigint, %s) g",
            (rows,),
        )
        conn.execute(f"VACUUM ANALYZE {TABLE}")
        print(f"generated {rows:,} rows in {time.perf_counter() - started:.1f}s")
    return copy_psycopg(dsn)[1]


def copy_psql(dsn: str) -> float:
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        subprocess.run([str(PG_BIN / "psql"), "-X", "-q", "-d", dsn, "-c", COPY_SQL], stdout=sink, check=True)
    return time.perf_counter() - started


def copy_psycopg(dsn: str) -> tuple[float, int]:
    size = 0
    with psycopg.connect(dsn, options=PG_SESSION_OPTIONS) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        with cur.copy(COPY_SQL) as copy:
            for data in copy:
                size += len(data)
        return time.perf_counter() - started, size


def load(dsn: str, folder: Path, round_: int, workers: int) -> tuple[float, float, int]:
    """Seconds and client CPU seconds of one load_snapshot, and the rows it loaded."""
    path = folder / f"warehouse-{round_}.duckdb"
    sink = DuckDBSink(path, "bench")
    try:
        with psycopg.connect(dsn) as conn:
            tables = discover_tables(conn, [TABLE], [], {})
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        with SnapshotSlot.create(dsn, f"bench_load_{round_}", temporary=True) as slot:
            report = load_snapshot(
                dsn, slot.snapshot_name, tables, sink, workers=workers, consistent_lsn=slot.consistent_lsn
            )
        took = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime
        return took, used, report.rows
    finally:
        sink.close()
        for leftover in folder.glob(f"warehouse-{round_}.duckdb*"):
            leftover.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dsn", help="an existing server (the table is created in schema 'bench')")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pgbridge-bench-duck-"))
    try:
        with contextlib.ExitStack() as stack:
            dsn = (
                args.dsn
                or stack.enter_context(bare_server("bench", settings="-c max_wal_size=4GB -c shared_buffers=512MB")).dsn
            )
            size = prepare(dsn, args.rows)
            psql, pyc, ours, cpu = [], [], [], []
            for round_ in range(args.rounds):
                psql.append(copy_psql(dsn))
                pyc.append(copy_psycopg(dsn)[0])
                took, used, rows = load(dsn, folder, round_, args.workers)
                assert rows == args.rows, f"loaded {rows} rows, expected {args.rows}"
                ours.append(took)
                cpu.append(used)
                print(
                    f"round {round_ + 1}: psql {psql[-1]:.2f}s  psycopg {pyc[-1]:.2f}s  "
                    f"load {took:.2f}s (cpu {used:.2f}s)"
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    mb = size / 1e6
    print(f"\n{args.rows:,} rows, {mb:.0f} MB of COPY text, best of {args.rounds}, {os.cpu_count()} CPUs")
    for label, times in (
        ("(a) psql COPY > /dev/null", psql),
        ("(b) psycopg COPY, discarded", pyc),
        (f"(c) load_snapshot, {args.workers} workers", ours),
    ):
        best = min(times)
        print(f"  {label:<34} {best:6.2f}s  {args.rows / best:>12,.0f} rows/s  {mb / best:7.1f} MB/s")
    print(f"  load client CPU (this process, best round): {min(cpu):.2f}s")
    print(f"ratio load/psql COPY    = {min(psql) / min(ours):.2f}  (goal >= 0.7)")
    print(f"ratio load/psycopg COPY = {min(pyc) / min(ours):.2f}")


if __name__ == "__main__":
    main()
