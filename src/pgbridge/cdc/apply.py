"""Turn the change stream into warehouse transactions: the heart of exactly-once apply.

Messages arrive as raw pgoutput payloads in chunks (:meth:`Applier.feed_raw`). Row changes are only
collected; Begin, Commit, Relation, Truncate and logical messages are decoded one by one and handled
at their place. When a micro-batch closes, the collected row changes are decoded column by column
(:mod:`pgbridge.cdc.columnar`) into per-table Arrow staging tables, which the sink folds and applies
set-based (:class:`~pgbridge.cdc.sinks.base.StagedChanges`); a batch in which a change moves a row to
another key is folded in Python instead (:class:`~pgbridge.cdc.reduce.TableDelta`). A table without a
unique key is staged as signed copies of whole rows, a multiset (:attr:`SinkTable.bag`). One sink
transaction holds every table's changes and the commit LSN, and only after it committed does the
caller confirm the LSN to PostgreSQL. A source transaction larger than the batch limit is applied in
chunks inside one still-open sink transaction, so memory stays bounded and the warehouse never shows
half a transaction. Transactions at or below the sink's checkpoint are skipped: a restart replays
nothing twice.

The sink work runs in one worker thread, in order, while the caller goes on reading: DuckDB
releases the GIL while it executes, so the stream is read while the previous batch is applied. At
most one piece of sink work is in flight; anything else that touches the sink waits for it first.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import pyarrow as pa

from pgbridge.cdc import columnar, ddl
from pgbridge.cdc.pgoutput import (
    STREAM_TAGS,
    Begin,
    Commit,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Relation,
    Truncate,
    TupleData,
    Update,
    decode,
    first_byte,
)
from pgbridge.cdc.reduce import UNCHANGED, Cell, Key, TableDelta, text_of
from pgbridge.cdc.sinks.base import Sink, SinkTable, StagedChanges
from pgbridge.errors import PgbridgeError
from pgbridge.types import LSN

if TYPE_CHECKING:
    from pgbridge.cdc.catalog import SourceTable


class SchemaMismatch(PgbridgeError):
    """The source table no longer has the shape the warehouse table was made for."""


# Why a table without a unique key stops after a rewrite: its re-copy read the source "as of now",
# which the changes the stream replays would be applied onto twice, so it waits for an exact one.
AWAITING_RESYNC: Final = "re-copied after a rewrite; an exact resync of it follows (pgbridge pipeline resync)"


class Catalog(Protocol):
    """What the applier asks the pipeline about tables it meets in the stream."""

    def lookup(self, schema: str, name: str) -> SourceTable | None:
        """A table first seen in the stream, from the source catalog; None when it is not replicated."""

    def shape(self, definition: Mapping[str, Any]) -> SourceTable | None:
        """A DDL message's table definition with the spec's exclusions (``problem`` set when it cannot be
        replicated); None when the pipeline does not select it."""

    def sink_table(self, st: SourceTable) -> SinkTable: ...

    def recopy(self, st: SourceTable, stt: SinkTable) -> LSN:
        """Copy the table's current rows into the sink's open transaction (the table is empty).

        Returns a WAL position past the commit of every transaction the copy saw (the stream may
        replay those): :func:`~pgbridge.cdc.copytext.wal_insert_lsn` after the copy."""


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 50_000  # changes held in memory before they go to the warehouse
    max_wait_s: float = 0.5  # longest a committed transaction waits for its batch to close
    # While changes keep arriving, a batch is handed to a free sink once it holds half of max_rows
    # or its first commit waited this long (a warehouse commit costs milliseconds: tiny batches
    # under load would spend the CPU the stream needs); a quiet stream's batch goes at once.
    # While the reader is behind the server (Applier.behind), a batch grows to max_rows or until
    # its first commit waited behind_wait_s (at most max_wait_s): larger batches clear a backlog
    # sooner, and the wait stays bounded whatever max_wait_s is.
    min_wait_s: float = 0.1
    behind_wait_s: float = 0.5  # while behind, a batch's first commit waits at most this long (or max_wait_s)


@dataclass
class _Rel:
    table: SinkTable
    positions: tuple[int, ...]  # for each sink column, its index in the relation's columns


@dataclass
class ApplyStats:
    transactions: int = 0
    skipped_transactions: int = 0
    changes: int = 0
    batches: int = 0
    rows_by_table: dict[str, int] = field(default_factory=dict)


@dataclass
class _Staged:
    """Columnar changes of one table, collected for :class:`StagedChanges` (arrays by column name)."""

    parts: list[dict[str, pa.Array]] = field(default_factory=list)
    unchanged: set[int] = field(default_factory=set)
    truncated: bool = False
    inserts_only: bool = True

    def changes(self, table: SinkTable, fresh: bool = False) -> StagedChanges:
        """``fresh``: no key inserted can be in the warehouse yet (see :attr:`StagedChanges.fresh`)."""
        columns = [f"c{i}" for i in range(len(table.columns))]
        if table.bag:
            names = ["_sign", *columns]
        else:
            names = ["_seq", "_op", *columns, *(f"k{i}" for i in table.key), *(f"u{i}" for i in sorted(self.unchanged))]
        batches = []
        for part in self.parts:
            n = len(part[names[0]])
            arrays = [part[name] if name in part else pa.array(np.zeros(n, np.bool_)) for name in names]
            batches.append(pa.RecordBatch.from_arrays(arrays, names))
        if batches:
            rows = pa.Table.from_batches(batches)
        else:
            rows = pa.table({name: pa.array([], _stage_type(name)) for name in names})
        only = self.inserts_only
        return StagedChanges(rows, tuple(sorted(self.unchanged)), self.truncated, only, only and fresh)


_STAGE_TYPES: Final = {"_seq": pa.int64(), "_op": pa.uint8(), "_sign": pa.int8()}


def _stage_type(name: str) -> pa.DataType:
    """The Arrow type of a staging column (see :class:`StagedChanges`)."""
    if name in _STAGE_TYPES:
        return _STAGE_TYPES[name]
    return pa.large_string() if name[0] in "ck" else pa.bool_()


_Segment = _Staged | TableDelta  # a table's changes in a batch: applied in order

_NOT_ROW: Final = re.compile(rb"[^IUD]")


class _Worker:
    """One thread running sink work in submission order (DuckDB releases the GIL while it executes)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], None], Future[None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        future: Future[None] = Future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pgbridge-apply", daemon=True)
            self._thread.start()
        self._queue.put((fn, future))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            del item  # an idle worker holds no reference to the work (and so to the sink)
            if future.set_running_or_notify_cancel():
                try:
                    fn()
                except BaseException as e:  # handed to the thread that waits for it
                    future.set_exception(e)
                else:
                    future.set_result(None)
            del fn, future

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


@dataclass
class _InFlight:
    future: Future[None]
    commit_lsn: LSN | None  # the checkpoint this work commits (None: it leaves the sink transaction open)
    confirm_lsn: LSN | None
    oldest_commit: float | None  # source commit time (epoch s) of its oldest transaction


class Applier:
    def __init__(
        self,
        sink: Sink,
        tables: dict[tuple[str, str], SinkTable],
        limits: BatchLimits,
        catalog: Catalog | None = None,
        sources: dict[tuple[str, str], SourceTable] | None = None,
        durable: Callable[[LSN], None] | None = None,
    ) -> None:
        """``catalog`` answers for tables first seen in the stream and for DDL messages; ``sources`` are
        the source shapes of ``tables`` (needed to follow renames and type changes). ``durable(lsn)``,
        if given, returns once the source's failover target has the WAL up to ``lsn``; each batch
        waits for it before the warehouse commits, so the warehouse never holds a transaction a
        new primary would not have."""
        self.sink = sink
        self.catalog = catalog
        self.tables = tables
        self.sources = dict(sources or {})
        # schema.table -> why its changes are not applied (needs resync); committed with each batch
        self.broken: dict[str, str] = sink.stopped_tables()
        self._broken_saved = dict(self.broken)
        # Tables without a unique key re-copied "as of now" (a rewrite): the caller resyncs them exactly.
        self.resync_wanted = {q for q, why in self.broken.items() if why == AWAITING_RESYNC}
        self._rewritten: set[int] = set()  # oids PostgreSQL rewrote in the open source transaction
        self.limits = limits
        self.checkpoint: LSN | None = sink.checkpoint()  # commit LSN of the last applied transaction
        self.applied_end: LSN | None = None  # its end LSN (what was confirmed to the server)
        self.stats = ApplyStats()
        self._rels: dict[int, _Rel | None] = {}
        self._relmsgs: dict[int, Relation] = {}  # the last Relation message of each oid
        self._rows: list[bytes] = []  # row-change payloads collected, not decoded yet (stream order)
        self._staged: dict[int, tuple[SinkTable, list[_Segment]]] = {}  # decoded, not applied yet
        self._seq = 0  # stream position of the next collected row change (orders a table's staged changes)
        self._pending_changes = 0  # changes held in memory (folded, not handed to the sink)
        self._batch_changes = 0  # changes in the batch since the last submit (held or already in the sink)
        self._decoder = Decoder()  # for chunks that hold stream blocks (protocol v2)
        self._in_txn = False
        self._skipping = False
        self._sink_open = False
        self._committed_lsn: LSN | None = None  # last source commit folded into the open batch
        self._confirm_lsn: LSN | None = None  # its end LSN: what the server may forget once committed
        self._first_commit_at: float | None = None
        self._oldest_pending_commit: float | None = None  # source commit time (epoch s) not yet submitted
        self._worker = _Worker()
        self._inflight: _InFlight | None = None
        self._ready: LSN | None = None  # end LSN of committed work the caller has not been told about
        self._idle_noted = 0.0  # monotonic time of the last note_idle record
        self.behind = False  # more of the stream is received than read: the caller says so (pump)
        self.durable = durable
        for t in tables.values():
            sink.ensure_table(t)

    # -- message handling -------------------------------------------------------------------
    def feed_raw(self, payloads: Sequence[bytes], tags: bytes | None = None) -> LSN | None:
        """Fold a chunk of raw pgoutput messages in, in stream order (``tags``: their first bytes, if known).

        Returns an LSN the caller may now confirm (work that committed meanwhile), if any.
        """
        if tags is None:
            tags = bytes(map(first_byte, payloads))
        if STREAM_TAGS.search(tags) or self._decoder.in_stream:
            for payload in payloads:  # stream blocks: message by message, as the decoder follows them
                self.feed(self._decoder.decode(payload))
            return self.poll()
        pos = 0
        for m in _NOT_ROW.finditer(tags):
            i = m.start()
            if i > pos:
                self._collect(payloads, pos, i)
            self._message(decode(payloads[i]))
            pos = i + 1
        if pos < len(payloads):
            self._collect(payloads, pos, len(payloads))
        return self.poll()

    def feed(self, msg: Message) -> LSN | None:
        """Fold one decoded message in; returns an LSN the caller may now confirm, if any."""
        if isinstance(msg, Insert | Update | Delete):
            if not self._skipping:
                self._rows.append(columnar.encode_row(msg))
                self._collected(1)
        else:
            self._message(msg)
        return self.poll()

    def _collect(self, payloads: Sequence[bytes], start: int, end: int) -> None:
        if not self._skipping:
            self._rows.extend(payloads[start:end])
            self._collected(end - start)

    def _held(self, n: int) -> None:
        """``n`` more changes held in memory, and in the batch."""
        self._pending_changes += n
        self._batch_changes += n

    def _collected(self, n: int) -> None:
        self._held(n)
        if self._in_txn and self._pending_changes >= self.limits.max_rows:
            # A large transaction: push what we have into the open warehouse transaction.
            self._apply_deltas()

    def _message(self, msg: Message) -> None:
        if isinstance(msg, Begin):
            self._in_txn = True
            self._skipping = self.checkpoint is not None and msg.final_lsn <= self.checkpoint
            return
        if isinstance(msg, Relation):
            self._decode_rows()  # the changes before it were sent with the old column layout
            self._relation(msg)
            return
        if isinstance(msg, Commit):
            self._in_txn = False
            if self._skipping:
                self._skipping = False
                self.stats.skipped_transactions += 1
                return
            self.stats.transactions += 1
            self._committed_lsn = msg.commit_lsn
            self._confirm_lsn = msg.end_lsn
            now = time.monotonic()
            if self._first_commit_at is None:
                self._first_commit_at = now
                self._oldest_pending_commit = msg.commit_time.timestamp()
            # Decided here, at the commit, not where a read happens to end: under a steady stream
            # most reads end inside a transaction, and a batch could then wait for a quiet moment.
            # Cheapest tests first: this runs for every source transaction.
            waited = now - self._first_commit_at
            limits = self.limits
            if (
                self._batch_changes >= limits.max_rows
                or waited >= limits.max_wait_s
                or (self._ripe(waited) and not self.busy)
            ):
                self.submit()
            return
        if self._skipping:
            return
        if isinstance(msg, LogicalMessage):
            if msg.prefix == ddl.PREFIX and msg.transactional and self.catalog is not None:
                self._ddl(ddl.parse(msg.content))
        elif isinstance(msg, Truncate):
            self._decode_rows()
            for oid in msg.relation_oids:
                rel = self._rels.get(oid)
                if rel:
                    self._staged[oid] = (rel.table, [_Staged(truncated=True)])  # what came before it is gone
                    self._counted(rel, 1)
                    self._held(1)

    # -- batches --------------------------------------------------------------------------------
    def due(self) -> bool:
        """True when a committed batch has waited long enough and should be flushed."""
        return (
            not self._in_txn
            and self._committed_lsn is not None
            and self._first_commit_at is not None
            and time.monotonic() - self._first_commit_at >= self.limits.max_wait_s
        )

    def due_in(self) -> float | None:
        """Seconds until the pending batch is due (0: now); None when nothing committed is pending."""
        if self._first_commit_at is None:
            return None
        return max(0.0, self.limits.max_wait_s - (time.monotonic() - self._first_commit_at))

    def ripe(self) -> bool:
        """A committed batch is worth a warehouse commit now, though more changes are arriving."""
        if self._committed_lsn is None or self._first_commit_at is None or self._in_txn:
            return False
        return self._ripe(time.monotonic() - self._first_commit_at)

    def _ripe(self, waited: float) -> bool:
        """Ripe, for a batch whose first commit waited ``waited`` seconds; max_rows always is."""
        limits = self.limits
        if self._batch_changes >= limits.max_rows:
            return True
        if self.behind:
            return waited >= min(limits.behind_wait_s, limits.max_wait_s)
        return self._batch_changes >= limits.max_rows // 2 or waited >= min(limits.min_wait_s, limits.max_wait_s)

    @property
    def pending_commit(self) -> bool:
        """A source commit is folded in and not submitted to the sink yet."""
        return self._committed_lsn is not None

    @property
    def busy(self) -> bool:
        """Sink work is in flight."""
        return self._inflight is not None and not self._inflight.future.done()

    def lag_seconds(self, now: float | None = None) -> float:
        """Age of the oldest source commit received but not yet in the warehouse (0 when none)."""
        candidates = [self._oldest_pending_commit, self._inflight.oldest_commit if self._inflight else None]
        times = [t for t in candidates if t is not None]
        if not times:
            return 0.0
        return max(0.0, (now if now is not None else time.time()) - min(times))

    @property
    def idle(self) -> bool:
        """Nothing in flight: the caller may let the slot advance to the server's WAL end."""
        return not self._in_txn and self._committed_lsn is None and not self._sink_open and self._inflight is None

    def note_idle(self, lsn: LSN, every_s: float = 1.0) -> bool:
        """Record ``lsn`` as the slot's position while idle; ``False`` when the last record is too recent."""
        now = time.monotonic()
        if not self.idle or now - self._idle_noted < every_s:
            return False
        self.sink.note_position(lsn)
        self._idle_noted = now
        return True

    def submit(self) -> None:
        """Send everything folded up to the last source commit to the sink, to commit there; returns at once.

        The sink work runs in the worker thread; :meth:`poll` or :meth:`wait` say when it committed.
        Waits first for the work already in flight, so at most one batch is applied while the next one
        is read.
        """
        if self._committed_lsn is None or self._confirm_lsn is None:
            return
        if self._in_txn:
            raise RuntimeError("submit() inside a source transaction")
        self._decode_rows()
        work = self._take_staged()
        oldest = self._oldest_pending_commit
        self._dispatch(work, self._committed_lsn, self._confirm_lsn, oldest)
        self._committed_lsn = self._confirm_lsn = None
        self._first_commit_at = self._oldest_pending_commit = None
        self._batch_changes = 0

    def poll(self) -> LSN | None:
        """The end LSN of sink work that committed since the last call, if any; never blocks.

        Raises what the sink work raised.
        """
        if self._inflight is not None and self._inflight.future.done():
            self._settle()
        ready, self._ready = self._ready, None
        return ready

    def wait(self) -> LSN | None:
        """Wait for the sink work in flight; then as :meth:`poll`."""
        if self._inflight is not None:
            self._settle()
        return self.poll()

    def flush(self) -> LSN | None:
        """Commit everything folded up to the last source commit and wait; returns the LSN to confirm."""
        self.submit()
        return self.wait()

    def close(self) -> None:
        """Wait for the sink work in flight (its error is dropped: nothing was committed) and end the worker."""
        with contextlib.suppress(Exception):  # the caller is stopping anyway; the sink rolls back on close
            self.wait()
        self._worker.stop()

    def _dispatch(
        self,
        work: list[tuple[SinkTable, list[_Segment]]],
        commit: LSN | None,
        confirm: LSN | None,
        oldest: float | None,
    ) -> None:
        if self._inflight is not None:
            self._settle()
        begin = not self._sink_open
        # Every transaction in this work commits after the checkpoint. The stream keeps the warehouse
        # equal to the source there, so an inserted key is new to it, unless rows were copied from the
        # source past the checkpoint (a re-copy or a repair reads the source as of now).
        horizon, checkpoint = self.sink.copy_horizon(), self.checkpoint
        fresh = checkpoint is not None and (horizon is None or horizon <= checkpoint)
        changes = [
            (table, seg.changes(table, fresh) if isinstance(seg, _Staged) else seg)
            for table, segs in work
            for seg in segs
        ]
        sink, durable = self.sink, self.durable
        stopped = None
        if commit is not None and self.broken != self._broken_saved:
            stopped = self._broken_saved = dict(self.broken)

        def run() -> None:
            if begin:
                sink.begin()
            if stopped is not None:
                sink.save_stopped(stopped)
            for table, change in changes:
                if isinstance(change, TableDelta):
                    if not change.is_empty():
                        sink.apply(table, change)
                else:
                    sink.apply_staged(table, change)
            if commit is not None:
                if durable is not None and confirm is not None:
                    durable(confirm)
                sink.commit(commit, confirm)

        self._sink_open = commit is None
        self._inflight = _InFlight(self._worker.submit(run), commit, confirm, oldest)

    def _settle(self) -> None:
        """Wait for the work in flight and take note of what it committed (raises what it raised)."""
        inflight, self._inflight = self._inflight, None
        assert inflight is not None
        try:
            inflight.future.result()
        except BaseException:
            self._sink_open = True  # whatever it left open, the caller rolls back (abort)
            raise
        if inflight.commit_lsn is not None:
            self.checkpoint = inflight.commit_lsn
            self.applied_end = inflight.confirm_lsn
            self._ready = inflight.confirm_lsn
            self.stats.batches += 1

    @property
    def in_transaction(self) -> bool:
        """Inside a source transaction: the warehouse may hold part of it in an open transaction."""
        return self._in_txn

    def reset_table(self, st: SourceTable, fill: Callable[[SinkTable], None]) -> None:
        """Re-create a table from its current source shape and rows (``pipeline resync TABLE``).

        Call between source transactions, after :meth:`flush`, with the stream applied exactly up
        to the moment the rows were copied: ``fill(table)`` writes them into the re-created table
        inside the sink's open transaction. The checkpoint does not move.
        """
        assert self.catalog is not None and not self._in_txn
        ident = (st.schema, st.name)
        self._open_sink()
        try:
            self._forget(ident)
            table = self._adopt(st)
            self.broken.pop(st.qualified, None)  # before the mapping, which leaves a broken table unmapped
            for msg in [m for m in self._relmsgs.values() if (m.namespace, m.name) == ident]:
                self._relation(msg)  # no Relation message will come again: map the columns now
            fill(table)
            self.sink.save_stopped(self.broken)
            self._broken_saved = dict(self.broken)
            if self.checkpoint is not None:
                self.sink.commit(self.checkpoint)
            else:
                self.sink.commit_meta()
        except BaseException as e:
            self.sink.rollback()
            # What the warehouse holds of the table is unknown here: its changes wait for a resync.
            self.broken[st.qualified] = f"resync failed ({type(e).__name__}); run it again"
            for oid in self._mapped(ident):
                self._rels[oid] = None
            raise
        finally:
            self._sink_open = False

    def abort(self) -> None:
        """Drop everything not yet committed (the caller restarts from the sink's checkpoint)."""
        with contextlib.suppress(Exception):  # the work that failed committed nothing: it is rolled back below
            self.wait()
        self.sink.rollback()
        self._sink_open = False
        self._rows.clear()
        self._staged.clear()
        self._pending_changes = self._batch_changes = 0
        self._committed_lsn = None
        self._first_commit_at = self._oldest_pending_commit = None
        self._in_txn = self._skipping = False
        self._decoder.reset()

    # -- internals --------------------------------------------------------------------------
    def _relation(self, msg: Relation) -> None:
        self._relmsgs[msg.oid] = msg
        ident = (msg.namespace or "pg_catalog", msg.name)
        table = self.tables.get(ident)
        if table is None and self.catalog is not None:
            st = self.catalog.lookup(*ident)
            if st is not None:
                table = self._adopt(st)
        qualified = _qualified(ident)
        if table is None or qualified in self.broken:
            self._rels[msg.oid] = None
            return
        names = [c.name for c in msg.columns]
        missing = [c.name for c in table.columns if c.name not in names]
        if missing:
            # The shape changed without a DDL message (the capture was off): never guess a mapping.
            self.broken[qualified] = (
                f"{qualified} no longer has column(s) {', '.join(missing)} and no DDL message said why;"
                f" its changes are not applied: run `pgbridge pipeline resync {qualified}`"
            )
            self._rels[msg.oid] = None
            return
        self._rels[msg.oid] = _Rel(table, tuple(names.index(c.name) for c in table.columns))

    def _adopt(self, st: SourceTable) -> SinkTable:
        """Start replicating a table: create it in the warehouse and record its shape (open transaction)."""
        assert self.catalog is not None
        table = self.catalog.sink_table(st)
        self._open_sink()
        self.sink.ensure_table(table)
        self._register(st, table)
        return table

    def _register(self, st: SourceTable, table: SinkTable) -> None:
        ident = (st.schema, st.name)
        self.tables[ident], self.sources[ident] = table, st
        self.sink.save_definition(st.schema, st.name, st.to_json())
        for oid in self._mapped(ident):  # column positions come from the next Relation message
            del self._rels[oid]

    def _mapped(self, ident: tuple[str, str]) -> list[int]:
        """The relation oids whose columns are mapped to the table ``ident``."""
        qualified = _qualified(ident)
        return [oid for oid, rel in self._rels.items() if rel is not None and rel.table.qualified == qualified]

    def _forget(self, ident: tuple[str, str]) -> None:
        table = self.tables.pop(ident, None)
        self.sources.pop(ident, None)
        self.broken.pop(_qualified(ident), None)  # a table gone has nothing to resync
        if table is not None:
            self.sink.drop_table(table)
            self.sink.save_definition(*ident, None)
        for oid in self._mapped(ident):
            del self._rels[oid]

    def _by_oid(self, oid: int) -> tuple[str, str] | None:
        return next((ident for ident, st in self.sources.items() if st.oid == oid), None)

    def _ddl(self, event: ddl.Event) -> None:
        """A schema change, applied at its place in the stream: earlier changes go in first."""
        assert self.catalog is not None
        self._apply_deltas()
        self._open_sink()
        if isinstance(event, ddl.Rewrite):
            self._rewritten.add(event.oid)
            return
        if isinstance(event, ddl.Drop):
            self._forget(self._by_oid(event.oid) or (event.schema, event.name))
            return
        st = self.catalog.shape(event.definition)
        before = self._by_oid(event.oid)
        if st is None:  # not selected (any more): e.g. moved to a schema the pipeline does not include
            if before is not None:
                self._forget(before)
            return
        if st.problem:  # e.g. its primary key was dropped: stop applying to it, say so, keep its rows
            self.broken[st.qualified] = f"{st.problem}; then run `pgbridge pipeline resync {st.qualified}`"
            return
        ident, new = (st.schema, st.name), self.catalog.sink_table(st)
        was = _qualified(before or ident)
        stopped = self.broken.pop(was, None)  # its changes were dropped while it was stopped
        recopy = event.oid in self._rewritten or event.tag in ("CREATE TABLE AS", "SELECT INTO")
        self._rewritten.discard(event.oid)
        old = self.tables.get(before or ident)
        if old is None:
            self.sink.ensure_table(new)
        else:
            if before is not None and before != ident:  # ALTER TABLE ... RENAME TO / SET SCHEMA
                if before[0] == ident[0]:
                    self.sink.rename_table(old, st.name)
                    self.sink.save_definition(*before, None)
                    self.tables.pop(before)
                    self.sources.pop(before, None)
                    old = replace(old, name=st.name)
                else:
                    self._forget(before)
                    self.sink.ensure_table(new)
                    old, recopy = None, True
            if old is not None:
                steps = ddl.plan_alter(old, new, {c.attnum: c.missing for c in st.columns})
                recopy = self.sink.alter_table(old, steps) or recopy
        self._register(st, new)
        qualified = st.qualified
        self.broken.pop(qualified, None)
        if stopped is not None and not recopy:
            # A new shape does not bring back the changes it missed: it stays stopped (under its
            # new name after a rename) until it is resynced or re-copied whole.
            if was != qualified:
                if stopped != AWAITING_RESYNC:
                    stopped = (
                        f"{qualified} was renamed from {was} while stopped ({stopped});"
                        f" run `pgbridge pipeline resync {qualified}`"
                    )
                if was in self.resync_wanted:
                    self.resync_wanted.discard(was)
                    self.resync_wanted.add(qualified)
            self.broken[qualified] = stopped
        if recopy:
            self.sink.clear_rows(new)
            try:
                self.sink.note_copy(self.catalog.recopy(st, new))
            except PgbridgeError as e:
                self.broken[qualified] = f"re-copying {qualified} after a rewrite failed ({e.message}); run resync"
            else:
                if new.bag:
                    self.broken[qualified] = AWAITING_RESYNC  # its changes wait for the exact resync
                    self.resync_wanted.add(qualified)

    def _open_sink(self) -> None:
        """Wait for the sink work in flight, then make sure a sink transaction is open (this thread)."""
        if self._inflight is not None:
            self._settle()
        if not self._sink_open:
            self.sink.begin()
            self._sink_open = True

    def _counted(self, rel: _Rel, n: int) -> None:
        self.stats.changes += n
        name = rel.table.qualified
        self.stats.rows_by_table[name] = self.stats.rows_by_table.get(name, 0) + n

    def _segments(self, oid: int, rel: _Rel) -> list[_Segment]:
        entry = self._staged.get(oid)
        if entry is None or entry[0] is not rel.table:
            if entry is not None:  # another table under this oid now: what is staged for the old one goes first
                self._apply_deltas()
            entry = self._staged[oid] = (rel.table, [])
        return entry[1]

    def _staging(self, oid: int, rel: _Rel) -> _Staged:
        segments = self._segments(oid, rel)
        if not segments or not isinstance(segments[-1], _Staged):
            segments.append(_Staged())
        last = segments[-1]
        assert isinstance(last, _Staged)
        return last

    def _delta(self, oid: int, rel: _Rel) -> TableDelta:
        segments = self._segments(oid, rel)
        if not segments or not isinstance(segments[-1], TableDelta):
            staged = segments[-1] if segments else None
            if isinstance(staged, _Staged) and staged.truncated and not staged.parts:
                segments.pop()  # a TRUNCATE with nothing after it yet: the delta carries it
                delta = TableDelta(key_positions=rel.table.key, truncated=True)
            else:
                delta = TableDelta(key_positions=rel.table.key)
            segments.append(delta)
        last = segments[-1]
        assert isinstance(last, TableDelta)
        return last

    def _decode_rows(self) -> None:
        """Decode the collected row changes into each table's staging (column by column)."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        buf = b"".join(rows)
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        ends = np.cumsum(lengths)
        starts = ends - lengths
        try:
            groups = columnar.decode_rows(buf, starts, ends)
        except columnar.Unsupported:
            for payload in rows:  # one by one: raises the DecodeError that says what is wrong
                self._fold(decode(payload))
            return
        arr = columnar.as_array(buf)
        seq, self._seq = self._seq, self._seq + len(rows)
        moved: set[int] = set()  # relations with a change that moves a row to another key
        staged: list[tuple[int, _Rel, columnar.RowGroup, dict[str, pa.Array]]] = []
        for g in groups:
            rel = self._rels.get(g.relation_oid)
            if rel is None:
                continue
            if g.relation_oid in moved:
                staged.append((g.relation_oid, rel, g, {}))
                continue
            arrays = self._arrays(rel, g, arr, seq)
            if arrays is None:
                moved.add(g.relation_oid)
            staged.append((g.relation_oid, rel, g, arrays or {}))
        for oid, rel, g, arrays in staged:
            self._counted(rel, len(g))
            if oid not in moved:
                staging = self._staging(oid, rel)
                staging.parts.append(arrays)
                staging.unchanged.update(int(name[1:]) for name in arrays if name[0] == "u")
                staging.inserts_only = staging.inserts_only and g.tag == columnar.TAG_INSERT
        for oid in moved:  # fold those tables in Python, in stream order
            index = np.sort(np.concatenate([g.index for o, _, g, _ in staged if o == oid]))
            for i in index.tolist():
                self._fold(decode(rows[i]), count=False)

    @staticmethod
    def _arrays(rel: _Rel, g: columnar.RowGroup, arr: Any, seq: int) -> dict[str, pa.Array] | None:
        """The staging columns of one group; None when a change in it moves a row to another key."""
        table, positions = rel.table, rel.positions
        if table.bag:
            return _bag_arrays(positions, g, arr)
        n = len(g)
        out: dict[str, pa.Array] = {
            "_seq": pa.array(g.index + seq),
            "_op": pa.array(np.full(n, g.tag, np.uint8)),
        }
        new, old = g.new, g.old
        text = columnar.text_array
        if new is not None:
            for i, p in enumerate(positions):
                kinds = new.kinds[:, p]
                valid = (kinds == columnar.KIND_TEXT) | (kinds == columnar.KIND_BINARY)
                out[f"c{i}"] = text(arr, new.starts[:, p], new.lengths[:, p], valid)
                unchanged = kinds == columnar.KIND_UNCHANGED
                if unchanged.any():
                    if i in table.key:
                        return None  # a key column not sent: the Python fold says what is wrong
                    out[f"u{i}"] = pa.array(unchanged)
            for i in table.key:
                out[f"k{i}"] = out[f"c{i}"]
            if old is not None:  # the old key was sent: does the key change?
                for i in table.key:
                    p = positions[i]
                    kinds = old.kinds[:, p]
                    valid = (kinds == columnar.KIND_TEXT) | (kinds == columnar.KIND_BINARY)
                    before = text(arr, old.starts[:, p], old.lengths[:, p], valid)
                    if not before.equals(out[f"k{i}"]):
                        return None
        else:
            assert old is not None
            nulls = pa.nulls(n, pa.large_string())
            for i in range(len(positions)):
                out[f"c{i}"] = nulls
            for i in table.key:
                p = positions[i]
                kinds = old.kinds[:, p]
                valid = (kinds == columnar.KIND_TEXT) | (kinds == columnar.KIND_BINARY)
                out[f"k{i}"] = text(arr, old.starts[:, p], old.lengths[:, p], valid)
        return out

    def _fold(self, msg: Message, *, count: bool = True) -> None:
        """One row change folded in Python (a batch in which a row moves to another key, or one the
        columnar decode declined)."""
        if not isinstance(msg, Insert | Update | Delete):
            raise TypeError(f"not a row change: {type(msg).__name__}")
        rel = self._rels.get(msg.relation_oid)
        if rel is None:
            return
        if rel.table.bag:
            try:
                part = _bag_part(rel, msg)
            except SchemaMismatch as e:  # its changes stop here, with the reason in status, until a resync
                self.broken[rel.table.qualified] = e.message
                self._rels[msg.relation_oid] = None
                self._staged.pop(msg.relation_oid, None)
                return
            staging = self._staging(msg.relation_oid, rel)
            staging.parts.append(part)
            staging.inserts_only = staging.inserts_only and isinstance(msg, Insert)
        elif isinstance(msg, Insert):
            self._delta(msg.relation_oid, rel).insert(self._values(rel, msg.new))
        elif isinstance(msg, Update):
            old_key = self._key(rel, msg.old) if msg.old is not None else None
            new = self._values(rel, msg.new)
            delta = self._delta(msg.relation_oid, rel)
            if old_key is not None and old_key == delta.key_of(new):
                old_key = None
            delta.update(new, old_key)
        elif msg.old is not None:
            self._delta(msg.relation_oid, rel).delete(self._key(rel, msg.old))
        if count:
            self._counted(rel, 1)

    @staticmethod
    def _values(rel: _Rel, tup: TupleData) -> list[Cell]:
        kinds, values = tup.kinds, tup.values
        return [UNCHANGED if kinds[p] == "u" else values[p] for p in rel.positions]

    def _key(self, rel: _Rel, tup: TupleData) -> Key:
        vals = self._values(rel, tup)
        return tuple(vals[i] for i in rel.table.key)  # type: ignore[misc]

    def _take_staged(self) -> list[tuple[SinkTable, list[_Segment]]]:
        work = [(table, segments) for table, segments in self._staged.values() if segments]
        self._staged.clear()
        self._pending_changes = 0
        return work

    def _apply_deltas(self) -> None:
        """Send what is folded so far into the open sink transaction (no commit)."""
        self._decode_rows()
        work = self._take_staged()
        if work:
            self._dispatch(work, None, None, None)


def _qualified(ident: tuple[str, str]) -> str:
    return f"{ident[0]}.{ident[1]}"


# -- tables kept as multisets (SinkTable.bag) ---------------------------------------------------------


def _bag_arrays(positions: tuple[int, ...], g: columnar.RowGroup, arr: Any) -> dict[str, pa.Array] | None:
    """The staging columns of a bag table's group: its old rows as -1 copies, its new rows as +1.

    An update's unchanged TOAST values are taken from its old row. None (the Python fold then says
    what is wrong) when an update or delete does not carry its whole old row, which REPLICA
    IDENTITY FULL always sends.
    """
    old, new, n = g.old, g.new, len(g)
    images: list[tuple[columnar.TupleColumns, int]] = []
    if g.tag != columnar.TAG_INSERT:
        if old is None or g.old_kind != "O" or bool((old.kinds == columnar.KIND_UNCHANGED).any()):
            return None
        images.append((old, -1))
    if new is not None:
        unchanged = new.kinds == columnar.KIND_UNCHANGED
        if unchanged.any():
            if old is None or old.ncols != new.ncols:
                return None
            new = columnar.TupleColumns(
                np.where(unchanged, old.kinds, new.kinds),
                np.where(unchanged, old.starts, new.starts),
                np.where(unchanged, old.lengths, new.lengths),
            )
        images.append((new, 1))
    out: dict[str, pa.Array] = {"_sign": pa.array(np.repeat([s for _, s in images], n).astype(np.int8))}
    for i, p in enumerate(positions):
        parts = []
        for t, _ in images:  # each image's values lie in buffer order: cut out one image at a time
            kinds = t.kinds[:, p]
            valid = (kinds == columnar.KIND_TEXT) | (kinds == columnar.KIND_BINARY)
            parts.append(columnar.text_array(arr, t.starts[:, p], t.lengths[:, p], valid))
        out[f"c{i}"] = parts[0] if len(parts) == 1 else pa.concat_arrays(parts)
    return out


def _bag_part(rel: _Rel, msg: Insert | Update | Delete) -> dict[str, pa.Array]:
    """One change to a bag table as staging columns (as :func:`_bag_arrays` makes them)."""
    table = rel.table
    images: list[tuple[list[Cell], int]] = []
    old = None
    if not isinstance(msg, Insert):
        if msg.old is None or msg.old_kind != "O":
            raise SchemaMismatch(
                f"{table.qualified} has no unique key, so its changes must carry the whole old row"
                " (REPLICA IDENTITY FULL), and this one did not; run `pgbridge pipeline resync"
                f" {table.qualified}` after fixing its replica identity"
            )
        old = Applier._values(rel, msg.old)
        if any(v is UNCHANGED for v in old):
            raise SchemaMismatch(f"a change to {table.qualified} did not carry its whole old row")
        images.append((old, -1))
    if not isinstance(msg, Delete):
        new = Applier._values(rel, msg.new)
        if old is not None:
            new = [o if v is UNCHANGED else v for v, o in zip(new, old, strict=True)]
        elif any(v is UNCHANGED for v in new):
            raise SchemaMismatch(f"an insert into {table.qualified} left a value out")
        images.append((new, 1))
    out: dict[str, pa.Array] = {"_sign": pa.array([s for _, s in images], pa.int8())}
    for i in range(len(table.columns)):
        out[f"c{i}"] = pa.array([text_of(v[i]) for v, _ in images], pa.large_string())
    return out
