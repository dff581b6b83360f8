"""The DuckDB sink: set-based apply of reduced batches, TOAST resolution, atomic checkpoint."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import pytest

from pgbridge.cdc.reduce import UNCHANGED, Cell, TableDelta
from pgbridge.cdc.sinks.base import SinkColumn, SinkTable
from pgbridge.cdc.sinks.duckdb import DuckDBSink, SinkError
from pgbridge.cdc.typemap import duckdb_type
from pgbridge.types import LSN

INT8, TEXT, NUMERIC_12_2 = 20, 25, 1700
TABLE = SinkTable(
    "shop",
    "order_items",
    (
        SinkColumn("id", duckdb_type(INT8)),
        SinkColumn("note", duckdb_type(TEXT)),
        SinkColumn("price", duckdb_type(NUMERIC_12_2, ((12 << 16) | 2) + 4)),
        SinkColumn("doc", duckdb_type(TEXT)),
    ),
    key=(0,),
)


def rows(sink: DuckDBSink) -> dict[int, tuple[object, ...]]:
    return {r[0]: r for r in sink.con.execute('SELECT * FROM "shop"."order_items"').fetchall()}


@pytest.fixture
def sink(tmp_path: Path) -> DuckDBSink:
    s = DuckDBSink(tmp_path / "w.duckdb", "p1")
    s.ensure_table(TABLE)
    return s


def test_apply_and_checkpoint_are_atomic(sink: DuckDBSink, tmp_path: Path) -> None:
    d = TableDelta(key_positions=(0,))
    d.insert([b"1", b"a", b"9.99", b"x" * 5000])
    d.insert([b"2", None, b"1.00", b"y"])
    sink.begin()
    sink.apply(TABLE, d)
    sink.commit(LSN(100))
    assert rows(sink)[1] == (1, "a", Decimal("9.99"), "x" * 5000)
    assert sink.checkpoint() == LSN(100)
    # A rolled-back batch leaves neither data nor checkpoint behind.
    d2 = TableDelta(key_positions=(0,))
    d2.delete((b"1",))
    sink.begin()
    sink.apply(TABLE, d2)
    sink.rollback()
    assert 1 in rows(sink) and sink.checkpoint() == LSN(100)
    sink.close()
    again = DuckDBSink(tmp_path / "w.duckdb", "p1")
    assert again.checkpoint() == LSN(100) and len(rows(again)) == 2


def test_unchanged_toast_is_kept_through_updates_and_key_moves(sink: DuckDBSink) -> None:
    d = TableDelta(key_positions=(0,))
    d.insert([b"1", b"a", b"1.00", b"BIG"])
    sink.begin()
    sink.apply(TABLE, d)
    sink.commit(LSN(1))
    d = TableDelta(key_positions=(0,))
    d.update([b"1", b"b", b"2.00", UNCHANGED])  # TOAST value not sent
    d.update([b"7", b"c", b"3.00", UNCHANGED], (b"1",))  # and the key moves
    sink.begin()
    sink.apply(TABLE, d)
    sink.commit(LSN(2))
    assert rows(sink) == {7: (7, "c", Decimal("3.00"), "BIG")}


def test_truncate_then_inserts(sink: DuckDBSink) -> None:
    d = TableDelta(key_positions=(0,))
    for i in range(10):
        d.insert([str(i).encode(), None, b"0", None])
    sink.begin()
    sink.apply(TABLE, d)
    sink.commit(LSN(1))
    d = TableDelta(key_positions=(0,))
    d.truncate()
    d.insert([b"42", b"after", b"1", None])
    sink.begin()
    sink.apply(TABLE, d)
    sink.commit(LSN(2))
    assert list(rows(sink)) == [42]


def test_random_batches_match_oracle(sink: DuckDBSink) -> None:
    rng = random.Random(3)
    oracle: dict[int, list[object]] = {}
    next_id = 0
    lsn = 0
    for _batch in range(40):
        d = TableDelta(key_positions=(0,))
        for _ in range(rng.randint(1, 60)):
            r = rng.random()
            if r < 0.4 or not oracle:
                next_id += 1
                note = rng.choice([None, "n", 'it\'s "quoted"', "ünï"])
                doc = "D" * rng.randint(0, 3000)
                d.insert([str(next_id).encode(), None if note is None else note.encode(), b"1.50", doc.encode()])
                oracle[next_id] = [next_id, note, Decimal("1.50"), doc]
            elif r < 0.8:
                k = rng.choice(list(oracle))
                move = rng.random() < 0.2
                nk = k
                if move:
                    next_id += 1
                    nk = next_id
                keep_doc = rng.random() < 0.7
                new_doc: Cell = UNCHANGED if keep_doc else b"new"
                d.update([str(nk).encode(), b"u", b"2.25", new_doc], (str(k).encode(),) if move else None)
                cur = oracle.pop(k)
                oracle[nk] = [nk, "u", Decimal("2.25"), cur[3] if keep_doc else "new"]
            else:
                k = rng.choice(list(oracle))
                d.delete((str(k).encode(),))
                del oracle[k]
        lsn += 10
        sink.begin()
        sink.apply(TABLE, d)
        sink.commit(LSN(lsn))
        assert rows(sink) == {k: tuple(v) for k, v in oracle.items()}


def test_a_value_the_warehouse_cannot_hold_is_an_error(sink: DuckDBSink) -> None:
    d = TableDelta(key_positions=(0,))
    d.insert([b"1", None, b"NaN", None])
    sink.begin()
    with pytest.raises(SinkError, match="order_items"):
        sink.apply(TABLE, d)
    sink.rollback()
    assert rows(sink) == {}


def test_the_slot_position_only_moves_forward_and_is_kept_per_pipeline(sink: DuckDBSink, tmp_path: Path) -> None:
    assert sink.position() is None
    sink.begin()
    sink.commit(LSN(500), confirm=LSN(600))  # a batch: checkpoint and position in one transaction
    sink.begin()
    sink.note_position(LSN(550))  # an older position never takes the record back
    sink.commit_meta()
    assert sink.position() == LSN(600) and sink.checkpoint() == LSN(500)
    sink.begin()
    sink.note_position(LSN(900))  # an idle confirmation, outside a batch
    sink.commit_meta()
    sink.close()
    other = DuckDBSink(tmp_path / "w.duckdb", "p2")  # another pipeline's rows in the same file
    assert other.position() is None and other.checkpoint() is None
    other.close()
    again = DuckDBSink(tmp_path / "w.duckdb", "p1")
    assert again.position() == LSN(900) and again.checkpoint() == LSN(500)
    again.close()
