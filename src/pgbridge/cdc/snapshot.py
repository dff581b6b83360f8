"""The initial load: copy the published tables into the warehouse as of the slot's exported snapshot.

The stream starts at the slot's consistent point, so the tables must be copied exactly as of the
snapshot the slot exported, or rows are lost or doubled where load and stream meet. Reading is
parallel across tables and across CTID ranges of a table (PostgreSQL 15 scans TID ranges), each
reader on its own connection that imports the snapshot. A reader copies its range as a series of
``COPY ... TO STDOUT`` statements over page spans of about 4 MB of text each, which psycopg2's
``copy_expert`` gathers in C (a Python loop over libpq's row messages costs the client nearly twice
the CPU, and on a small host the client and the server share the cores), Arrow's C++ CSV reader
parses each span outside the GIL, and each reader's writer inserts the chunks on its own DuckDB
cursor, casting the string columns set-based (:func:`~pgbridge.cdc.typemap.duckdb_cast_expr`).

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
import json
import queue
import re
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase
from typing import Any, Final

import duckdb
import psycopg
import psycopg2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from psycopg import pq, sql

from pgbridge.cdc.sinks.base import SinkColumn, SinkTable
from pgbridge.cdc.sinks.duckdb import META_SCHEMA, DuckDBSink, SinkError, qi
from pgbridge.cdc.typemap import (
    PG_SESSION_OPTIONS,
    ColumnType,
    MappingPolicy,
    copy_text_fields,
    duckdb_cast_expr,
    duckdb_type,
    pg_type_names,
)
from pgbridge.errors import PgbridgeError, TransientError
from pgbridge.secrets.redact import redact_dsn
from pgbridge.types import LSN

__all__ = ["LoadProgress", "LoadReport", "SnapshotError", "SnapshotSourceError", "SourceColumn", "SourceTable"]
__all__ += ["TableReport", "copy_rows", "definition_function_sql", "discover_tables", "load_snapshot", "plan_ranges"]
__all__ += ["sink_table", "table_from_definition"]

PROGRESS_TABLE: Final = f"{META_SCHEMA}.load_progress"
LOAD_LOCK_TIMEOUT: Final = "5s"
_CHUNK_BYTES: Final = 4 << 20  # the COPY text a parse chunk aims at (Arrow parses 4 MB best)
_BUILTIN: Final = frozenset(pg_type_names.values())


class SnapshotError(PgbridgeError):
    """The initial load cannot proceed: a table without a usable key, a refused query, bad COPY output."""


class SnapshotSourceError(TransientError):
    """Reading the source failed for a reason worth retrying (connection lost, server shutting down)."""


def _source_error(code: str | None, text: str, doing: str) -> PgbridgeError:
    message = f"{doing}: {redact_dsn(' '.join(text.split()))}"
    if code == "22023" and "snapshot" in text:
        return SnapshotError(message, hint="keep the slot's connection open (inside its `with`) for the whole load")
    if code == "55P03":  # lock_timeout: an ALTER TABLE is queued behind the load's locks
        return SnapshotSourceError(message, hint="a schema change was waiting for the load; the load starts over")
    if code is None or code[:2] in ("08", "53", "57", "58") or code in ("40001", "40P01"):
        return SnapshotSourceError(message)
    return SnapshotError(message)


@dataclass(frozen=True)
class SourceColumn:
    """A column as ``pg_attribute`` has it; ``type_name`` names the base type (through domains)."""

    name: str
    type_oid: int
    atttypmod: int
    type_name: str
    ndims: int = 0
    element_oid: int | None = None
    enum_labels: tuple[str, ...] | None = None
    excluded: bool = False
    attnum: int = 0  # its position in pg_attribute: a rename keeps it, a drop and re-add does not
    missing: str | None = None  # the value rows written before an ADD COLUMN ... DEFAULT read (attmissingval)

    def ctype(self, policy: MappingPolicy | None = None) -> ColumnType:
        """The DuckDB mapping, called the way the stream's Relation and Type messages would call it."""
        return duckdb_type(
            self.type_oid,
            self.atttypmod,
            type_name=self.type_name,
            enum_labels=self.enum_labels,
            element_oid=self.element_oid,
            array_ndims=max(self.ndims, 1),
            policy=policy,
        )


@dataclass(frozen=True)
class SourceTable:
    """A table to replicate; ``key`` indexes ``columns`` (attnum order, excluded ones included)."""

    schema: str
    name: str
    oid: int
    relpages: int
    reltuples: float
    pages: int  # its size in pages now (pg_relation_size): what ranges are planned from
    columns: tuple[SourceColumn, ...]
    replica_identity: str  # pg_class.relreplident: d(efault), f(ull), i(ndex), n(othing)
    key: tuple[int, ...]
    problem: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SourceTable:
        raw = json.loads(text)
        cols = []
        for c in raw.pop("columns"):
            c["enum_labels"] = tuple(c["enum_labels"]) if c["enum_labels"] is not None else None
            cols.append(SourceColumn(**c))
        return cls(**{**raw, "columns": tuple(cols), "key": tuple(raw["key"])})

    @property
    def rows_estimate(self) -> int:
        if self.reltuples < 0 or self.relpages <= 0:
            return 0
        return int(self.reltuples / self.relpages * max(self.pages, self.relpages))


# ``%(only)s``: one table's oid, or NULL for all. The same text, with the parameters bound to the
# function's argument, is the body of the source-side `_pgbridge.table_definition(oid)` that the DDL
# event trigger calls: the stream and the initial load read a table's shape with the same queries.
_TABLES_SQL: Final = """
SELECT c.oid, n.nspname, c.relname, c.relpages, c.reltuples, c.relreplident,
       pg_relation_size(c.oid) / current_setting('block_size')::int AS pages
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  AND (%(only)s::oid IS NULL OR c.oid = %(only)s::oid)
ORDER BY n.nspname, c.relname"""

# Domains are followed down to their base type (pgoutput's Type message names the base type too).
_COLUMNS_SQL: Final = """
WITH RECURSIVE chain(start, cur) AS (
    SELECT DISTINCT atttypid, atttypid FROM pg_attribute WHERE attrelid = ANY(%(oids)s::oid[])
  UNION ALL
    SELECT c.start, t.typbasetype FROM chain c JOIN pg_type t ON t.oid = c.cur WHERE t.typtype = 'd')
SELECT a.attrelid, a.attname, a.atttypid, a.atttypmod, a.attndims, b.typname,
       CASE WHEN b.typcategory = 'A' THEN nullif(b.typelem, 0) END AS elem,
       (SELECT array_agg(enumlabel::text ORDER BY enumsortorder) FROM pg_enum
        WHERE enumtypid = CASE WHEN b.typcategory = 'A' THEN b.typelem ELSE b.oid END) AS labels,
       a.attnum, CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END AS missing
FROM pg_attribute a JOIN chain ch ON ch.start = a.atttypid JOIN pg_type b ON b.oid = ch.cur AND b.typtype <> 'd'
WHERE a.attrelid = ANY(%(oids)s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attrelid, a.attnum"""

_KEYS_SQL: Final = """SELECT indrelid, indisprimary, indisreplident, indkey::int2[] AS indkey FROM pg_index
WHERE indrelid = ANY(%(oids)s::oid[]) AND (indisprimary OR indisreplident) AND indisvalid"""


def definition_function_sql(schema: str) -> str:
    """``CREATE FUNCTION <schema>.table_definition(oid) RETURNS jsonb``: one table's catalog rows.

    The DDL event trigger puts its result into the WAL, so the stream learns a table's new shape at
    the exact point of the change; :func:`table_from_definition` reads it back.
    """

    def bind(query: str) -> str:
        return query.replace("%(only)s", "$1").replace("%(oids)s", "ARRAY[$1]")

    return f"""CREATE OR REPLACE FUNCTION {schema}.table_definition(oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog AS $fn$
SELECT jsonb_build_object(
  'table', (SELECT to_jsonb(t) FROM ({bind(_TABLES_SQL)}) t),
  'columns', (SELECT coalesce(jsonb_agg(to_jsonb(c)), '[]') FROM ({bind(_COLUMNS_SQL)}) c),
  'keys', (SELECT coalesce(jsonb_agg(to_jsonb(k)), '[]') FROM ({bind(_KEYS_SQL)}) k))
$fn$"""


def discover_tables(
    conn: psycopg.Connection[Any],
    include: Sequence[str],
    exclude: Sequence[str] = (),
    exclude_columns: Mapping[str, Sequence[str]] | None = None,
) -> list[SourceTable]:
    """Ordinary permanent tables whose ``schema.table`` matches an ``include`` glob and no ``exclude`` glob.

    An empty ``include`` means every table outside the system schemas. ``exclude_columns`` maps a
    ``schema.table`` glob to column names left out of the load. A table that cannot be replicated
    comes back with ``problem`` saying why and what to do.
    """

    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatchcase(name, p) for p in patterns)

    try:
        found = [
            r
            for r in conn.execute(_TABLES_SQL, {"only": None}).fetchall()
            if (not include or matches(f"{r[1]}.{r[2]}", include)) and not matches(f"{r[1]}.{r[2]}", exclude)
        ]
        params = {"oids": [r[0] for r in found]}
        column_rows = conn.execute(_COLUMNS_SQL, params).fetchall()
        key_rows = conn.execute(_KEYS_SQL, params).fetchall()
    except psycopg.Error as exc:
        raise _source_error(exc.sqlstate, str(exc), "cannot read the source catalog") from None
    return _assemble(found, column_rows, key_rows, exclude_columns)


def table_from_definition(
    definition: Mapping[str, Any], exclude_columns: Mapping[str, Sequence[str]] | None = None
) -> SourceTable | None:
    """The :class:`SourceTable` of a ``table_definition()`` result (None: the table is not a plain table)."""
    if not definition.get("table"):
        return None
    t = dict(definition["table"])

    def oid(v: Any) -> int | None:  # jsonb renders oid as a string
        return None if v is None else int(v)

    t["oid"], t["reltuples"] = oid(t["oid"]), float(t["reltuples"])
    found = [[t[k] for k in ("oid", "nspname", "relname", "relpages", "reltuples", "relreplident", "pages")]]
    names = ("attrelid", "attname", "atttypid", "atttypmod", "attndims", "typname", "elem", "labels", "attnum")
    cols = []
    for c in definition.get("columns") or ():
        c = {**c, "attrelid": oid(c["attrelid"]), "atttypid": oid(c["atttypid"]), "elem": oid(c["elem"])}
        cols.append([c[k] for k in (*names, "missing")])
    keys = [(oid(k["indrelid"]), k["indisprimary"], k["indisreplident"], k["indkey"]) for k in definition["keys"] or ()]
    return _assemble(found, cols, keys, exclude_columns)[0]


def _assemble(
    found: Sequence[Sequence[Any]],
    column_rows: Sequence[Sequence[Any]],
    key_rows: Sequence[Sequence[Any]],
    exclude_columns: Mapping[str, Sequence[str]] | None,
) -> list[SourceTable]:
    columns: dict[int, list[SourceColumn]] = {r[0]: [] for r in found}
    for relid, name, typid, typmod, ndims, typname, elem, labels, attnum, missing in column_rows:
        enum = tuple(labels) if labels is not None else None
        ndims = ndims if elem is not None else 0
        elem = None if typname in _BUILTIN else elem  # a builtin array maps by its own name
        columns[relid].append(SourceColumn(name, typid, typmod, typname, ndims, elem, enum, False, attnum, missing))
    keys: dict[int, dict[str, list[int]]] = {r[0]: {} for r in found}
    for relid, primary, replident, indkey in key_rows:
        keys[relid].update({k: list(indkey) for k, flag in (("p", primary), ("i", replident)) if flag})
    tables = []
    for oid, schema, name, relpages, reltuples, replident, pages in found:
        qualified = f"{schema}.{name}"
        drop = {c for glob, cols in (exclude_columns or {}).items() if fnmatchcase(qualified, glob) for c in cols}
        cols = tuple(replace(c, excluded=c.name in drop) for c in columns[oid])
        key, problem = _key(qualified, replident, keys[oid], [c.attnum for c in cols], cols)
        tables.append(SourceTable(schema, name, oid, relpages, reltuples, pages, cols, replident, key, problem))
    return tables


def _key(
    qualified: str, replident: str, indexes: dict[str, list[int]], attnums: list[int], cols: tuple[SourceColumn, ...]
) -> tuple[tuple[int, ...], str | None]:
    """The key the stream identifies rows by: the replica identity index, the primary key, or every column."""
    kept = tuple(i for i, c in enumerate(cols) if not c.excluded)
    if not kept:
        return (), f"table {qualified} has no columns to replicate"
    if replident == "n":
        return (), (
            f"table {qualified} has REPLICA IDENTITY NOTHING, so updates and deletes cannot be replicated; "
            f"ALTER TABLE {qualified} REPLICA IDENTITY DEFAULT (with a primary key) or FULL"
        )
    index = indexes.get("i") if replident == "i" else indexes.get("p")
    if index is None:
        if replident == "f":
            return kept, None
        return (), f"table {qualified} has no primary key; add one or ALTER TABLE {qualified} REPLICA IDENTITY FULL"
    key = tuple(attnums.index(a) for a in index)
    lost = [cols[i].name for i in key if cols[i].excluded]
    if lost:
        return (), f"table {qualified}: key column(s) {', '.join(lost)} cannot be excluded"
    return key, None


def sink_table(st: SourceTable, policy: MappingPolicy | None = None) -> SinkTable:
    """The warehouse view of ``st``: typed columns without the excluded ones, key positions re-indexed."""
    if st.problem:
        raise SnapshotError(st.problem)
    kept = [i for i, c in enumerate(st.columns) if not c.excluded]
    columns = tuple(SinkColumn(st.columns[i].name, st.columns[i].ctype(policy), st.columns[i].attnum) for i in kept)
    key = tuple(kept.index(i) for i in st.key)
    # Only REPLICA IDENTITY FULL without a primary key makes every column the key (NULLs allowed).
    not_null = not (st.replica_identity == "f" and len(key) == len(kept))
    return SinkTable(st.schema, st.name, columns, key, key_not_null=not_null)


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


@dataclass(frozen=True)
class _Plan:
    """How one table is copied: the source SELECT, what the parser makes of each column, the INSERTs.

    Arrow parses a column straight to its warehouse type where its parser is exact and strict for
    PostgreSQL's text (integers, floats, booleans, decimals, dates and timestamps): the warehouse
    insert then casts nothing there. A value it refuses (``infinity``, a BC date, NaN in a decimal,
    a year past 9999) makes the whole chunk parse as text instead, cast by the typemap's SQL.
    """

    select_sql: sql.Composable
    select_text: str  # the same, for the loader's psycopg2 connections
    types: tuple[pa.DataType | None, ...]  # per column: what Arrow parses it to; None: text
    insert_typed: str  # from a chunk parsed with ``types``
    insert_text: str  # from a chunk parsed as text only: every column cast in SQL

    @property
    def ncols(self) -> int:
        return len(self.types)


@dataclass(eq=False)
class _State:
    st: SourceTable
    plan: _Plan
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


_PARSE: Final = pcsv.ParseOptions(
    delimiter="\t", quote_char=False, escape_char=False, double_quote=False, ignore_empty_lines=False
)


def _arrow_type(ct: ColumnType) -> pa.DataType | None:
    """The Arrow type whose CSV parser reads PostgreSQL's text of ``ct`` exactly (or refuses it), if any."""
    if ct.kind == "int":
        return _ARROW_INTS.get(ct.sql_type)
    if ct.kind == "float":
        return {"REAL": pa.float32(), "DOUBLE": pa.float64()}.get(ct.sql_type)
    if ct.kind == "bool":
        return pa.bool_()
    if ct.kind == "decimal":
        m = re.fullmatch(r"DECIMAL\((\d+),(\d+)\)", ct.sql_type)
        return pa.decimal128(int(m.group(1)), int(m.group(2))) if m else None
    if ct.kind == "datetime":
        return {"DATE": pa.date32(), "TIMESTAMP": pa.timestamp("us"), "TIMESTAMPTZ": pa.timestamp("us", "UTC")}.get(
            ct.sql_type
        )
    return None


def _parse_pool() -> pa.MemoryPool:
    """Arrow's jemalloc pool where the build has it: it keeps freed pages for reuse a while.

    The default (mimalloc) handed a chunk's pages back and faulted fresh, zeroed (huge) pages in for
    the next: a third to a half CPU-second of kernel time per 2M rows of order_items on 2 cores.
    """
    try:
        return pa.jemalloc_memory_pool()
    except (NotImplementedError, pa.ArrowException):
        return pa.default_memory_pool()


_POOL: Final = _parse_pool()
_Parsed = tuple[pa.Table, bool]  # a parsed chunk, and whether its columns are typed
_Chunk = tuple["_Job", "Future[_Parsed] | None"]  # a chunk of the job's range being parsed; None: range read
_ARROW_INTS: Final = {"SMALLINT": pa.int16(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "UINTEGER": pa.uint32()}


def _parse(
    buf: bytes | bytearray, types: Sequence[pa.DataType | None], check_utf8: bool, piece: tuple[int, int] | None = None
) -> tuple[pa.Table, bool]:
    """COPY text lines (``buf[start:stop]`` for a ``piece``) -> columns ``c0..`` (``\\N`` -> NULL).

    The second value is True when the columns are typed as ``types`` says.

    Columns without a type (and every column, when Arrow refuses a value of a typed one) hold
    PostgreSQL's text; fields with backslash escapes are undone with
    :func:`~pgbridge.cdc.typemap.copy_text_fields`. A UTF8 server has validated every string already
    (``check_utf8=False`` saves a tenth of the parse).
    """
    names = [f"c{i}" for i in range(len(types))]
    typed = any(t is not None for t in types)
    start, stop = piece or (0, len(buf))
    data = pa.py_buffer(buf).slice(start, stop - start)  # no copy
    read = pcsv.ReadOptions(column_names=names, use_threads=False, block_size=stop - start + 1)

    def parse(column_types: dict[str, pa.DataType]) -> pa.Table:
        convert = pcsv.ConvertOptions(
            column_types=column_types,
            null_values=["\\N"],
            true_values=["t"],
            false_values=["f"],
            strings_can_be_null=True,
            check_utf8=check_utf8,
        )
        return pcsv.read_csv(data, read_options=read, parse_options=_PARSE, convert_options=convert, memory_pool=_POOL)

    table = None
    if typed:
        with contextlib.suppress(pa.ArrowInvalid):  # a value the typed parser refuses: all as text
            table = parse({n: t or pa.string() for n, t in zip(names, types, strict=True)})
    if table is None:
        typed = False
        table = parse(dict.fromkeys(names, pa.string()))
    if buf.count(b"\\", start, stop) == buf.count(b"\\N", start, stop):
        return table, typed  # every backslash starts a NULL (COPY doubles literal ones): nothing to unescape
    for i in range(len(types)):
        if typed and types[i] is not None:
            continue  # parsed as a number, a date or a time: it had no backslash
        col = table.column(i).combine_chunks()
        mask = pc.fill_null(pc.match_substring(col, "\\"), False)
        if pc.any(mask).as_py():
            fixed = [copy_text_fields(v.encode())[0] for v in pc.filter(col, mask).to_pylist()]
            plain = pa.array([None if v is None else v.decode() for v in fixed], pa.string())
            table = table.set_column(i, names[i], pc.replace_with_mask(col, mask, plain))
    return table, typed


class _Stopped(Exception):
    """The load is being abandoned: a reader just returns."""


def _wait(pgconn: pq.abc.PGconn, stop: threading.Event, event: int = select.POLLIN) -> None:
    poller = select.poll()
    poller.register(pgconn.socket, event)
    while not poller.poll(500):
        if stop.is_set():
            raise _Stopped


def _raise_result(pgconn: pq.abc.PGconn, result: pq.abc.PGresult | None) -> None:
    code = result.error_field(pq.DiagnosticField.SQLSTATE) if result is not None else None
    text = (result.error_message if result is not None else b"") or pgconn.error_message
    raise _source_error(code.decode() if code else None, text.decode(errors="replace"), "COPY failed")


def _copy_out(
    pgconn: pq.abc.PGconn, query: bytes, stop: threading.Event, chunk_rows: int, emit: Callable[[bytearray], None]
) -> None:
    """Run one ``COPY ... TO STDOUT`` on libpq directly and hand line-aligned chunks to ``emit``.

    psycopg's ``for data in copy`` runs a generator and a wait per row message; the same libpq calls
    without them take 1.2 instead of 3.2 CPU-seconds per 2M rows (2 vCPU).
    """
    pgconn.send_query(query)
    while pgconn.flush():
        _wait(pgconn, stop, select.POLLOUT)
    pgconn.consume_input()
    while pgconn.is_busy():
        _wait(pgconn, stop)
        pgconn.consume_input()
    result = pgconn.get_result()
    if result is None or result.status != pq.ExecStatus.COPY_OUT:
        _raise_result(pgconn, result)
    get, buf, rows = pgconn.get_copy_data, bytearray(), 0
    while True:
        n, data = get(1)
        if n > 0:
            buf += data
            rows += 1
            if (rows >= chunk_rows or len(buf) >= _CHUNK_BYTES) and buf[-1] == 10:
                emit(buf)
                buf, rows = bytearray(), 0
        elif n == 0:
            _wait(pgconn, stop)
            pgconn.consume_input()
        elif n == -1:
            break
        else:
            _raise_result(pgconn, None)
    if buf:
        emit(buf)
    while (result := pgconn.get_result()) is not None:
        if result.status != pq.ExecStatus.COMMAND_OK:
            _raise_result(pgconn, result)


def _statements(st: SourceTable, stt: SinkTable, target: str) -> _Plan:
    """How to copy ``st``: its replicated columns' SELECT, their parse types, the INSERTs from ``_pgb_load``."""
    types = tuple(_arrow_type(c.ctype) for c in stt.columns)
    casts = [duckdb_cast_expr(c.ctype, f"c{i}") for i, c in enumerate(stt.columns)]
    kept = [f"c{i}" if t is not None else cast for i, (t, cast) in enumerate(zip(types, casts, strict=True))]
    names = sql.SQL(", ").join(sql.Identifier(c.name) for c in stt.columns)
    select_sql = sql.SQL("SELECT {} FROM ONLY {}").format(names, sql.Identifier(st.schema, st.name))
    insert = f"INSERT INTO {target} ({', '.join(qi(c.name) for c in stt.columns)}) SELECT"
    return _Plan(
        select_sql,
        select_sql.as_string(),
        types,
        f"{insert} {', '.join(kept)} FROM _pgb_load",
        f"{insert} {', '.join(casts)} FROM _pgb_load",
    )


def copy_rows(
    conn: psycopg.Connection[Any],
    st: SourceTable,
    stt: SinkTable,
    con: duckdb.DuckDBPyConnection,
    target: str,
    where: sql.Composable | None = None,
    *,
    chunk_rows: int = 100_000,
) -> int:
    """Copy ``st``'s rows (those matching ``where``) into ``target`` inside ``con``'s open transaction.

    One reader, as the source connection ``conn`` sees the table now (its transaction's snapshot):
    used to re-copy a table after a rewrite, for ``pipeline resync TABLE`` and ``validate --repair``.
    Returns the rows copied.
    """
    plan = _statements(st, stt, target)
    select_sql = plan.select_sql
    if where is not None:
        select_sql = sql.SQL("{} WHERE {}").format(select_sql, where)
    check_utf8 = conn.info.parameter_status("server_encoding") != "UTF8"
    rows = 0

    def emit(buf: bytearray) -> None:
        nonlocal rows
        try:
            table, typed = _parse(buf, plan.types, check_utf8)
        except (pa.ArrowInvalid, UnicodeError) as exc:
            raise SnapshotError(f"unexpected COPY output from {st.qualified}: {exc}") from None
        con.register("_pgb_load", table)
        try:
            con.execute(plan.insert_typed if typed else plan.insert_text)
        except duckdb.Error as exc:
            raise SinkError(f"copying {st.qualified} into the warehouse failed: {exc}") from None
        finally:
            con.unregister("_pgb_load")
        rows += table.num_rows

    query = sql.SQL("COPY ({}) TO STDOUT").format(select_sql).as_bytes(conn)
    _copy_out(conn.pgconn, query, threading.Event(), chunk_rows, emit)
    return rows


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
    """Pages for the next COPY of a range: about ``_CHUNK_BYTES`` of text, as the last ``pages`` gave ``size``.

    It grows at most 4x a step and to :data:`_MAX_SPAN` pages, so a span after empty or narrow pages
    stays near its aim; a span of one page holds at most that page's rows (with their TOASTed values).
    """
    if size <= 0:
        return min(pages * 4, _MAX_SPAN)
    return max(1, min(pages * 4, _MAX_SPAN, pages * _CHUNK_BYTES // size))


def _pieces(text: bytes) -> list[tuple[int, int]]:
    """``text`` (whole COPY lines) cut at line ends into pieces of about ``_CHUNK_BYTES`` (the last up to 1.5x).

    A span's text can exceed its aim (its rows are wider than the last span's); its pieces still
    parse in chunks of the size Arrow parses best, and no string column nears Arrow's 2 GB limit.
    """
    pieces, start = [], 0
    while len(text) - start > _CHUNK_BYTES * 3 // 2:
        cut = text.find(b"\n", start + _CHUNK_BYTES - 1) + 1
        if cut >= len(text):
            break
        pieces.append((start, cut))
        start = cut
    return [*pieces, (start, len(text))]


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
        state = _State(st, _statements(st, stt, target))
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

    def read(self, lane: queue.Queue[_Chunk | None]) -> None:
        """A reader thread: imports the snapshot, then copies ranges until none are left.

        A range is read as a series of ``COPY`` statements over consecutive page spans, each sized
        to about :data:`_CHUNK_BYTES` of text and taken whole by psycopg2's ``copy_expert`` into a
        ``BytesIO``: libpq's row messages are then gathered in C, at about 0.4 instead of 0.6 client
        CPU-microseconds a row for a Python loop over ``get_copy_data``, and each statement's output is
        one parse chunk. Every statement runs in the same transaction, under the imported snapshot.
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
                plan, start = job.state.plan, job.start
                while True:
                    end = _span_end(start, job.state.span, job.end, job.state.st.pages)
                    text = b""  # the last span's text goes before the next is read
                    out = io.BytesIO()
                    cur.copy_expert(f"COPY ({plan.select_text}{_where(start, end)}) TO STDOUT", out)
                    if self.stop.is_set():
                        raise _Stopped
                    size = out.tell()
                    text = out.getvalue()  # BytesIO's own buffer: no copy
                    for piece in _pieces(text) if size else ():
                        self._put(lane, (job, self.parsers.submit(_parse, text, plan.types, check_utf8, piece)))
                    if end is None or end == job.end:
                        break
                    job.state.span = _next_span(end - start, size)
                    start = end
                self._put(lane, (job, None))
        except _Stopped:
            pass
        except psycopg2.Error as exc:
            self.events.put((None, _source_error(exc.pgcode, str(exc), "reading failed")))
        except BaseException as exc:  # a PgbridgeError, or a bug: the caller raises it either way
            self.events.put((None, exc))
        finally:
            if conn is not None:
                with self._lock, contextlib.suppress(ValueError):
                    self._conns.remove(conn)
                conn.close()  # a COPY in flight was cancelled by run() on a stop

    def _put(self, lane: queue.Queue[_Chunk | None], item: _Chunk | None) -> None:
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

    def write(self, lane: queue.Queue[_Chunk | None], cursor: duckdb.DuckDBPyConnection) -> None:
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
