"""The binary COPY decoder (cdc/_copybin.c, wrapped by cdc/copybinary.py) on hand-made COPY output.

The real server's output is checked against the text path in tests/integration/test_snapshot.py;
here: each kind's values and NULLs, what the decoder must refuse, and malformed input (which must
be refused, never crash).
"""

from __future__ import annotations

import datetime as dt
import math
import random
import struct
from decimal import Decimal

import pyarrow as pa
import pytest

from pgbridge.cdc.columnar import Unsupported
from pgbridge.cdc.copybinary import BinaryPlan, decode_binary

_copybin = pytest.importorskip("pgbridge.cdc._copybin", reason="the C extension was not built (no compiler)")

HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
PG_EPOCH = dt.datetime(2000, 1, 1)


def copy_out(rows: list[list[bytes | None]]) -> bytes:
    parts = [HEADER]
    for row in rows:
        parts.append(struct.pack(">h", len(row)))
        for v in row:
            parts.append(struct.pack(">i", -1) if v is None else struct.pack(">i", len(v)) + v)
    return b"".join([*parts, b"\xff\xff"])


def pg_numeric(d: Decimal, dscale: int) -> bytes:
    """PostgreSQL's binary numeric: base-10000 digits around the decimal point, weight, sign, dscale."""
    sign = 0x4000 if d < 0 else 0
    whole, _, frac = f"{abs(d):f}".partition(".")
    whole = whole.lstrip("0")
    whole = whole.rjust(-(-len(whole) // 4) * 4, "0")
    frac = frac.ljust(-(-len(frac) // 4) * 4, "0")
    digits = [int(whole[i : i + 4]) for i in range(0, len(whole), 4)]
    digits += [int(frac[i : i + 4]) for i in range(0, len(frac), 4)]
    weight = len(whole) // 4 - 1
    while digits and digits[0] == 0:
        digits.pop(0)
        weight -= 1
    while digits and digits[-1] == 0:
        digits.pop()
    if not digits:
        weight = 0
    return struct.pack(">hhHh", len(digits), weight, sign, dscale) + b"".join(struct.pack(">H", x) for x in digits)


def plan(kinds: str, types: list[pa.DataType | None], scales: list[int] | None = None) -> BinaryPlan:
    return BinaryPlan("", kinds.encode(), bytes(scales or [0] * len(kinds)), tuple(types))


def test_every_kind_with_its_nulls() -> None:
    when = dt.datetime(2024, 2, 29, 12, 30, 15, 123456)
    us = (when - PG_EPOCH) // dt.timedelta(microseconds=1)
    rows: list[list[bytes | None]] = [
        [
            struct.pack(">h", -32768),
            struct.pack(">i", 2**31 - 1),
            struct.pack(">q", -(2**63)),
            struct.pack(">I", 2**32 - 1),
            struct.pack(">f", -0.0),
            struct.pack(">d", math.inf),
            b"\x01",
            struct.pack(">i", (dt.date(1, 1, 1) - PG_EPOCH.date()).days),
            struct.pack(">q", us),
            pg_numeric(Decimal("-12345.67"), 2),
            "tab\there é 😀".encode(),
        ],
        [None] * 11,
        [
            struct.pack(">h", 7),
            struct.pack(">i", -1),
            struct.pack(">q", 2**63 - 1),
            struct.pack(">I", 0),
            struct.pack(">f", math.nan),
            struct.pack(">d", -1e-300),
            b"\x00",
            struct.pack(">i", (dt.date(9999, 12, 31) - PG_EPOCH.date()).days),
            struct.pack(">q", 0),
            pg_numeric(Decimal(0), 2),
            b"",
        ],
    ]
    types = [pa.int16(), pa.int32(), pa.int64(), pa.uint32(), pa.float32(), pa.float64(), pa.bool_(), pa.date32()]
    types += [pa.timestamp("us"), pa.decimal128(12, 2), None]
    table, typed = decode_binary(copy_out(rows), plan("hilofdbDtnT", types, [0] * 9 + [2, 0]))
    assert typed and table.num_rows == 3
    got = [table.column(i).to_pylist() for i in range(11)]
    assert got[0] == [-32768, None, 7] and got[1] == [2**31 - 1, None, -1] and got[2] == [-(2**63), None, 2**63 - 1]
    assert got[3] == [2**32 - 1, None, 0] and got[6] == [True, None, False]
    assert math.copysign(1, got[4][0]) == -1 and got[4][1] is None and math.isnan(got[4][2])
    assert got[5] == [math.inf, None, -1e-300]
    assert got[7] == [dt.date(1, 1, 1), None, dt.date(9999, 12, 31)]
    assert got[8] == [when, None, PG_EPOCH]
    assert got[9] == [Decimal("-12345.67"), None, Decimal("0.00")]
    assert got[10] == ["tab\there é 😀", None, ""]
    assert [table.column(i).type for i in range(10)] == types[:10] and table.column(10).type == pa.large_string()


@pytest.mark.parametrize(
    ("value", "precision", "scale"),
    [
        ("0.01", 12, 2),
        ("-0.5", 3, 1),
        ("9999999999.99", 12, 2),
        ("123456789012.345678", 18, 6),
        ("-999999999999999999", 18, 0),
        ("10000", 8, 0),
        ("0.00001", 5, 5),
        ("-0.00099", 3, 5),
        ("100000000", 9, 0),
        ("1234500", 7, 0),  # numeric(5,-2): stored with scale 0
    ],
)
def test_numerics_at_their_scale(value: str, precision: int, scale: int) -> None:
    d = Decimal(value)
    out = copy_out([[pg_numeric(d, max(scale, 0))]])
    table, _ = decode_binary(out, plan("n", [pa.decimal128(precision, scale)], [scale]))
    assert table.column(0).to_pylist() == [d]


@pytest.mark.parametrize(
    ("kinds", "field", "scale"),
    [
        ("D", struct.pack(">i", 2**31 - 1), 0),  # date 'infinity'
        ("D", struct.pack(">i", (dt.date(1, 1, 1) - PG_EPOCH.date()).days - 1), 0),  # 1 BC
        ("t", struct.pack(">q", 2**63 - 1), 0),  # timestamp 'infinity'
        ("t", struct.pack(">q", -(2**63)), 0),  # '-infinity'
        ("t", struct.pack(">q", (dt.datetime(9999, 12, 31) - PG_EPOCH).days * 86400 * 10**6 + 86400 * 10**6), 0),
        ("n", struct.pack(">hhHh", 0, 0, 0xC000, 2), 2),  # NaN
        ("n", struct.pack(">hhHh", 0, 0, 0xD000, 2), 2),  # Infinity
        ("n", struct.pack(">hhHh", 0, 0, 0xF000, 2), 2),  # -Infinity
        ("t", struct.pack(">q", (dt.datetime(1, 1, 1) - PG_EPOCH) // dt.timedelta(microseconds=1) - 1), 0),
        ("n", pg_numeric(Decimal("1.234"), 3), 2),  # more decimals than the scale
        ("n", pg_numeric(Decimal("1" + "0" * 18), 0), 0),  # 19 digits
        ("n", pg_numeric(Decimal("9" * 17 + ".9"), 1), 2),  # 19 digits at scale 2
        ("n", struct.pack(">hhHh", 2, 0, 0, 0) + struct.pack(">H", 1), 0),  # fewer digits than it says
        ("i", struct.pack(">q", 1), 0),  # a field of another width
        ("b", b"\x01\x00", 0),
    ],
)
def test_values_the_typed_parse_refuses_send_the_span_to_the_text_path(kinds: str, field: bytes, scale: int) -> None:
    arrow = {"D": pa.date32(), "t": pa.timestamp("us"), "n": pa.decimal128(18, scale), "i": pa.int32()}
    with pytest.raises(Unsupported):
        decode_binary(copy_out([[field]]), plan(kinds, [arrow.get(kinds, pa.bool_())], [scale]))


def test_malformed_output_is_refused() -> None:
    good = copy_out([[struct.pack(">i", 1), b"x"], [None, b"yz"]])
    p = plan("iT", [pa.int32(), None])
    assert decode_binary(good, p)[0].num_rows == 2
    for bad in [
        good[:-2],  # no trailer
        good + b"\x00",  # something after it
        good[:5] + b"X" + good[6:],  # not the signature
        good[:11] + b"\x00\x01\x00\x00" + good[15:],  # with OIDs
        good[:19] + b"\x00\x03" + good[21:],  # another field count
        good[:19] + b"\x00\x02\x7f\xff\xff\xff" + good[25:],  # a length past the end
        good[:19] + b"\x00\x02\xff\xff\xff\xfe" + good[25:],  # a negative length other than -1
        b"",
    ]:
        with pytest.raises(Unsupported):
            decode_binary(bad, p)
    assert decode_binary(copy_out([]), p)[0].num_rows == 0


def test_a_wrong_plan_is_a_bug_not_a_fallback() -> None:
    with pytest.raises(ValueError, match="unknown field kind"):
        _copybin.decode(copy_out([[b"x"]]), b"?", b"\x00")
    with pytest.raises(ValueError, match="alike"):
        _copybin.decode(copy_out([[b"x"]]), b"T", b"")
    with pytest.raises(TypeError):  # only bytes: its second pass trusts the first, so it must not change
        _copybin.decode(bytearray(copy_out([[b"x"]])), b"T", b"\x00")


def test_damaged_output_never_crashes_the_decoder() -> None:
    """Random damage to a valid output: the C decoder refuses it or decodes it, and reads nothing out of bounds."""
    rng = random.Random(7)
    rows: list[list[bytes | None]] = [
        [struct.pack(">q", i), None if i % 3 == 0 else f"v{i}".encode() * (i % 5), pg_numeric(Decimal(i) / 8, 3)]
        for i in range(200)
    ]
    good = copy_out(rows)
    for _ in range(3000):
        buf = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(buf))
            buf[at] = rng.randrange(256)
        if rng.random() < 0.2:
            buf = buf[: rng.randrange(len(buf))]
        result = _copybin.decode(bytes(buf), b"lTn", b"\x00\x00\x03")
        if result is not None:
            n, fields = result
            assert len(fields) == 3 and len(fields[0][0]) == 8 * n and len(fields[2][0]) == 16 * n
            offsets = struct.unpack(f"<{n + 1}q", fields[1][0])
            assert offsets[0] == 0 and offsets[-1] == len(fields[1][1]) and list(offsets) == sorted(offsets)
