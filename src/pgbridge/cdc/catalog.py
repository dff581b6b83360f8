"""The source's tables as the pipeline sees them: columns, types, the key rows are identified by.

The initial load (:mod:`pgbridge.cdc.snapshot`) and the stream read a table's shape with the same
catalog queries: the stream through ``_pgbridge.table_definition(oid)``, a source-side function the
DDL event trigger calls, so a schema change reaches the warehouse with the table's new shape at the
exact point of the change (:func:`definition_function_sql`, :func:`table_from_definition`).

A table that cannot be replicated (no usable key, REPLICA IDENTITY NOTHING, its key excluded) comes
back with ``problem`` saying why and what to do; :func:`sink_table` refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase
from typing import Any, Final

import psycopg

from pgbridge.cdc.sinks.base import SinkColumn, SinkTable
from pgbridge.cdc.typemap import ColumnType, MappingPolicy, duckdb_type, pg_type_names
from pgbridge.errors import PgbridgeError, TransientError
from pgbridge.secrets.redact import redact_dsn

__all__ = ["SnapshotError", "SnapshotSourceError", "SourceColumn", "SourceTable", "definition_function_sql"]
__all__ += ["discover_tables", "sink_table", "source_error", "table_from_definition"]

_BUILTIN: Final = frozenset(pg_type_names.values())


class SnapshotError(PgbridgeError):
    """The initial load cannot proceed: a table without a usable key, a refused query, bad COPY output."""


class SnapshotSourceError(TransientError):
    """Reading the source failed for a reason worth retrying (connection lost, server shutting down)."""


def source_error(code: str | None, text: str, doing: str) -> PgbridgeError:
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
        raise source_error(exc.sqlstate, str(exc), "cannot read the source catalog") from None
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
