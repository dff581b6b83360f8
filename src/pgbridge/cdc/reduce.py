"""Reduce a run of row changes to their net effect per table, so a sink can apply them set-based.

A micro-batch holds many source changes, often several to the same row. Applying them one by one
would be a statement per row; instead this pure reducer folds them, in commit order, into two sets
per table: keys to delete and final rows to write. Unchanged TOAST values (pgoutput kind 'u') are
taken from an earlier change in the same batch when there is one; otherwise the row remembers its
*origin key* (its key before the batch), and the sink reads those columns from the warehouse row
at that key before deleting anything. A primary-key change moves the row: the old key is deleted
and the lineage, with its origin, continues under the new key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# A column value as it travels: text bytes from pgoutput, None for SQL NULL, or UNCHANGED.
Value = bytes | None
Key = tuple[Value, ...]


class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()
Cell = Value | _Unchanged


def text_of(v: Cell) -> str | None:
    """The text of a value as a sink stages it: None for NULL (and for UNCHANGED, resolved separately)."""
    if v is None or v is UNCHANGED:
        return None
    assert isinstance(v, bytes)
    return v.decode()


@dataclass
class PendingRow:
    """The latest state of one row lineage within the batch."""

    values: list[Cell]
    origin: Key | None  # key of the warehouse row before the batch; None for rows inserted in it

    @property
    def unresolved(self) -> bool:
        return any(v is UNCHANGED for v in self.values)


@dataclass
class TableDelta:
    """Net effect of a batch on one table."""

    key_positions: tuple[int, ...]
    rows: dict[Key, PendingRow] = field(default_factory=dict)
    deletes: set[Key] = field(default_factory=set)
    truncated: bool = False
    changes: int = 0

    def key_of(self, values: Sequence[Cell]) -> Key:
        key = tuple(values[i] for i in self.key_positions)
        if any(isinstance(k, _Unchanged) for k in key):
            raise ValueError("a key column cannot be an unchanged TOAST value")
        return key  # type: ignore[return-value]

    # -- folding ----------------------------------------------------------------------------
    def insert(self, new: Sequence[Cell]) -> None:
        self.changes += 1
        key = self.key_of(new)
        self.rows[key] = PendingRow(list(new), None)

    def update(self, new: Sequence[Cell], old_key: Key | None = None) -> None:
        """`old_key` is given when the key changed (pgoutput 'K'/'O' tuple), else None."""
        self.changes += 1
        new_key = self.key_of(new)
        src_key = old_key if old_key is not None else new_key
        prev = self.rows.pop(src_key, None)
        if prev is None:
            # First touch in this batch: the row (if any) lives in the warehouse at src_key.
            origin: Key | None = src_key
            values = list(new)
        else:
            origin = prev.origin
            values = [p if v is UNCHANGED else v for v, p in zip(new, prev.values, strict=True)]
        if src_key != new_key:
            self.deletes.add(src_key)
        # Whatever held new_key before this change is overwritten by it.
        self.rows[new_key] = PendingRow(values, origin)

    def delete(self, old_key: Key) -> None:
        self.changes += 1
        self.rows.pop(old_key, None)
        self.deletes.add(old_key)

    def truncate(self) -> None:
        self.changes += 1
        self.rows.clear()
        self.deletes.clear()
        self.truncated = True

    def is_empty(self) -> bool:
        return not (self.rows or self.deletes or self.truncated)

    def keys_to_clear(self) -> set[Key]:
        """Keys whose warehouse row must go before the final rows are written."""
        return self.deletes | set(self.rows)
