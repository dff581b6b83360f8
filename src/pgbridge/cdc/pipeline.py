"""The pipeline daemon: initial load, then the stream, applied to the warehouse it owns.

One process per pipeline owns the DuckDB file (DuckDB allows one writer), so it also serves
read-only queries for `pgbridge query` over a unix socket: readers never meet a lock error. It
writes a small status file every second for `pipeline status`. A lost slot is never recreated:
the pipeline reports it and waits for `pipeline resync`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

import duckdb
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgbridge.cdc import ddl
from pgbridge.cdc.apply import Applier, BatchLimits, SchemaMismatch
from pgbridge.cdc.catalog import SnapshotSourceError, SourceTable, discover_tables, sink_table, table_from_definition
from pgbridge.cdc.copytext import copy_rows, wal_insert_lsn
from pgbridge.cdc.pgoutput import Begin, decode
from pgbridge.cdc.sinks.base import SinkTable
from pgbridge.cdc.sinks.duckdb import META_SCHEMA, DuckDBSink, qi
from pgbridge.cdc.snapshot import LOAD_LOCK_TIMEOUT, PROGRESS_TABLE, LoadProgress, load_snapshot
from pgbridge.cdc.source import (
    ReplicationStream,
    SlotExistsError,
    SlotMissingError,
    StreamOptions,
    create_slot,
    drop_slot,
    slot_exists,
    slot_status,
)
from pgbridge.cdc.typemap import PG_SESSION_OPTIONS
from pgbridge.cdc.validate import stage_exact, validate_table
from pgbridge.cdc.wire import sql_connect
from pgbridge.errors import PgbridgeError, TransientError
from pgbridge.types import LSN

QUERY_ROW_LIMIT = 10_000
# Received and not read yet, after a read: the pipeline is behind the server. About half a
# second of a fast stream: a shorter pause of the consumer does not count as a backlog.
BEHIND_BYTES = 8 << 20
RESYNC_STAGE = "_pgb_resync"  # the exact copy of a table being resynced (a DuckDB temporary table)


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    dsn: str  # no password: a deployment's daemon names a password file (passfile=)
    slot: str
    publication: str
    warehouse: str
    status_file: str
    socket: str
    resync_file: str = ""  # present: start over (new slot, empty warehouse, initial load)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exclude_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    max_rows: int = 50_000
    max_wait_ms: int = 500
    load_workers: int = 2
    # A synchronous standby may take over: a batch commits in the warehouse only once that standby
    # has the batch's WAL (see ``SyncStandbyWait``).
    sync_standby: bool = False

    @classmethod
    def load(cls, path: Path) -> PipelineConfig:
        raw = json.loads(path.read_text())
        raw["include"] = tuple(raw.get("include", ()))
        raw["exclude"] = tuple(raw.get("exclude", ()))
        raw["exclude_columns"] = {k: tuple(v) for k, v in raw.get("exclude_columns", {}).items()}
        return cls(**raw)

    def dump(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


@dataclass
class Status:
    pipeline: str
    state: str = "starting"  # starting | running | stopped | error
    phase: str = "starting"  # initial-load | streaming | slot-lost
    last_applied_lsn: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    changes_per_s: float = 0.0
    transactions: int = 0
    changes: int = 0
    rows_by_table: dict[str, int] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None
    needs_resync: dict[str, str] = field(default_factory=dict)  # table -> why its changes are not applied
    updated_at: float = 0.0
    pid: int = field(default_factory=os.getpid)


class StatusFile:
    def __init__(self, path: Path, status: Status) -> None:
        self.path = path
        self.status = status
        self._last = 0.0

    def write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < 1.0:
            return
        self._last = now
        self.status.updated_at = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.status), default=str))
        os.replace(tmp, self.path)


# -- read-only queries, served by the process that owns the warehouse ------------------------------
_READ_ONLY = {"SELECT", "EXPLAIN"}


_CURSOR_LOCK = threading.Lock()


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    with _CURSOR_LOCK:  # a connection is not thread-safe; each query gets its own cursor
        cur = con.cursor()
    try:
        statements = cur.extract_statements(sql)
        if len(statements) != 1:
            return {"error": "send exactly one statement"}
        kind = statements[0].type.name
        if kind not in _READ_ONLY:
            return {"error": f"only read-only queries are allowed (got {kind})"}
        cur.execute(sql)
        columns = [d[0] for d in cur.description or []]
        rows = cur.fetchmany(QUERY_ROW_LIMIT + 1)
        truncated = len(rows) > QUERY_ROW_LIMIT
        return {"columns": columns, "rows": [list(r) for r in rows[:QUERY_ROW_LIMIT]], "truncated": truncated}
    except duckdb.Error as e:
        return {"error": str(e).strip()}
    finally:
        cur.close()


def serve_queries(
    owner: duckdb.DuckDBPyConnection,
    path: Path,
    stop: threading.Event,
    control: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> threading.Thread:
    """Answer ``{"sql": ...}`` read-only queries, and ``{"op": ...}`` requests through ``control``."""
    con = owner.cursor()  # made in the owner's thread; handler threads only take cursors of it
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o660)
    srv.listen(8)
    srv.settimeout(0.5)

    def handle(conn: socket.socket) -> None:
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            try:
                request = json.loads(data)
                if isinstance(request, dict) and "op" in request and control is not None:
                    answer = control(request)
                else:
                    answer = run_query(con, request["sql"])
            except (ValueError, KeyError, TypeError):
                answer = {"error": 'malformed request: send one JSON line {"sql": "..."}'}
            conn.sendall(json.dumps(answer, default=str).encode() + b"\n")

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
        srv.close()

    t = threading.Thread(target=loop, name="pgbridge-query", daemon=True)
    t.start()
    return t


def query(socket_path: Path, sql: str, timeout: float = 60) -> dict[str, Any]:
    """Client side of `pgbridge query`."""
    return request(socket_path, {"sql": sql}, timeout)


def request(socket_path: Path, payload: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """One JSON request to the daemon's socket, one JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


# -- the run loop ------------------------------------------------------------------------------------
_STATE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {META_SCHEMA}.pipeline_state"
    " (pipeline VARCHAR PRIMARY KEY, phase VARCHAR NOT NULL, slot VARCHAR, start_lsn UBIGINT)"
)


def pump(
    stream: ReplicationStream,
    applier: Applier,
    *,
    max_messages: int = 20_000,
    max_wait_s: float = 0.2,
    held: deque[bytes] | None = None,
    until: LSN | None = None,
) -> int:
    """One cycle: read what is buffered, fold it in, hand what committed to the sink, confirm what is durable.

    Committed transactions go to the sink when it is free (it applies in a worker thread while the
    next messages are read): at once when the stream has gone quiet, else once the batch is ripe
    (:meth:`Applier.ripe`), so batches are small when the stream is quiet (low latency) and large
    under load (few warehouse commits). The applier also decides at each source commit, and is
    told when the stream holds BEHIND_BYTES not read yet (``behind``: larger batches).
    ``max_wait_s`` bounds a read when nothing arrives.

    With ``until``, no transaction committing at or after it is fed: its messages and everything
    after them wait in ``held`` (raw payloads), which the next call feeds first, and what was fed is
    committed before returning (``validate`` compares the warehouse exactly as of a source snapshot
    this way).
    """
    confirms = [applier.poll()]
    tags: bytes | None = None
    if held:
        payloads = list(held)
        held.clear()
    else:
        due_in = applier.due_in()  # a committed batch waiting: read no longer than until it is due
        wait = max_wait_s if due_in is None else min(max_wait_s, max(due_in, 0.005))
        if applier.busy or applier.pending_commit:
            wait = min(wait, 0.005)  # notice soon that the sink is free again, or that the stream went quiet
        chunk = stream.read_raw(max_messages=max_messages, max_wait_s=wait)
        payloads, tags = chunk.payloads, chunk.tags
    applier.behind = stream.buffered >= BEHIND_BYTES
    if until is not None and held is not None:
        stop = _first_begin_from(payloads, until)
        if stop is not None:
            held.extend(payloads[stop:])
            payloads, tags = payloads[:stop], None
    confirms.append(applier.feed_raw(payloads, tags))
    if not applier.in_transaction and applier.pending_commit:
        if held:
            confirms.append(applier.flush())
        elif applier.due() or (not applier.busy and (not payloads or applier.ripe())):
            applier.submit()
    confirms.append(applier.poll())
    for confirm in confirms:
        if confirm is not None:
            stream.confirm(confirm)
    if applier.idle and not held:
        # Nothing in flight: let the slot advance so WAL is not pinned (recorded in the warehouse
        # first, at most once a second, so a slot found beyond that record is known not to be ours).
        idle = stream.idle_position()
        if idle is not None and applier.note_idle(idle):
            stream.confirm(idle)
    return len(payloads)


class SyncStandbyWait:
    """Waits until the synchronous standby has flushed the WAL up to a position.

    On PostgreSQL 15 the walsender sends a transaction once it is flushed on the primary, before
    the synchronous standby confirms it. If the primary died in that window, the new primary would
    not have a transaction the warehouse holds. Each batch therefore waits here (in the apply
    worker, not the reader) before its warehouse commit; usually the standby is already there.
    With no synchronous standby configured (``synchronous_standby_names`` empty) nothing waits.
    """

    SQL: Final = f"SELECT {ddl.SCHEMA}.sync_standby_flush_lsn()::text"

    def __init__(self, dsn: str, stop: threading.Event, poll_s: float = 0.002) -> None:
        self.dsn, self.stop, self.poll_s = dsn, stop, poll_s
        self._conn: psycopg.Connection[Any] | None = None
        # The standby's flush position last seen on this connection (it only grows): a batch at or
        # below it needs no query. Never "no standby": that setting can change at any time.
        self._flushed: LSN | None = None

    def wait(self, lsn: LSN) -> None:
        delay = self.poll_s
        while True:
            if self._conn is None or self._conn.closed:
                self._conn, self._flushed = sql_connect(self.dsn), None
            if self._flushed is not None and self._flushed >= lsn:
                return
            row = self._conn.execute(self.SQL).fetchone()
            if row is None or row[0] is None:
                return
            self._flushed = LSN.parse(row[0])
            if self._flushed >= lsn:
                return
            if self.stop.wait(delay):
                raise _Stopping  # the batch is not committed: the slot replays it on the next start
            delay = min(delay * 2, 0.1)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _first_begin_from(payloads: list[bytes], lsn: LSN) -> int | None:
    """Index of the first Begin of a transaction committing at or after ``lsn``."""
    for i, payload in enumerate(payloads):
        if payload[0] == 0x42:  # 'B'
            begin = decode(payload)
            assert isinstance(begin, Begin)
            if begin.final_lsn >= lsn:
                return i
    return None


def held_begin(held: deque[bytes]) -> Begin | None:
    """The Begin at the head of ``held``, if that is what is there."""
    if held and held[0][:1] == b"B":
        msg = decode(held[0])
        assert isinstance(msg, Begin)
        return msg
    return None


def _shape(t: SourceTable | None) -> Any:
    """What a copy of ``t`` depends on: its columns, key and replica identity."""
    if t is None:
        return None
    return (t.oid, t.key, t.replica_identity, [(c.name, c.attnum, c.type_oid, c.atttypmod) for c in t.columns])


class _StreamFailed(Exception):
    """The stream failed while a job was moving it (``catch_up``): the pipeline must restart."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class _Job:
    """A request that needs the warehouse writer: run by the stream loop between transactions."""

    op: str
    args: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] = field(default_factory=dict)


class _ShapeChanged(Exception):
    """DDL committed between the slot's snapshot and the load's locks: start over."""


class _Stopping(Exception):
    """Raised from the load's progress callback to abandon the load when asked to stop."""


class Pipeline:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.status = Status(cfg.name)
        self.status_file = StatusFile(Path(cfg.status_file), self.status)
        self.stop = threading.Event()
        self.sink = DuckDBSink(cfg.warehouse, cfg.name)
        self.sink.con.execute(_STATE_DDL)
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.held: deque[bytes] = deque()  # read from the stream, not yet fed (see pump)

    # -- requests from `pgbridge pipeline validate|resync` --------------------------------------
    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op not in ("validate", "resync"):
            return {"error": f"unknown request {op!r}"}
        if self.status.phase != "streaming":
            return {"error": f"the pipeline is {self.status.phase}; {op} needs it streaming"}
        job = _Job(str(op), {k: v for k, v in req.items() if k != "op"})
        self.jobs.put(job)
        if not job.done.wait(float(req.get("timeout", 3600))):
            return {"error": f"{op} did not finish in time; it goes on in the pipeline"}
        return job.result

    def _run_jobs(self, stream: ReplicationStream, applier: Applier) -> None:
        confirm = applier.flush()
        if confirm is not None:
            stream.confirm(confirm)
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            try:
                job.result = self._job(job, stream, applier)
            except _StreamFailed as e:  # the stream broke while the job moved it: start again from the checkpoint
                job.result = {"error": f"the stream failed during {job.op}; the pipeline restarts"}
                raise e.cause from None
            except PgbridgeError as e:
                job.result = {"error": e.message}
            except (psycopg.Error, duckdb.Error) as e:
                job.result = {"error": " ".join(f"{type(e).__name__}: {e}".split())}
            except BaseException as e:  # a bug: answer the waiting client, then fail as usual
                job.result = {"error": f"internal error in the pipeline ({type(e).__name__}); see its log"}
                raise
            finally:
                job.done.set()
            if "error" in job.result:  # also for a job nobody waits for (a resync the pipeline runs itself)
                print(f"pipeline {self.cfg.name}: {job.op} failed: {job.result['error']}", file=sys.stderr)

    def _job(self, job: _Job, stream: ReplicationStream, applier: Applier) -> dict[str, Any]:
        wanted = job.args.get("tables") or []
        known = {f"{schema}.{name}": (schema, name) for schema, name in applier.sources}
        unknown = [t for t in wanted if t not in known]
        if unknown and job.op != "resync":
            return {"error": f"not replicated by this pipeline: {', '.join(unknown)}"}

        def catch_up(lsn: LSN) -> None:
            """Apply exactly the transactions that committed before ``lsn``, then hold the stream."""
            deadline = time.monotonic() + 600
            while True:
                nxt = held_begin(self.held)
                caught = nxt is not None and nxt.final_lsn >= lsn
                caught = caught or (not self.held and applier.idle and stream.server_wal_end >= lsn)
                if caught and not applier.in_transaction:
                    confirm = applier.flush()
                    if confirm is not None:
                        stream.confirm(confirm)
                    return
                if time.monotonic() > deadline:
                    raise TransientError(f"the warehouse did not reach {lsn} within 10 minutes")
                try:
                    if applier.idle:
                        stream.send_status(reply=True)  # ask for a keepalive carrying the server's WAL end
                    pump(stream, applier, held=self.held, until=lsn)
                except BaseException as e:  # a chunk may be half fed: only a restart is safe
                    raise _StreamFailed(e) from e

        if job.op == "resync":
            return {"tables": [self._resync(name, applier, catch_up) for name in wanted]}
        results = []
        for name in sorted(wanted or known):
            if name in applier.broken:
                results.append({"table": name, "ok": False, "error": applier.broken[name]})
                continue
            ident = known[name]
            stt = applier.tables[ident]
            r = validate_table(
                self.cfg.dsn,
                applier.sources[ident],
                stt,
                self.sink.con,
                self.sink.target(stt),
                catch_up,
                repair=bool(job.args.get("repair")),
            )
            results.append(r.as_dict())
        return {"tables": results}

    def _resync(self, name: str, applier: Applier, catch_up: Callable[[LSN], None]) -> dict[str, Any]:
        """Re-create one table from an exact copy of the source, taken where the stream is then held.

        Rows copied "as of now" would meet the changes the stream still has to replay: harmless for
        a keyed table, where the last change of a key wins, but a table without a unique key would
        get a replayed insert's row twice.
        """
        schema, _, table = name.partition(".")
        for _ in range(3):
            st = self.lookup(schema, table)
            if st is None:
                raise PgbridgeError(f"{name} is not a table this pipeline replicates")
            try:
                lsn = stage_exact(self.cfg.dsn, st, self.sink_table(st), self.sink.con, RESYNC_STAGE)
                if _shape(self.lookup(schema, table)) != _shape(st):
                    continue  # its shape changed as the copy started: the copy may not match st
                catch_up(lsn)

                def fill(t: SinkTable) -> None:
                    self.sink.con.execute(f"INSERT INTO {self.sink.target(t)} SELECT * FROM {RESYNC_STAGE}")

                applier.reset_table(st, fill)
            finally:
                self.sink.con.execute(f"DROP TABLE IF EXISTS {RESYNC_STAGE}")
            return {"table": name, "rows": self._count(applier.tables[(st.schema, st.name)])}
        raise TransientError(f"{name} kept changing shape while it was being copied; run the resync again")

    def _count(self, t: SinkTable) -> int:
        row = self.sink.con.execute(f"SELECT count(*) FROM {self.sink.target(t)}").fetchone()
        return int(row[0]) if row else 0

    def _phase(self) -> tuple[str | None, LSN | None]:
        row = self.sink.con.execute(
            f"SELECT phase, start_lsn FROM {META_SCHEMA}.pipeline_state WHERE pipeline = ?", [self.cfg.name]
        ).fetchone()
        return (row[0], LSN(int(row[1])) if row[1] is not None else None) if row else (None, None)

    def _set_phase(self, phase: str, start: LSN | None) -> None:
        self.sink.con.execute(
            f"INSERT OR REPLACE INTO {META_SCHEMA}.pipeline_state VALUES (?, ?, ?, ?)",
            [self.cfg.name, phase, self.cfg.slot, int(start) if start else None],
        )
        self.status.phase = phase

    def _discover(self, conn: psycopg.Connection[Any], only: list[str] | None = None) -> list[SourceTable]:
        found = discover_tables(
            conn, only or self.cfg.include, () if only else self.cfg.exclude, self.cfg.exclude_columns
        )
        refused = [t for t in found if t.problem]
        if refused:
            self.status.last_error = "; ".join(t.problem or "" for t in refused)
        return [t for t in found if not t.problem]

    def run(self) -> None:
        serve_queries(self.sink.con, Path(self.cfg.socket), self.stop, self.control)
        check_passfile(self.cfg.dsn)
        self.status.state = "running"
        if self.cfg.resync_file and Path(self.cfg.resync_file).exists():
            self._reset()
            Path(self.cfg.resync_file).unlink()
        phase, _start = self._phase()
        exists = slot_exists(self.cfg.dsn, self.cfg.slot)
        if phase == "streaming" and not exists:
            self._slot_lost("the replication slot is gone")
            return
        if phase != "streaming":
            try:
                self._initial_load(exists)
            except _Stopping:
                return  # committed ranges stay recorded; the next start loads again
        if not self.stop.is_set():
            self._stream()

    def _reset(self) -> None:
        """Forget everything replicated so far: the next steps create a new slot and load again."""
        drop_slot(self.cfg.dsn, self.cfg.slot, terminate_active=True)
        con = self.sink.con
        con.execute("BEGIN TRANSACTION")
        for schema, name in self.sink.definitions():
            con.execute(f"DROP TABLE IF EXISTS {qi(schema)}.{qi(name)}")
        for table in ("pipeline_state", "checkpoint", "slot_position", "tables", "stopped_tables"):
            con.execute(f"DELETE FROM {META_SCHEMA}.{table} WHERE pipeline = ?", [self.cfg.name])
        schema, table = PROGRESS_TABLE.split(".")
        if con.execute(
            "SELECT 1 FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?", [schema, table]
        ).fetchone():
            con.execute(f"DELETE FROM {PROGRESS_TABLE} WHERE pipeline = ?", [self.cfg.name])
        con.execute("COMMIT")

    def _slot_lost(self, why: str) -> None:
        self.status.state, self.status.phase = "error", "slot-lost"
        self.status.last_error = f"{why}; run `pgbridge pipeline resync` (the slot is never recreated silently)"
        self.status_file.write(force=True)
        while not self.stop.wait(1):
            self.status_file.write()

    def _initial_load(self, slot_already: bool) -> None:
        if slot_already:  # a load that died: its snapshot is gone, start the load over
            drop_slot(self.cfg.dsn, self.cfg.slot, terminate_active=True)
        self._set_phase("initial-load", None)
        self.status_file.write(force=True)

        def progress(p: LoadProgress) -> None:
            self.status.load[p.table] = {"rows": p.rows_done, "estimate": p.rows_estimate, "eta_s": p.eta_s}
            self.status_file.write()
            if self.stop.is_set():
                raise _Stopping

        for attempt in range(20):
            try:
                with create_slot(self.cfg.dsn, self.cfg.slot) as s:
                    with self._snapshot_tables(s.snapshot_name) as tables:
                        load_snapshot(
                            self.cfg.dsn,
                            s.snapshot_name,
                            tables,
                            self.sink,
                            workers=self.cfg.load_workers,
                            consistent_lsn=s.consistent_lsn,
                            progress=progress,
                        )
                    self.sink.begin()
                    for t in tables:
                        self.sink.save_definition(t.schema, t.name, t.to_json())
                    self._set_phase("streaming", s.consistent_lsn)
                    self.sink.commit_meta()
                    return
            except SlotExistsError:
                # Patroni recreates a permanent slot it finds missing: drop its slot and create ours.
                drop_slot(self.cfg.dsn, self.cfg.slot, terminate_active=True)
                continue
            except (_ShapeChanged, SnapshotSourceError, psycopg.errors.LockNotAvailable) as e:
                # The slot was dropped on the way out of `with`; a waiting ALTER TABLE goes first.
                self.status.last_error = str(e) or "a table changed shape as the load started; starting over"
                if self.stop.wait(min(0.1 * 2**attempt, 5)):
                    raise _Stopping from None
        raise SchemaMismatch(
            f"tables kept changing shape while the initial load started (20 attempts; last: {self.status.last_error})",
            hint="pause schema changes on the replicated tables until `pipeline status` says streaming",
        )

    @contextlib.contextmanager
    def _snapshot_tables(self, snapshot: str) -> Iterator[list[SourceTable]]:
        """The tables as of the slot's snapshot, locked against DDL for the whole load.

        The load's COPY is planned with today's catalog but reads rows as of the snapshot, so the
        two must agree: discover under the snapshot, lock (ACCESS SHARE, as PostgreSQL's own table
        sync does: ALTER TABLE waits until the load ends), then check nothing changed in between.
        """
        with psycopg.connect(self.cfg.dsn, connect_timeout=10, autocommit=True) as guard:
            guard.execute(f"SET lock_timeout = '{LOAD_LOCK_TIMEOUT}'")
            guard.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            guard.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            tables = self._discover(guard)
            for t in tables:
                guard.execute(
                    sql.SQL("LOCK TABLE ONLY {} IN ACCESS SHARE MODE").format(sql.Identifier(t.schema, t.name))
                )
            with psycopg.connect(self.cfg.dsn, connect_timeout=10, autocommit=True) as fresh:
                fresh.execute(f"SET lock_timeout = '{LOAD_LOCK_TIMEOUT}'")  # may queue behind a waiting ALTER
                now = self._discover(fresh, [t.qualified for t in tables]) if tables else []

            if [_shape(t) for t in now] != [_shape(t) for t in tables]:
                raise _ShapeChanged
            yield tables
            guard.execute("COMMIT")

    # -- the applier's Catalog ----------------------------------------------------------------
    def _selected(self, qualified: str) -> bool:
        include = self.cfg.include or ("*.*",)
        return any(fnmatchcase(qualified, g) for g in include) and not any(
            fnmatchcase(qualified, g) for g in self.cfg.exclude
        )

    def lookup(self, schema: str, name: str) -> SourceTable | None:
        """A table first seen in the stream (created before DDL capture was on): replicate it if selected."""
        qualified = f"{schema}.{name}"
        if not self._selected(qualified):
            return None
        with psycopg.connect(self.cfg.dsn, connect_timeout=10) as c:
            found = self._discover(c, [qualified])  # a table that cannot be replicated is reported there
        return found[0] if found else None

    def shape(self, definition: Mapping[str, Any]) -> SourceTable | None:
        st = table_from_definition(definition, self.cfg.exclude_columns)
        return st if st is not None and self._selected(st.qualified) else None

    def sink_table(self, st: SourceTable) -> SinkTable:
        return sink_table(st)

    def recopy(self, st: SourceTable, stt: SinkTable) -> LSN:
        with psycopg.connect(self.cfg.dsn, connect_timeout=10, options=PG_SESSION_OPTIONS) as c:
            copy_rows(c, st, stt, self.sink.con, self.sink.target(stt))
            return wal_insert_lsn(c)

    def _check_slot_is_ours(self) -> None:
        """Refuse a slot confirmed beyond anything this pipeline ever confirmed: it was recreated.

        After a failover to a member that had no copy of the slot, Patroni creates the permanent
        slot afresh at the current position; streaming from it would silently skip every change
        in between.
        """
        _, start = self._phase()
        ours = max((p for p in (self.sink.position(), start) if p is not None), default=None)
        st = slot_status(self.cfg.dsn, self.cfg.slot)
        if ours is not None and st.confirmed_flush_lsn is not None and st.confirmed_flush_lsn > ours:
            raise SlotMissingError(
                f"replication slot {self.cfg.slot} starts at {st.confirmed_flush_lsn}, beyond {ours} where this"
                " pipeline left it: it was recreated (a failover to a member without a copy of it?)"
            )

    def _stream(self) -> None:
        # The shapes the warehouse holds as of its checkpoint, not today's catalog: the stream
        # replays from the checkpoint, and DDL messages carry each table forward from there.
        sources = {ident: SourceTable.from_json(d) for ident, d in self.sink.definitions().items()}
        sink_tables = {ident: sink_table(st) for ident, st in sources.items()}
        limits = BatchLimits(self.cfg.max_rows, self.cfg.max_wait_ms / 1000)
        try:
            self._check_slot_is_ours()
        except SlotMissingError as e:
            self._slot_lost(e.message)
            return
        waiter = SyncStandbyWait(self.cfg.dsn, self.stop) if self.cfg.sync_standby else None
        applier = Applier(
            self.sink, sink_tables, limits, catalog=self, sources=sources, durable=waiter.wait if waiter else None
        )
        self.status.phase = "streaming"
        opts = StreamOptions(publications=(self.cfg.publication,))
        dsn = f"{self.cfg.dsn} options='{PG_SESSION_OPTIONS}'"
        window_start, window_changes = time.monotonic(), 0
        try:
            with ReplicationStream.start(dsn, self.cfg.slot, opts) as stream, contextlib.closing(applier):
                self.status.state = "running"
                while not self.stop.is_set():
                    pump(stream, applier, held=self.held)
                    st = self.status
                    st.transactions, st.changes = applier.stats.transactions, applier.stats.changes
                    st.rows_by_table = dict(applier.stats.rows_by_table)
                    st.needs_resync = dict(applier.broken)
                    st.last_applied_lsn = str(applier.checkpoint) if applier.checkpoint else None
                    if applier.applied_end is not None:
                        st.lag_bytes = max(0, stream.server_wal_end - applier.applied_end)
                    st.lag_seconds = round(applier.lag_seconds(), 3)
                    now = time.monotonic()
                    if now - window_start >= 1:
                        st.changes_per_s = (st.changes - window_changes) / (now - window_start)
                        window_start, window_changes = now, st.changes
                    self.status_file.write()
                    if applier.resync_wanted and not applier.in_transaction:
                        # Re-copied "as of now" after a rewrite: a table without a unique key gets an
                        # exact copy as well, before replayed changes could double its rows.
                        self.jobs.put(_Job("resync", {"tables": sorted(applier.resync_wanted)}))
                        applier.resync_wanted.clear()
                    if not self.jobs.empty() and not applier.in_transaction:
                        self._run_jobs(stream, applier)
                # Stopped inside a source transaction, what it folded cannot be told apart from
                # the commits before it: all of it replays from the warehouse's checkpoint.
                confirm = None if applier.in_transaction else applier.flush()
                if confirm is not None:
                    stream.confirm(confirm)
        except _Stopping:
            pass  # stopped while a batch waited for the standby: it replays on the next start
        except SlotMissingError as e:
            self._slot_lost(e.message)
        finally:
            if waiter is not None:
                waiter.close()

    def close(self) -> None:
        self.stop.set()
        while not self.jobs.empty():
            job = self.jobs.get_nowait()
            job.result = {"error": "the pipeline stopped before it could run this"}
            job.done.set()
        if self.status.state != "error":  # an error stays visible to `pipeline status`
            self.status.state = "stopped"
        with contextlib.suppress(OSError):
            self.status_file.write(force=True)
        self.sink.close()


def check_passfile(dsn: str) -> None:
    """libpq passes over a password file it cannot use without a word ("no password supplied"):
    say which file and why instead."""
    path = conninfo_to_dict(dsn).get("passfile")
    if not path:
        return
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise PgbridgeError(f"the pipeline's password file {path} is not a plain file; `pgbridge up` writes it")
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise PgbridgeError(
            f"cannot read the pipeline's password file {path}: {exc.strerror}; `pgbridge up` writes it"
        ) from None
    if mode & 0o077:
        raise PgbridgeError(
            f"the pipeline's password file {path} is open to other users (mode {stat.S_IMODE(mode):o}),"
            " so libpq will not use it; `pgbridge up` writes it again with mode 600"
        )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pgbridge.cdc.pipeline CONFIG.json", file=sys.stderr)
        return 2
    cfg = PipelineConfig.load(Path(args[0]))
    pipeline = Pipeline(cfg)
    signal.signal(signal.SIGTERM, lambda *_: pipeline.stop.set())
    try:
        pipeline.run()
        return 0
    except PgbridgeError as e:
        pipeline.status.state, pipeline.status.last_error = "error", e.message
        print(f"pipeline {cfg.name}: {e.message}", file=sys.stderr)
        return 1
    except (psycopg.Error, duckdb.Error, OSError) as e:
        # Not ours, but not a bug either (server gone, disk full): record it; supervisord restarts us.
        message = " ".join(f"{type(e).__name__}: {e}".split())
        pipeline.status.state, pipeline.status.last_error = "error", message
        print(f"pipeline {cfg.name}: {message}", file=sys.stderr)
        return 1
    finally:
        pipeline.close()


if __name__ == "__main__":
    sys.exit(main())
