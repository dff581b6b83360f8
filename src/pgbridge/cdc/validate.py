"""`pipeline validate`: compare every replicated table between the source and the warehouse.

Runs inside the pipeline daemon, between transactions of the stream, because only the daemon may
write the warehouse and only it knows how far the warehouse has applied. For each table:

1. Copy the source table, as of a snapshot whose WAL position is ``L``, into a DuckDB temporary
   table through the same casts as the load and the stream (so values compare exactly). The
   snapshot is the one a temporary logical slot exports: it sees exactly the transactions that
   commit before the slot's consistent point ``L``. (A snapshot taken with ``pg_current_wal_lsn()``
   beside it is not exact: a transaction can commit between the two, or be written to the WAL
   before the snapshot but become visible after it; under a steady writer that showed up as a
   difference in every pass now and then.)
2. Let the stream apply through ``L`` (the caller's ``catch_up``), then hold it.
3. Split the key space into ranges (``ntile`` over the first key column of the source copy) and
   compare per range: row count and the sum of row hashes, in DuckDB.
4. A range that differs is compared again under a new snapshot, and only ranges that differ every
   time are reported, so a difference is never reported on the strength of one reading.

``repair`` replaces the rows of the differing ranges with the last pass's copy, while the stream is
still held at that copy's position: the ranges are then exactly the source's as of the warehouse's
checkpoint, for a table without a unique key (a multiset, where replaying a change twice would
double it) as for any other. ``pipeline resync TABLE`` uses the same exact copy
(:func:`stage_exact`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb
import psycopg
from psycopg import sql

from pgbridge.cdc.catalog import SourceTable
from pgbridge.cdc.copytext import copy_rows
from pgbridge.cdc.sinks.base import SinkTable
from pgbridge.cdc.sinks.duckdb import DuckDBSink, qi
from pgbridge.cdc.source import create_slot
from pgbridge.cdc.typemap import PG_SESSION_OPTIONS
from pgbridge.types import LSN

STAGE = "_pgb_validate"
BOUNDS = "_pgb_bounds"
_SLOTS = itertools.count(1)


@dataclass
class RangeDiff:
    low: Any
    high: Any  # None: to the end of the key space
    source_rows: int
    warehouse_rows: int


@dataclass
class TableResult:
    table: str
    source_rows: int = 0
    warehouse_rows: int = 0
    ranges: int = 0
    differences: list[RangeDiff] = field(default_factory=list)
    repaired: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.differences and self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def stage_exact(dsn: str, st: SourceTable, stt: SinkTable, con: duckdb.DuckDBPyConnection, name: str) -> LSN:
    """Copy the source table into a new DuckDB temporary table ``name``, exactly as of the returned position.

    The copy reads under the snapshot a temporary logical slot exports, which sees exactly the
    transactions that commit before the slot's consistent point: once the stream has applied those
    (and no more), the copy and the warehouse describe the same moment.
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} ({DuckDBSink.column_defs(stt)})")
    with create_slot(dsn, f"pgb_stage_{os.getpid()}_{next(_SLOTS)}", temporary=True) as slot:
        with psycopg.connect(dsn, connect_timeout=10, options=PG_SESSION_OPTIONS) as pg:
            pg.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            pg.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(slot.snapshot_name)))
            copy_rows(pg, st, stt, con, name)
            pg.rollback()
        return slot.consistent_lsn


def _hash(stt: SinkTable) -> str:
    return f"hash({', '.join('x.' + qi(c.name) for c in stt.columns)})"


def _compare(con: duckdb.DuckDBPyConnection, stt: SinkTable, target: str) -> tuple[int, int, list[RangeDiff]]:
    k0 = qi(stt.columns[stt.key[0]].name)
    ranged = f"WITH b AS (SELECT lo, row_number() OVER (ORDER BY lo) AS r FROM {BOUNDS})"

    def side(table: str) -> str:
        return (
            f"SELECT coalesce(b.r, 0) AS r, count(*) AS n, sum({_hash(stt)}::HUGEINT) AS h"
            f" FROM {table} x ASOF LEFT JOIN b ON x.{k0} >= b.lo GROUP BY ALL"
        )

    rows = con.execute(
        f"{ranged}, s AS ({side(STAGE)}), w AS ({side(target)}),"
        " bl AS (SELECT lo, lead(lo) OVER (ORDER BY lo) AS hi, row_number() OVER (ORDER BY lo) AS r FROM b)"
        " SELECT r, bl.lo, bl.hi, coalesce(s.n, 0), coalesce(w.n, 0)"
        " FROM s FULL JOIN w USING (r) LEFT JOIN bl USING (r)"
        " WHERE s.n IS DISTINCT FROM w.n OR s.h IS DISTINCT FROM w.h ORDER BY r"
    ).fetchall()
    counts = con.execute(f"SELECT (SELECT count(*) FROM {STAGE}), (SELECT count(*) FROM {target})").fetchone()
    assert counts is not None
    return counts[0], counts[1], [RangeDiff(lo, hi, int(n_s), int(n_w)) for _, lo, hi, n_s, n_w in rows]


def _bounds(con: duckdb.DuckDBPyConnection, stt: SinkTable, range_rows: int) -> int:
    k0 = qi(stt.columns[stt.key[0]].name)
    n = con.execute(f"SELECT count(*) FROM {STAGE}").fetchone()
    buckets = max(1, -(-(n[0] if n else 0) // range_rows))
    con.execute(
        # Distinct and never NULL: a column with few values (a table without a unique key) gives
        # several buckets the same lower bound, and a range from a bound to itself holds nothing.
        f"CREATE OR REPLACE TEMP TABLE {BOUNDS} AS SELECT DISTINCT min({k0}) AS lo"
        f" FROM (SELECT {k0}, ntile({buckets}) OVER (ORDER BY {k0}) AS t FROM {STAGE}) GROUP BY t"
        f" HAVING min({k0}) IS NOT NULL"
    )
    got = con.execute(f"SELECT count(*) FROM {BOUNDS}").fetchone()
    return int(got[0]) if got else 0


def _in_ranges(stt: SinkTable, diffs: list[RangeDiff]) -> tuple[str, list[Any]]:
    k0 = qi(stt.columns[stt.key[0]].name)
    parts, params = [], []
    for d in diffs:
        if d.low is None:  # below the first bound (only warehouse rows can be there: every row when the
            # source is empty), or NULL (a table without a unique key may hold NULL in any column)
            parts.append(f"NOT EXISTS (SELECT 1 FROM {BOUNDS} WHERE lo <= {k0})")
            continue
        parts.append(f"({k0} >= ?" + (f" AND {k0} < ?)" if d.high is not None else ")"))
        params += [d.low] + ([d.high] if d.high is not None else [])
    return " OR ".join(parts), params


def validate_table(
    dsn: str,
    st: SourceTable,
    stt: SinkTable,
    con: duckdb.DuckDBPyConnection,
    target: str,
    catch_up: Callable[[LSN], None],
    *,
    repair: bool = False,
    range_rows: int = 50_000,
    passes: int = 3,
) -> TableResult:
    """Compare one table (see the module docstring); ``con`` must not be inside a transaction."""
    result = TableResult(st.qualified)
    suspect: list[RangeDiff] | None = None
    for _ in range(passes):
        lsn = stage_exact(dsn, st, stt, con, STAGE)
        catch_up(lsn)
        if suspect is None:
            result.ranges = _bounds(con, stt, range_rows)
        result.source_rows, result.warehouse_rows, diffs = _compare(con, stt, target)
        seen = {(d.low, d.high) for d in suspect} if suspect is not None else None
        suspect = [d for d in diffs if seen is None or (d.low, d.high) in seen]
        if not suspect:
            break
    result.differences = suspect or []
    if repair and result.differences:
        # The stream is still held where the last pass's copy was taken: that copy is exact.
        where, params = _in_ranges(stt, result.differences)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"DELETE FROM {target} WHERE {where}", params)
            con.execute(f"INSERT INTO {target} SELECT * FROM {STAGE} WHERE {where}", params)
            con.execute("COMMIT")
        except duckdb.Error:
            con.execute("ROLLBACK")
            raise
        result.repaired = True
    con.execute(f"DROP TABLE IF EXISTS {STAGE}")
    con.execute(f"DROP TABLE IF EXISTS {BOUNDS}")
    return result
