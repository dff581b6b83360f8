"""The seam between the pipeline and a warehouse: a small protocol plus capabilities as data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pgbridge.cdc.reduce import TableDelta
from pgbridge.cdc.typemap import ColumnType
from pgbridge.types import LSN


@dataclass(frozen=True)
class SinkColumn:
    name: str
    ctype: ColumnType


@dataclass(frozen=True)
class SinkTable:
    """A replicated table as the sink sees it: target name, typed columns, key positions."""

    schema: str
    name: str
    columns: tuple[SinkColumn, ...]
    key: tuple[int, ...]


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

    def commit(self, lsn: LSN) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...
