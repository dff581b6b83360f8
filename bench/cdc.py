"""Benchmark: the CDC pipeline end to end on one real deployment, against what PostgreSQL itself can do.

Not a test. Run from the repository root as root (the servers run as the service user, postgres):

    PYTHONPATH=src python bench/cdc.py [--inserts 1000000] [--updates 200000] [--deletes 100000]
        [--txn-rows 1000] [--load-rows 2000000] [--load-rounds 2] [--latency-seconds 30] [--quick]

It brings up one deployment through the CLI (``pgbridge up``, a spec with a ``pipeline:`` section,
in a temporary PGBRIDGE_HOME_BASE, on a free port) and destroys it at the end, also after a failure
or Ctrl-C (``pgbridge destroy --yes``, then the process trees of its pid files, never by name).
The source is driven over the admin unix socket; tables are created as the application role, so
the CDC role can read them. In one run, in this order, it measures:

  (d) the initial load of an order_items-like table (``--load-rows``): ``psql -c "COPY (SELECT *
      FROM t) TO STDOUT" > /dev/null`` against the pipeline daemon loading it, timed from its slot
      appearing to its stream starting (the pipeline is reset for each round: stopped, its slot
      dropped, its warehouse file removed, started), and ``load_snapshot`` in this process under a
      temporary slot into a scratch DuckDB file, for reference;
  (a) with the pipeline stopped and a second pgoutput slot created (Patroni is told to leave it
      alone through ``ignore_slots``), ``--inserts`` inserts in ``--txn-rows`` transactions, then
      ``--updates`` updates and ``--deletes`` deletes spread over the table; ``pg_recvlogical
      --start -o proto_version=1 -o publication_names=pgbridge_<pipeline> -o messages=true
      --no-loop -E <end> -f /dev/null`` drains that slot: the server's decode ceiling;
  (b) ``pgbridge pipeline start``, timed until the pipeline slot's confirmed_flush_lsn (confirmed
      only after the DuckDB commit) reaches the same end LSN, from its walsender starting (and from
      the start command, daemon start-up included), with the rate of each phase (to the batch);
      the warehouse is checked against the source. The daemon streams over TCP on 127.0.0.1 (as
      a deployment's daemon does, with SCRAM), while (a) reads over the unix socket, its fastest;
  (c) a writer thread committing ``--txn-per-s`` transactions a second, together inserting
      order_items-like rows at half of (b)'s rate (each transaction also sets a one-row tick table
      to its number), while a prober asks the pipeline's query socket for the tick every
      ``--probe-ms``: commit-to-queryable is the time from the writer's COMMIT returning to the
      first probe answer that shows it (one monotonic clock); the first ``--warmup`` seconds are
      left out.

The pipeline runs with pgbridge's default batch settings unless ``--max-rows``, ``--max-wait-ms`` or
``--load-workers`` say otherwise. Everything shares the host: other work on it skews the figures
(the summary prints the load average before and after).

It prints rows or changes/s and MB/s (of WAL for a and b, of COPY text for d), p50/p99/max for c,
the ratios b/a and d/COPY, and PASS/MISS against the goals: b/a >= 0.8, p99 <= 1 s, d/COPY >= 0.7.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for the shared rig

from pgbridge.cdc.catalog import discover_tables
from pgbridge.cdc.pipeline import query as socket_query
from pgbridge.cdc.sinks.duckdb import DuckDBSink
from pgbridge.cdc.snapshot import load_snapshot
from pgbridge.cdc.source import SnapshotSlot
from rig import Rig, deployment, pgbridge_argv, say

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ADMIN_ROLE = "pgbridge_admin"
DATABASE = SCHEMA = "shop"
APP_ROLE = "shop_app"
PIPELINE = "bench"
BENCH_SLOT = "bench_recvlogical"
ITEMS, LOAD, LATENCY, TICK = (f"{SCHEMA}.{t}" for t in ("bench_items", "bench_load", "bench_latency", "bench_tick"))
COLUMNS = (
    "(id bigint PRIMARY KEY, order_id bigint, product_id int, qty int, price numeric(12,2),"
    " created_at timestamptz, note text)"
)
ROW_EXPR = (
    "g, g / 4, (g * 7919) %% 100000, 1 + g %% 5, ((g * 31) %% 100000) / 100.0,"
    " timestamptz '2024-01-01' + g * interval '1 second',"
    " CASE WHEN g %% 10 = 0 THEN NULL ELSE 'note for item ' || g END"
)
GOAL_B_A, GOAL_P99_S, GOAL_D_COPY = 0.8, 1.0, 0.7
FULL = {"inserts": 1_000_000, "updates": 200_000, "deletes": 100_000, "load_rows": 2_000_000}
FULL |= {"load_rounds": 2, "latency_seconds": 30}
QUICK = {"inserts": 20_000, "updates": 4_000, "deletes": 2_000, "load_rows": 100_000}
QUICK |= {"load_rounds": 1, "latency_seconds": 6}


# -- the deployment ----------------------------------------------------------------------------------
class CdcRig(Rig):
    """A deployment with the bench pipeline: its slot, socket, warehouse and status."""

    @property
    def admin_dsn(self) -> str:
        return (
            f"host={self.home / 'run'} port={self.port} dbname={DATABASE} user={ADMIN_ROLE}"
            " application_name=pgbridge-bench"
        )

    @property
    def slot(self) -> str:
        return f"pgbridge_{PIPELINE}"

    @property
    def publication(self) -> str:
        return f"pgbridge_{PIPELINE}"

    @property
    def socket(self) -> Path:
        return self.home / "run" / f"pipeline-{PIPELINE}.sock"

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse" / f"{PIPELINE}.duckdb"

    def pipeline_status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("pipeline", "status", "--json"))
        return result

    def query(self, sql: str) -> list[list[Any]]:
        answer = socket_query(self.socket, sql, timeout=60)
        if "error" in answer:
            raise RuntimeError(f"warehouse query failed: {answer['error']}")
        rows: list[list[Any]] = answer["rows"]
        return rows

    def diagnosis(self) -> str:
        log = self.home / "logs" / f"pipeline-{PIPELINE}.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no pipeline log)"
        try:
            status = json.dumps(self.pipeline_status(), indent=1)[:3000]
        except Exception as e:  # diagnosing a failure must not fail
            status = f"(status failed: {e})"
        return f"pipeline status: {status}\npipeline log tail:\n{tail}"


def cdc_deployment(instance_class: str, pipeline_extra: str) -> contextlib.AbstractContextManager[CdcRig]:
    extra = f"pipeline:\n  name: {PIPELINE}\n{pipeline_extra}"
    return deployment(extra, rig_class=CdcRig, instance_class=instance_class, size_gb=100)


def connect(rig: CdcRig, *, app: bool = False, autocommit: bool = True) -> psycopg.Connection[Any]:
    """Admin over the unix socket (peer identity); ``app``: acting as the application role."""
    conn = psycopg.connect(rig.admin_dsn, autocommit=autocommit, connect_timeout=10)
    conn.execute("SET log_statement = 'none'")
    conn.execute("SET log_min_duration_statement = -1")
    if app:
        conn.execute(f"SET ROLE {APP_ROLE}")
    if not autocommit:
        conn.commit()
    return conn


def ignore_bench_slot(rig: CdcRig) -> None:
    """Patroni drops replication slots it does not know within one HA loop; tell it to leave ours alone."""
    from pgbridge.home import Home
    from pgbridge.ops.context import Deployment
    from pgbridge.settings import load_settings

    api = Deployment(load_settings(), Home(rig.home)).patroni()
    ignore = [m for m in api.config().get("ignore_slots") or [] if m.get("name") != BENCH_SLOT]
    api.patch_config({"ignore_slots": [*ignore, {"name": BENCH_SLOT, "type": "logical"}]})
    time.sleep(1)  # the PATCH wakes the HA loop up, which reads the new configuration


# -- slot watching ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotView:
    exists: bool
    state: str | None  # of the walsender holding it: startup | catchup | streaming
    confirmed: int  # confirmed_flush_lsn as a number


def slot_view(admin: psycopg.Connection[Any], slot: str) -> SlotView:
    row = admin.execute(
        "SELECT r.state, pg_wal_lsn_diff(coalesce(s.confirmed_flush_lsn, '0/0'), '0/0')::bigint"
        " FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid"
        " WHERE s.slot_name = %s",
        (slot,),
    ).fetchone()
    return SlotView(True, row[0], int(row[1])) if row else SlotView(False, None, 0)


def lsn(admin: psycopg.Connection[Any], expr: str) -> int:
    row = admin.execute(f"SELECT pg_wal_lsn_diff({expr}, '0/0')::bigint").fetchone()
    assert row is not None
    return int(row[0])


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass
class Watch:
    started: float  # before `pipeline start`
    cli_done: float = 0.0
    slot_seen: float = 0.0  # first poll that found the slot
    streaming: float = 0.0  # its walsender in catchup/streaming
    done: float = 0.0  # confirmed through the target (or streaming, without a target)
    marks: list[float] = field(default_factory=list)  # when confirmed first reached each mark LSN


def start_and_watch(
    rig: CdcRig,
    admin: psycopg.Connection[Any],
    target: int | None,
    timeout: float,
    marks: Sequence[int] = (),
    every: float = 0.02,
) -> Watch:
    """`pipeline start`, polling the pipeline slot every ``every`` s while it runs and after."""
    w = Watch(time.monotonic())
    proc = subprocess.Popen(
        [*pgbridge_argv(), "-f", str(rig.spec), "pipeline", "start"],
        env=rig.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while True:
            v = slot_view(admin, rig.slot)
            now = time.monotonic()
            if v.exists and not w.slot_seen:
                w.slot_seen = now
            if v.state in ("catchup", "streaming") and not w.streaming:
                w.streaming = now
            while len(w.marks) < len(marks) and v.confirmed >= marks[len(w.marks)]:
                w.marks.append(now)
            if w.streaming and (target is None or v.confirmed >= target):
                w.done = now
                break
            if not w.cli_done and proc.poll() is not None:
                w.cli_done = now
                if proc.returncode != 0:
                    raise RuntimeError(f"pgbridge pipeline start exited {proc.returncode}: {proc.communicate()}")
            if now - w.started > timeout:
                raise RuntimeError(
                    f"the pipeline did not get there in {timeout:.0f}s (slot {v}, target {target})\n{rig.diagnosis()}"
                )
            time.sleep(every)
        _, err = proc.communicate(timeout=120)  # reads its pipes: a chatty CLI cannot block on them
        if proc.returncode != 0:
            raise RuntimeError(f"pgbridge pipeline start exited {proc.returncode}: {err.strip()}")
        w.cli_done = w.cli_done or time.monotonic()
        return w
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def drop_slot(admin: psycopg.Connection[Any], slot: str) -> None:
    admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,))


def stop_pipeline(rig: CdcRig, admin: psycopg.Connection[Any]) -> None:
    rig.cli("pipeline", "stop")
    deadline = time.monotonic() + 60
    while slot_view(admin, rig.slot).state is not None:  # its walsender gone: the slot is released
        if time.monotonic() > deadline:
            raise RuntimeError("the pipeline slot is still active 60s after `pipeline stop`")
        time.sleep(0.05)


def wait_warehouse(rig: CdcRig, sql: str, want: list[Any], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    got: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            got = rig.query(sql)[0]
            if [str(x) for x in got] == [str(x) for x in want]:
                return
        time.sleep(0.2)
    raise RuntimeError(f"warehouse {sql!r} answered {got}, expected {want}\n{rig.diagnosis()}")


# -- (d) initial load -----------------------------------------------------------------------------------
@dataclass
class LoadResult:
    rows: int
    copy_bytes: int
    psql: list[float] = field(default_factory=list)
    daemon: list[float] = field(default_factory=list)  # slot created -> stream started
    daemon_total: list[float] = field(default_factory=list)  # `pipeline start` -> stream started
    library: list[float] = field(default_factory=list)  # load_snapshot in this process


def prepare_load(rig: CdcRig, rows: int) -> int:
    """Create and fill the load table (pipeline stopped); returns the size of its COPY text."""
    with connect(rig, app=True) as app:
        app.execute(f"CREATE TABLE {LOAD} {COLUMNS}")
        started = time.perf_counter()
        app.execute(f"INSERT INTO {LOAD} SELECT {ROW_EXPR} FROM generate_series(1::bigint, %s) g", (rows,))
        app.execute(f"VACUUM (FREEZE, ANALYZE) {LOAD}")  # hint bits set: no COPY pays for them
        say(f"(d) generated {rows:,} rows in {time.perf_counter() - started:.1f}s")
    with connect(rig) as admin:
        admin.execute("CHECKPOINT")
    size = 0
    with (  # also warms the cache
        psycopg.connect(rig.admin_dsn) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY (SELECT * FROM {LOAD}) TO STDOUT") as copy,
    ):
        for data in copy:
            size += len(data)
    return size


def copy_psql(rig: CdcRig) -> float:
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-q", "-d", rig.admin_dsn, "-c", f"COPY (SELECT * FROM {LOAD}) TO STDOUT"],
            stdout=sink,
            check=True,
        )
    return time.perf_counter() - started


def daemon_load(rig: CdcRig, admin: psycopg.Connection[Any], rows: int) -> tuple[float, float]:
    """A fresh initial load by the pipeline daemon: (slot created -> streaming, start -> streaming)."""
    stop_pipeline(rig, admin)
    drop_slot(admin, rig.slot)
    for f in rig.warehouse.parent.glob(f"{rig.warehouse.name}*"):
        f.unlink()
    w = start_and_watch(rig, admin, None, timeout=max(300, rows / 10_000), every=0.05)
    wait_warehouse(rig, f"SELECT count(*) FROM {LOAD}", [rows], timeout=60)
    return w.streaming - w.slot_seen, w.streaming - w.started


def library_load(rig: CdcRig, round_: int, workers: int, rows: int) -> float:
    """load_snapshot in this process, under a temporary slot, into a scratch DuckDB file."""
    folder = rig.base / "scratch"
    folder.mkdir(exist_ok=True)
    path = folder / f"load-{round_}.duckdb"
    sink = DuckDBSink(path, "bench")
    try:
        with psycopg.connect(rig.admin_dsn) as conn:
            tables = discover_tables(conn, [LOAD], [], {})
        started = time.perf_counter()
        with SnapshotSlot.create(rig.admin_dsn, f"bench_load_{round_}", temporary=True) as slot:
            report = load_snapshot(
                rig.admin_dsn, slot.snapshot_name, tables, sink, workers=workers, consistent_lsn=slot.consistent_lsn
            )
        took = time.perf_counter() - started
        if report.rows != rows:
            raise RuntimeError(f"load_snapshot loaded {report.rows} rows, expected {rows}")
        return took
    finally:
        sink.close()
        for leftover in folder.glob(f"load-{round_}.duckdb*"):
            leftover.unlink()


def bench_load(rig: CdcRig, rows: int, rounds: int, workers: int) -> LoadResult:
    with connect(rig) as admin:
        stop_pipeline(rig, admin)
        result = LoadResult(rows, prepare_load(rig, rows))
        for r in range(rounds):
            result.psql.append(copy_psql(rig))
            took, total = daemon_load(rig, admin, rows)
            result.daemon.append(took)
            result.daemon_total.append(total)
            result.library.append(library_load(rig, r, workers, rows))
            say(
                f"(d) round {r + 1}: psql COPY {result.psql[-1]:.2f}s  daemon load {took:.2f}s"
                f" ({total:.2f}s from `pipeline start`)  load_snapshot here {result.library[-1]:.2f}s"
            )
    return result


# -- (a) and (b): the same WAL, decoded by pg_recvlogical and by the pipeline ----------------------------
@dataclass
class StreamResult:
    changes: int
    wal_bytes: int
    recv_s: float
    pipe_s: float  # walsender streaming -> confirmed through the end
    pipe_total_s: float  # `pipeline start` -> confirmed through the end
    applied_changes: int | None


def create_stream_tables(rig: CdcRig) -> None:
    """The (b) and (c) tables, made known to the pipeline before it is stopped."""
    with connect(rig, app=True) as app:
        app.execute(f"CREATE TABLE {ITEMS} {COLUMNS}")
        app.execute(f"CREATE TABLE {LATENCY} (txn bigint NOT NULL, LIKE {ITEMS} INCLUDING ALL)")
        app.execute(f"CREATE TABLE {TICK} (id int PRIMARY KEY, txn bigint NOT NULL)")
        app.execute(f"INSERT INTO {TICK} VALUES (1, 0)")
        app.execute(f"INSERT INTO {LATENCY} SELECT 0, {ROW_EXPR} FROM generate_series(%s::bigint, %s) g", (0, 0))
    wait_warehouse(rig, f"SELECT count(*) FROM {TICK}", [1])
    wait_warehouse(rig, f"SELECT count(*) FROM {LATENCY}", [1])


def generate(rig: CdcRig, inserts: int, updates: int, deletes: int, txn_rows: int) -> list[int]:
    """Inserts in txn_rows transactions, then updates and deletes spread over the table, as many per txn.

    Returns, for the insert and the update phase, a position past every commit before the phase's
    last transaction and not past that transaction's commit: the slot's confirmed_flush_lsn reaches
    it exactly when the whole phase is confirmed.
    """
    up_stride = max(1, inserts // max(updates, 1))
    del_stride = max(1, inserts // max(deletes, 1))
    del_offset = 1 if del_stride > 1 else 0  # never a multiple of the update stride when both are 5 and 10
    chunks = [(first, min(first + txn_rows - 1, inserts)) for first in range(1, inserts + 1, txn_rows)]
    phases: list[list[tuple[str, tuple[Any, ...], int | None]]] = [
        [(f"INSERT INTO {ITEMS} SELECT {ROW_EXPR} FROM generate_series(%s::bigint, %s) g", c, None) for c in chunks]
    ]
    sql = f"UPDATE {ITEMS} SET qty = qty + 1, price = price + 1, note = 'updated' WHERE id = ANY(%s)"
    ids = [k * up_stride for k in range(1, updates + 1)]
    phases.append([(sql, (ids[i : i + txn_rows],), len(ids[i : i + txn_rows])) for i in range(0, updates, txn_rows)])
    ids = [k * del_stride - del_offset for k in range(1, deletes + 1)]
    sql = f"DELETE FROM {ITEMS} WHERE id = ANY(%s)"
    phases.append([(sql, (ids[i : i + txn_rows],), len(ids[i : i + txn_rows])) for i in range(0, deletes, txn_rows)])
    marks: list[int] = []
    took: list[float] = []
    with connect(rig, app=True) as app:
        app.execute("SET synchronous_commit = off")  # the same WAL either way; only faster to make
        for statements in phases:
            started, mark = time.perf_counter(), lsn(app, "pg_current_wal_insert_lsn()")
            for i, (query, params, rows) in enumerate(statements):
                if i == len(statements) - 1:
                    mark = lsn(app, "pg_current_wal_insert_lsn()")
                cur = app.execute(query, params)
                assert rows is None or cur.rowcount == rows, (query, cur.rowcount, rows)
            marks.append(mark + 1)
            took.append(time.perf_counter() - started)
    say(
        f"(a/b) generated {inserts:,} inserts ({took[0]:.1f}s), {updates:,} updates ({took[1]:.1f}s) and"
        f" {deletes:,} deletes ({took[2]:.1f}s) in {txn_rows:,}-row transactions"
    )
    return marks[:2]


def run_recvlogical(rig: CdcRig, endpos: int) -> float:
    argv = [
        str(PG_BIN / "pg_recvlogical"),
        "-d",
        rig.admin_dsn,
        "--slot",
        BENCH_SLOT,
        "--start",
        "--no-loop",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={rig.publication}",
        "-o",
        "messages=true",  # as the pipeline asks
        "-f",
        "/dev/null",
        f"--endpos={lsn_text(endpos)}",
    ]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pg_recvlogical exited {proc.returncode}: {proc.stderr.strip()}")
    return took


def bench_stream(rig: CdcRig, inserts: int, updates: int, deletes: int, txn_rows: int) -> StreamResult:
    changes = inserts + updates + deletes
    with connect(rig) as admin:
        stop_pipeline(rig, admin)
        ignore_bench_slot(rig)
        row = admin.execute(
            "SELECT pg_wal_lsn_diff(lsn, '0/0')::bigint FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
            (BENCH_SLOT,),
        ).fetchone()
        assert row is not None
        start = int(row[0])
        try:
            marks = generate(rig, inserts, updates, deletes, txn_rows)
            end = lsn(admin, "pg_current_wal_insert_lsn()")  # past the last commit, flushed or not
            admin.execute("CHECKPOINT")  # flushes it, and no checkpoint falls into the timed runs
            if not slot_view(admin, BENCH_SLOT).exists:
                raise RuntimeError(f"slot {BENCH_SLOT} was dropped (by Patroni?) before pg_recvlogical ran")
            wal = end - start
            say(f"(a/b) {wal / 1e6:,.1f} MB of WAL from {lsn_text(start)} to {lsn_text(end)}")
            recv = run_recvlogical(rig, end)
            say(f"(a) pg_recvlogical drained it in {recv:.2f}s: {changes / recv:,.0f} changes/s")
        finally:
            drop_slot(admin, BENCH_SLOT)
        w = start_and_watch(rig, admin, end, timeout=max(300, changes / 2_000), marks=marks)
        pipe, total = w.done - w.streaming, w.done - w.started
        say(
            f"(b) pipeline applied it in {pipe:.2f}s from its stream starting ({total:.2f}s from `pipeline start`):"
            f" {changes / pipe:,.0f} changes/s"
        )
        with connect(rig) as app:
            src = app.execute(f"SELECT count(*), sum(qty) FROM {ITEMS}").fetchone()
        assert src is not None
        wait_warehouse(rig, f"SELECT count(*), sum(qty) FROM {ITEMS}", list(src), timeout=30)
        time.sleep(1.5)  # the status file is written once a second
        applied = rig.pipeline_status().get("changes")
        if applied != changes:
            say(f"(b) WARNING: the pipeline counted {applied} changes since its start, expected {changes}")
    if len(w.marks) == 2:  # confirmations come a batch at a time, so the boundaries are as coarse
        bounds = [w.streaming, *w.marks, w.done]
        rates = [
            f"{label} {n / (b - a):,.0f}/s"
            for label, n, a, b in zip(
                ("inserts", "updates", "deletes"), (inserts, updates, deletes), bounds[:-1], bounds[1:], strict=True
            )
            if n and b > a
        ]
        say("(b) by phase: " + ", ".join(rates))
    return StreamResult(changes, wal, recv, pipe, total, applied)


# -- (c) commit-to-queryable latency ---------------------------------------------------------------------
@dataclass
class LatencyResult:
    target_rows_s: float
    rows_per_txn: int
    txns: int
    seconds: float
    samples: list[float]
    probe_rtt_ms: float

    @property
    def achieved_rows_s(self) -> float:
        return self.txns * self.rows_per_txn / self.seconds

    def pct(self, p: float) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def bench_latency(
    rig: CdcRig, rate: float, seconds: float, txn_per_s: float, probe_s: float, warmup_s: float
) -> LatencyResult:
    rows_per_txn = max(1, round(rate / txn_per_s))
    committed: dict[int, float] = {}
    visible: dict[int, float] = {}
    rtts: list[float] = []
    stop_writer, stop_prober = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    last = [0]

    def writer() -> None:
        try:
            with connect(rig, app=True, autocommit=False) as conn:
                interval, txn = 1 / txn_per_s, 0
                due = time.monotonic()
                while not stop_writer.is_set():
                    txn += 1
                    first = (txn - 1) * rows_per_txn + 1
                    conn.execute(
                        f"INSERT INTO {LATENCY} SELECT %s, {ROW_EXPR} FROM generate_series(%s::bigint, %s) g",
                        (txn, first, first + rows_per_txn - 1),
                    )
                    conn.execute(f"UPDATE {TICK} SET txn = %s WHERE id = 1", (txn,))
                    conn.commit()
                    committed[txn] = time.monotonic()
                    last[0] = txn
                    due += interval
                    pause = due - time.monotonic()
                    if pause > 0:
                        stop_writer.wait(pause)
                    elif pause < -1:
                        due = time.monotonic()  # fell behind by more than a second: do not burst to catch up
        except BaseException as e:
            errors.append(e)

    def prober() -> None:
        seen = 0
        try:
            while not stop_prober.is_set():
                sent = time.monotonic()
                n = int(rig.query(f"SELECT txn FROM {TICK}")[0][0])
                now = time.monotonic()
                rtts.append(now - sent)
                for i in range(seen + 1, n + 1):
                    visible[i] = now
                seen = max(seen, n)
                stop_prober.wait(probe_s)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=prober, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    began = time.monotonic()
    try:
        while time.monotonic() - began < seconds and not errors:
            time.sleep(0.1)
    finally:
        stop_writer.set()
        threads[1].join(30)
    elapsed = time.monotonic() - began
    deadline = time.monotonic() + 60
    while last[0] not in visible and not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_prober.set()
    threads[0].join(30)
    if errors:
        raise RuntimeError(f"latency run failed: {errors[0]!r}\n{rig.diagnosis()}")
    if last[0] not in visible:
        raise RuntimeError(f"transaction {last[0]} never became visible\n{rig.diagnosis()}")
    measured = [i for i, t in committed.items() if t - began >= warmup_s]
    samples = [max(0.0, visible[i] - committed[i]) for i in measured]
    rtts.sort()
    return LatencyResult(rate, rows_per_txn, last[0], elapsed, samples, 1000 * rtts[len(rtts) // 2])


# -- main --------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(args: argparse.Namespace, load: LoadResult, stream: StreamResult, lat: LatencyResult) -> None:
    mb_wal, mb_copy = stream.wal_bytes / 1e6, load.copy_bytes / 1e6
    best_psql, best_daemon, best_lib = min(load.psql), min(load.daemon), min(load.library)
    best_total = min(load.daemon_total)
    b_a = stream.recv_s / stream.pipe_s
    d_copy = best_psql / best_daemon
    say()
    say(f"pgbridge CDC benchmark: {args.instance_class} deployment, PostgreSQL 15, {os.cpu_count()} CPUs")
    say(f"host load average (1 min) at the start {args.load_before:.2f}, at the end {os.getloadavg()[0]:.2f}")
    say(
        f"stream workload: {args.inserts:,} inserts + {args.updates:,} updates + {args.deletes:,} deletes"
        f" = {stream.changes:,} changes in {args.txn_rows:,}-row transactions, {mb_wal:,.1f} MB of WAL"
    )
    say(f"load table: {load.rows:,} rows, {mb_copy:,.1f} MB of COPY text, best of {len(load.psql)} round(s)")
    say()
    say(f"  {'':<52} {'seconds':>8} {'rate':>18} {'MB/s':>8}")

    def line(label: str, secs: float, n: int, unit: str, mb: float) -> None:
        say(f"  {label:<52} {secs:8.2f} {n / secs:>11,.0f} {unit:<6} {mb / secs:8.1f}")

    line("(a) pg_recvlogical -> /dev/null", stream.recv_s, stream.changes, "chg/s", mb_wal)
    line("(b) pgbridge -> DuckDB, from its stream starting", stream.pipe_s, stream.changes, "chg/s", mb_wal)
    line("    same, from `pipeline start` (daemon start-up)", stream.pipe_total_s, stream.changes, "chg/s", mb_wal)
    line("(d) psql COPY (SELECT * FROM t) TO STDOUT > /dev/null", best_psql, load.rows, "rows/s", mb_copy)
    line("    pgbridge initial load (daemon, slot -> streaming)", best_daemon, load.rows, "rows/s", mb_copy)
    line("    same, from `pipeline start`", best_total, load.rows, "rows/s", mb_copy)
    line("    load_snapshot in this process (reference)", best_lib, load.rows, "rows/s", mb_copy)
    say(
        f"(c) steady load: target {lat.target_rows_s:,.0f} rows/s (half of b), achieved {lat.achieved_rows_s:,.0f}"
        f" rows/s in {lat.txns:,} transactions of {lat.rows_per_txn} rows over {lat.seconds:.0f}s;"
        f" {len(lat.samples):,} measured after {args.warmup:.0f}s of warm-up"
    )
    say(
        f"    commit -> queryable: p50 {lat.pct(50):.3f}s  p90 {lat.pct(90):.3f}s  p99 {lat.pct(99):.3f}s"
        f"  max {max(lat.samples):.3f}s  (probe every {args.probe_ms} ms, median probe {lat.probe_rtt_ms:.1f} ms)"
    )
    if stream.applied_changes != stream.changes:
        say(f"    note: the pipeline counted {stream.applied_changes} changes for (b), expected {stream.changes}")
    say()
    say(f"  {'goal':<34} {'value':>8} {'target':>10}  result")
    say(f"  {'b/a (pipeline / pg_recvlogical)':<34} {b_a:8.2f} {'>= 0.8':>10}  {verdict(b_a >= GOAL_B_A)}")
    p99 = lat.pct(99)
    say(f"  {'p99 commit -> queryable':<34} {p99:7.3f}s {'<= 1 s':>10}  {verdict(p99 <= GOAL_P99_S)}")
    say(f"  {'d/COPY (initial load / psql COPY)':<34} {d_copy:8.2f} {'>= 0.7':>10}  {verdict(d_copy >= GOAL_D_COPY)}")
    say(f"  (load_snapshot in this process / psql COPY = {best_psql / best_lib:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--inserts", type=int)
    parser.add_argument("--updates", type=int)
    parser.add_argument("--deletes", type=int)
    parser.add_argument("--txn-rows", type=int, default=1_000, help="rows per transaction of the (a/b) workload")
    parser.add_argument("--load-rows", type=int)
    parser.add_argument("--load-rounds", type=int, help="rounds of (d); the best one counts")
    parser.add_argument("--latency-seconds", type=float)
    parser.add_argument("--warmup", type=float, help="seconds of (c) left out of the figures (default: 1/10)")
    parser.add_argument("--txn-per-s", type=float, default=100, help="commits per second of the (c) writer")
    parser.add_argument("--probe-ms", type=int, default=20, help="pause between (c) probes")
    parser.add_argument("--instance-class", default="db.large")
    parser.add_argument("--load-workers", type=int, help="pipeline load_workers (default: pgbridge's)")
    parser.add_argument("--max-rows", type=int, help="pipeline batch.max_rows (default: pgbridge's)")
    parser.add_argument("--max-wait-ms", type=int, help="pipeline batch.max_wait_ms (default: pgbridge's)")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = args.latency_seconds / 10
    if args.updates > args.inserts or args.deletes > args.inserts:
        parser.error("--updates and --deletes cannot exceed --inserts")
    if os.geteuid() != 0:
        parser.error("run as root: the deployment's servers run as the service user")

    extra = ""
    if args.max_rows or args.max_wait_ms:
        batch = {k: v for k, v in (("max_rows", args.max_rows), ("max_wait_ms", args.max_wait_ms)) if v}
        extra += "  batch: {" + ", ".join(f"{k}: {v}" for k, v in batch.items()) + "}\n"
    if args.load_workers:
        extra += f"  load_workers: {args.load_workers}\n"
    workers = args.load_workers or 2
    for key in [k for k in os.environ if k.startswith("PGBRIDGE_")]:
        del os.environ[key]  # the deployment is self-contained: its own home base and key file
    os.environ["COLUMNS"] = "200"

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    args.load_before = os.getloadavg()[0]  # anything else busy on the host skews every figure
    try:
        with cdc_deployment(args.instance_class, extra) as rig:
            load = bench_load(rig, args.load_rows, args.load_rounds, workers)
            create_stream_tables(rig)
            stream = bench_stream(rig, args.inserts, args.updates, args.deletes, args.txn_rows)
            rate = stream.changes / stream.pipe_s / 2
            say(f"(c) steady load at {rate:,.0f} rows/s for {args.latency_seconds:.0f}s ...")
            lat = bench_latency(rig, rate, args.latency_seconds, args.txn_per_s, args.probe_ms / 1000, args.warmup)
    except KeyboardInterrupt:
        say("interrupted; the deployment was destroyed")
        sys.exit(130)
    report(args, load, stream, lat)


if __name__ == "__main__":
    main()
