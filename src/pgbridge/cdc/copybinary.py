"""Binary COPY in, Arrow columns out: the initial load's fast path.

``COPY ... TO STDOUT (FORMAT binary)`` spares the server the text output functions (a timestamptz
costs it three times as much as text as in binary) and the client the tokenizing and the number
parsing. Its rows have no separators: each is an Int16 field count, then per field an Int32 length
(-1 for NULL) and that many bytes, so finding a row takes a walk through every length before it.
The C extension :mod:`pgbridge.cdc._copybin` walks them (without the GIL) into little-endian column
buffers, and this module wraps those as Arrow arrays, the same types the text path's typed parse
gives (:attr:`~pgbridge.cdc.copytext.CopyPlan.types`), so the loader inserts both alike.

Decoded natively: integers, oids, floats, booleans, dates, timestamps, ``numeric(p,s)`` up to 18
digits and the text types. Every other column is selected as the text its output function writes
(what a text COPY sends, without COPY's escaping) and cast in SQL as the text path casts it. A value the
text path would not parse typed either (a date or timestamp outside years 1-9999, ``infinity``, NaN
in a numeric) makes :func:`decode_binary` raise :class:`~pgbridge.cdc.columnar.Unsupported`: the
loader then copies that span again as text (:mod:`pgbridge.cdc.copytext`), so both paths load
exactly the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Final

import numpy as np
import pyarrow as pa
from psycopg import sql

from pgbridge.cdc.catalog import SourceColumn, SourceTable
from pgbridge.cdc.columnar import Unsupported
from pgbridge.cdc.copytext import CopyPlan
from pgbridge.cdc.sinks.base import SinkTable

_copybin: ModuleType | None
try:
    from pgbridge.cdc import _copybin
except ImportError:  # not built (no C compiler where it was installed): the load copies text only
    _copybin = None

__all__ = ["BinaryPlan", "binary_plan", "decode_binary"]

_NUMERIC_MAX_DIGITS: Final = 18  # a scaled numeric(p,s) up to 18 digits fits the decoder's int64

# base type name -> (the decoder's field kind, the Arrow type). The Arrow type must be the one the
# text path parses the column to (copytext._arrow_type), or the column is selected as text.
_NATIVE: Final[dict[str, tuple[str, pa.DataType]]] = {
    "int2": ("h", pa.int16()),
    "int4": ("i", pa.int32()),
    "int8": ("l", pa.int64()),
    "oid": ("o", pa.uint32()),
    "float4": ("f", pa.float32()),
    "float8": ("d", pa.float64()),
    "bool": ("b", pa.bool_()),
    "date": ("D", pa.date32()),
    "timestamp": ("t", pa.timestamp("us")),
    "timestamptz": ("t", pa.timestamp("us", "UTC")),
}
_TEXT_TYPES: Final = frozenset({"text", "varchar", "bpchar", "name"})  # sent as their text, unescaped
# Built-in types whose cast to text is their output function (no pg_cast entry: CoerceViaIO), as
# are arrays'. Others may have a cast of their own that writes other text than a COPY does: inet's
# adds "/32" (network_show), xml's keeps the declaration, and a user's type may have any. Those are
# selected through format('%s'), which calls the output function.
_TEXT_BY_CAST: Final = frozenset({"bytea", "uuid", "json", "jsonb", "interval", "time", "timetz", "numeric", "money"})


@dataclass(frozen=True)
class BinaryPlan:
    """How a table is copied in binary: the SELECT, and per column the decoder's kind and scale.

    ``types`` are the Arrow types of the columns (None: a string the insert casts in SQL), as
    :attr:`CopyPlan.types`.
    """

    select_text: str
    kinds: bytes
    scales: bytes
    types: tuple[pa.DataType | None, ...]


def _field(type_name: str, arrow: pa.DataType | None) -> tuple[str, int] | None:
    """The decoder's kind (and scale) for a column of base type ``type_name`` the text path parses to ``arrow``."""
    native = _NATIVE.get(type_name)
    if native is not None and arrow == native[1]:
        return native[0], 0
    if type_name == "numeric" and isinstance(arrow, pa.Decimal128Type) and arrow.precision <= _NUMERIC_MAX_DIGITS:
        return "n", arrow.scale
    return ("T", 0) if arrow is None else None  # text, or its COPY text the insert casts (see _select)


def binary_plan(st: SourceTable, stt: SinkTable, plan: CopyPlan) -> BinaryPlan | None:
    """The binary form of ``plan``; None when the table must be copied as text.

    It must be when the decoder is not built, or when a column the text path parses typed has no
    binary decoder here (``numeric`` beyond 18 digits, or kept as DOUBLE).
    """
    if _copybin is None:
        return None
    source = {c.name: c for c in st.columns}
    kinds, scales, exprs = [], [], []
    for col, arrow in zip(stt.columns, plan.types, strict=True):
        type_name = source[col.name].type_name
        field = _field(type_name, arrow)
        if field is None:
            return None
        kinds.append(field[0])
        scales.append(field[1])
        exprs.append(_select(sql.Identifier(col.name), field[0], source[col.name]))
    select = sql.SQL("SELECT {} FROM ONLY {}").format(sql.SQL(", ").join(exprs), sql.Identifier(st.schema, st.name))
    return BinaryPlan(select.as_string(), "".join(kinds).encode(), bytes(scales), plan.types)


def _select(ident: sql.Identifier, kind: str, column: SourceColumn) -> sql.Composable:
    """How a column is selected: itself, or its COPY text (what its output function writes)."""
    if kind != "T" or column.type_name in _TEXT_TYPES:
        return ident
    if column.element_oid is not None or column.type_name in _TEXT_BY_CAST:  # arrays: array_out
        return sql.SQL("{}::text").format(ident)
    return sql.SQL("CASE WHEN {0} IS NULL THEN NULL ELSE format('%s', {0}) END").format(ident)


def _validity(valid: bytes | None) -> pa.Buffer | None:
    return None if valid is None else pa.py_buffer(np.packbits(np.frombuffer(valid, np.bool_), bitorder="little"))


def _nulls(valid: bytes | None) -> int:
    return 0 if valid is None else len(valid) - int(np.count_nonzero(np.frombuffer(valid, np.uint8)))


def decode_binary(buf: bytes, plan: BinaryPlan) -> tuple[pa.Table, bool]:
    """One ``COPY (plan.select_text ...) TO STDOUT (FORMAT binary)`` output -> columns ``c0..``.

    Returns the table and True: its columns are typed as ``plan.types``, like the text path's typed
    parse. Raises :class:`Unsupported` when the text path must copy these rows instead.
    """
    assert _copybin is not None
    decoded = _copybin.decode(buf, plan.kinds, plan.scales)
    if decoded is None:
        raise Unsupported("binary COPY output the decoder cannot vouch for")
    rows, fields = decoded
    columns = []
    for kind, arrow, field in zip(plan.kinds, plan.types, fields, strict=True):
        if kind == ord("T"):
            offsets, data, valid = field
            buffers = [_validity(valid), pa.py_buffer(offsets), pa.py_buffer(data)]
            columns.append(pa.Array.from_buffers(pa.large_string(), rows, buffers, null_count=_nulls(valid)))
        elif kind == ord("b"):
            values, valid = field
            bits = np.frombuffer(values, np.bool_)
            columns.append(pa.array(bits, pa.bool_(), mask=None if valid is None else ~np.frombuffer(valid, np.bool_)))
        else:
            values, valid = field
            assert arrow is not None
            columns.append(
                pa.Array.from_buffers(arrow, rows, [_validity(valid), pa.py_buffer(values)], null_count=_nulls(valid))
            )
    return pa.Table.from_arrays(columns, names=[f"c{i}" for i in range(len(columns))]), True
