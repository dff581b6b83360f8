"""COPY text in, warehouse rows out: parse ``COPY ... TO STDOUT`` output with Arrow, insert it into DuckDB.

Arrow's C++ CSV reader parses the text outside the GIL, straight to the warehouse type where its
parser is exact for PostgreSQL's text; the other columns stay strings and are cast set-based by the
typemap's SQL (:func:`~pgbridge.cdc.typemap.duckdb_cast_expr`). The initial load
(:mod:`pgbridge.cdc.snapshot`) reads with many connections in parallel; :func:`copy_rows` is the
one-reader form that ``pipeline resync TABLE``, ``validate --repair`` and a table rewrite use.
"""

from __future__ import annotations

import contextlib
import re
import select
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from psycopg import pq, sql

from pgbridge.cdc.catalog import SnapshotError, SourceTable, source_error
from pgbridge.cdc.sinks.base import SinkTable
from pgbridge.cdc.sinks.duckdb import SinkError, qi
from pgbridge.cdc.typemap import ColumnType, copy_text_fields, duckdb_cast_expr
from pgbridge.types import LSN

__all__ = ["CHUNK_BYTES", "CopyPlan", "copy_plan", "copy_rows", "parse_copy_text", "pieces", "wal_insert_lsn"]

CHUNK_BYTES: Final = 4 << 20  # the COPY text a parse chunk aims at (Arrow parses 4 MB best)


@dataclass(frozen=True)
class CopyPlan:
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
_ARROW_INTS: Final = {"SMALLINT": pa.int16(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "UINTEGER": pa.uint32()}


def parse_copy_text(
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


def _wait(pgconn: pq.abc.PGconn, event: int = select.POLLIN) -> None:
    poller = select.poll()
    poller.register(pgconn.socket, event)
    poller.poll()


def _raise_result(pgconn: pq.abc.PGconn, result: pq.abc.PGresult | None) -> None:
    code = result.error_field(pq.DiagnosticField.SQLSTATE) if result is not None else None
    text = (result.error_message if result is not None else b"") or pgconn.error_message
    raise source_error(code.decode() if code else None, text.decode(errors="replace"), "COPY failed")


def _copy_out(pgconn: pq.abc.PGconn, query: bytes, chunk_rows: int, emit: Callable[[bytearray], None]) -> None:
    """Run one ``COPY ... TO STDOUT`` on libpq directly and hand line-aligned chunks to ``emit``.

    psycopg's ``for data in copy`` runs a generator and a wait per row message; the same libpq calls
    without them take 1.2 instead of 3.2 CPU-seconds per 2M rows (2 vCPU).
    """
    pgconn.send_query(query)
    while pgconn.flush():
        _wait(pgconn, select.POLLOUT)
    pgconn.consume_input()
    while pgconn.is_busy():
        _wait(pgconn)
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
            if (rows >= chunk_rows or len(buf) >= CHUNK_BYTES) and buf[-1] == 10:
                emit(buf)
                buf, rows = bytearray(), 0
        elif n == 0:
            _wait(pgconn)
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


def copy_plan(st: SourceTable, stt: SinkTable, target: str) -> CopyPlan:
    """How to copy ``st``: its replicated columns' SELECT, their parse types, the INSERTs from ``_pgb_load``."""
    types = tuple(_arrow_type(c.ctype) for c in stt.columns)
    casts = [duckdb_cast_expr(c.ctype, f"c{i}") for i, c in enumerate(stt.columns)]
    kept = [f"c{i}" if t is not None else cast for i, (t, cast) in enumerate(zip(types, casts, strict=True))]
    names = sql.SQL(", ").join(sql.Identifier(c.name) for c in stt.columns)
    select_sql = sql.SQL("SELECT {} FROM ONLY {}").format(names, sql.Identifier(st.schema, st.name))
    insert = f"INSERT INTO {target} ({', '.join(qi(c.name) for c in stt.columns)}) SELECT"
    return CopyPlan(
        select_sql,
        select_sql.as_string(),
        types,
        f"{insert} {', '.join(kept)} FROM _pgb_load",
        f"{insert} {', '.join(casts)} FROM _pgb_load",
    )


def wal_insert_lsn(conn: psycopg.Connection[Any]) -> LSN:
    """The source's WAL insert position: after a copy, beyond the commit of every transaction it saw.

    A transaction is visible only once its commit record is in the WAL, so rows copied earlier on
    ``conn`` hold nothing that committed past this position (the stream's :meth:`Sink.note_copy`).
    """
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return LSN.parse(str(row[0]))


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
    plan = copy_plan(st, stt, target)
    select_sql = plan.select_sql
    if where is not None:
        select_sql = sql.SQL("{} WHERE {}").format(select_sql, where)
    check_utf8 = conn.info.parameter_status("server_encoding") != "UTF8"
    rows = 0

    def emit(buf: bytearray) -> None:
        nonlocal rows
        try:
            table, typed = parse_copy_text(buf, plan.types, check_utf8)
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
    _copy_out(conn.pgconn, query, chunk_rows, emit)
    return rows


def pieces(text: bytes) -> list[tuple[int, int]]:
    """``text`` (whole COPY lines) cut at line ends into pieces of about ``CHUNK_BYTES`` (the last up to 1.5x).

    A span's text can exceed its aim (its rows are wider than the last span's); its pieces still
    parse in chunks of the size Arrow parses best, and no string column nears Arrow's 2 GB limit.
    """
    pieces, start = [], 0
    while len(text) - start > CHUNK_BYTES * 3 // 2:
        cut = text.find(b"\n", start + CHUNK_BYTES - 1) + 1
        if cut >= len(text):
            break
        pieces.append((start, cut))
        start = cut
    return [*pieces, (start, len(text))]
