"""Round-trip tests for pgbridge.cdc.typemap against a real PostgreSQL 15 server and DuckDB.

For every type and edge value the server prints its text (the bytes pgoutput and COPY carry), both
conversion paths load it into DuckDB -- Python (:func:`convert_column`, staged as ``value_type``, then
``CAST(v AS sql_type)``) and SQL (raw text staged as VARCHAR, then :func:`duckdb_cast_expr`) -- and the
stored values are compared with the source through canonical forms computed independently on each side
(epoch microseconds, interval fields, hex, element lists from ``unnest``), never through this module.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest

from pgbridge.cdc.typemap import (
    PG_SESSION_OPTIONS,
    PG_SESSION_SETTINGS,
    ColumnType,
    MappingPolicy,
    TypeMapError,
    convert_column,
    copy_text_fields,
    duckdb_cast_expr,
    duckdb_type,
    parse_array,
    pg_type_names,
)
from pgbridge.errors import PgbridgeError

PG_BIN = Path("/usr/lib/postgresql/15/bin")


# --------------------------------------------------------------------------------------------
# A throwaway PostgreSQL 15 on a unix socket
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pg() -> Iterator[psycopg.Connection[Any]]:
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL 15 is not installed in {PG_BIN}")
    run_as = "postgres" if os.geteuid() == 0 else None
    prefix = ["runuser", "-u", run_as, "--"] if run_as else []
    base = Path(tempfile.mkdtemp(prefix="pgbridge-typemap-", dir="/tmp"))
    base.chmod(0o755)
    if run_as:
        shutil.chown(base, run_as)
    data = base / "data"
    port = _free_port()
    started = False
    initdb_opts = ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync"]
    try:
        subprocess.run(
            [*prefix, str(PG_BIN / "initdb"), "-D", str(data), *initdb_opts],
            check=True,
            capture_output=True,
            timeout=120,
        )
        opts = f"-p {port} -k {base} -c listen_addresses='' -c fsync=off -c max_connections=10"
        started = True
        subprocess.run(
            [*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-o", opts, "-w", "start"],
            check=True,
            capture_output=True,
            timeout=90,
        )
        with psycopg.connect(
            host=str(base), port=port, user="postgres", dbname="postgres", autocommit=True, options=PG_SESSION_OPTIONS
        ) as conn:
            yield conn
    finally:
        if started:
            pid = None
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((data / "postmaster.pid").read_text().split()[0])
            subprocess.run(
                [*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


_counter = itertools.count()


def _table(pg: psycopg.Connection[Any], pg_type: str, values: Sequence[str]) -> str:
    """A fresh table ``(id, v pg_type)`` holding the SQL expressions ``values`` in order."""
    name = f"t{next(_counter)}"
    pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v {pg_type})")
    if values:
        rows = ", ".join(f"({i}, {expr})" for i, expr in enumerate(values))
        pg.execute(f"INSERT INTO {name} VALUES {rows}")
    return name


def _column_type(pg: psycopg.Connection[Any], table: str, policy: MappingPolicy | None = None) -> ColumnType:
    """Resolve the column like a sink would: Relation fields (oid, typmod) plus what the catalog says."""
    row = pg.execute(
        """SELECT a.atttypid::int, a.atttypmod, a.attndims, t.typname, t.typtype, t.typelem::int,
                  e.typtype, b.typname
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_type e ON e.oid = t.typelem
             LEFT JOIN pg_type b ON b.oid = t.typbasetype
            WHERE a.attrelid = %s::regclass AND a.attname = 'v'""",
        (table,),
    ).fetchone()
    assert row is not None
    oid, typmod, ndims, typname, typtype, elem, elem_typtype, basename = row
    ndims = max(ndims, 1)

    def labels(enum_oid: int) -> list[str]:
        rows = pg.execute("SELECT enumlabel FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder", (enum_oid,))
        return [r[0] for r in rows]

    if typtype == "e":
        return duckdb_type(oid, typmod, type_name=typname, enum_labels=labels(oid), policy=policy)
    if elem and elem_typtype == "e":
        return duckdb_type(
            oid, typmod, type_name=typname, element_oid=elem, enum_labels=labels(elem), array_ndims=ndims, policy=policy
        )
    if typtype == "d":  # pgoutput names a domain by its base type
        return duckdb_type(oid, typmod, type_name=basename, array_ndims=ndims, policy=policy)
    return duckdb_type(oid, typmod, type_name=typname, array_ndims=ndims, policy=policy)


def _raw_texts(pg: psycopg.Connection[Any], table: str) -> list[bytes | None]:
    """The type output function's bytes (what pgoutput sends with binary=false)."""
    cur = pg.execute(f"SELECT v FROM {table} ORDER BY id", binary=False)
    res = cur.pgresult
    assert res is not None
    return [res.get_value(i, 0) for i in range(res.ntuples)]


def _copy_texts(pg: psycopg.Connection[Any], table: str) -> list[bytes | None]:
    with pg.cursor() as cur, cur.copy(f"COPY (SELECT v FROM {table} ORDER BY id) TO STDOUT") as copy:
        data = b"".join(bytes(chunk) for chunk in copy)
    return [copy_text_fields(line, ncols=1)[0] for line in data.split(b"\n")[:-1]]


# --------------------------------------------------------------------------------------------
# Canonical forms, computed independently on each side
# --------------------------------------------------------------------------------------------


def _pg_canon(ct: ColumnType, v: str) -> str:
    k = ct.kind
    if k == "bool":
        return f"CASE WHEN {v} THEN 't' ELSE 'f' END"
    if k == "bytea":
        return f"encode({v}, 'hex')"
    if k == "float" and ct.pg_type.startswith("numeric"):
        return f"{v}::float8::text"
    if k == "datetime" and ct.sql_type == "DATE":
        return f"CASE WHEN isfinite({v}) THEN ({v} - DATE '1970-01-01')::text ELSE {v}::text END"
    if k == "datetime":
        return (
            f"CASE WHEN isfinite({v}) THEN (extract(epoch FROM {v}) * 1000000)::numeric(30,0)::text ELSE {v}::text END"
        )
    if k == "time":
        local = (
            f"(extract(hour FROM {v}) * 3600000000 + extract(minute FROM {v}) * 60000000"
            f" + extract(microseconds FROM {v}))::numeric(20,0)::text"
        )
        return local if ct.sql_type == "TIME" else f"{local} || ' ' || extract(timezone FROM {v})::text"
    if k == "interval":
        return (
            f"(extract(year FROM {v}) * 12 + extract(month FROM {v}))::text || ' ' || extract(day FROM {v})::text"
            f" || ' ' || (extract(hour FROM {v}) * 3600000000 + extract(minute FROM {v}) * 60000000"
            f" + extract(microseconds FROM {v}))::numeric(30,0)::text"
        )
    return f"concat({v})"  # the output function's text (keeps char(n) padding, inet without /32)


def _duck_canon(ct: ColumnType, v: str) -> str:
    k = ct.kind
    if k == "bool":
        return f"CASE WHEN {v} THEN 't' ELSE 'f' END"
    if k == "bytea":
        return f"lower(hex({v}))"
    if k == "datetime" and ct.sql_type == "DATE":
        return f"CASE WHEN isfinite({v}) THEN CAST({v} - DATE '1970-01-01' AS VARCHAR) ELSE CAST({v} AS VARCHAR) END"
    if k == "datetime":
        return f"CASE WHEN isfinite({v}) THEN CAST(epoch_us({v}) AS VARCHAR) ELSE CAST({v} AS VARCHAR) END"
    if k == "time":
        local = f"CAST(hour({v})::BIGINT * 3600000000 + minute({v}) * 60000000 + microsecond({v}) AS VARCHAR)"
        return local if ct.sql_type == "TIME" else f"{local} || ' ' || CAST(datepart('timezone', {v}) AS VARCHAR)"
    if k == "interval":
        return (
            f"CAST(datepart('year', {v}) * 12 + datepart('month', {v}) AS VARCHAR) || ' ' || "
            f"CAST(datepart('day', {v}) AS VARCHAR) || ' ' || CAST(datepart('hour', {v})::HUGEINT * 3600000000"
            f" + datepart('minute', {v}) * 60000000 + datepart('microseconds', {v}) AS VARCHAR)"
        )
    return f"CAST({v} AS VARCHAR)"


def _norm(ct: ColumnType, s: str | None) -> Any:
    if s is None:
        return None
    if ct.kind == "float":
        f = float(s)
        if math.isnan(f):
            return "nan"
        return struct.pack(">f" if ct.sql_type == "REAL" else ">d", f)
    if ct.kind == "decimal":
        return Decimal(s)
    return s


def _null_safe(var: str, expr: str) -> str:
    return f"CASE WHEN {var} IS NULL THEN NULL ELSE {expr} END"


def _pg_side(pg: psycopg.Connection[Any], table: str, ct: ColumnType) -> list[Any]:
    if ct.element is None:
        rows = pg.execute(f"SELECT {_null_safe('v', _pg_canon(ct, 'v'))} FROM {table} ORDER BY id").fetchall()
        return [_norm(ct, r[0]) for r in rows]
    elem = _null_safe("e", _pg_canon(ct.element, "e"))
    lengths = ", ".join(f"array_length(v, {i})" for i in range(1, ct.ndims + 1))
    rows = pg.execute(
        f"SELECT v IS NULL, (SELECT array_agg({elem} ORDER BY o) FROM unnest(v) WITH ORDINALITY AS u(e, o)),"
        f" ARRAY[{lengths}]::int[] FROM {table} ORDER BY id"
    ).fetchall()
    return [_array_norm(ct, isnull, items, dims) for isnull, items, dims in rows]


def _duck_side(db: duckdb.DuckDBPyConnection, table: str, ct: ColumnType) -> list[Any]:
    if ct.element is None:
        rows = db.execute(f"SELECT {_null_safe('v', _duck_canon(ct, 'v'))} FROM {table} ORDER BY id").fetchall()
        return [_norm(ct, r[0]) for r in rows]
    flat = "v"
    for _ in range(ct.ndims - 1):
        flat = f"flatten({flat})"
    elem = _null_safe("e", _duck_canon(ct.element, "e"))
    lengths = ", ".join(f"len(v{'[1]' * i})" for i in range(ct.ndims))
    rows = db.execute(
        f"SELECT v IS NULL, list_transform({flat}, lambda e: {elem}), [{lengths}] FROM {table} ORDER BY id"
    ).fetchall()
    return [_array_norm(ct, isnull, items, dims) for isnull, items, dims in rows]


def _array_norm(ct: ColumnType, isnull: bool, items: list[Any] | None, dims: list[int | None]) -> Any:
    assert ct.element is not None
    if isnull:
        return None
    if not dims or not dims[0]:
        return ("empty",)
    return (tuple(dims), [_norm(ct.element, x) for x in items or []])


# --------------------------------------------------------------------------------------------
# The two load paths
# --------------------------------------------------------------------------------------------


def _load_python(db: duckdb.DuckDBPyConnection, ct: ColumnType, raw: Sequence[bytes | None]) -> str:
    values = convert_column(ct, raw)
    assert len(values) == len(raw)
    for v, conv in zip(raw, values, strict=True):  # the single-value converter agrees with the bulk one
        if v is None:
            assert conv is None
        else:
            assert repr(ct.converter(v)) == repr(conv)  # repr: NaN == NaN
    db.execute(f"CREATE OR REPLACE TABLE stage_py (id INTEGER, v {ct.value_type})")
    with db.appender("stage_py") as app:
        app.append_rows([(i, v) for i, v in enumerate(values)])
    db.execute(f"CREATE OR REPLACE TABLE dst_py (id INTEGER, v {ct.sql_type})")
    db.execute(f"INSERT INTO dst_py SELECT id, CAST(v AS {ct.sql_type}) FROM stage_py")
    return "dst_py"


def _load_sql(db: duckdb.DuckDBPyConnection, ct: ColumnType, raw: Sequence[bytes | None]) -> str:
    db.execute("CREATE OR REPLACE TABLE stage_sql (id INTEGER, v VARCHAR)")
    with db.appender("stage_sql") as app:
        app.append_rows([(i, None if v is None else v.decode()) for i, v in enumerate(raw)])
    db.execute(f"CREATE OR REPLACE TABLE dst_sql (id INTEGER, v {ct.sql_type})")
    db.execute(f"INSERT INTO dst_sql SELECT id, {duckdb_cast_expr(ct, 'v')} FROM stage_sql")
    return "dst_sql"


def _round_trip(pg: psycopg.Connection[Any], table: str, ct: ColumnType) -> list[bytes | None]:
    raw = _raw_texts(pg, table)
    assert _copy_texts(pg, table) == raw, "COPY text, unescaped, must equal the output function's text"
    expected = _pg_side(pg, table, ct)
    db = duckdb.connect()
    try:
        for path in (_load_python(db, ct, raw), _load_sql(db, ct, raw)):
            got = _duck_side(db, path, ct)
            for i, (want, have) in enumerate(zip(expected, got, strict=True)):
                assert want == have, f"{ct.pg_type} via {path}: source text {raw[i]!r}: expected {want!r}, got {have!r}"
        differ = db.execute(
            "SELECT a.id FROM dst_py a JOIN dst_sql b USING (id) WHERE a.v IS DISTINCT FROM b.v"
        ).fetchall()
        assert differ == [], f"the Python and SQL paths disagree on rows {differ}"
        assert db.execute("SELECT count(*) FROM dst_sql").fetchone() == (len(raw),)
    finally:
        db.close()
    return raw


# --------------------------------------------------------------------------------------------
# Every type and its edge values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    pg_type: str
    values: list[str]
    sql_type: str
    lossless: bool = True
    known: bool = True
    policy: MappingPolicy | None = None
    setup: list[str] = field(default_factory=list)


BC_TS = "'0044-03-15 12:00:00.5 BC'"
TEXTS = [
    "''",
    "'plain'",
    "'it''s'",
    r"E'back\\slash'",
    r"E'tab\there\nnew line\rcr'",
    "'ä€😀 unicode'",
    "'  padded  '",
    "'NULL'",
    "'\"quoted\"'",
    "'{brace},'",
    "NULL",
]

CASES = [
    Case("bool", "boolean", ["true", "false", "NULL"], "BOOLEAN"),
    Case("int2", "smallint", ["-32768", "32767", "0", "NULL"], "SMALLINT"),
    Case("int4", "integer", ["-2147483648", "2147483647", "0"], "INTEGER"),
    Case("int8", "bigint", ["-9223372036854775808", "9223372036854775807"], "BIGINT"),
    Case("oid", "oid", ["0", "4294967295"], "UINTEGER"),
    Case(
        "numeric_12_2",
        "numeric(12,2)",
        ["0", "-1234567890.12", "9999999999.99", "0.01", "1.5", "-0.00", "NULL"],
        "DECIMAL(12,2)",
        lossless=False,
    ),
    Case(
        "numeric_38_30",
        "numeric(38,30)",
        ["1e-30", "-12345678.123456789012345678901234567890", "0"],
        "DECIMAL(38,30)",
        lossless=False,
    ),
    Case("numeric_38_6", "numeric(38,6)", ["99999999999999999999999.999999", "-1"], "DECIMAL(38,6)", lossless=False),
    Case("numeric_neg_scale", "numeric(2,-3)", ["12345", "99000", "-500"], "DECIMAL(5,0)", lossless=False),
    Case("numeric_scale_gt_p", "numeric(3,5)", ["0.00123", "-0.00999"], "DECIMAL(5,5)", lossless=False),
    Case(
        "numeric_nan_null",
        "numeric(12,2)",
        ["1.25", "NULL"],
        "DECIMAL(12,2)",
        lossless=False,
        policy=MappingPolicy(numeric_nan="null"),
    ),
    Case(
        "numeric",
        "numeric",
        [
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "1e-30",
            "99999999999999999999999.999999",
            "'1e400'",
            "'-0.000'",
            "'123456789012345678901234567890123456789012345678901234567890.0001'",
        ],
        "VARCHAR",
    ),
    Case("numeric_1000", "numeric(1000,500)", ["'1.5'", "'1e-500'", "'NaN'"], "VARCHAR"),
    Case(
        "numeric_double",
        "numeric",
        ["'NaN'", "'Infinity'", "'-Infinity'", "'0.1'", "'1e300'", "'-123456789012345678901234567890.5'"],
        "DOUBLE",
        lossless=False,
        policy=MappingPolicy(unconstrained_numeric="double"),
    ),
    Case(
        "float4",
        "real",
        [
            "'Infinity'",
            "'-Infinity'",
            "'NaN'",
            "'-0'",
            "0",
            "'1.4e-45'",
            "'3.4028235e38'",
            "'0.1'",
            "'-1.17549435e-38'",
            "'16777217'",
        ],
        "REAL",
    ),
    Case(
        "float8",
        "double precision",
        [
            "'Infinity'",
            "'-Infinity'",
            "'NaN'",
            "'-0'",
            "'5e-324'",
            "'1.7976931348623157e308'",
            "'0.1'",
            "'3.141592653589793'",
            "'2.2250738585072014e-308'",
        ],
        "DOUBLE",
    ),
    Case("text", "text", TEXTS, "VARCHAR"),
    Case("varchar", "varchar(20)", ["'abc'", "''", "'ä€😀'"], "VARCHAR"),
    Case("bpchar", "char(5)", ["'ab'", "''", "'abcde'", "'ä'"], "VARCHAR"),
    Case("char", '"char"', ["'a'", "'Z'"], "VARCHAR"),
    Case("name", "name", ["'pg_class'", "'Mixed Case'"], "VARCHAR"),
    Case("xml", "xml", ["'<a x=\"1\">t &amp; ä</a>'"], "VARCHAR"),
    Case(
        "bytea",
        "bytea",
        ["'\\x'", "'\\x00ff41'", "decode(repeat('00ff7f80', 300), 'hex')", "convert_to('ä€', 'UTF8')"],
        "BLOB",
    ),
    Case(
        "uuid",
        "uuid",
        [
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            "'00000000-0000-0000-0000-000000000000'",
            "'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF'",
        ],
        "UUID",
    ),
    Case(
        "date",
        "date",
        [
            "'2024-02-29'",
            "'infinity'",
            "'-infinity'",
            "'0044-03-15 BC'",
            "'4713-01-01 BC'",
            "'0001-01-01 BC'",
            "'0001-01-01'",
            "'1582-10-10'",
            "'5874897-12-31'",
            "'1970-01-01'",
        ],
        "DATE",
    ),
    Case(
        "time",
        "time",
        ["'00:00:00'", "'23:59:59.999999'", "'24:00:00'", "'23:59:60'", "'12:34:56.5'"],
        "TIME",
    ),
    Case(
        "timetz",
        "timetz",
        [
            "'00:00:00+00'",
            "'12:34:56.789-08'",
            "'24:00:00-15:59:59'",
            "'12:00:00+15:59:59'",
            "'23:59:59.999999+05:30:15'",
        ],
        "TIMETZ",
    ),
    Case(
        "timestamp",
        "timestamp",
        [
            "'2024-01-02 03:04:05.123456'",
            "'infinity'",
            "'-infinity'",
            BC_TS,
            "'4713-01-01 00:00:00 BC'",
            "'2016-12-31 23:59:60'",
            "'294247-01-10 04:00:54.775806'",
            "'0001-01-01 00:00:00'",
            "'1900-01-01 00:00:00'",
        ],
        "TIMESTAMP",
    ),
    Case(
        "timestamptz",
        "timestamptz",
        [
            "'2024-01-02 03:04:05.123456+05:30'",
            "'infinity'",
            "'-infinity'",
            "'0044-03-15 12:00:00+00 BC'",
            "'1883-11-18 12:00:00 America/New_York'",
            "'2000-01-01 00:00:00 Europe/Berlin'",
            "'294247-01-09 00:00:00+00'",
        ],
        "TIMESTAMPTZ",
    ),
    Case(
        "interval",
        "interval",
        [
            "'1 year 2 mons 3 days 04:05:06.5'",
            "'-1 year -2 mons +3 days -04:05:06.5'",
            "'1000 hours'",
            "'-0.5 seconds'",
            "'0'",
            "'1 day -1 hour'",
            "'-1 day +1 hour'",
            "make_interval(0, 2147483647, 0, 2147483647) + '2562047788:00:54.775807'",
            "make_interval(0, -2147483648, 0, -2147483648) + '-9223372036854775808 microseconds'",
            "'1 microsecond'",
        ],
        "INTERVAL",
    ),
    Case(
        "json",
        "json",
        [
            """'{"a": [1, 2.50, "x"],   "b": null}'""",
            r"""'"\u00e4 \ud83d\ude00"'""",
            "'[]'",
            "'null'",
            "'1e400'",
            """'{"a":1,"a":2}'""",
            r"""'{"k":"\u0000"}'""",
            """' {"spaced" : true} '""",
        ],
        "JSON",
    ),
    Case(
        "jsonb",
        "jsonb",
        [
            """'{"b": 1, "a": {"ü": ["😀", null, true, 1.50]}}'""",
            """'"x"'""",
            "'12.50'",
            "'[]'",
            r"""'"quote\" and \\ back"'""",
        ],
        "JSON",
    ),
    Case(
        "enum",
        "mood",
        ["'sad'", "'with space'", "'quote''s'", "NULL"],
        "VARCHAR",
        setup=["CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'with space', 'quote''s')"],
    ),
    Case(
        "enum_as_enum",
        "mood",
        ["'happy'", "'quote''s'", "'sad'"],
        "ENUM('sad', 'ok', 'happy', 'with space', 'quote''s')",
        policy=MappingPolicy(enums="enum"),
    ),
    Case(
        "domain", "posint", ["1", "2147483647"], "INTEGER", setup=["CREATE DOMAIN posint AS integer CHECK (VALUE > 0)"]
    ),
    Case(
        "inet", "inet", ["'192.168.0.1/24'", "'10.0.0.1'", "'::1'", "'2001:db8::1/64'", "'::ffff:1.2.3.4'"], "VARCHAR"
    ),
    Case("cidr", "cidr", ["'10.0.0.0/8'", "'2001:db8::/32'", "'192.168.1.0/24'"], "VARCHAR"),
    Case("point", "point", ["'(1,2)'", "'(-1.5,1e300)'"], "VARCHAR", lossless=False, known=False),
    Case("tsvector", "tsvector", ["'a fat cat'", "''"], "VARCHAR", lossless=False, known=False),
    Case("money", "money", ["'1.23'"], "VARCHAR", lossless=False, known=False),
    # arrays
    Case("int4_arr", "integer[]", ["'{1,2,NULL}'", "'{}'", "'[0:2]={1,2,3}'", "NULL", "'{-2147483648}'"], "INTEGER[]"),
    Case("int4_arr2", "integer[][]", ["'{{1,2},{3,4}}'", "'{{NULL,2}}'", "'{}'", "'{{1},{2},{3}}'"], "INTEGER[][]"),
    Case("int4_arr3", "integer[][][]", ["'{{{1,2},{3,4}},{{5,6},{7,NULL}}}'", "'{}'"], "INTEGER[][][]"),
    Case("int2_arr", "smallint[]", ["'{-32768,32767}'"], "SMALLINT[]"),
    Case("int8_arr", "bigint[]", ["'{-9223372036854775808,NULL}'"], "BIGINT[]"),
    Case("oid_arr", "oid[]", ["'{1,4294967295}'"], "UINTEGER[]"),
    Case(
        "text_arr",
        "text[]",
        [
            "ARRAY['a b', 'c\"d', 'NULL', NULL, '', E'x\\\\y', '{', '}', ',', ' ', 'ä€😀', E'new\\nline', 'null']",
            "ARRAY['Null', 'NuLL', 'NULLs']",
            "'{}'",
            "ARRAY[NULL]::text[]",
            "ARRAY[E'\\\\\"', '\"\"']",
        ],
        "VARCHAR[]",
    ),
    Case("text_arr2", "text[][]", ["ARRAY[['a', '{b}'], ['\"c\"', NULL]]", "ARRAY[['x,y'], ['']]"], "VARCHAR[][]"),
    Case("varchar_arr", "varchar(5)[]", ["ARRAY['ab', 'NULL']"], "VARCHAR[]"),
    Case("bpchar_arr", "char(3)[]", ["ARRAY['a', 'bc', '']::char(3)[]"], "VARCHAR[]"),
    Case("char_arr", '"char"[]', ["ARRAY['a', 'b']::\"char\"[]"], "VARCHAR[]"),
    Case("name_arr", "name[]", ["ARRAY['pg_class', 'a b']::name[]"], "VARCHAR[]"),
    Case("xml_arr", "xml[]", ["ARRAY['<a>1</a>', '<b x=\"y\"/>']::xml[]"], "VARCHAR[]"),
    Case("bool_arr", "boolean[]", ["'{t,f,NULL}'"], "BOOLEAN[]"),
    Case("float4_arr", "real[]", ["'{NaN,Infinity,-Infinity,-0,1.5,1.4e-45}'"], "REAL[]"),
    Case("float8_arr", "double precision[]", ["'{NaN,Infinity,-Infinity,-0,0.1,5e-324}'"], "DOUBLE[]"),
    Case("numeric_arr", "numeric[]", ["'{1.5,NaN,-Infinity,1e-30,NULL}'"], "VARCHAR[]"),
    Case(
        "numeric_12_2_arr", "numeric(12,2)[]", ["'{1.50,NULL,-0.01,9999999999.99}'"], "DECIMAL(12,2)[]", lossless=False
    ),
    Case(
        "date_arr",
        "date[]",
        ["ARRAY['0044-03-15 BC', 'infinity', '-infinity', '2024-01-01', NULL]::date[]"],
        "DATE[]",
    ),
    Case("time_arr", "time[]", ["ARRAY['24:00:00', '12:34:56.5']::time[]"], "TIME[]"),
    Case("timetz_arr", "timetz[]", ["ARRAY['12:00:00+05:30', '24:00:00-15:59:59']::timetz[]"], "TIMETZ[]"),
    Case(
        "timestamp_arr",
        "timestamp[]",
        ["ARRAY[" + BC_TS + ", 'infinity', '2024-01-02 03:04:05.123456']::timestamp[]"],
        "TIMESTAMP[]",
    ),
    Case(
        "timestamptz_arr",
        "timestamptz[]",
        ["ARRAY['0044-03-15 12:00:00+00 BC', '-infinity', '2024-01-02 03:04:05.123456+05']::timestamptz[]"],
        "TIMESTAMPTZ[]",
    ),
    Case(
        "timestamptz_arr2",
        "timestamptz[][]",
        ["ARRAY[['2024-01-01 00:00:00+00', NULL], ['infinity', '0001-01-01 00:00:00+00 BC']]::timestamptz[][]"],
        "TIMESTAMPTZ[][]",
    ),
    Case(
        "interval_arr",
        "interval[]",
        ["ARRAY['-1 year -2 mons +3 days -04:05:06.5', '1000 hours', NULL]::interval[]"],
        "INTERVAL[]",
    ),
    Case("uuid_arr", "uuid[]", ["ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', NULL]::uuid[]"], "UUID[]"),
    Case("bytea_arr", "bytea[]", ["ARRAY['\\x4142'::bytea, '\\x'::bytea, NULL, '\\x22225c'::bytea]"], "BLOB[]"),
    Case(
        "json_arr",
        "json[]",
        ["ARRAY['{\"a\": \"q\\\"uote\"}', '[1, 2]', 'null', NULL]::json[]"],
        "JSON[]",
    ),
    Case(
        "jsonb_arr",
        "jsonb[][]",
        ["ARRAY[['{\"ü\": [\"😀\"]}', '\"{\"'], ['1', NULL]]::jsonb[][]"],
        "JSON[][]",
    ),
    Case("inet_arr", "inet[]", ["ARRAY['10.0.0.1', '::1/128', '192.168.0.1/24']::inet[]"], "VARCHAR[]"),
    Case("cidr_arr", "cidr[]", ["ARRAY['10.0.0.0/8']::cidr[]"], "VARCHAR[]"),
    Case("enum_arr", "mood[]", ["ARRAY['sad', 'with space', NULL]::mood[]", "'{}'"], "VARCHAR[]"),
    Case(
        "enum_arr_enum",
        "mood[]",
        ["ARRAY['quote''s', 'ok']::mood[]"],
        "ENUM('sad', 'ok', 'happy', 'with space', 'quote''s')[]",
        policy=MappingPolicy(enums="enum"),
    ),
    Case("point_arr", "point[]", ["ARRAY[point(1,2)]"], "VARCHAR", lossless=False, known=False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round_trip(pg: psycopg.Connection[Any], case: Case) -> None:
    for stmt in case.setup:
        pg.execute(stmt)
    table = _table(pg, case.pg_type, case.values)
    ct = _column_type(pg, table, case.policy)
    assert ct.sql_type == case.sql_type
    assert (ct.lossless, ct.known) == (case.lossless, case.known), ct.note
    if not ct.known:
        assert ct.note is not None and ct.note.startswith("warning:")
    raw = _round_trip(pg, table, ct)
    assert len(raw) == len(case.values)


def test_session_settings_are_in_effect(pg: psycopg.Connection[Any]) -> None:
    for name, value in PG_SESSION_SETTINGS.items():
        row = pg.execute(f"SHOW {name}").fetchone()
        assert row is not None
        assert row[0] == value or (name == "DateStyle" and row[0].startswith("ISO"))


def test_pg_type_names_match_the_server(pg: psycopg.Connection[Any]) -> None:
    rows = dict(pg.execute("SELECT oid::int, typname FROM pg_type WHERE oid = ANY(%s)", (list(pg_type_names),)))
    assert rows == pg_type_names
    for oid, name in pg_type_names.items():
        if name.startswith("_"):
            elem = pg.execute("SELECT typelem::int FROM pg_type WHERE oid = %s", (oid,)).fetchone()
            assert elem is not None
            assert pg_type_names[elem[0]] == name[1:]
            scalar = pg.execute("SELECT typarray::int FROM pg_type WHERE oid = %s", (elem[0],)).fetchone()
            assert scalar == (oid,)
        else:
            assert duckdb_type(oid).known


# --------------------------------------------------------------------------------------------
# Random values
# --------------------------------------------------------------------------------------------


def _unnest_table(pg: psycopg.Connection[Any], pg_type: str, select: str, params: Sequence[Any]) -> str:
    name = f"t{next(_counter)}"
    pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v {pg_type})")
    pg.execute(f"INSERT INTO {name} {select}", params)
    return name


def test_random_floats(pg: psycopg.Connection[Any]) -> None:
    rnd = random.Random(15)
    f32 = [struct.unpack(">f", struct.pack(">I", rnd.getrandbits(32)))[0] for _ in range(3000)]
    f64 = [struct.unpack(">d", struct.pack(">Q", rnd.getrandbits(64)))[0] for _ in range(3000)]
    f32 = [x for x in f32 if not math.isnan(x)]
    f64 = [x for x in f64 if not math.isnan(x)]
    for pg_type, values in (("real", f32), ("double precision", f64)):
        table = _unnest_table(
            pg, pg_type, f"SELECT o::int, x::{pg_type} FROM unnest(%s::float8[]) WITH ORDINALITY AS u(x, o)", [values]
        )
        ct = _column_type(pg, table)
        _round_trip(pg, table, ct)
        fmt = ">f" if pg_type == "real" else ">d"
        converted = convert_column(ct, _raw_texts(pg, table))
        assert [struct.pack(fmt, x) for x in converted] == [struct.pack(fmt, x) for x in values]


def test_random_intervals(pg: psycopg.Connection[Any]) -> None:
    rnd = random.Random(7)

    def r(bits: int) -> int:
        b = rnd.choice([0, 1, 3, bits // 2, bits - 1, bits])
        limit: int = 2**bits
        return max(-limit, min(limit - 1, rnd.randint(-(2**b), 2**b)))

    rows = [(r(31), r(31), r(63)) for _ in range(3000)]
    table = _unnest_table(
        pg,
        "interval",
        "SELECT o::int, make_interval(0, m, 0, d) + (us::text || ' microseconds')::interval"
        " FROM unnest(%s::int[], %s::int[], %s::int8[]) WITH ORDINALITY AS u(m, d, us, o)",
        [[x[0] for x in rows], [x[1] for x in rows], [x[2] for x in rows]],
    )
    _round_trip(pg, table, _column_type(pg, table))


def test_random_dates_and_timestamps(pg: psycopg.Connection[Any]) -> None:
    rnd = random.Random(3)
    lo, hi = -210863520000000000, 9214646400000000000  # 4713-01-01 BC .. 294247-01-01 as epoch microseconds
    micros = [rnd.randint(lo, hi) for _ in range(1500)] + [rnd.randint(-(10**13), 10**13) for _ in range(500)]
    for pg_type, expr in (
        ("timestamp", "timestamp '1970-01-01' + (x::text || ' microseconds')::interval"),
        ("timestamptz", "timestamptz '1970-01-01 00:00:00+00' + (x::text || ' microseconds')::interval"),
        ("date", "(timestamp '1970-01-01' + (x::text || ' microseconds')::interval)::date"),
        ("time", "(timestamp '1970-01-01' + (x::text || ' microseconds')::interval)::time"),
    ):
        table = _unnest_table(
            pg, pg_type, f"SELECT o::int, {expr} FROM unnest(%s::int8[]) WITH ORDINALITY AS u(x, o)", [micros]
        )
        ct = _column_type(pg, table)
        raw = _round_trip(pg, table, ct)
        assert any(v is not None and v.endswith(b" BC") for v in raw) or pg_type == "time"


# --------------------------------------------------------------------------------------------
# Values that must be refused, loudly, by both paths
# --------------------------------------------------------------------------------------------


def _both_paths_fail(pg: psycopg.Connection[Any], table: str, ct: ColumnType) -> None:
    raw = _raw_texts(pg, table)
    with pytest.raises(TypeMapError):
        convert_column(ct, raw)
    db = duckdb.connect()
    try:
        with pytest.raises(duckdb.Error):
            _load_sql(db, ct, raw)
    finally:
        db.close()


def test_numeric_nan_in_decimal_is_refused_by_default(pg: psycopg.Connection[Any]) -> None:
    table = _table(pg, "numeric(12,2)", ["1", "'NaN'"])
    _both_paths_fail(pg, table, _column_type(pg, table))
    table = _table(pg, "numeric(12,2)[]", ["'{1,NaN}'"])
    _both_paths_fail(pg, table, _column_type(pg, table))
    ct = _column_type(pg, table, MappingPolicy(numeric_nan="null"))
    assert convert_column(ct, _raw_texts(pg, table)) == [[Decimal(1), None]]


def test_array_with_other_dimensions_is_refused(pg: psycopg.Connection[Any]) -> None:
    table = _table(pg, "integer[]", ["'{1}'", "'{{1,2},{3,4}}'"])  # attndims is not enforced
    _both_paths_fail(pg, table, _column_type(pg, table))
    table = _table(pg, "integer[][]", ["'{{1}}'", "'{1,2}'"])
    _both_paths_fail(pg, table, _column_type(pg, table))
    table = _table(pg, "text[]", ["ARRAY[ARRAY['{a', 'b}']]"])
    _both_paths_fail(pg, table, _column_type(pg, table))


def test_documented_edges_are_refused_not_altered(pg: psycopg.Connection[Any]) -> None:
    db = duckdb.connect()
    try:
        for pg_type, value in (
            ("timestamp", "'294276-12-31 23:59:59.999999'"),
            ("timestamptz", "'294270-01-01 00:00:00+00'"),
            ("json", r"""'"\ud800"'"""),  # an unpaired surrogate escape: json accepts it, DuckDB does not
        ):
            table = _table(pg, pg_type, [value])
            ct = _column_type(pg, table)
            assert ct.lossless  # the edge is named in the note
            with pytest.raises(duckdb.Error):
                _load_sql(db, ct, _raw_texts(pg, table))
            with pytest.raises(duckdb.Error):
                _load_python(db, ct, _raw_texts(pg, table))
    finally:
        db.close()


# --------------------------------------------------------------------------------------------
# Pure unit tests
# --------------------------------------------------------------------------------------------


def test_numeric_typmod_decoding() -> None:
    def typmod(p: int, s: int) -> int:
        return ((p << 16) | (s & 0x7FF)) + 4

    assert duckdb_type(1700, typmod(12, 2)).sql_type == "DECIMAL(12,2)"
    assert duckdb_type(1700, typmod(38, 0)).sql_type == "DECIMAL(38,0)"
    assert duckdb_type(1700, typmod(39, 2)).sql_type == "VARCHAR"
    assert duckdb_type(1700, typmod(36, -3)).sql_type == "VARCHAR"  # needs 39 digits
    assert duckdb_type(1700, typmod(35, -3)).sql_type == "DECIMAL(38,0)"
    assert duckdb_type(1700, typmod(1, 38)).sql_type == "DECIMAL(38,38)"
    assert duckdb_type(1700, typmod(1, 39)).sql_type == "VARCHAR"
    assert duckdb_type(1700, -1).pg_type == "numeric"
    assert duckdb_type(1700, typmod(2, -3)).pg_type == "numeric(2,-3)"
    assert duckdb_type(1231, typmod(12, 2)).sql_type == "DECIMAL(12,2)[]"
    assert duckdb_type(1700, -1, policy=MappingPolicy(unconstrained_numeric="double")).sql_type == "DOUBLE"


def test_unknown_types_never_raise() -> None:
    for oid, name in ((600, "point"), (3614, "tsvector"), (999999, None), (1017, "_point"), (0, "")):
        ct = duckdb_type(oid, -1, type_name=name)
        assert (ct.sql_type, ct.kind, ct.known, ct.lossless) == ("VARCHAR", "unknown", False, False)
        assert ct.note is not None and ct.note.startswith("warning:")
        assert convert_column(ct, [b"(1,2)", None]) == ["(1,2)", None]
        assert duckdb_cast_expr(ct, '"v"') == '"v"'
    ct = duckdb_type(99999, -1, type_name="_point", element_oid=600)
    assert (ct.sql_type, ct.known) == ("VARCHAR", False)


def test_domains_and_named_types_map_by_base_name() -> None:
    assert duckdb_type(90001, -1, type_name="int4").sql_type == "INTEGER"
    assert duckdb_type(90002, -1, type_name="_text").sql_type == "VARCHAR[]"
    assert duckdb_type(90003, -1, type_name="timestamptz").sql_type == "TIMESTAMPTZ"
    assert duckdb_type(90004, -1, type_name="mood", enum_labels=["a", "b"]).sql_type == "VARCHAR"
    ct = duckdb_type(90005, -1, type_name="mood", enum_labels=["a", "it's"], policy=MappingPolicy(enums="enum"))
    assert ct.sql_type == "ENUM('a', 'it''s')"
    arr = duckdb_type(90006, -1, type_name="_mood", element_oid=90004, enum_labels=["a"], array_ndims=2)
    assert (arr.sql_type, arr.element and arr.element.kind, arr.ndims) == ("VARCHAR[][]", "enum", 2)


def test_parse_array() -> None:
    assert parse_array("{}") == []
    assert parse_array("{}", 3) == []
    assert parse_array('{1,NULL,"NULL",null,""}') == ["1", None, "NULL", None, ""]
    assert parse_array(r'{"a\"b","c\\d","{,}"}') == ['a"b', "c\\d", "{,}"]
    assert parse_array("{{a,b},{c,d}}", 2) == [["a", "b"], ["c", "d"]]
    assert parse_array("[0:1]={x,y}") == ["x", "y"]
    assert parse_array("[1:1][2:3]={{x,y}}", 2) == [["x", "y"]]
    assert parse_array('{"line\nbreak"}') == ["line\nbreak"]
    for bad, ndims in (
        ("{1,2", 1),
        ("1,2}", 1),
        ("{1,,2}", 1),
        ("{,1}", 1),
        ("{1}x", 1),
        ("{1}{2}", 1),
        ("{{1}}", 1),
        ("{1}", 2),
        ('{"a}', 1),
        ("", 1),
        ("[0:1]", 1),
        ("{{1},2}", 2),
    ):
        with pytest.raises(TypeMapError):
            parse_array(bad, ndims)
    assert issubclass(TypeMapError, PgbridgeError)


def test_copy_text_fields() -> None:
    line = b"a\\tb\\\\c\\nd\\r\t\\N\t\\\\x00ff\t\t\\101\\x42\\q\n"
    assert copy_text_fields(line) == [b"a\tb\\c\nd\r", None, b"\\x00ff", b"", b"ABq"]
    assert copy_text_fields(b"x") == [b"x"]
    with pytest.raises(TypeMapError):
        copy_text_fields(b"a\tb\n", ncols=3)


def test_convert_column_basics() -> None:
    assert convert_column(duckdb_type(23), []) == []
    assert convert_column(duckdb_type(23), [b"1", None, b"-7"]) == [1, None, -7]
    assert convert_column(duckdb_type(16), [b"t", b"f", None]) == [True, False, None]
    assert convert_column(duckdb_type(17), [b"\\x00ff", b"\\x"]) == [b"\x00\xff", b""]
    assert convert_column(duckdb_type(1082), [b"0044-03-15 BC", b"infinity"]) == ["0044-03-15 (BC)", "infinity"]
    assert convert_column(duckdb_type(1184), [b"0001-01-01 00:00:00+00 BC"]) == ["0001-01-01 (BC) 00:00:00+00"]
    assert convert_column(duckdb_type(1186), [b"-1 years +2 mons"]) == ["-1 years 2 mons"]
    with pytest.raises(TypeMapError):
        convert_column(duckdb_type(17), [b"abc"])  # bytea_output=escape is not understood
    ct = duckdb_type(1007)
    assert convert_column(ct, [b"{1,NULL}", None]) == [[1, None], None]
    assert ct.value_type == "INTEGER[]"
    assert duckdb_type(1182).value_type == "VARCHAR[]"
    assert duckdb_type(1231, ((12 << 16) | 2) + 4).value_type == "DECIMAL(12,2)[]"
