"""Benchmark: the pipeline's CPU per change after the socket, replayed from memory (no walsender).

Not a test. Run from the repository root (as root or as a user that can run PostgreSQL):

    PYTHONPATH=src python bench/cdc_replay.py [--inserts 1000000] [--updates 200000] [--deletes 100000]
        [--rate 130000] [--max-rows 50000] [--rounds 2]

``bench/cdc.py`` measures the pipeline end to end, with the walsender on the same 2 vCPUs and
everything else on a shared host: its figures move by 20 % between runs. This one isolates what
the pipeline spends after the socket. It starts a throwaway PostgreSQL 15, creates an
order_items-like table, its publication and a slot, generates the changes (inserts in
1,000-row transactions, then updates and deletes spread over the table), and captures the
stream once as the pipeline reads it (``ReplicationStream.read_raw`` chunks). Then, each round,
it replays the captured chunks through ``pump`` into an ``Applier`` and a fresh DuckDB
warehouse, two ways:

  behind   every chunk at once, with the stream reporting a backlog: the pipeline's batches when
           it is behind the server (large, at ``max_rows``);
  paced    at ``--rate`` changes a second, in the gulps the reader thread hands over (every
           ``GATHER_S``): the batches of a pipeline that keeps up. The consumer's extra wait for
           64 kB after it waited (``wire.GULP_S``) is not modelled, and paced figures from before
           GATHER_S went from 0.5 to 0.1 ms (2026-11-22) had gulps 5 times larger.

It prints the wall time, the CPU time of the whole process (main thread, apply thread, DuckDB's
threads) per change, the main thread's share, and the number of warehouse commits. The reader
thread's receiving and framing are not in these figures (``bench/source_read.py`` measures those).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.pgserver
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for bench/cdc.py's table

from tests.pgserver import bare_server

from cdc import COLUMNS, ROW_EXPR
from pgbridge.cdc.apply import Applier, BatchLimits
from pgbridge.cdc.catalog import discover_tables, sink_table
from pgbridge.cdc.pipeline import BEHIND_BYTES, pump
from pgbridge.cdc.sinks.duckdb import DuckDBSink
from pgbridge.cdc.source import RawChunk, ReplicationStream, StreamOptions, create_slot
from pgbridge.cdc.typemap import PG_SESSION_OPTIONS
from pgbridge.cdc.wire import GATHER_S  # the reader thread's gulps
from pgbridge.types import LSN

ROW = ROW_EXPR.replace("%%", "%")  # bench/cdc.py's rows, here in SQL sent without parameters
TXN_ROWS = 1_000


def capture(inserts: int, updates: int, deletes: int) -> tuple[Any, list[tuple[list[bytes], bytes]]]:
    """The table's SourceTable and the stream as read_raw chunks."""
    with bare_server("replay", settings="-c max_wal_size=4GB -c logical_decoding_work_mem=64MB") as srv:
        with psycopg.connect(srv.dsn, autocommit=True) as c:
            c.execute(f"CREATE TABLE items {COLUMNS}")
            c.execute("CREATE PUBLICATION bench_replay FOR TABLE items")
            (table,) = discover_tables(c, ["public.items"])
        with create_slot(srv.dsn, "bench_replay") as slot:
            start = slot.consistent_lsn
        started = time.perf_counter()
        with psycopg.connect(srv.dsn, autocommit=True) as c:
            c.execute("SET synchronous_commit = off")
            for first in range(1, inserts + 1, TXN_ROWS):
                last = min(first + TXN_ROWS - 1, inserts)
                c.execute(f"INSERT INTO items SELECT {ROW} FROM generate_series({first}::bigint, {last}) g")
            for name, count, sql in (
                ("updates", updates, "UPDATE items SET qty = qty + 1, note = 'u' || id WHERE id IN"),
                ("deletes", deletes, "DELETE FROM items WHERE id IN"),
            ):
                prime = 7919 if name == "updates" else 104729
                for first in range(0, count, TXN_ROWS):
                    last = min(first + TXN_ROWS, count) - 1
                    c.execute(
                        f"{sql} (SELECT 1 + (g::bigint * {prime}) % {inserts} FROM generate_series({first}, {last}) g)"
                    )
        took = time.perf_counter() - started
        print(f"generated {inserts:,} inserts, {updates:,} updates, {deletes:,} deletes in {took:.1f}s")
        chunks: list[tuple[list[bytes], bytes]] = []
        opts = StreamOptions(publications=("bench_replay",))
        dsn = srv.dsn + f" options='{PG_SESSION_OPTIONS}'"
        with ReplicationStream.start(dsn, "bench_replay", opts, start_lsn=start) as stream:
            while len(chunk := stream.read_raw(20_000, 2.0)):
                chunks.append((chunk.payloads, chunk.tags))
        print(f"captured {sum(len(p) for p, _ in chunks):,} messages")
        return table, chunks


class ReplayStream:
    """What ``pump`` needs of a ReplicationStream, served from captured chunks."""

    def __init__(self, chunks: list[tuple[list[bytes], bytes]], rate: int) -> None:
        self.payloads = [p for ps, _ in chunks for p in ps]
        self.tags = b"".join(t for _, t in chunks)
        self.rate = rate  # 0: everything is there at once (behind)
        self.sent = 0
        self.started = time.perf_counter()
        self.buffered = 0

    @property
    def done(self) -> bool:
        return self.sent >= len(self.payloads)

    def read_raw(self, max_messages: int = 20_000, max_wait_s: float = 1.0, max_bytes: int = 0) -> RawChunk:
        total = len(self.payloads)
        if self.rate:
            due = min(total, int((time.perf_counter() - self.started) * self.rate))
            if due - self.sent < 50:  # the reader hands over what gathered meanwhile
                time.sleep(min(max_wait_s, GATHER_S))
                due = min(total, int((time.perf_counter() - self.started) * self.rate))
        else:
            due = total
        end = min(due, self.sent + max_messages)
        chunk = RawChunk(self.payloads[self.sent : end], self.tags[self.sent : end])
        self.sent = end
        self.buffered = (due - end) * 128 if self.rate else (BEHIND_BYTES if end < total else 0)
        return chunk

    def confirm(self, lsn: LSN) -> None:
        pass

    def idle_position(self) -> LSN | None:
        return None


def replay(table: Any, chunks: list[tuple[list[bytes], bytes]], rate: int, max_rows: int, folder: Path) -> str:
    path = folder / "replay.duckdb"
    for p in (path, path.with_suffix(".duckdb.wal")):
        p.unlink(missing_ok=True)
    sink = DuckDBSink(path, "replay")
    commits = 0
    commit = sink.commit

    def counted(*args: Any, **kwargs: Any) -> None:
        nonlocal commits
        commits += 1
        commit(*args, **kwargs)

    sink.commit = counted  # type: ignore[method-assign]
    applier = Applier(sink, {("public", "items"): sink_table(table)}, BatchLimits(max_rows=max_rows))
    stream = ReplayStream(chunks, rate)
    changes = stream.tags.count(b"I") + stream.tags.count(b"U") + stream.tags.count(b"D")
    cpu, main, wall = time.process_time(), time.thread_time(), time.perf_counter()
    with contextlib.closing(applier):
        while not stream.done:
            pump(stream, applier)  # type: ignore[arg-type]
        applier.flush()
        cpu, main, wall = time.process_time() - cpu, time.thread_time() - main, time.perf_counter() - wall
        rows = sink.con.execute("SELECT count(*) FROM public.items").fetchone()
    sink.close()
    mode = f"paced {rate:,}/s" if rate else "behind"
    per = f"CPU {cpu / changes * 1e6:4.2f} us per change (main thread {main / changes * 1e6:4.2f})"
    held = rows[0] if rows else 0
    rate_s = f"{changes / wall:9,.0f}/s"
    return f"  {mode:<16} {changes:,} changes in {wall:5.2f}s ({rate_s})  {per}  {commits} commits, {held:,} rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inserts", type=int, default=1_000_000)
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--deletes", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=130_000, help="changes/s of the paced replay")
    parser.add_argument("--max-rows", type=int, default=50_000, help="batch.max_rows")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    table, chunks = capture(args.inserts, args.updates, args.deletes)
    with tempfile.TemporaryDirectory(prefix="pgbridge-replay-") as folder:
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} (load average {os.getloadavg()[0]:.2f}):")
            for rate in (0, args.rate):
                print(replay(table, chunks, rate, args.max_rows, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
