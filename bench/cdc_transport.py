"""Benchmark: the pipeline end to end over the unix socket against TCP on the loopback, same WAL.

Not a test. Run from the repository root (as root or as a user that can run PostgreSQL):

    PYTHONPATH=src python bench/cdc_transport.py [--inserts 1000000] [--updates 200000]
        [--deletes 100000] [--rounds 2] [--gathers-ms 0.1]

It starts a throwaway PostgreSQL 15 listening on its unix socket and on 127.0.0.1 (``trust``: the
server lives only as long as the run), creates bench/cdc.py's order_items-like table, one slot per
measurement, then the changes (inserts in 1,000-row transactions, then updates and deletes spread
over the table). Each slot is then drained, interleaved:

  a      ``pg_recvlogical`` over the unix socket into /dev/null: the server's decode ceiling;
  unix   ``pump`` + ``Applier`` + a fresh DuckDB warehouse, in this process, over the unix socket;
  tcp    the same over TCP on 127.0.0.1, once for each of ``--gathers-ms`` (the reader's pause
         between the first byte and a gulp, ``wire.GATHER_S``; the unix socket keeps the default).

This is the measurement that moved the pipeline daemon from the unix socket (where it logged in by
OS identity) to TCP on the loopback (SCRAM) in 2026-11. A unix socket carries one socket buffer per
message and holds about 280 of them (see docs/cdc.md, "The reader's gather"); TCP coalesces them
and its buffers grow to megabytes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.pgserver
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for bench/cdc.py's table

from tests.pgserver import PG_BIN, bare_server

from cdc import COLUMNS, ROW_EXPR
from pgbridge.cdc import wire
from pgbridge.cdc.apply import Applier, BatchLimits
from pgbridge.cdc.catalog import SourceTable, discover_tables, sink_table
from pgbridge.cdc.pipeline import pump
from pgbridge.cdc.sinks.duckdb import DuckDBSink
from pgbridge.cdc.source import ReplicationStream, StreamOptions, create_slot
from pgbridge.cdc.typemap import PG_SESSION_OPTIONS
from pgbridge.types import LSN

ROW = ROW_EXPR.replace("%%", "%")
TXN_ROWS = 1_000


def generate(dsn: str, inserts: int, updates: int, deletes: int) -> LSN:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET synchronous_commit = off")
        for first in range(1, inserts + 1, TXN_ROWS):
            last = min(first + TXN_ROWS - 1, inserts)
            c.execute(f"INSERT INTO items SELECT {ROW} FROM generate_series({first}::bigint, {last}) g".encode())
        for sql, count, prime in (
            ("UPDATE items SET qty = qty + 1, note = 'u' || id WHERE id IN", updates, 7919),
            ("DELETE FROM items WHERE id IN", deletes, 104729),
        ):
            for first in range(0, count, TXN_ROWS):
                last = min(first + TXN_ROWS, count) - 1
                pick = f"SELECT 1 + (g::bigint * {prime}) % {inserts} FROM generate_series({first}, {last}) g"
                c.execute(f"{sql} ({pick})".encode())
        row = c.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return LSN.parse(str(row[0]))


def recvlogical(dsn: str, slot: str, end: LSN) -> float:
    argv = [str(PG_BIN / "pg_recvlogical"), "-d", dsn, "--slot", slot, "--start", "--no-loop"]
    argv += ["-o", "proto_version=1", "-o", "publication_names=bench_transport", "-o", "messages=true"]
    started = time.perf_counter()
    subprocess.run([*argv, "-f", "/dev/null", f"--endpos={end}"], check=True)
    return time.perf_counter() - started


def pipeline(dsn: str, slot: str, start: LSN, table: SourceTable, transactions: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        sink = DuckDBSink(Path(folder) / "w.duckdb", "bench")
        applier = Applier(sink, {("public", "items"): sink_table(table)}, BatchLimits())
        opts = StreamOptions(("bench_transport",))
        with ReplicationStream.start(f"{dsn} options='{PG_SESSION_OPTIONS}'", slot, opts, start_lsn=start) as stream:
            started = time.perf_counter()
            while applier.stats.transactions < transactions or applier.in_transaction:
                pump(stream, applier)
            applier.flush()
            took = time.perf_counter() - started
        applier.close()
        sink.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inserts", type=int, default=1_000_000)
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--deletes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gathers-ms", default=f"{wire.GATHER_S * 1000:g}", help="comma-separated, for tcp")
    args = parser.parse_args()
    gathers = {f"tcp/{g.strip()}": float(g) / 1000 for g in args.gathers_ms.split(",")}
    variants = ["unix", *gathers]
    order = [h for r in range(args.rounds) for h in ["a", *(variants if r % 2 == 0 else variants[::-1])]]
    default_gather = wire.GATHER_S
    settings = "-c max_wal_size=4GB -c logical_decoding_work_mem=64MB -c listen_addresses=127.0.0.1"
    with bare_server("transport", settings=settings) as srv:
        tcp = f"host=127.0.0.1 port={srv.port} dbname=postgres user=postgres"
        with psycopg.connect(srv.dsn, autocommit=True) as c:
            c.execute(f"CREATE TABLE items {COLUMNS}".encode())
            c.execute(b"CREATE PUBLICATION bench_transport FOR TABLE items")
            (table,) = discover_tables(c, ["public.items"])
        starts = []
        for i in range(len(order)):
            with create_slot(srv.dsn, f"bench_transport_{i}") as slot:
                starts.append(slot.consistent_lsn)
        end = generate(srv.dsn, args.inserts, args.updates, args.deletes)
        changes = args.inserts + args.updates + args.deletes
        transactions = sum(-(-n // TXN_ROWS) for n in (args.inserts, args.updates, args.deletes))
        best: dict[str, float] = {}
        for i, how in enumerate(order):
            slot = f"bench_transport_{i}"
            wire.GATHER_S = gathers.get(how, default_gather)
            if how == "a":
                took = recvlogical(srv.dsn, slot, end)
            else:
                took = pipeline(srv.dsn if how == "unix" else tcp, slot, starts[i], table, transactions)
            best[how] = min(took, best.get(how, took))
            print(f"  {how:<8} {took:6.2f}s  {changes / took:10,.0f} changes/s", flush=True)
    a = changes / best["a"]
    print(f"best of {args.rounds}, {changes:,} changes:")
    labels = {"a": "pg_recvlogical, unix socket", "unix": "pipeline, unix socket"}
    labels |= {how: f"pipeline, TCP, gather {g * 1000:g} ms" for how, g in gathers.items()}
    for how, label in labels.items():
        rate = changes / best[how]
        print(f"  {label:<34} {rate:10,.0f} changes/s   /a = {rate / a:4.2f}")


if __name__ == "__main__":
    main()
