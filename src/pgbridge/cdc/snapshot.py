"""The initial load: copy the published tables into the warehouse as of the slot's exported snapshot.

The stream starts at the slot's consistent point, so the tables must be copied exactly as of the
snapshot the slot exported, or rows are lost or doubled where load and stream meet. Reading is
parallel across tables and across CTID ranges of a table (PostgreSQL 15 scans TID ranges), each
reader on its own connection that imports the snapshot. A reader copies its range as a series of
``COPY ... TO STDOUT (FORMAT binary)`` statements over page spans of about 4 MB each, which
psycopg2's ``copy_expert`` gathers in C (a Python loop over libpq's row messages costs the client
nearly twice the CPU, and on a small host the client and the server share the cores). A parser
thread decodes each span in C, outside the GIL (:mod:`pgbridge.cdc.copybinary`), and each reader's
writer inserts the chunks on its own DuckDB cursor, casting the columns without a decoder set-based.
A span the binary decoder refuses (a value the warehouse types need the SQL casts for, such as an
``infinity`` timestamp) is copied again as text and parsed by Arrow's C++ CSV reader
(:mod:`pgbridge.cdc.copytext`); a table with a column neither can type (``numeric`` beyond 18
digits) is copied as text throughout. The tables and their keys come from
:mod:`pgbridge.cdc.catalog`.

Resuming. Each range is written in its own DuckDB transaction together with its row in
``_pgbridge.load_progress``, which names the snapshot (and its consistent LSN) the rows are as of:
the warehouse never holds half a range and always knows what it holds. After a failure:

* The snapshot is still open (the caller still holds the :class:`~pgbridge.cdc.source.SnapshotSlot`):
  ``load_snapshot(..., resume=True)`` copies only the ranges not recorded. Exact.
* The snapshot is gone (the process died): a table is kept only if it was *complete* under one
  earlier snapshot; every other table is cleared and copied whole under the new one. Two snapshots
  in one table cannot be repaired by the stream: a row that moved between pages in the meantime is
  lost or doubled, and a later UPDATE leaving a TOASTed column unchanged would take it from the
  wrong (or a missing) row. So keep the old slot (nothing was confirmed past its consistent point),
  take the new snapshot from a *temporary* slot (``SnapshotSlot.create(dsn, name, temporary=True)``,
  whose consistent LSN bounds it exactly) and apply a streamed transaction to a table only if it
  committed at or after that table's :attr:`TableReport.snapshot_lsn` — PostgreSQL's own
  table-sync rule. After an uninterrupted load every table has the slot's LSN: nothing is filtered.

Tables whose ``problem`` is set (no usable key) are refused. Stored generated columns are left out,
as pgoutput on PostgreSQL 15 leaves them out of the stream.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import duckdb
import psycopg2
import pyarrow as pa

from pgbridge.cdc.catalog import SnapshotError, SourceTable, sink_table, source_error
from pgbridge.cdc.columnar import Unsupported
from pgbridge.cdc.copybinary import BinaryPlan, binary_plan, decode_binary
from pgbridge.cdc.copytext import CHUNK_BYTES, CopyPlan, copy_plan, parse_copy_text, pieces
from pgbridge.cdc.sinks.duckdb import META_SCHEMA, DuckDBSink, SinkError
from pgbridge.cdc.typemap import PG_SESSION_OPTIONS, MappingPolicy
from pgbridge.types import LSN

__all__ = ["LOAD_LOCK_TIMEOUT", "PROGRESS_TABLE", "LoadProgress", "LoadReport", "TableReport", "load_snapshot"]
__all__ += ["plan_ranges"]

PROGRESS_TABLE: Final = f"{META_SCHEMA}.load_progress"
LOAD_LOCK_TIMEOUT: Final = "5s"


Range = tuple[int, int | None]  # pages [start, end); end None: to the end of the table


def plan_ranges(pages: int, pages_per_range: int, done: Sequence[Range] = ()) -> list[Range]:
    """The page ranges of ``[0, ∞)`` not covered by ``done``, at most ``pages_per_range`` long up to ``pages``.

    The last range is open-ended, so rows in pages added after ``pages`` was measured are copied too.
    An empty result means ``done`` covers the whole table.
    """
    if pages_per_range < 1:
        raise ValueError("pages_per_range must be at least 1")
    gaps: list[Range] = []
    cursor: int | None = 0
    for start, end in sorted(done, key=lambda r: r[0]):
        if cursor is None:
            break
        if start > cursor:
            gaps.append((cursor, start))
        cursor = None if end is None else max(cursor, end)
    if cursor is not None:
        gaps.append((cursor, None))
    ranges: list[Range] = []
    for start, end in gaps:
        stop = max(start, pages) if end is None else end
        while stop - start > pages_per_range:
            ranges.append((start, start + pages_per_range))
            start += pages_per_range
        ranges.append((start, end))
    return ranges


_PROGRESS_DDL: Final = f"""CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} (
    pipeline VARCHAR NOT NULL, "table" VARCHAR NOT NULL, range_start BIGINT NOT NULL, range_end BIGINT,
    rows BIGINT NOT NULL, done_at TIMESTAMPTZ NOT NULL, snapshot VARCHAR NOT NULL, consistent_lsn UBIGINT)"""


@dataclass(frozen=True)
class LoadProgress:
    table: str
    rows_done: int
    rows_estimate: int
    rows_per_s: float
    eta_s: float | None
    ranges_done: int
    ranges_total: int


@dataclass(frozen=True)
class TableReport:
    """``rows``/``ranges`` copied by this call, ``rows_total`` held now, the data as of ``snapshot_lsn``.

    ``reused``: the table was complete under an earlier snapshot and kept; stream it from ``snapshot_lsn``.
    """

    table: str
    rows: int
    rows_total: int
    ranges: int
    ranges_skipped: int
    elapsed_s: float
    snapshot_lsn: LSN | None
    reused: bool = False


@dataclass(frozen=True)
class LoadReport:
    tables: tuple[TableReport, ...]
    elapsed_s: float

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


@dataclass(eq=False)
class _State:
    st: SourceTable
    plan: CopyPlan
    binary: BinaryPlan | None  # how to copy it in binary (None: only as text)
    refused: int = 0  # binary spans the decoder refused (each then copied as text)
    ranges_total: int = 0
    ranges_done: int = 0
    ranges_skipped: int = 0
    rows_before: int = 0
    rows_now: int = 0
    started: float = 0.0
    finished: float = 0.0
    snapshot_lsn: LSN | None = None
    reused: bool = False
    span: int = 1  # pages in this table's next COPY span: starts at one, sized by what the last one gave

    def progress(self, now: float) -> LoadProgress:
        done, estimate, ranges = self.rows_before + self.rows_now, self.st.rows_estimate, self.ranges_done
        rate = self.rows_now / max(now - self.started, 1e-9)
        eta = 0.0 if self.finished else max(estimate - done, 0) / rate if rate > 0 and estimate else None
        return LoadProgress(
            self.st.qualified, done, estimate, rate, eta, ranges + self.ranges_skipped, self.ranges_total
        )

    def report(self, now: float) -> TableReport:
        took = (self.finished or now) - (self.started or now)
        rows = (self.rows_now, self.rows_before + self.rows_now, self.ranges_done, self.ranges_skipped)
        return TableReport(self.st.qualified, *rows, took, self.snapshot_lsn, self.reused)


@dataclass(eq=False)
class _Job:
    state: _State
    start: int
    end: int | None
    rows: int = 0
    begun: bool = False  # its DuckDB transaction is open (on its writer's cursor)


_Parsed = tuple[pa.Table, bool]  # a parsed chunk, and whether its columns are typed
_Chunk = tuple["_Job", "Future[_Parsed] | None"]  # a chunk of the job's range being parsed; None: range read
_Lane = queue.Queue[_Chunk | None]
_Held = tuple["_Job", "Future[_Parsed]", int, int | None]  # a binary span being decoded, and its pages


class _Stopped(Exception):
    """The load is being abandoned: a reader just returns."""


_REFUSED_SPANS: Final = 3  # a table whose binary spans were refused this often is read as text from then on
_MAX_SPAN: Final = 2048  # pages: a span may grow over empty pages, but not past this


def _span_end(start: int, span: int, end: int | None, pages: int) -> int | None:
    """Where the COPY starting at page ``start`` of the range ending at ``end`` stops.

    The span of an open-ended range that reaches past ``pages`` (the table's size when the load was
    planned) is open-ended too, so rows in pages added since are copied.
    """
    stop = start + span
    if end is None:
        return None if stop >= pages else stop
    return min(stop, end)


def _next_span(pages: int, size: int) -> int:
    """Pages for the next COPY of a range: about ``CHUNK_BYTES`` of text, as the last ``pages`` gave ``size``.

    It grows at most 4x a step and to :data:`_MAX_SPAN` pages, so a span after empty or narrow pages
    stays near its aim; a span of one page holds at most that page's rows (with their TOASTed values).
    """
    if size <= 0:
        return min(pages * 4, _MAX_SPAN)
    return max(1, min(pages * 4, _MAX_SPAN, pages * CHUNK_BYTES // size))


def _where(start: int, end: int | None) -> str:
    parts = [f"ctid >= '({start},0)'::tid"] if start > 0 else []
    parts += [f"ctid < '({end},0)'::tid"] if end is not None else []
    return " WHERE " + " AND ".join(parts) if parts else ""


def load_snapshot(
    dsn: str,
    snapshot_name: str,
    tables: Sequence[SourceTable],
    sink: DuckDBSink,
    *,
    workers: int = 2,
    pages_per_range: int = 4096,
    resume: bool = False,
    consistent_lsn: LSN | None = None,
    policy: MappingPolicy | None = None,
    progress: Callable[[LoadProgress], None] | None = None,
    progress_every_s: float = 0.5,
) -> LoadReport:
    """Copy ``tables`` into ``sink`` as of the exported snapshot ``snapshot_name``.

    ``consistent_lsn`` is the snapshot's slot position: recorded with every range, it identifies the
    snapshot across restarts and becomes each table's ``snapshot_lsn``. Without ``resume`` each
    table's warehouse rows and progress records are cleared first; with it, the rules of the module
    docstring apply. ``progress`` is called in this thread at most every ``progress_every_s``, and
    when a table completes; an exception it raises aborts the load (committed ranges stay recorded).
    Raises :class:`SnapshotError`, :class:`SnapshotSourceError` or :class:`SinkError`.
    """
    problems = [t.problem for t in tables if t.problem]
    if problems:
        raise SnapshotError("; ".join(p for p in problems if p))
    started, ident = time.monotonic(), (snapshot_name, consistent_lsn.value if consistent_lsn else None)
    loader = _Loader(dsn, sink, ident, max(1, workers), progress, progress_every_s)
    try:
        sink.con.execute(_PROGRESS_DDL)
        pending = [job for st in tables for job in loader.prepare(st, policy, resume, pages_per_range)]
    except duckdb.Error as exc:
        with contextlib.suppress(duckdb.Error):
            sink.con.execute("ROLLBACK")
        raise SinkError(f"preparing the warehouse for the initial load failed: {exc}") from None
    pending.sort(key=lambda j: -j.state.st.pages)  # biggest tables first; a table's ranges stay in order
    if pending:
        loader.run(pending)
    now = time.monotonic()
    return LoadReport(tuple(s.report(now) for s in loader.states), now - started)


class _Loader:
    """One load: reader threads (each with its own connection), a parser pool, a writer per reader.

    Reader *i* hands its parsed chunks to writer *i*, which inserts them on its own DuckDB cursor,
    one transaction per range. The caller's thread keeps the account and reports progress. A writer
    per reader because the DuckDB side (the insert, and compressing row groups as they fill and at
    commit) is about half of the client's CPU: a single writer was the slowest stage.
    """

    def __init__(
        self,
        dsn: str,
        sink: DuckDBSink,
        ident: tuple[str, int | None],
        workers: int,
        progress: Callable[[LoadProgress], None] | None,
        every_s: float,
    ) -> None:
        self.dsn, self.sink, self.ident, self.workers = dsn, sink, ident, workers
        self.progress, self.every_s = progress, every_s
        self.states: list[_State] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[Any] = []  # the readers' connections, cancelled on a stop
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        # (job, rows inserted | None: its range is committed) or (None, the exception a reader or writer hit)
        self.events: queue.SimpleQueue[tuple[_Job | None, int | BaseException | None]] = queue.SimpleQueue()
        self.parsers = ThreadPoolExecutor(workers, thread_name_prefix="pgbridge-parse")

    def prepare(self, st: SourceTable, policy: MappingPolicy | None, resume: bool, per_range: int) -> list[_Job]:
        """The ranges to copy for ``st``, under the resume rules of the module docstring."""
        stt, con, where = sink_table(st, policy), self.sink.con, [self.sink.pipeline, st.qualified]
        self.sink.ensure_table(stt)
        target = self.sink.target(stt)
        plan = copy_plan(st, stt, target)
        state = _State(st, plan, binary_plan(st, stt, plan))
        self.states.append(state)
        query = (
            f"SELECT range_start, range_end, rows, snapshot, consistent_lsn FROM {PROGRESS_TABLE} WHERE pipeline = ?"
        )
        rows = con.execute(query + ' AND "table" = ?', where).fetchall()
        idents, ranges = {(r[3], r[4]) for r in rows}, plan_ranges(st.pages, per_range, [(r[0], r[1]) for r in rows])
        if resume and (idents == {self.ident} or (len(idents) == 1 and not ranges)):
            state.ranges_skipped, state.rows_before, lsn = len(rows), sum(r[2] for r in rows), rows[0][4]
            state.reused = idents != {self.ident}
        else:
            con.execute("BEGIN TRANSACTION")
            con.execute(f"DROP TABLE {target}")  # re-made: an earlier attempt may have had another shape
            self.sink.ensure_table(stt)
            con.execute(f'DELETE FROM {PROGRESS_TABLE} WHERE pipeline = ? AND "table" = ?', where)
            con.execute("COMMIT")
            ranges, lsn = plan_ranges(st.pages, per_range), self.ident[1]
        state.snapshot_lsn = LSN(lsn) if lsn is not None else None
        state.ranges_total = state.ranges_skipped + len(ranges)
        return [_Job(state, a, b) for a, b in ranges]

    def read(self, lane: _Lane) -> None:
        """A reader thread: imports the snapshot, then copies ranges until none are left.

        A range is read as a series of ``COPY`` statements over consecutive page spans, each sized
        to about :data:`CHUNK_BYTES` of output and taken whole by psycopg2's ``copy_expert`` into a
        ``BytesIO``: libpq's row messages are then gathered in C, at about 0.4 instead of 0.6 client
        CPU-microseconds a row for a Python loop over ``get_copy_data``, and each statement's output is
        one chunk to decode. A binary span is handed on once the next one has been read (its
        decoding runs meanwhile), so that one it cannot decode is copied again as text first: a
        reader holds at most one more span. Every statement runs in the same transaction, under the
        imported snapshot.
        """
        conn: Any = None
        try:
            conn = psycopg2.connect(self.dsn, options=PG_SESSION_OPTIONS, application_name="pgbridge")
            conn.autocommit = True
            cur = conn.cursor()
            # Never wait long for a table lock: an ALTER TABLE queued behind a lock the caller holds
            # for the whole load would wait for us while we wait for it. Failing lets the caller retry.
            cur.execute(f"SET lock_timeout = '{LOAD_LOCK_TIMEOUT}'")
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur.execute("SET TRANSACTION SNAPSHOT %s", (self.ident[0],))
            check_utf8 = conn.get_parameter_status("server_encoding") != "UTF8"
            with self._lock:
                self._conns.append(conn)
            while not self.stop.is_set():
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    self._put(lane, None)
                    return
                start, held = job.start, None
                while True:
                    end = _span_end(start, job.state.span, job.end, job.state.st.pages)
                    binary = job.state.binary if not check_utf8 else None
                    if binary is None:
                        if held is not None:  # the table just went over to text: the binary span first
                            self._settle(lane, cur, held, check_utf8)
                            held = None
                        size = self._copy_text(lane, cur, job, start, end, check_utf8)
                    else:
                        size, decoding = self._copy_binary(cur, binary, start, end)
                        if held is not None:  # the last span is settled while this one decodes
                            self._settle(lane, cur, held, check_utf8)
                        held = (job, decoding, start, end)
                    if end is None or end == job.end:
                        break
                    job.state.span = _next_span(end - start, size)
                    start = end
                if held is not None:
                    self._settle(lane, cur, held, check_utf8)
                self._put(lane, (job, None))
        except _Stopped:
            pass
        except psycopg2.Error as exc:
            self.events.put((None, source_error(exc.pgcode, str(exc), "reading failed")))
        except BaseException as exc:  # a PgbridgeError, or a bug: the caller raises it either way
            self.events.put((None, exc))
        finally:
            if conn is not None:
                with self._lock, contextlib.suppress(ValueError):
                    self._conns.remove(conn)
                conn.close()  # a COPY in flight was cancelled by run() on a stop

    def _copy_text(self, lane: _Lane, cur: Any, job: _Job, start: int, end: int | None, check_utf8: bool) -> int:
        """Copy pages [start, end) of ``job``'s table as text; hand its pieces to the parsers. Returns its size."""
        plan = job.state.plan
        text = self._copy(cur, f"COPY ({plan.select_text}{_where(start, end)}) TO STDOUT")
        for piece in pieces(text) if text else ():
            self._put(lane, (job, self.parsers.submit(parse_copy_text, text, plan.types, check_utf8, piece)))
        return len(text)

    def _copy_binary(self, cur: Any, binary: BinaryPlan, start: int, end: int | None) -> tuple[int, Future[_Parsed]]:
        """Copy pages [start, end) in binary; returns its size and its decoding (by a parser)."""
        out = self._copy(cur, f"COPY ({binary.select_text}{_where(start, end)}) TO STDOUT (FORMAT binary)")
        return len(out), self.parsers.submit(decode_binary, out, binary)

    def _copy(self, cur: Any, statement: str) -> bytes:
        """One COPY's whole output, gathered by psycopg2 in C."""
        out = io.BytesIO()
        cur.copy_expert(statement, out)
        if self.stop.is_set():
            raise _Stopped
        return out.getvalue()  # BytesIO's own buffer: no copy

    def _settle(self, lane: _Lane, cur: Any, held: _Held, check_utf8: bool) -> None:
        """Hand a binary span's decoding to the writer, or copy the span again as text if it cannot be decoded.

        Waits for the decoding: a span is settled while the next one is read, so the wait is short.
        After :data:`_REFUSED_SPANS` refusals the table's further spans are read as text straight away
        (say a column holding ``infinity`` in every span).
        """
        job, decoding, start, end = held
        error = decoding.exception()  # the parsers outlive the readers (run() joins them first)
        if isinstance(error, Unsupported):
            state = job.state
            state.refused += 1
            if state.refused >= _REFUSED_SPANS:  # such values throughout: stop reading every span twice
                state.binary = None
            self._copy_text(lane, cur, job, start, end, check_utf8)
        elif error is not None or decoding.result()[0].num_rows:  # an empty span has nothing to insert
            self._put(lane, (job, decoding))

    def _put(self, lane: _Lane, item: _Chunk | None) -> None:
        """Hand ``item`` to the reader's writer; a stop ends the wait (nothing is dropped behind its back)."""
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                lane.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run(self, pending: list[_Job]) -> None:
        """Start the readers and writers; account for what they did until every range is committed."""
        for pending_job in pending:
            self.jobs.put(pending_job)
        n = min(self.workers, len(pending))
        lanes: list[queue.Queue[_Chunk | None]] = [queue.Queue(2) for _ in range(n)]  # bounded: so is memory
        cursors: list[duckdb.DuckDBPyConnection] = []
        threads: list[threading.Thread] = []
        remaining, last = len(pending), time.monotonic()
        try:
            for i in range(n):
                cursors.append(self.sink.con.cursor())
                threads.append(threading.Thread(target=self.read, args=(lanes[i],), name=f"pgbridge-load-{i}"))
                threads.append(
                    threading.Thread(target=self.write, args=(lanes[i], cursors[i]), name=f"pgbridge-write-{i}")
                )
            for t in threads:
                t.start()
            while remaining:
                job, what = self.events.get()
                if job is None:
                    assert isinstance(what, BaseException)
                    raise what
                state = job.state
                state.started = state.started or time.monotonic()
                if what is None:
                    state.ranges_done += 1
                    remaining -= 1
                else:
                    assert isinstance(what, int)
                    state.rows_now += what
                now = time.monotonic()
                if state.ranges_done + state.ranges_skipped == state.ranges_total:
                    state.finished = now
                    if self.progress is not None:
                        self.progress(state.progress(now))
                elif self.progress is not None and now - last >= self.every_s:
                    last = now
                    for s in self.states:
                        if s.started and not s.finished:
                            self.progress(s.progress(now))
        finally:
            self.stop.set()
            with self._lock:  # a COPY in flight ends now, not when the server finishes it
                for conn in self._conns:
                    with contextlib.suppress(psycopg2.Error):
                        conn.cancel()
            for t in threads:
                if t.ident is not None:
                    t.join()  # readers see the stop within 0.1 s of a lane wait; writers roll back an open range
            for cursor in cursors:
                with contextlib.suppress(duckdb.Error):
                    cursor.close()
            self.parsers.shutdown(cancel_futures=True)

    def write(self, lane: _Lane, cursor: duckdb.DuckDBPyConnection) -> None:
        """A writer thread: one DuckDB transaction per range, committed with its progress record."""
        job: _Job | None = None
        try:
            while not self.stop.is_set():
                try:
                    item = lane.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None or self.stop.is_set():  # a range's end seen after a stop may lack pieces
                    return
                job, chunk = item
                self.events.put((job, self._write(cursor, job, chunk)))
                if chunk is None:
                    job = None
        except BaseException as exc:
            self.events.put((None, exc))
        finally:
            if job is not None and job.begun:
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")

    def _write(self, cursor: duckdb.DuckDBPyConnection, job: _Job, chunk: Future[_Parsed] | None) -> int | None:
        """Insert a chunk of ``job``'s range (returns its rows), or commit the range (returns None)."""
        state = job.state
        try:
            if not job.begun:
                cursor.execute("BEGIN TRANSACTION")
                job.begun = True
            if chunk is not None:
                try:
                    table, typed = chunk.result()
                except (pa.ArrowInvalid, UnicodeError) as exc:
                    raise SnapshotError(f"unexpected COPY output from {state.st.qualified}: {exc}") from None
                cursor.register("_pgb_load", table)
                cursor.execute(state.plan.insert_typed if typed else state.plan.insert_text)
                cursor.unregister("_pgb_load")
                job.rows += table.num_rows
                return int(table.num_rows)
            cursor.execute(
                f"INSERT INTO {PROGRESS_TABLE} VALUES (?, ?, ?, ?, ?, now(), ?, ?)",
                [self.sink.pipeline, state.st.qualified, job.start, job.end, job.rows, *self.ident],
            )
            cursor.execute("COMMIT")
            return None
        except duckdb.Error as exc:
            raise SinkError(f"loading {state.st.qualified} into the warehouse failed: {exc}") from None
