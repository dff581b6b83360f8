"""Turn the decoded change stream into warehouse transactions: the heart of exactly-once apply.

Messages are folded into per-table deltas (`reduce.TableDelta`) as they arrive. At a source
commit the applier may close a micro-batch: one sink transaction with every delta and the commit
LSN, after which (and only after which) the caller confirms the LSN to PostgreSQL. A source
transaction larger than the batch limit is applied in chunks inside one still-open sink
transaction, so memory stays bounded and the warehouse never shows half a transaction.
Transactions at or below the sink's checkpoint are skipped: a restart replays nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from pgbridge.cdc import ddl
from pgbridge.cdc.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Relation,
    Truncate,
    TupleData,
    Update,
)
from pgbridge.cdc.reduce import UNCHANGED, Cell, Key, TableDelta
from pgbridge.cdc.sinks.base import Sink, SinkTable
from pgbridge.errors import PgbridgeError
from pgbridge.types import LSN

if TYPE_CHECKING:
    from pgbridge.cdc.snapshot import SourceTable


class SchemaMismatch(PgbridgeError):
    """The source table no longer has the shape the warehouse table was made for."""


class Catalog(Protocol):
    """What the applier asks the pipeline about tables it meets in the stream."""

    def lookup(self, schema: str, name: str) -> SourceTable | None:
        """A table first seen in the stream, from the source catalog; None when it is not replicated."""

    def shape(self, definition: Mapping[str, Any]) -> SourceTable | None:
        """A DDL message's table definition with the spec's exclusions (``problem`` set when it cannot be
        replicated); None when the pipeline does not select it."""

    def sink_table(self, st: SourceTable) -> SinkTable: ...

    def recopy(self, st: SourceTable, stt: SinkTable) -> None:
        """Copy the table's current rows into the sink's open transaction (the table is empty)."""


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 50_000  # changes held in memory before they go to the warehouse
    max_wait_s: float = 0.5  # longest a committed transaction waits for its batch to close


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


class Applier:
    def __init__(
        self,
        sink: Sink,
        tables: dict[tuple[str, str], SinkTable],
        limits: BatchLimits,
        catalog: Catalog | None = None,
        sources: dict[tuple[str, str], SourceTable] | None = None,
    ) -> None:
        """``catalog`` answers for tables first seen in the stream and for DDL messages; ``sources`` are
        the source shapes of ``tables`` (needed to follow renames and type changes)."""
        self.sink = sink
        self.catalog = catalog
        self.tables = tables
        self.sources = dict(sources or {})
        self.broken: dict[str, str] = {}  # schema.table -> why its changes are not applied (needs resync)
        self._rewritten: set[int] = set()  # oids PostgreSQL rewrote in the open source transaction
        self.limits = limits
        self.checkpoint: LSN | None = sink.checkpoint()  # commit LSN of the last applied transaction
        self.applied_end: LSN | None = None  # its end LSN (what was confirmed to the server)
        self.stats = ApplyStats()
        self._rels: dict[int, _Rel | None] = {}
        self._relmsgs: dict[int, Relation] = {}  # the last Relation message of each oid
        self._deltas: dict[int, TableDelta] = {}
        self._pending_changes = 0
        self._in_txn = False
        self._skipping = False
        self._sink_open = False
        self._committed_lsn: LSN | None = None  # last source commit folded into the open batch
        self._confirm_lsn: LSN | None = None  # its end LSN: what the server may forget once committed
        self._first_commit_at: float | None = None
        self._oldest_pending_commit: float | None = None  # source commit time (epoch s) not yet applied
        for t in tables.values():
            sink.ensure_table(t)

    # -- message handling -------------------------------------------------------------------
    def feed(self, msg: Message) -> LSN | None:
        """Fold one message in; returns an LSN the caller may now confirm, when a batch committed."""
        if isinstance(msg, Begin):
            self._in_txn = True
            self._skipping = self.checkpoint is not None and msg.final_lsn <= self.checkpoint
            return None
        if isinstance(msg, Relation):
            self._relation(msg)
            return None
        if isinstance(msg, Commit):
            self._in_txn = False
            if self._skipping:
                self._skipping = False
                self.stats.skipped_transactions += 1
                return None
            self.stats.transactions += 1
            self._committed_lsn = msg.commit_lsn
            self._confirm_lsn = msg.end_lsn
            if self._first_commit_at is None:
                self._first_commit_at = time.monotonic()
                self._oldest_pending_commit = msg.commit_time.timestamp()
            if self._pending_changes >= self.limits.max_rows:
                return self.flush()
            return None
        if self._skipping:
            return None
        if isinstance(msg, LogicalMessage):
            if msg.prefix == ddl.PREFIX and msg.transactional and self.catalog is not None:
                self._ddl(ddl.parse(msg.content))
            return None
        if isinstance(msg, Insert):
            rel = self._rels.get(msg.relation_oid)
            if rel:
                self._delta(msg.relation_oid, rel).insert(self._values(rel, msg.new))
                self._counted(rel)
        elif isinstance(msg, Update):
            rel = self._rels.get(msg.relation_oid)
            if rel:
                old_key = self._key(rel, msg.old) if msg.old is not None else None
                new = self._values(rel, msg.new)
                delta = self._delta(msg.relation_oid, rel)
                if old_key is not None and old_key == delta.key_of(new):
                    old_key = None
                delta.update(new, old_key)
                self._counted(rel)
        elif isinstance(msg, Delete):
            rel = self._rels.get(msg.relation_oid)
            if rel and msg.old is not None:
                self._delta(msg.relation_oid, rel).delete(self._key(rel, msg.old))
                self._counted(rel)
        elif isinstance(msg, Truncate):
            for oid in msg.relation_oids:
                rel = self._rels.get(oid)
                if rel:
                    self._delta(oid, rel).truncate()
                    self._counted(rel)
        return None

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

    def lag_seconds(self, now: float | None = None) -> float:
        """Age of the oldest source commit received but not yet in the warehouse (0 when none)."""
        if self._oldest_pending_commit is None:
            return 0.0
        return max(0.0, (now if now is not None else time.time()) - self._oldest_pending_commit)

    @property
    def idle(self) -> bool:
        """Nothing in flight: the caller may let the slot advance to the server's WAL end."""
        return not self._in_txn and self._committed_lsn is None and not self._sink_open

    def flush(self) -> LSN | None:
        """Commit everything folded up to the last source commit; returns the LSN to confirm."""
        if self._committed_lsn is None or self._confirm_lsn is None:
            return None
        if self._in_txn:
            raise RuntimeError("flush() inside a source transaction")
        self._apply_deltas()
        lsn = self._committed_lsn
        if not self._sink_open:
            self.sink.begin()
        self.sink.commit(lsn)
        self._sink_open = False
        self.checkpoint = lsn
        confirm = self.applied_end = self._confirm_lsn
        self._committed_lsn = self._confirm_lsn = None
        self._first_commit_at = self._oldest_pending_commit = None
        self.stats.batches += 1
        return confirm

    @property
    def in_transaction(self) -> bool:
        """Inside a source transaction: the warehouse may hold part of it in an open transaction."""
        return self._in_txn

    def reset_table(self, st: SourceTable) -> None:
        """Re-create a table from its current source shape and rows (``pipeline resync TABLE``).

        Call between source transactions, after :meth:`flush`. The rows are read now, later than
        the warehouse's position, so the changes the stream replays afterwards only move them
        forward; the checkpoint does not move.
        """
        assert self.catalog is not None and not self._in_txn
        ident = (st.schema, st.name)
        self._open_sink()
        try:
            self._forget(ident)
            table = self._adopt(st)
            for msg in [m for m in self._relmsgs.values() if (m.namespace, m.name) == ident]:
                self._relation(msg)  # no Relation message will come again: map the columns now
            self.catalog.recopy(st, table)
            self.broken.pop(st.qualified, None)
            if self.checkpoint is not None:
                self.sink.commit(self.checkpoint)
            else:
                self.sink.commit_meta()
        except BaseException:
            self.sink.rollback()
            raise
        finally:
            self._sink_open = False

    def abort(self) -> None:
        """Drop everything not yet committed (the caller restarts from the sink's checkpoint)."""
        self.sink.rollback()
        self._sink_open = False
        self._deltas.clear()
        self._pending_changes = 0
        self._committed_lsn = None
        self._first_commit_at = self._oldest_pending_commit = None
        self._in_txn = self._skipping = False

    # -- internals --------------------------------------------------------------------------
    def _relation(self, msg: Relation) -> None:
        self._relmsgs[msg.oid] = msg
        ident = (msg.namespace or "pg_catalog", msg.name)
        table = self.tables.get(ident)
        if table is None and self.catalog is not None:
            st = self.catalog.lookup(*ident)
            if st is not None:
                table = self._adopt(st)
        qualified = f"{ident[0]}.{ident[1]}"
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
        for oid, rel in list(self._rels.items()):  # column positions come from the next Relation message
            if rel is not None and (rel.table.schema, rel.table.name) == ident:
                del self._rels[oid]

    def _forget(self, ident: tuple[str, str]) -> None:
        table = self.tables.pop(ident, None)
        self.sources.pop(ident, None)
        if table is not None:
            self.sink.drop_table(table)
            self.sink.save_definition(*ident, None)
        for oid, rel in list(self._rels.items()):
            if rel is not None and (rel.table.schema, rel.table.name) == ident:
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
        qualified = f"{st.schema}.{st.name}"
        self.broken.pop(qualified, None)
        if recopy:
            self.sink.clear_rows(new)
            try:
                self.catalog.recopy(st, new)
            except PgbridgeError as e:
                self.broken[qualified] = f"re-copying {qualified} after a rewrite failed ({e.message}); run resync"

    def _open_sink(self) -> None:
        if not self._sink_open:
            self.sink.begin()
            self._sink_open = True

    def _delta(self, oid: int, rel: _Rel) -> TableDelta:
        d = self._deltas.get(oid)
        if d is None:
            d = self._deltas[oid] = TableDelta(key_positions=rel.table.key)
        return d

    @staticmethod
    def _values(rel: _Rel, tup: TupleData) -> list[Cell]:
        kinds, values = tup.kinds, tup.values
        return [UNCHANGED if kinds[p] == "u" else values[p] for p in rel.positions]

    def _key(self, rel: _Rel, tup: TupleData) -> Key:
        vals = self._values(rel, tup)
        return tuple(vals[i] for i in rel.table.key)  # type: ignore[misc]

    def _counted(self, rel: _Rel) -> None:
        self._pending_changes += 1
        self.stats.changes += 1
        name = f"{rel.table.schema}.{rel.table.name}"
        self.stats.rows_by_table[name] = self.stats.rows_by_table.get(name, 0) + 1
        if self._in_txn and self._pending_changes >= self.limits.max_rows:
            # A large transaction: push what we have into the open warehouse transaction.
            self._apply_deltas()

    def _apply_deltas(self) -> None:
        if not self._deltas:
            return
        self._open_sink()
        for oid, delta in self._deltas.items():
            rel = self._rels[oid]
            if rel is not None and not delta.is_empty():
                self.sink.apply(rel.table, delta)
        self._deltas.clear()
        self._pending_changes = 0
