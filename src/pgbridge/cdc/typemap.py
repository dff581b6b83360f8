"""Map PostgreSQL column types and text values onto DuckDB, faithfully, with no I/O at all.

Change-data-capture gets every column value as PostgreSQL's *text* output: the stream (pgoutput with
``binary = false``) and the initial load (``COPY ... TO STDOUT``, text format) both carry what the
type's output function printed. Both paths must turn that text into the same DuckDB value, and the
value must be the one PostgreSQL holds: ``infinity`` dates, BC timestamps, ``NaN`` floats, intervals
with months *and* days *and* microseconds, ``char(n)`` padding, array elements that are NULL versus the
string ``"NULL"``. This module is that shared layer:

* :func:`duckdb_type` maps a column (type oid + atttypmod, plus what a pgoutput Type message or the
  catalog says about non-builtin types) to a :class:`ColumnType`: the DuckDB type, whether the mapping
  is exact, and a note when it is not.
* :func:`duckdb_cast_expr` gives the DuckDB SQL expression that turns a VARCHAR holding the PostgreSQL
  text into the target type. This is the bulk path: stage raw text, cast set-based in DuckDB.
* :func:`convert_column` converts a whole column of raw values in Python (one converter picked per
  column, no per-value type dispatch), for callers that want Python values. The two paths agree; the
  unit tests check both against a real server.
* :func:`copy_text_fields` splits one ``COPY ... TO STDOUT`` text line into raw values, undoing COPY's
  backslash escaping, so the initial load hands the same bytes to this module as the stream does.

Assumptions about the PostgreSQL sessions that produce the text (set them with
:data:`PG_SESSION_OPTIONS` on the replication and the COPY connection): ``TimeZone=UTC``,
``DateStyle=ISO``, ``IntervalStyle=postgres``, ``extra_float_digits=3``, ``bytea_output=hex`` and a
UTF-8 database. Under other settings timestamptz text carries other offsets (still exact), but dates in
another DateStyle, intervals in another IntervalStyle and bytea in escape format are *not* understood.
"""

from __future__ import annotations

import re
from binascii import unhexlify
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal
from uuid import UUID

from pgbridge.errors import PgbridgeError

__all__ = [
    "PG_SESSION_OPTIONS",
    "PG_SESSION_SETTINGS",
    "ColumnType",
    "MappingPolicy",
    "TypeMapError",
    "convert_column",
    "copy_text_fields",
    "duckdb_cast_expr",
    "duckdb_type",
    "parse_array",
    "pg_type_names",
]


class TypeMapError(PgbridgeError):
    """A PostgreSQL text value cannot be converted to its mapped DuckDB type (malformed or unrepresentable)."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            hint="check that the source sessions use pgbridge.cdc.typemap.PG_SESSION_OPTIONS and that the "
            "column mapping (array dimensions, numeric NaN policy) fits the data",
        )


#: Settings the replication and COPY sessions must run with for the text this module parses.
PG_SESSION_SETTINGS: Final[dict[str, str]] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "client_encoding": "UTF8",
}

#: The same settings as a libpq ``options`` connection parameter value.
PG_SESSION_OPTIONS: Final = " ".join(f"-c {name}={value}" for name, value in PG_SESSION_SETTINGS.items())

#: Built-in PostgreSQL type oids this module maps (checked against a PostgreSQL 15 pg_type by the tests).
pg_type_names: Final[dict[int, str]] = {
    16: "bool",
    17: "bytea",
    18: "char",
    19: "name",
    20: "int8",
    21: "int2",
    23: "int4",
    25: "text",
    26: "oid",
    114: "json",
    142: "xml",
    650: "cidr",
    700: "float4",
    701: "float8",
    869: "inet",
    1042: "bpchar",
    1043: "varchar",
    1082: "date",
    1083: "time",
    1114: "timestamp",
    1184: "timestamptz",
    1186: "interval",
    1266: "timetz",
    1700: "numeric",
    2950: "uuid",
    3802: "jsonb",
    # arrays
    143: "_xml",
    199: "_json",
    651: "_cidr",
    1000: "_bool",
    1001: "_bytea",
    1002: "_char",
    1003: "_name",
    1005: "_int2",
    1007: "_int4",
    1009: "_text",
    1014: "_bpchar",
    1015: "_varchar",
    1016: "_int8",
    1021: "_float4",
    1022: "_float8",
    1028: "_oid",
    1041: "_inet",
    1115: "_timestamp",
    1182: "_date",
    1183: "_time",
    1185: "_timestamptz",
    1187: "_interval",
    1231: "_numeric",
    1270: "_timetz",
    2951: "_uuid",
    3807: "_jsonb",
}

_OID_BY_NAME: Final = {name: oid for oid, name in pg_type_names.items()}


@dataclass(frozen=True, slots=True)
class MappingPolicy:
    """Choices where PostgreSQL and DuckDB differ and no mapping is both exact and convenient.

    * ``enums``: ``"varchar"`` (default) stores enum labels as text: every value survives, and a label
      added later with ``ALTER TYPE ... ADD VALUE`` (which pgoutput does not announce) keeps working, but
      ordering is by text, not label order. ``"enum"`` maps to a DuckDB ``ENUM`` of the labels given
      (PostgreSQL's order), and a value with an unknown label fails the cast.
    * ``numeric_nan``: PostgreSQL allows ``NaN`` even in ``numeric(p,s)``; DuckDB ``DECIMAL`` has none.
      ``"error"`` (default) refuses it loudly; ``"null"`` stores NULL.
    * ``unconstrained_numeric``: plain ``numeric`` (and precision above 38) holds any number of digits,
      ``NaN`` and ``±Infinity``. ``"varchar"`` (default) keeps PostgreSQL's exact text; ``"double"``
      keeps NaN/Infinity but only ~17 significant digits.
    """

    enums: Literal["varchar", "enum"] = "varchar"
    numeric_nan: Literal["error", "null"] = "error"
    unconstrained_numeric: Literal["varchar", "double"] = "varchar"


_DEFAULT_POLICY: Final = MappingPolicy()

Converter = Callable[[bytes], Any]
TextConverter = Callable[[str], Any]
BulkConverter = Callable[[Sequence[bytes | None]], list[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnType:
    """How one PostgreSQL column lands in DuckDB.

    * ``sql_type``: the DuckDB column type (``DECIMAL(12,2)``, ``TIMESTAMPTZ``, ``INTEGER[]``, ...).
    * ``kind``: the conversion family (``"int"``, ``"decimal"``, ``"datetime"``, ``"array"``, ...).
    * ``converter``: one non-NULL PostgreSQL text value (``bytes``) to the Python value
      :func:`convert_column` produces for it.
    * ``value_type``: the DuckDB type those Python values load as. It equals ``sql_type`` when they are
      native values of the target (``int``, ``Decimal``, ``bytes``, ``UUID``, lists of them); otherwise
      (dates, times, intervals, JSON, enums, ...) they are text DuckDB casts exactly, and the values
      are staged as ``value_type`` (``VARCHAR``, ``VARCHAR[]``) and loaded with ``CAST(v AS sql_type)``.
      Python's datetime types cannot hold ``infinity``, BC years, ``24:00:00`` or month intervals.
    * ``lossless``: every value of the PostgreSQL type is stored exactly, except pathological edge
      values named in ``note`` (years after 294247 AD, an unpaired surrogate escape in ``json``), which
      DuckDB refuses with an error; nothing is silently altered. ``False`` when ordinary values cannot
      be stored (NaN in ``numeric(p,s)``), lose precision, or the type is unknown.
    * ``note``: why a mapping is inexact, what it assumes, or (``known=False``) a warning that the type
      is not understood and is kept as its text.
    * ``element`` and ``ndims`` describe arrays (``ndims == 0`` for scalars); ``enum_labels`` and
      ``numeric_nan`` record the policy the SQL cast must follow.
    """

    type_oid: int
    atttypmod: int
    pg_type: str
    sql_type: str
    kind: str
    value_type: str
    lossless: bool
    note: str | None = None
    known: bool = True
    element: ColumnType | None = None
    ndims: int = 0
    converter: Converter = field(repr=False, compare=False)
    text_converter: TextConverter = field(repr=False, compare=False)
    bulk: BulkConverter = field(repr=False, compare=False)
    enum_labels: tuple[str, ...] = ()
    numeric_nan: str = "error"


# --------------------------------------------------------------------------------------------
# Python converters (one per kind; chosen once per column)
# --------------------------------------------------------------------------------------------


def _decode(v: bytes) -> str:
    return v.decode()


def _same(s: str) -> str:
    return s


def _bool_b(v: bytes) -> bool:
    return v == b"t"


def _bool_s(s: str) -> bool:
    if s == "t":
        return True
    if s == "f":
        return False
    raise TypeMapError(f"invalid PostgreSQL boolean text {s!r}")


def _bc(s: str) -> str:
    """PostgreSQL ``YYYY-MM-DD[ time] BC`` -> DuckDB ``YYYY-MM-DD (BC)[ time]`` (same year numbering)."""
    body = s[:-3]
    i = body.find(" ")
    if i < 0:
        return body + " (BC)"
    return body[:i] + " (BC)" + body[i:]


def _datetime_s(s: str) -> str:
    return _bc(s) if s.endswith(" BC") else s


def _datetime_b(v: bytes) -> str:
    return _bc(v.decode()) if v.endswith(b" BC") else v.decode()


def _interval_s(s: str) -> str:
    # IntervalStyle=postgres: '-1 years -2 mons +3 days -04:05:06.5'. DuckDB reads it exactly except
    # the explicit '+' PostgreSQL puts on a positive field after a negative one; '+' occurs nowhere else.
    return s.replace("+", "")


def _interval_b(v: bytes) -> str:
    return v.decode().replace("+", "")


def _bytea_s(s: str) -> bytes:
    if not s.startswith("\\x"):
        raise TypeMapError(f"bytea text is not in hex format (bytea_output=hex): {s[:20]!r}")
    return bytes.fromhex(s[2:])


def _bytea_b(v: bytes) -> bytes:
    if not v.startswith(b"\\x"):
        raise TypeMapError(f"bytea text is not in hex format (bytea_output=hex): {v[:20]!r}")
    return unhexlify(memoryview(v)[2:])


def _uuid_b(v: bytes) -> UUID:
    return UUID(v.decode())


def _float_b(v: bytes) -> float:
    return float(v)


def _int_b(v: bytes) -> int:
    return int(v)


def _decimal_converters(nan: str, sql_type: str) -> tuple[Converter, TextConverter]:
    def text(s: str) -> Decimal | None:
        if s == "NaN":
            if nan == "null":
                return None
            raise TypeMapError(
                f"numeric NaN cannot be stored in {sql_type} (MappingPolicy.numeric_nan='error'); "
                "use numeric_nan='null' to store it as NULL"
            )
        return Decimal(s)

    def raw(v: bytes) -> Decimal | None:
        return text(v.decode())

    return raw, text


def _bulk_of(conv: Converter) -> BulkConverter:
    def bulk(values: Sequence[bytes | None]) -> list[Any]:
        return [None if v is None else conv(v) for v in values]

    return bulk


def _bulk_text(values: Sequence[bytes | None]) -> list[Any]:
    return [None if v is None else v.decode() for v in values]


def _bulk_int(values: Sequence[bytes | None]) -> list[Any]:
    return [None if v is None else int(v) for v in values]


def _bulk_float(values: Sequence[bytes | None]) -> list[Any]:
    return [None if v is None else float(v) for v in values]


def _bulk_bool(values: Sequence[bytes | None]) -> list[Any]:
    return [None if v is None else v == b"t" for v in values]


def _bulk_datetime(values: Sequence[bytes | None]) -> list[Any]:
    # 67 is 'C': only a BC value ends with it.
    return [None if v is None else (_bc(v.decode()) if v[-1] == 67 else v.decode()) for v in values]


# --------------------------------------------------------------------------------------------
# PostgreSQL array text
# --------------------------------------------------------------------------------------------

_ARRAY_TOKEN: Final = re.compile(r'"((?:[^"\\]|\\.)*)"|([{}])|(,)|([^,{}"]+)', re.S)
_UNESCAPE: Final = re.compile(r"\\(.)", re.S)


def parse_array(text: str, ndims: int = 1) -> list[Any]:
    """Parse PostgreSQL array output text into nested lists of ``str | None`` (``ndims`` levels).

    Handles quoting and backslash escapes, unquoted ``NULL`` (an SQL NULL) versus quoted ``"NULL"``
    (a string), and the ``[lower:upper]=`` prefix of arrays whose bounds do not start at 1 (the bounds
    are dropped). ``{}`` is an empty list whatever ``ndims`` is. A value with another number of
    dimensions, or malformed text, raises :class:`TypeMapError`.
    """
    body = text
    if body.startswith("["):
        eq = body.find("=")
        if eq < 0:
            raise TypeMapError(f"malformed array text {text[:60]!r}")
        body = body[eq + 1 :]
    stack: list[list[Any]] = []
    result: list[Any] | None = None
    pos = 0
    end = len(body)
    expect_item = True  # at the start of a list or after a comma
    while pos < end:
        m = _ARRAY_TOKEN.match(body, pos)
        if m is None:
            raise TypeMapError(f"malformed array text {text[:60]!r} at offset {pos}")
        pos = m.end()
        quoted, brace, comma, bare = m.groups()
        if brace == "{":
            if result is not None or not expect_item:
                raise TypeMapError(f"malformed array text {text[:60]!r}")
            if stack and len(stack) >= ndims:
                raise TypeMapError(f"array {text[:60]!r} has more than {ndims} dimension(s)")
            new: list[Any] = []
            if stack:
                stack[-1].append(new)
            stack.append(new)
            continue
        if brace == "}":
            if not stack:
                raise TypeMapError(f"malformed array text {text[:60]!r}")
            done = stack.pop()
            expect_item = False
            if not stack:
                result = done
            continue
        if comma is not None:
            if expect_item or not stack:
                raise TypeMapError(f"malformed array text {text[:60]!r}")
            expect_item = True
            continue
        if not stack or not expect_item:
            raise TypeMapError(f"malformed array text {text[:60]!r}")
        if len(stack) != ndims:
            raise TypeMapError(f"array {text[:60]!r} has fewer than {ndims} dimension(s)")
        if quoted is not None:
            stack[-1].append(_UNESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted)
        else:
            stack[-1].append(None if bare.upper() == "NULL" else bare)
        expect_item = False
    if result is None or stack:
        raise TypeMapError(f"malformed array text {text[:60]!r}")
    if ndims > 1 and result and not isinstance(result[0], list):
        raise TypeMapError(f"array {text[:60]!r} has fewer than {ndims} dimension(s)")
    return result


def _map_nested(items: list[Any], conv: TextConverter, depth: int) -> list[Any]:
    if depth == 1:
        return [None if e is None else conv(e) for e in items]
    return [_map_nested(sub, conv, depth - 1) for sub in items]


def _array_converters(element: ColumnType, ndims: int) -> tuple[Converter, TextConverter]:
    conv = element.text_converter

    def text(s: str) -> list[Any]:
        return _map_nested(parse_array(s, ndims), conv, ndims)

    def raw(v: bytes) -> list[Any]:
        return text(v.decode())

    return raw, text


# --------------------------------------------------------------------------------------------
# COPY text format
# --------------------------------------------------------------------------------------------

_COPY_ESCAPE: Final = re.compile(rb"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)", re.S)
_COPY_SIMPLE: Final = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _copy_unescape(m: re.Match[bytes]) -> bytes:
    seq = m.group(1)
    simple = _COPY_SIMPLE.get(seq)
    if simple is not None:
        return simple
    if seq[0] == 0x78 and len(seq) > 1:  # 'x'
        return bytes((int(seq[1:], 16),))
    if 0x30 <= seq[0] <= 0x37:
        return bytes((int(seq, 8) & 0xFF,))
    return seq


def copy_text_fields(line: bytes, *, ncols: int | None = None) -> list[bytes | None]:
    """Split one ``COPY ... TO STDOUT`` text-format line into the raw text values pgoutput would send.

    Fields are tab-separated, ``\\N`` is NULL and backslash escapes (``\\\\``, ``\\t``, ``\\n``, octal,
    ``\\x`` hex, ...) are undone. A trailing newline is ignored. With ``ncols`` a wrong field count raises
    :class:`TypeMapError`.
    """
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    fields: list[bytes | None] = []
    for f in line.split(b"\t"):
        if f == b"\\N":
            fields.append(None)
        elif b"\\" in f:
            fields.append(_COPY_ESCAPE.sub(_copy_unescape, f))
        else:
            fields.append(f)
    if ncols is not None and len(fields) != ncols:
        raise TypeMapError(f"COPY line has {len(fields)} fields, expected {ncols}")
    return fields


# --------------------------------------------------------------------------------------------
# The mapping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scalar:
    sql_type: str
    kind: str
    native: bool  # converter output is a native value of sql_type
    converter: Converter
    text_converter: TextConverter
    bulk: BulkConverter
    lossless: bool = True
    note: str | None = None


def _scalar(
    sql_type: str,
    kind: str,
    *,
    native: bool,
    raw: Converter,
    text: TextConverter,
    bulk: BulkConverter | None = None,
    lossless: bool = True,
    note: str | None = None,
) -> _Scalar:
    return _Scalar(sql_type, kind, native, raw, text, bulk or _bulk_of(raw), lossless, note)


def _text_like(note: str | None = None) -> _Scalar:
    """A type kept as its exact PostgreSQL text in a VARCHAR column."""
    return _scalar("VARCHAR", "text", native=True, raw=_decode, text=_same, bulk=_bulk_text, note=note)


def _float_like(sql_type: str) -> _Scalar:
    return _scalar(
        sql_type,
        "float",
        native=True,
        raw=_float_b,
        text=float,
        bulk=_bulk_float,
        note="NaN, Infinity, -Infinity and -0 are kept",
    )


_INET_NOTE: Final = (
    "kept as text: DuckDB's inet extension is not available offline; network operators and ordering are lost"
)

_TS_RANGE_NOTE: Final = (
    "infinity, -infinity and BC values are kept; PostgreSQL allows years up to 294276 AD, DuckDB only "
    "to 294247-01-10, so a later value is refused with an error"
)

_FIXED: Final[dict[str, _Scalar]] = {
    "bool": _scalar("BOOLEAN", "bool", native=True, raw=_bool_b, text=_bool_s, bulk=_bulk_bool),
    "int2": _scalar("SMALLINT", "int", native=True, raw=_int_b, text=int, bulk=_bulk_int),
    "int4": _scalar("INTEGER", "int", native=True, raw=_int_b, text=int, bulk=_bulk_int),
    "int8": _scalar("BIGINT", "int", native=True, raw=_int_b, text=int, bulk=_bulk_int),
    "oid": _scalar("UINTEGER", "int", native=True, raw=_int_b, text=int, bulk=_bulk_int),
    "float4": _float_like("REAL"),
    "float8": _float_like("DOUBLE"),
    "text": _text_like(),
    "varchar": _text_like("the length limit is not enforced by DuckDB"),
    "bpchar": _text_like(
        "char(n) keeps the blank padding PostgreSQL sends; DuckDB compares it as ordinary text "
        "(PostgreSQL ignores trailing blanks when comparing char(n))"
    ),
    "char": _text_like(),
    "name": _text_like(),
    "xml": _text_like("XML document text"),
    "bytea": _scalar("BLOB", "bytea", native=True, raw=_bytea_b, text=_bytea_s, note="assumes bytea_output=hex"),
    "uuid": _scalar("UUID", "uuid", native=True, raw=_uuid_b, text=UUID),
    "date": _scalar(
        "DATE",
        "datetime",
        native=False,
        raw=_datetime_b,
        text=_datetime_s,
        bulk=_bulk_datetime,
        note="infinity, -infinity and BC dates are kept",
    ),
    "time": _scalar("TIME", "time", native=False, raw=_decode, text=_same, bulk=_bulk_text, note="24:00:00 is kept"),
    "timetz": _scalar(
        "TIMETZ",
        "time",
        native=False,
        raw=_decode,
        text=_same,
        bulk=_bulk_text,
        note="the time and its UTC offset are both kept",
    ),
    "timestamp": _scalar(
        "TIMESTAMP",
        "datetime",
        native=False,
        raw=_datetime_b,
        text=_datetime_s,
        bulk=_bulk_datetime,
        note=_TS_RANGE_NOTE,
    ),
    "timestamptz": _scalar(
        "TIMESTAMPTZ",
        "datetime",
        native=False,
        raw=_datetime_b,
        text=_datetime_s,
        bulk=_bulk_datetime,
        note=_TS_RANGE_NOTE + "; assumes TimeZone=UTC text (any offset is read exactly)",
    ),
    "interval": _scalar(
        "INTERVAL",
        "interval",
        native=False,
        raw=_interval_b,
        text=_interval_s,
        note="months, days and microseconds are kept separately (as in PostgreSQL); assumes IntervalStyle=postgres",
    ),
    "json": _scalar(
        "JSON",
        "json",
        native=False,
        raw=_decode,
        text=_same,
        bulk=_bulk_text,
        note="the document text is kept as PostgreSQL stored it (DuckDB's JSON type is built in); a json "
        "document with an unpaired surrogate escape ('\\ud800'), which jsonb would reject, is refused by DuckDB",
    ),
    "jsonb": _scalar(
        "JSON",
        "json",
        native=False,
        raw=_decode,
        text=_same,
        bulk=_bulk_text,
        note="jsonb's canonical text is kept",
    ),
    "inet": _text_like(_INET_NOTE),
    "cidr": _text_like(_INET_NOTE),
}


def _numeric(atttypmod: int, policy: MappingPolicy) -> tuple[_Scalar, str]:
    """The mapping for numeric with this typmod, and the PostgreSQL type spelled out."""
    if atttypmod >= 4:
        t = atttypmod - 4
        precision = (t >> 16) & 0xFFFF
        scale = ((t & 0x7FF) ^ 1024) - 1024  # PostgreSQL 15: an 11-bit signed scale (may be < 0 or > p)
        pg = f"numeric({precision},{scale})"
        if scale < 0:
            width, dscale = precision - scale, 0
        else:
            width, dscale = max(precision, scale), scale
        if width <= 38:
            sql = f"DECIMAL({width},{dscale})"
            raw, text = _decimal_converters(policy.numeric_nan, sql)
            nan = "refused with an error" if policy.numeric_nan == "error" else "stored as NULL"
            return (
                _scalar(
                    sql,
                    "decimal",
                    native=True,
                    raw=raw,
                    text=text,
                    lossless=False,
                    note=f"exact for every number; NaN (which PostgreSQL allows in {pg}) has no DECIMAL "
                    f"equivalent and is {nan}",
                ),
                pg,
            )
        why = f"precision {width} exceeds DuckDB's DECIMAL limit of 38"
    else:
        pg = "numeric"
        why = "unconstrained numeric may hold any number of digits, NaN and Infinity"
    if policy.unconstrained_numeric == "double":
        return (
            _scalar(
                "DOUBLE",
                "float",
                native=True,
                raw=_float_b,
                text=float,
                bulk=_bulk_float,
                lossless=False,
                note=f"{why}: stored as DOUBLE, NaN and ±Infinity kept, digits beyond ~17 significant lost",
            ),
            pg,
        )
    return (
        _scalar(
            "VARCHAR",
            "numeric_text",
            native=True,
            raw=_decode,
            text=_same,
            bulk=_bulk_text,
            note=f"{why}: kept as PostgreSQL's exact text; CAST to DECIMAL or DOUBLE when querying",
        ),
        pg,
    )


def _sql_string(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _from_scalar(oid: int, typmod: int, pg: str, sc: _Scalar, policy: MappingPolicy) -> ColumnType:
    return ColumnType(
        type_oid=oid,
        atttypmod=typmod,
        pg_type=pg,
        sql_type=sc.sql_type,
        kind=sc.kind,
        value_type=sc.sql_type if sc.native else "VARCHAR",
        lossless=sc.lossless,
        note=sc.note,
        converter=sc.converter,
        text_converter=sc.text_converter,
        bulk=sc.bulk,
        numeric_nan=policy.numeric_nan,
    )


def _unknown(oid: int, typmod: int, type_name: str | None, why: str) -> ColumnType:
    shown = type_name or f"oid {oid}"
    return ColumnType(
        type_oid=oid,
        atttypmod=typmod,
        pg_type=shown,
        sql_type="VARCHAR",
        kind="unknown",
        value_type="VARCHAR",
        lossless=False,
        known=False,
        note=f"warning: {why} PostgreSQL type {shown!r}; kept as its PostgreSQL text in VARCHAR",
        converter=_decode,
        text_converter=_same,
        bulk=_bulk_text,
    )


def _enum(oid: int, typmod: int, type_name: str | None, labels: Sequence[str], policy: MappingPolicy) -> ColumnType:
    shown = type_name or f"enum oid {oid}"
    if policy.enums == "enum" and labels:
        sql = "ENUM(" + ", ".join(_sql_string(label) for label in labels) + ")"
        note = (
            "DuckDB ENUM with PostgreSQL's label order; a label added later with ALTER TYPE ... ADD VALUE "
            "is not announced by pgoutput and fails the cast until the column is re-typed"
        )
    else:
        sql = "VARCHAR"
        note = "enum labels kept as text; ordering is by text, not by label order"
    return ColumnType(
        type_oid=oid,
        atttypmod=typmod,
        pg_type=shown,
        sql_type=sql,
        kind="enum",
        value_type="VARCHAR",
        lossless=True,
        note=note,
        converter=_decode,
        text_converter=_same,
        bulk=_bulk_text,
        enum_labels=tuple(labels),
    )


def _array(oid: int, typmod: int, pg_name: str, element: ColumnType, ndims: int) -> ColumnType:
    if ndims < 1:
        raise ValueError(f"array_ndims must be at least 1, got {ndims}")
    raw, text = _array_converters(element, ndims)
    brackets = "[]" * ndims
    notes = [
        f"{ndims}-dimensional; a value with another number of dimensions is refused with an error "
        "(pass pg_attribute.attndims as array_ndims); non-default lower bounds ('[0:2]={...}') are dropped"
    ]
    if element.note:
        notes.append(f"elements: {element.note}")
    return ColumnType(
        type_oid=oid,
        atttypmod=typmod,
        pg_type=pg_name,
        sql_type=element.sql_type + brackets,
        kind="array",
        value_type=element.value_type + brackets,
        lossless=element.lossless,
        note="; ".join(notes),
        element=element,
        ndims=ndims,
        converter=raw,
        text_converter=text,
        bulk=_bulk_of(raw),
        numeric_nan=element.numeric_nan,
    )


def _builtin_scalar(oid: int, name: str, typmod: int, policy: MappingPolicy) -> ColumnType | None:
    if name == "numeric":
        sc, pg = _numeric(typmod, policy)
        return _from_scalar(oid, typmod, pg, sc, policy)
    sc2 = _FIXED.get(name)
    if sc2 is None:
        return None
    return _from_scalar(oid, typmod, name, sc2, policy)


def duckdb_type(
    type_oid: int,
    atttypmod: int = -1,
    *,
    type_name: str | None = None,
    enum_labels: Sequence[str] | None = None,
    element_oid: int | None = None,
    array_ndims: int = 1,
    policy: MappingPolicy | None = None,
) -> ColumnType:
    """Map a PostgreSQL column type to DuckDB. Never raises for an unknown type.

    ``type_oid`` and ``atttypmod`` come from a pgoutput Relation column (or ``pg_attribute``).
    Non-builtin types are identified by what the caller knows about them:

    * ``type_name``: the name from a pgoutput Type message or ``pg_type``. pgoutput names a domain by
      its *base* type (``int4``), so a domain over a builtin maps like the builtin (its typmod, which
      lives in ``pg_type.typtypmod`` and not in the Relation message, is unknown: ``numeric`` domains
      map as unconstrained). ``_name`` is an array of ``name``.
    * ``enum_labels``: the type is an enum (labels from ``pg_enum`` in ``enumsortorder``).
    * ``element_oid``: the type is an array of that element type (an array of an enum, say); the
      element is resolved with ``type_name``/``enum_labels`` as above.
    * ``array_ndims``: dimensions of array columns (``pg_attribute.attndims``; the Relation message
      does not carry it). Default 1.

    An oid that is none of these maps to VARCHAR with ``known=False`` and a warning in ``note``.
    """
    pol = policy or _DEFAULT_POLICY
    if element_oid is not None:
        elem_name = type_name[1:] if type_name and type_name.startswith("_") else type_name
        element = duckdb_type(element_oid, atttypmod, type_name=elem_name, enum_labels=enum_labels, policy=pol)
        if element.kind in ("array", "unknown"):
            return _unknown(type_oid, atttypmod, type_name, f"array of an unsupported element type ({element.pg_type})")
        return _array(type_oid, atttypmod, type_name or f"{element.pg_type}[]", element, array_ndims)
    if enum_labels is not None:
        return _enum(type_oid, atttypmod, type_name, enum_labels, pol)
    name = pg_type_names.get(type_oid)
    if name is None and type_name is not None:
        name = type_name if type_name in _OID_BY_NAME else None
    if name is None:
        return _unknown(type_oid, atttypmod, type_name, "unknown")
    if name.startswith("_"):
        inner = _builtin_scalar(_OID_BY_NAME[name[1:]], name[1:], atttypmod, pol)
        assert inner is not None  # every array in pg_type_names has a mapped element
        return _array(type_oid, atttypmod, f"{inner.pg_type}[]", inner, array_ndims)
    ct = _builtin_scalar(type_oid, name, atttypmod, pol)
    assert ct is not None
    return ct


def convert_column(ct: ColumnType, values: Sequence[bytes | None]) -> list[Any]:
    """Convert a column of PostgreSQL text values (``None`` for NULL) to Python values of ``ct.value_type``.

    One converter is chosen for the column up front; NULLs stay ``None``. Raises :class:`TypeMapError`
    for a value that cannot be converted (malformed array text, NaN into DECIMAL under the default
    policy); plain Python errors (``ValueError``) for text the type's converter rejects.
    """
    return ct.bulk(values)


# --------------------------------------------------------------------------------------------
# DuckDB SQL casts
# --------------------------------------------------------------------------------------------

_QUOTED: Final = r'"(?:[^"\\]|\\.)*"'
_ARRAY_ITEM_SQL: Final = "(?s)" + _QUOTED + "|[^,]+"


def _brace_group(levels: int) -> str:
    """RE2 pattern for one ``{...}`` group holding ``levels`` levels of braces (quote-aware)."""
    pattern = r"\{(?:" + _QUOTED + r'|[^"{}])*\}'
    for _ in range(levels - 1):
        pattern = r"\{(?:" + _QUOTED + "|" + pattern + r'|[^"{}])*\}'
    return "(?s)" + pattern


def _scalar_cast(ct: ColumnType, x: str) -> str:
    kind = ct.kind
    if kind in ("text", "numeric_text", "unknown"):
        return x
    if kind == "enum":
        return x if ct.sql_type == "VARCHAR" else f"CAST({x} AS {ct.sql_type})"
    if kind == "bytea":
        return f"unhex(substr({x}, 3))"
    if kind == "datetime":
        # PostgreSQL 'YYYY-MM-DD[ time] BC' -> DuckDB 'YYYY-MM-DD (BC)[ time]'. A plain CAST would not
        # fail on ' BC': DuckDB's TIMESTAMP cast silently ignores it and stores the AD year.
        bc = rf"regexp_replace({x}, '^([0-9]+-[0-9]+-[0-9]+)(.*) BC$', '\1 (BC)\2')"
        fixed = f"CASE WHEN suffix({x}, ' BC') THEN {bc} ELSE {x} END"
        return f"CAST({fixed} AS {ct.sql_type})"
    if kind == "interval":
        return f"CAST(replace({x}, '+', '') AS INTERVAL)"
    if kind == "decimal":
        if ct.numeric_nan == "null":
            return f"CASE WHEN {x} = 'NaN' THEN NULL ELSE CAST({x} AS {ct.sql_type}) END"
        msg = _sql_string(f"numeric NaN cannot be stored in {ct.sql_type} (MappingPolicy.numeric_nan='error')")
        return f"CASE WHEN {x} = 'NaN' THEN error({msg}) ELSE CAST({x} AS {ct.sql_type}) END"
    # bool, int, float, uuid, time, json
    return f"CAST({x} AS {ct.sql_type})"


def _array_cast(ct: ColumnType, x: str) -> str:
    element = ct.element
    assert element is not None
    n = ct.ndims
    # Drop a '[lower:upper]=' prefix, then check the number of dimensions: PostgreSQL arrays are
    # rectangular and an element starting with '{' is always quoted, so the leading braces count them.
    body = f"CASE WHEN starts_with({x}, '[') THEN substr({x}, strpos({x}, '=') + 1) ELSE {x} END"
    msg = _sql_string(f"array value does not have {n} dimension(s) (the mapped type is {ct.sql_type})")
    opening = "{" * n
    checked = (
        f"CASE WHEN p IS NULL OR p = '{{}}' OR (starts_with(p, '{opening}') AND NOT starts_with(p, '{opening}{{')) "
        f"THEN p ELSE error({msg}) END"
    )
    unquote = (
        r"""CASE WHEN starts_with(t, '"') THEN regexp_replace(substr(t, 2, length(t) - 2), '\\(.)', '\1', 'g') """
        "WHEN upper(t) = 'NULL' THEN NULL ELSE t END"
    )

    def level(expr: str, remaining: int) -> str:
        inner = f"substr({expr}, 2, length({expr}) - 2)"
        if remaining == 1:
            items = f"regexp_extract_all({inner}, {_sql_string(_ARRAY_ITEM_SQL)})"
            return (
                f"list_transform(list_transform({items}, lambda t: {unquote}), lambda e: {_scalar_cast(element, 'e')})"
            )
        var = f"a{remaining - 1}"
        groups = f"regexp_extract_all({inner}, {_sql_string(_brace_group(remaining - 1))})"
        return f"list_transform({groups}, lambda {var}: {level(var, remaining - 1)})"

    # A one-element list binds an intermediate value to a lambda name so it is computed once.
    bound = f"list_transform([{body}], lambda p: {checked})[1]"
    return f"CAST(list_transform([{bound}], lambda b: {level('b', n)})[1] AS {ct.sql_type})"


def duckdb_cast_expr(ct: ColumnType, column_sql: str) -> str:
    """A DuckDB SQL expression casting ``column_sql`` (VARCHAR holding the PostgreSQL text) to ``ct.sql_type``.

    Exact: no ``TRY_CAST``; a value that cannot be represented raises in DuckDB. ``column_sql`` is
    inserted as written (a quoted identifier or an expression) and may be evaluated more than once.
    NULL stays NULL.
    """
    if ct.kind == "array":
        return _array_cast(ct, column_sql)
    return _scalar_cast(ct, column_sql)
