"""Benchmark: how fast ReplicationStream reads and decodes a pgoutput stream, against pg_recvlogical.

Not a test. Run from the repository root (as root or as a user that can run PostgreSQL):

    PYTHONPATH=src python bench/source_read.py [--rows 1000000] [--txn-rows 1000] [--rounds 3] [--dsn DSN]

Without ``--dsn`` it starts a throwaway PostgreSQL 15 (wal_level=logical, unix socket only) in a
temporary folder and removes it afterwards. It creates one slot per reader before generating the
changes (``--rows`` inserts into a narrow table, ``--txn-rows`` per transaction), so every reader
decodes exactly the same WAL, then times:

  (a) ``pg_recvlogical --start -o proto_version=1 -o publication_names=... -f /dev/null --endpos=...``
  (b) ``ReplicationStream.read_batch`` reading and decoding into typed pgoutput messages
  (c) the same stream read with psycopg2's ``read_message`` only, no decoding (for reference)
  (d) ``ReplicationStream.read_raw``, what the pipeline reads with: undecoded payloads in chunks

each ``--rounds`` times, interleaved (each run on its own slot), and prints the best changes/s of
each and the ratio b/a.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import select
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import psycopg2
import psycopg2.extras

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.pgserver

from tests.pgserver import bare_server

from pgbridge.cdc.pgoutput import Commit, Delete, Insert, Update
from pgbridge.cdc.source import ReplicationStream, StreamOptions

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TABLE = "bench_narrow"
PUBLICATION = "bench_pub"
READERS = ("a", "b", "c", "d")


def slot_name(reader: str, round_: int) -> str:
    return f"bench_{reader}_{round_}"


def prepare(dsn: str, rows: int, txn_rows: int, slots: list[str]) -> str:
    """Create the table, publication and slots, generate the changes; returns the end LSN."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name ~ '^bench_'")
        conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, n integer, t text)")
        conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}")
        for slot in slots:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        conn.execute("SET synchronous_commit = off")
        started = time.perf_counter()
        for first in range(1, rows + 1, txn_rows):
            last = min(first + txn_rows - 1, rows)
            conn.execute(
                f"INSERT INTO {TABLE} SELECT g, g %% 1000, 'row ' || g FROM generate_series(%s::bigint, %s) g",
                (first, last),
            )
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        took = time.perf_counter() - started
        print(f"generated {rows:,} inserts in {-(-rows // txn_rows):,} transactions in {took:.1f}s")
        return str(row[0])


def run_recvlogical(dsn: str, slot: str, endpos: str) -> float:
    argv = [
        str(PG_BIN / "pg_recvlogical"),
        "-d",
        dsn,
        "--slot",
        slot,
        "--start",
        "--no-loop",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={PUBLICATION}",
        "-f",
        "/dev/null",
        f"--endpos={endpos}",
    ]
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


def run_stream(dsn: str, slot: str, rows: int, batch: int) -> float:
    changes = commits = 0
    started = time.perf_counter()
    with ReplicationStream.start(dsn, slot, StreamOptions((PUBLICATION,))) as stream:
        while changes < rows:
            for msg in stream.read_batch(batch, 0.1).messages:
                cls = type(msg)
                if cls is Insert or cls is Update or cls is Delete:
                    changes += 1
                elif cls is Commit:
                    commits += 1
    elapsed = time.perf_counter() - started
    assert changes == rows and commits > 0, (changes, commits)
    return elapsed


def run_chunks(dsn: str, slot: str, rows: int) -> float:
    """ReplicationStream.read_raw, what the pipeline reads with: payloads in chunks, 'I' tags counted."""
    changes = 0
    started = time.perf_counter()
    with ReplicationStream.start(dsn, slot, StreamOptions((PUBLICATION,))) as stream:
        while changes < rows:
            changes += stream.read_raw(20_000, 0.1).tags.count(b"I")
    elapsed = time.perf_counter() - started
    assert changes == rows, changes
    return elapsed


def run_raw(dsn: str, slot: str, rows: int) -> float:
    """psycopg2 alone: read_message in a loop, count 'I' payloads, no decoding."""
    conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        cur = conn.cursor()
        started = time.perf_counter()
        cur.start_replication_expert(
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0 "
            f"(proto_version '1', publication_names '{PUBLICATION}', messages 'true')"
        )
        read, fd, changes = cur.read_message, cur.fileno(), 0
        while changes < rows:
            msg = read()
            if msg is None:
                select.select([fd], [], [], 1.0)
            elif msg.payload[0] == 0x49:  # 'I'
                changes += 1
        return time.perf_counter() - started
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--txn-rows", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=10_000, help="read_batch max_messages")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each reader; best one counts")
    parser.add_argument("--no-gc", action="store_true", help="run (b) with the cyclic garbage collector off")
    parser.add_argument("--dsn", help="use this server instead of a throwaway one (needs wal_level=logical)")
    args = parser.parse_args()

    rounds = range(args.rounds)
    slots = [slot_name(reader, r) for r in rounds for reader in READERS]
    times: dict[str, list[float]] = {reader: [] for reader in READERS}
    with contextlib.ExitStack() as stack:
        dsn = (
            args.dsn
            or stack.enter_context(
                bare_server("bench", settings="-c max_wal_size=4GB -c logical_decoding_work_mem=64MB")
            ).dsn
        )
        endpos = prepare(dsn, args.rows, args.txn_rows, slots)
        for r in rounds:
            times["a"].append(run_recvlogical(dsn, slot_name("a", r), endpos))
            if args.no_gc:
                gc.disable()
            times["b"].append(run_stream(dsn, slot_name("b", r), args.rows, args.batch))
            gc.enable()
            times["c"].append(run_raw(dsn, slot_name("c", r), args.rows))
            times["d"].append(run_chunks(dsn, slot_name("d", r), args.rows))
            print(f"round {r + 1}: " + "  ".join(f"{k} {args.rows / v[-1]:,.0f}/s" for k, v in times.items()))
        if args.dsn:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for slot in slots:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    a, b, c, d = (min(times[reader]) for reader in READERS)
    print(f"best of {args.rounds}, {args.rows:,} changes:")
    print(f"(a) pg_recvlogical -> /dev/null        {args.rows / a:>10,.0f} changes/s  ({a:.2f}s)")
    print(f"(b) ReplicationStream read + decode    {args.rows / b:>10,.0f} changes/s  ({b:.2f}s)")
    print(f"(c) psycopg2 read_message, no decode   {args.rows / c:>10,.0f} changes/s  ({c:.2f}s)")
    print(f"(d) ReplicationStream.read_raw         {args.rows / d:>10,.0f} changes/s  ({d:.2f}s)")
    print(f"ratio b/a = {a / b:.2f}   (b/c = {c / b:.2f})   d/a = {a / d:.2f}   d/c = {c / d:.2f}")


if __name__ == "__main__":
    main()
