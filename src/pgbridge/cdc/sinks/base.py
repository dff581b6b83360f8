"""The seam between the pipeline and a warehouse: a small protocol plus capabilities as data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

from pgbridge.cdc.reduce import TableDelta
from pgbridge.cdc.typemap import ColumnType
from pgbridge.types import LSN

if TYPE_CHECKING:
    from pgbridge.cdc.ddl import Step


@dataclass(frozen=True)
class SinkColumn:
    name: str
    ctype: ColumnType
    attnum: int = 0  # the source column's pg_attribute.attnum: tells a RENAME from a DROP and ADD


@dataclass(frozen=True)
class SinkTable:
    """A replicated table as the sink sees it: target name, typed columns, key positions.

    ``key_not_null``: the key is a primary key or replica identity index (never NULL), so a sink may
    match keys with plain equality; with REPLICA IDENTITY FULL every column is the key and may be NULL.
    """

    schema: str
    name: str
    columns: tuple[SinkColumn, ...]
    key: tuple[int, ...]
    key_not_null: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def bag(self) -> bool:
        """Rows have no identity of their own (REPLICA IDENTITY FULL without a unique key).

        The source may hold the same row several times, and a delete removes one copy of it, so such
        a table is kept as a multiset: a change adds or removes one copy of a whole row, never a key.
        """
        return not self.key_not_null and len(self.key) == len(self.columns)


@dataclass(frozen=True)
class StagedChanges:
    """A batch's row changes to one table, columnar and in stream order, for a set-based apply.

    ``rows`` has one row per change: ``_seq`` (int64, stream order), ``_op`` (uint8: ``ord('I')``,
    ``ord('U')`` or ``ord('D')``), ``c<i>`` for every sink column ``i`` (PostgreSQL text of the new
    value, NULL for a delete), ``k<i>`` for every key column ``i`` (text of the key the change
    addresses) and ``u<i>`` (bool: column ``i`` is an unchanged TOAST value) for each ``i`` in
    ``unchanged``.
    No change moves a row to another key (those batches go through :class:`TableDelta`).
    ``truncated``: the table was emptied before these changes. ``inserts_only``: every change is an
    insert of a key that is unique in the source, so no key occurs twice. ``fresh``: besides, no
    key inserted can be in the warehouse yet (no rows were copied from the source ahead of the
    stream since these changes' transactions: see :meth:`Sink.copy_horizon`), so nothing needs clearing.

    For a :attr:`SinkTable.bag` table the form differs, as order does not matter there: ``rows`` has
    ``_sign`` (int8: +1 a copy of the row added, -1 a copy removed) and ``c<i>`` for every column (the
    whole row's text). An insert is one +1 row, a delete one -1 row (its old row), an update both
    (unchanged TOAST values taken from the old row, which REPLICA IDENTITY FULL sends whole).
    """

    rows: pa.Table
    unchanged: tuple[int, ...] = ()
    truncated: bool = False
    inserts_only: bool = False
    fresh: bool = False


@dataclass(frozen=True)
class SinkCapabilities:
    transactions: bool  # data and checkpoint commit atomically
    set_based_apply: bool  # a delta is applied with a few statements per table
    schema_changes: bool  # ADD/DROP/RENAME COLUMN and type changes can be applied in place


class Sink(Protocol):
    capabilities: SinkCapabilities

    def checkpoint(self) -> LSN | None: ...

    def begin(self) -> None: ...

    def ensure_table(self, table: SinkTable) -> None: ...

    def apply(self, table: SinkTable, delta: TableDelta) -> None: ...

    def apply_staged(self, table: SinkTable, changes: StagedChanges) -> None: ...

    # Schema changes, inside the open transaction (see pgbridge.cdc.ddl).
    def alter_table(self, old: SinkTable, steps: Sequence[Step]) -> bool: ...

    def drop_table(self, table: SinkTable) -> None: ...

    def rename_table(self, table: SinkTable, name: str) -> None: ...

    def clear_rows(self, table: SinkTable) -> None: ...

    # Rows copied from the source outside the stream (a re-copy, a repair) may include transactions
    # the stream has not applied yet, up to ``lsn``: record it (inside the open transaction).
    def note_copy(self, lsn: LSN) -> None: ...

    # The highest position recorded by ``note_copy`` (None: none was), committed or not.
    def copy_horizon(self) -> LSN | None: ...

    def save_definition(self, schema: str, name: str, definition: str | None) -> None: ...

    # Tables whose changes are not applied until a resync (schema.table -> why), as of the checkpoint.
    def stopped_tables(self) -> dict[str, str]: ...

    def save_stopped(self, stopped: dict[str, str]) -> None: ...

    # Commit, recording ``lsn`` as the checkpoint and ``confirm`` as the slot's position.
    def commit(self, lsn: LSN, confirm: LSN | None = None) -> None: ...

    # Record (committed at once) the position the slot is about to be confirmed to while idle.
    def note_position(self, lsn: LSN) -> None: ...

    # The highest position recorded by ``commit`` or ``note_position``.
    def position(self) -> LSN | None: ...

    def commit_meta(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...
