"""The vectorized row-change decoder must give exactly what the one-message decoder gives."""

from __future__ import annotations

import random
import struct

import numpy as np
import pyarrow as pa
import pytest

from pgbridge.cdc import columnar
from pgbridge.cdc.pgoutput import DecodeError, Delete, Insert, TupleData, Update, decode
from tests.unit.both_ways import with_and_without_c
from tests.unit.test_pgoutput import FIXTURES


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def walker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with the C row walk (cdc/_rowwalk.c) and with numpy's, which must agree."""
    with_and_without_c(request, monkeypatch, columnar, "_rowwalk")


ROW_FIXTURES = [
    "insert_null",
    "insert_utf8",
    "insert_binary",
    "update_key",
    "update_unchanged_toast",
    "update_full",
    "delete_full",
    "delete_key",
]


def layout(payloads: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    lengths = np.array([len(p) for p in payloads], np.int64)
    ends = np.cumsum(lengths)
    return b"".join(payloads), ends - lengths, ends


def image(t: columnar.TupleColumns, row: int, buf: bytes) -> TupleData:
    kinds = bytes(t.kinds[row]).decode()
    values = tuple(
        buf[s : s + n] if k in "tb" else None for k, s, n in zip(kinds, t.starts[row], t.lengths[row], strict=True)
    )
    return TupleData(kinds, values)


def redecode(payloads: list[bytes]) -> list[Insert | Update | Delete]:
    """Each message rebuilt from the vectorized decoding, in stream order."""
    buf, starts, ends = layout(payloads)
    out: dict[int, Insert | Update | Delete] = {}
    for g in columnar.decode_rows(buf, starts, ends):
        for row, i in enumerate(g.index.tolist()):
            new = image(g.new, row, buf) if g.new is not None else None
            old = image(g.old, row, buf) if g.old is not None else None
            if g.tag == columnar.TAG_INSERT:
                assert new is not None and old is None
                out[i] = Insert(None, g.relation_oid, new)
            elif g.tag == columnar.TAG_UPDATE:
                assert new is not None
                out[i] = Update(None, g.relation_oid, g.old_kind, old, new)
            else:
                assert old is not None and g.old_kind is not None
                out[i] = Delete(None, g.relation_oid, g.old_kind, old)
    assert sorted(out) == list(range(len(payloads)))
    return [out[i] for i in range(len(payloads))]


@pytest.mark.parametrize("name", ROW_FIXTURES)
def test_each_fixture_decodes_as_the_message_decoder_does(name: str) -> None:
    assert redecode([FIXTURES[name]]) == [decode(FIXTURES[name])]


def test_fixtures_mixed_in_one_buffer_keep_their_order() -> None:
    rng = random.Random(5)
    payloads = [FIXTURES[rng.choice(ROW_FIXTURES)] for _ in range(200)]
    assert redecode(payloads) == [decode(p) for p in payloads]


def random_tuple(rng: random.Random, ncols: int, kinds: str = "tnu") -> TupleData:
    ks = "".join(rng.choice(kinds) for _ in range(ncols))
    values = tuple(
        bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 12, 13, 300]))) if k in "tb" else None for k in ks
    )
    return TupleData(ks, values)


def random_message(rng: random.Random) -> Insert | Update | Delete:
    relid, ncols = rng.choice([(16384, 3), (16390, 5), (2**32 - 1, 1)])
    r = rng.random()
    if r < 0.4:
        return Insert(None, relid, random_tuple(rng, ncols, "tn"))
    if r < 0.8:
        old_kind = rng.choice([None, "K", "O"])
        old = random_tuple(rng, ncols, "tn") if old_kind else None
        return Update(None, relid, old_kind, old, random_tuple(rng, ncols))
    return Delete(None, relid, rng.choice("KO"), random_tuple(rng, ncols, "tn"))


def test_random_messages_round_trip_through_encode_row() -> None:
    rng = random.Random(11)
    for _ in range(30):
        msgs = [random_message(rng) for _ in range(rng.randint(1, 300))]
        payloads = [columnar.encode_row(m) for m in msgs]
        assert [decode(p) for p in payloads] == msgs
        assert redecode(payloads) == msgs


def test_text_array_gathers_values_and_nulls() -> None:
    msgs = [
        Insert(None, 1, TupleData("tn", (b"h\xc3\xa9llo", None))),
        Insert(None, 1, TupleData("tt", (b"", b"x" * 5000))),
        Insert(None, 1, TupleData("nt", (None, b"z"))),
    ]
    buf, starts, ends = layout([columnar.encode_row(m) for m in msgs])
    (g,) = columnar.decode_rows(buf, starts, ends)
    assert g.new is not None
    arr = columnar.as_array(buf)
    cols = [
        columnar.text_array(arr, g.new.starts[:, c], g.new.lengths[:, c], g.new.kinds[:, c] == columnar.KIND_TEXT)
        for c in range(2)
    ]
    assert cols[0].to_pylist() == ["héllo", "", None]
    assert cols[1].to_pylist() == [None, "x" * 5000, "z"]
    cols[0].validate(full=True)
    cols[1].validate(full=True)


@pytest.mark.parametrize("in_order", [True, False])
def test_text_array_cuts_any_values_out_of_the_buffer(in_order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # In buffer order (a column of messages) Arrow cuts them out; in any other order, numpy gathers.
    if in_order:
        gather = columnar._gathered

        def only_when_empty(arr: object, starts: np.ndarray, *args: object) -> pa.Array:
            assert len(starts) == 0, "values in buffer order were gathered byte by byte"
            return gather(arr, starts, *args)

        monkeypatch.setattr(columnar, "_gathered", only_when_empty)
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(0, 40)
        buf, starts, lengths, want = bytearray(), [], [], []
        for _ in range(n):
            buf += bytes(rng.randint(0, 6))  # the bytes between two values of the column
            value = None if rng.random() < 0.3 else "".join(rng.choice("aé€ \\t") for _ in range(rng.randint(0, 9)))
            raw = value.encode() if value is not None else b""
            starts.append(len(buf) if value is not None else 0)
            lengths.append(len(raw))
            buf += raw
            want.append(value)
        order = list(range(n))
        if not in_order:
            rng.shuffle(order)
        pick = np.array(order, np.int64)
        valid = np.array([want[i] is not None for i in order], np.bool_)
        got = columnar.text_array(
            columnar.as_array(bytes(buf)), np.array(starts, np.int64)[pick], np.array(lengths, np.int64)[pick], valid
        )
        got.validate(full=True)
        assert got.type == pa.large_string() and got.to_pylist() == [want[i] for i in order]


def test_malformed_messages_are_left_to_the_message_decoder() -> None:
    good = columnar.encode_row(Insert(None, 7, TupleData("tt", (b"ab", b"cd"))))
    bad = [
        good[:-1],  # truncated
        good + b"x",  # trailing byte
        good[:6] + b"\x00\x03" + good[8:],  # more columns announced than sent
        good[:8] + b"q" + good[9:],  # unknown column kind
        b"I" + struct.pack(">I", 7) + b"X" + good[6:],  # no 'N' marker
        good[:9] + struct.pack(">I", 1 << 30) + good[13:],  # a value running past the end
        b"C" + bytes(25),  # not a row change
    ]
    for payload in bad:
        buf, starts, ends = layout([good, payload, good])
        with pytest.raises(columnar.Unsupported):
            columnar.decode_rows(buf, starts, ends)
        if payload[:1] in b"IUD":
            with pytest.raises(DecodeError):
                decode(payload)


def test_column_counts_that_differ_within_a_relation_are_refused() -> None:
    a = columnar.encode_row(Insert(None, 7, TupleData("t", (b"1",))))
    b = columnar.encode_row(Insert(None, 7, TupleData("tt", (b"1", b"2"))))
    buf, starts, ends = layout([a, b])
    with pytest.raises(columnar.Unsupported):
        columnar.decode_rows(buf, starts, ends)
    buf, starts, ends = layout([a])
    assert len(columnar.decode_rows(buf, starts, ends)) == 1


def _verdict(buf: bytes, starts: np.ndarray, ends: np.ndarray) -> list[list[object]] | None:
    """What decode_rows makes of the messages, as plain lists; None when it refuses them."""
    try:
        groups = columnar.decode_rows(buf, starts, ends)
    except columnar.Unsupported:
        return None
    out: list[list[object]] = []
    for g in groups:
        out.append([g.tag, g.relation_oid, g.old_kind, g.index.tolist()])
        for t in (g.old, g.new):
            out[-1] += [None] if t is None else [t.kinds.tolist(), t.starts.tolist(), t.lengths.tolist()]
    return out


def test_damaged_messages_get_the_same_verdict_from_both_walks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes flipped anywhere: the C walk agrees with numpy's, value for value (its reads stay in the padded
    buffer by construction; a review fuzzed it under AddressSanitizer)."""
    compiled = pytest.importorskip("pgbridge.cdc._rowwalk", reason="the C extension was not built (no compiler)")
    rng = random.Random(13)
    for _ in range(400):
        payloads = [bytearray(columnar.encode_row(random_message(rng))) for _ in range(rng.randint(1, 40))]
        for _ in range(rng.randint(1, 3)):
            p = rng.choice(payloads)
            p[rng.randrange(len(p))] = rng.choice([0, 1, 0x6E, 0x74, 0x75, 0xFF, rng.randrange(256)])
        buf, starts, ends = layout([bytes(p) for p in payloads])
        monkeypatch.setattr(columnar, "_rowwalk", compiled)
        with_c = _verdict(buf, starts, ends)
        monkeypatch.setattr(columnar, "_rowwalk", None)
        assert _verdict(buf, starts, ends) == with_c


def test_c_strings_agree_with_arrow_on_strided_columns_and_refuse_values_outside_the_buffer() -> None:
    """_rowwalk.strings takes columns of the (n, ncols) arrays as they are (strided): the same array
    as the numpy/Arrow path, and an error, not a read past the buffer, for a value outside it."""
    compiled = pytest.importorskip("pgbridge.cdc._rowwalk", reason="the C extension was not built (no compiler)")
    rng = random.Random(5)
    for _ in range(100):
        msgs = [random_message(rng) for _ in range(rng.randint(1, 60))]
        buf, starts, ends = layout([columnar.encode_row(m) for m in msgs])
        arr = columnar.as_array(buf)
        for g in columnar.decode_rows(buf, starts, ends):
            for t in (g.old, g.new):
                if t is None:
                    continue
                for c in range(t.ncols):
                    valid = (t.kinds[:, c] == columnar.KIND_TEXT) | (t.kinds[:, c] == columnar.KIND_BINARY)
                    offsets, data, validity, nulls = compiled.strings(arr, t.starts[:, c], t.lengths[:, c], valid)
                    bits = None if validity is None else pa.py_buffer(validity)
                    buffers = [bits, pa.py_buffer(offsets), pa.py_buffer(data)]
                    got = pa.Array.from_buffers(pa.large_binary(), len(valid), buffers, null_count=nulls)
                    got.validate(full=True)
                    spans = zip(t.starts[:, c], t.lengths[:, c], valid, strict=True)
                    want = [bytes(buf[s : s + n]) if v else None for s, n, v in spans]
                    assert got.to_pylist() == want and nulls == int((~valid).sum())
    arr = columnar.as_array(b"abcdef")
    for start, length in ((4, 3), (-1, 2), (0, -1), (7, 0)):
        with pytest.raises(ValueError, match="outside the buffer"):
            compiled.strings(arr, np.array([0, start], np.int64), np.array([1, length], np.int64), np.ones(2, np.bool_))
    with pytest.raises(ValueError, match="int64"):
        compiled.strings(arr, np.zeros(2, np.int32), np.zeros(2, np.int64), np.ones(2, np.bool_))
