"""The initial load's typed parse must land exactly the values the text parse plus SQL casts land."""

from __future__ import annotations

import itertools

import duckdb
import pyarrow as pa
import pytest

from pgbridge.cdc import copytext
from pgbridge.cdc.catalog import SourceColumn, SourceTable, sink_table
from pgbridge.cdc.copytext import CHUNK_BYTES, copy_plan, parse_copy_text, pieces
from pgbridge.cdc.sinks.base import SinkColumn, SinkTable
from pgbridge.cdc.snapshot import _MAX_SPAN, _next_span, _span_end
from pgbridge.cdc.typemap import duckdb_type

# (pg type oid, atttypmod, PostgreSQL text values as COPY prints them with pgbridge's session settings)
NUMERIC_12_2 = ((12 << 16) | 2) + 4
COLUMNS = [
    (20, -1, ["0", "-9223372036854775808", "9223372036854775807", "42"]),
    (23, -1, ["-2147483648", "2147483647", "0", "7"]),
    (21, -1, ["-32768", "32767", "1", "2"]),
    (26, -1, ["0", "4294967295", "1", "3"]),
    (700, -1, ["1.5", "-0", "3.4028235e+38", "1e-45"]),
    (701, -1, ["0.1", "-1.7976931348623157e+308", "5e-324", "-0"]),
    (16, -1, ["t", "f", "t", "f"]),
    (1700, NUMERIC_12_2, ["0.00", "-9999999999.99", "9999999999.99", "1.05"]),
    (1082, -1, ["2024-02-29", "0001-01-01", "9999-12-31", "1970-01-01"]),
    (
        1114,
        -1,
        ["2024-01-01 00:00:00", "0001-01-01 00:00:00.000001", "9999-12-31 23:59:59.999999", "2000-01-01 12:00:00"],
    ),
    (
        1184,
        -1,
        [
            "2024-01-01 00:00:00+00",
            "0001-01-01 00:00:00.5+00",
            "9999-12-31 23:59:59.999999+00",
            "2000-01-01 01:02:03+00",
        ],
    ),
    (25, -1, ["plain", "tab\\there", "back\\\\slash", "é"]),
]
# Values the typed parser refuses (the chunk then goes through the text parse and the SQL casts).
REFUSED = {
    1082: ["infinity", "-infinity", "0044-03-15 BC"],
    1114: ["infinity", "0044-03-15 12:00:00 BC"],
    1184: ["-infinity", "0044-03-15 12:00:00+00 BC"],
}


def table_of(oids: list[tuple[int, int]]) -> tuple[SourceTable, SinkTable]:
    cols = tuple(
        SourceColumn(f"c{i}", oid, mod, duckdb_type(oid, mod).pg_type, attnum=i + 1)
        for i, (oid, mod) in enumerate([(20, -1), *oids])
    )
    st = SourceTable("s", "t", 1, 1, 1.0, 1, cols, "d", (0,))
    return st, sink_table(st)


def load(stt: SinkTable, buf: bytearray, typed: bool) -> tuple[list[tuple[object, ...]], bool]:
    con = duckdb.connect()
    con.execute("CREATE SCHEMA s")
    con.execute(f"CREATE TABLE s.t ({', '.join(f'{c.name} {c.ctype.sql_type}' for c in stt.columns)})")
    plan = copy_plan(SourceTable("s", "t", 1, 1, 1.0, 1, (), "d", (0,)), stt, "s.t")
    table, was_typed = parse_copy_text(buf, plan.types if typed else (None,) * plan.ncols, check_utf8=True)
    con.register("_pgb_load", table)
    con.execute(plan.insert_typed if was_typed else plan.insert_text)
    return con.execute("SELECT * FROM s.t ORDER BY c0").fetchall(), was_typed


def test_typed_parse_equals_text_parse_and_casts() -> None:
    _, stt = table_of([(oid, mod) for oid, mod, _ in COLUMNS])
    lines = []
    for r in range(4):
        lines.append("\t".join([str(r), *(values[r] for _, _, values in COLUMNS)]))
    lines.append("\t".join(["9", *("\\N" for _ in COLUMNS)]))
    buf = bytearray(("\n".join(lines) + "\n").encode())
    typed_rows, was_typed = load(stt, buf, typed=True)
    text_rows, _ = load(stt, buf, typed=False)
    assert was_typed
    assert typed_rows == text_rows
    assert [c.ctype.sql_type for c in stt.columns][1:5] == ["BIGINT", "INTEGER", "SMALLINT", "UINTEGER"]
    assert text_rows[1][-1] == "tab\there" and text_rows[2][-1] == "back\\slash"


@pytest.mark.parametrize("oid", sorted(REFUSED))
def test_values_the_typed_parser_refuses_go_through_the_casts(oid: int) -> None:
    _, stt = table_of([(oid, -1), (25, -1)])
    good = {1082: "2024-01-01", 1114: "2024-01-01 00:00:00", 1184: "2024-01-01 00:00:00+00"}
    for value in REFUSED[oid]:
        buf = bytearray(f"1\t{good[oid]}\tx\n2\t{value}\ty\\\\z\n".encode())
        rows, was_typed = load(stt, buf, typed=True)
        expected, _ = load(stt, buf, typed=False)
        assert not was_typed and rows == expected and rows[1][2] == "y\\z"


@pytest.mark.parametrize("oid", [700, 701])
def test_float_specials_parse_as_the_casts_do(oid: int) -> None:
    _, stt = table_of([(oid, -1)])
    buf = bytearray(b"1\tNaN\n2\tInfinity\n3\t-Infinity\n4\t-0\n")
    rows, was_typed = load(stt, buf, typed=True)
    expected, _ = load(stt, buf, typed=False)
    assert was_typed and [repr(r) for r in rows] == [repr(r) for r in expected]
    assert repr(rows[3][1]) == "-0.0"


def test_nan_in_a_decimal_still_names_the_problem() -> None:
    _, stt = table_of([(1700, NUMERIC_12_2)])
    with pytest.raises(duckdb.Error, match="NaN"):
        load(stt, bytearray(b"1\t1.00\n2\tNaN\n"), typed=True)


def test_only_exact_parsers_are_used() -> None:
    st, stt = table_of([(1700, -1), (2950, -1), (1186, -1), (3802, -1), (1009, -1)])
    plan = copy_plan(st, stt, "s.t")
    assert plan.types[1:] == (None,) * 5  # numeric text, uuid, interval, jsonb, text[]: cast in SQL
    assert isinstance(stt.columns[0], SinkColumn)


def test_spans_cover_a_range_and_follow_the_text_size() -> None:
    assert _span_end(0, 64, 100, 1000) == 64 and _span_end(64, 64, 100, 1000) == 100
    assert _span_end(900, 64, None, 1000) == 964 and _span_end(960, 64, None, 1000) is None
    assert _span_end(0, 64, None, 0) is None  # an empty table: one open-ended COPY
    assert _next_span(64, CHUNK_BYTES // 2) == 128 and _next_span(64, CHUNK_BYTES * 64) == 1
    assert _next_span(64, 0) == 256  # empty pages: look further, but not unboundedly
    assert _next_span(_MAX_SPAN, 0) == _MAX_SPAN and _next_span(1024, 1) == _MAX_SPAN  # capped in pages too


def test_a_span_is_parsed_in_line_aligned_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copytext, "CHUNK_BYTES", 10)
    text = b"".join(b"%d\tx%d\n" % (i, i) for i in range(100)) + b"7\t" + b"y" * 40 + b"\n"
    cuts = pieces(text)
    assert cuts[0][0] == 0 and cuts[-1][1] == len(text) and len(cuts) > 10
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cuts))
    assert all(text[b - 1 : b] == b"\n" and b - a >= 10 for a, b in cuts[:-1])
    assert pieces(b"") == [(0, 0)] and pieces(b"1\t" + b"z" * 30 + b"\n") == [(0, 33)]
    rows = [
        r
        for a, b in cuts
        for r in zip(
            *parse_copy_text(text, (pa.int64(), None), check_utf8=True, piece=(a, b))[0].to_pydict().values(),
            strict=True,
        )
    ]
    assert rows == [*((i, f"x{i}") for i in range(100)), (7, "y" * 40)]
