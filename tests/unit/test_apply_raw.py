"""The applier on raw pgoutput chunks against an oracle that applies every change one at a time.

Random transactions of inserts, updates (with unchanged TOAST values and key moves), deletes,
re-inserts and truncates are encoded as the server sends them, cut into random chunks, fed through
``Applier.feed_raw`` with batches handed to the sink at random points and large transactions split
by a small ``max_rows``; the warehouse must equal the oracle. Replaying the same stream afterwards
must change nothing (every transaction is at or below the checkpoint).
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pgbridge.cdc import apply, columnar
from pgbridge.cdc.apply import Applier, BatchLimits
from pgbridge.cdc.pgoutput import Delete, Insert, TupleData, Update
from pgbridge.cdc.pipeline import BEHIND_BYTES, pump
from pgbridge.cdc.sinks.base import SinkColumn, SinkTable, StagedChanges
from pgbridge.cdc.sinks.duckdb import DuckDBSink
from pgbridge.cdc.source import RawChunk
from pgbridge.cdc.typemap import duckdb_type
from pgbridge.types import LSN

OID = 16400
COLUMNS = [("id", 20), ("note", 25), ("big", 25), ("n", 23)]  # id is the key; big may be sent as 'u'


def relation(identity: bytes = b"d") -> bytes:
    """The table's Relation message; with identity ``f`` (FULL) every column is part of the key."""
    cols = b"".join(
        bytes([1 if name == "id" or identity == b"f" else 0]) + name.encode() + b"\0" + struct.pack(">Ii", oid, -1)
        for name, oid in COLUMNS
    )
    return b"R" + struct.pack(">I", OID) + b"public\0t\0" + identity + struct.pack(">h", len(COLUMNS)) + cols


def begin(lsn: int) -> bytes:
    return b"B" + struct.pack(">QqI", lsn, 0, lsn)


def commit(lsn: int) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, lsn, lsn + 1, 0)


def truncate() -> bytes:
    return b"T" + struct.pack(">iBI", 1, 0, OID)


Row = tuple[int, str | None, str, int | None]


def image(row: Row, unchanged_big: bool = False) -> TupleData:
    i, note, big, n = row
    kinds = "t" + ("n" if note is None else "t") + ("u" if unchanged_big else "t") + ("n" if n is None else "t")
    values = (
        str(i).encode(),
        None if note is None else note.encode(),
        None if unchanged_big else big.encode(),
        None if n is None else str(n).encode(),
    )
    return TupleData(kinds, values)


def key_image(i: int) -> TupleData:
    return TupleData("tnnn", (str(i).encode(), None, None, None))


def stream(rng: random.Random, txns: int) -> tuple[list[bytes], dict[int, Row]]:
    """A random stream and the table it leaves behind (one change at a time)."""
    table: dict[int, Row] = {}
    out = [relation()]
    next_id, lsn = 1, 1000
    for _ in range(txns):
        lsn += 100
        out.append(begin(lsn))
        for _ in range(rng.choice([1, 3, 10, 40])):
            r = rng.random()
            ids = list(table)
            if r < 0.35 or not ids:
                i = rng.choice([next_id, next_id, rng.randint(1, next_id)])  # sometimes a re-insert
                if i in table:
                    i = next_id
                next_id = max(next_id, i + 1)
                row: Row = (i, rng.choice([None, "a", "it's"]), f"big{rng.random()}", rng.choice([None, 1, 2]))
                table[i] = row
                out.append(columnar.encode_row(Insert(None, OID, image(row))))
            elif r < 0.75:
                i = rng.choice(ids)
                keep = rng.random() < 0.6
                moved = rng.random() < 0.15
                new_id = next_id if moved else i
                next_id += moved
                old = table.pop(i)
                big = old[2] if keep else f"new{rng.random()}"
                row = (new_id, rng.choice([None, "u", "ü"]), big, rng.randint(0, 9))
                table[new_id] = row
                old_image = key_image(i) if moved else None
                msg = Update(None, OID, "K" if moved else None, old_image, image(row, unchanged_big=keep))
                out.append(columnar.encode_row(msg))
            elif r < 0.97:
                i = rng.choice(ids)
                del table[i]
                out.append(columnar.encode_row(Delete(None, OID, "K", key_image(i))))
            else:
                table.clear()
                out.append(truncate())
        out.append(commit(lsn + 50))
    return out, table


def warehouse(sink: DuckDBSink) -> dict[int, Row]:
    rows = sink.con.execute("SELECT id, note, big, n FROM public.t").fetchall()
    return {r[0]: tuple(r) for r in rows}  # type: ignore[misc]


def feed(applier: Applier, payloads: list[bytes], rng: random.Random) -> None:
    pos = 0
    while pos < len(payloads):
        step = rng.choice([1, 2, 7, 50, 400])
        applier.behind = rng.random() < 0.5  # batches close at other commits
        applier.feed_raw(payloads[pos : pos + step])
        pos += step
        if not applier.in_transaction and applier.pending_commit and rng.random() < 0.5:
            applier.submit()
        if rng.random() < 0.3:
            applier.poll()
    applier.flush()


@pytest.mark.parametrize("key_not_null", [True, False])
def test_random_stream_matches_one_at_a_time_application(tmp_path: Path, key_not_null: bool) -> None:
    table = SinkTable(
        "public", "t", tuple(SinkColumn(n, duckdb_type(oid)) for n, oid in COLUMNS), (0,), key_not_null=key_not_null
    )
    for seed in range(6):
        rng = random.Random(seed)
        payloads, expected = stream(rng, 120)
        path = tmp_path / f"w{seed}.duckdb"
        sink = DuckDBSink(path, "p")
        applier = Applier(sink, {("public", "t"): table}, BatchLimits(max_rows=rng.choice([5, 60, 50_000])))
        feed(applier, payloads, rng)
        assert warehouse(sink) == expected, seed
        assert applier.stats.transactions == 120
        applier.close()
        # A restart replays the stream from before the checkpoint: nothing changes.
        applier = Applier(sink, {("public", "t"): table}, BatchLimits(max_rows=50))
        feed(applier, payloads, rng)
        assert applier.stats.skipped_transactions == 120 and applier.stats.changes == 0
        assert warehouse(sink) == expected, seed
        applier.close()
        sink.close()


def simple_table() -> SinkTable:
    return SinkTable("public", "t", tuple(SinkColumn(n, duckdb_type(oid)) for n, oid in COLUMNS), (0,), True)


def insert_transactions(count: int, rows: int) -> list[bytes]:
    """The relation, then ``count`` transactions of ``rows`` inserts each."""
    payloads = [relation()]
    for n in range(1, count + 1):
        lsn = 1000 + 100 * n
        payloads.append(begin(lsn))
        payloads += [columnar.encode_row(Insert(None, OID, image((n * 100 + k, "a", "b", k)))) for k in range(rows)]
        payloads.append(commit(lsn + 50))
    return payloads


def test_a_batch_commits_though_every_read_ends_inside_a_transaction(tmp_path: Path) -> None:
    # A steady stream: each read returns the end of one transaction and the start of the next.
    # The batch must still go to the warehouse once due, decided at a commit, not only when a
    # read happens to end between transactions.
    sink = DuckDBSink(tmp_path / "w.duckdb", "p")
    applier = Applier(sink, {("public", "t"): simple_table()}, BatchLimits(max_rows=50_000, max_wait_s=0.02))
    payloads = insert_transactions(30, 1)
    confirmed = []
    for i in range(0, len(payloads) - 1, 3):  # [R B I] [C B I] [C B I] ...
        confirmed.append(applier.feed_raw(payloads[i : i + 3]))
        assert applier.in_transaction
        time.sleep(0.005)
    confirmed.append(applier.wait())
    assert any(c is not None for c in confirmed)
    assert applier.checkpoint is not None and applier.stats.batches >= 2
    applier.close()
    sink.close()


def test_a_pipeline_behind_the_server_makes_batches_of_max_rows(tmp_path: Path) -> None:
    sink = DuckDBSink(tmp_path / "w.duckdb", "p")
    applier = Applier(sink, {("public", "t"): simple_table()}, BatchLimits(max_rows=400, max_wait_s=60))
    payloads = insert_transactions(20, 50)
    applier.behind = True  # half of max_rows (200) is not enough now
    applier.feed_raw(payloads[:209])  # the relation and four transactions: 200 changes
    assert not applier.ripe() and applier.pending_commit
    applier.behind = False
    assert applier.ripe()
    applier.behind = True
    applier.feed_raw(payloads[209:])  # at the commit that reaches 400 changes the batch goes
    applier.wait()
    assert applier.stats.batches == 2 and applier.stats.transactions == 20
    applier.close()
    sink.close()


class BufferedStream:
    """What ``pump`` asks of a ReplicationStream: chunks to read, and how much is received and not read."""

    def __init__(self, chunks: list[list[bytes]], buffered: list[int]) -> None:
        self.chunks, self.backlog = chunks, buffered
        self.buffered = 0

    def read_raw(self, max_messages: int = 20_000, max_wait_s: float = 1.0) -> RawChunk:
        payloads = self.chunks.pop(0) if self.chunks else []
        self.buffered = self.backlog.pop(0) if self.backlog else 0
        return RawChunk(payloads, bytes(p[0] for p in payloads))

    def confirm(self, lsn: LSN) -> None:
        pass

    def idle_position(self) -> LSN | None:
        return None


def test_pump_calls_the_pipeline_behind_while_the_reader_holds_a_backlog(tmp_path: Path) -> None:
    # No time limit can close a batch here: only counts (half of max_rows, 100 changes, unless the
    # pipeline is behind, then max_rows).
    limits = BatchLimits(max_rows=200, max_wait_s=60, min_wait_s=60, behind_wait_s=60)
    sink = DuckDBSink(tmp_path / "w.duckdb", "p")
    applier = Applier(sink, {("public", "t"): simple_table()}, limits)
    payloads = insert_transactions(3, 50)  # R, then B 50xI C three times
    stream = BufferedStream([payloads[:53], payloads[53:]], [BEHIND_BYTES, BEHIND_BYTES - 1])
    pump(stream, applier)  # type: ignore[arg-type]
    assert applier.behind and applier.pending_commit and not applier.busy  # 50 changes, held for more
    pump(stream, applier)  # type: ignore[arg-type]
    assert not applier.behind  # so the batch went at the second commit (100 changes); the third waits
    applier.wait()
    assert applier.stats.batches == 1 and applier.checkpoint == LSN(1250) and applier.pending_commit
    applier.close()
    sink.close()


def test_decoded_messages_fed_one_by_one_give_the_same_warehouse(tmp_path: Path) -> None:
    from pgbridge.cdc.pgoutput import decode

    table = simple_table()
    rng = random.Random(42)
    payloads, expected = stream(rng, 60)
    sink = DuckDBSink(tmp_path / "w.duckdb", "p")
    applier = Applier(sink, {("public", "t"): table}, BatchLimits(max_rows=30))
    for p in payloads:
        applier.feed(decode(p))
    applier.flush()
    assert warehouse(sink) == expected
    applier.close()
    sink.close()


def full_table() -> SinkTable:
    """REPLICA IDENTITY FULL without a unique key: the table is kept as a multiset."""
    table = SinkTable("public", "t", simple_table().columns, (0, 1, 2, 3), False)
    assert table.bag
    return table


def test_identical_rows_of_a_full_identity_table_are_kept(tmp_path: Path) -> None:
    # The source may hold the same row twice; each delete removes one copy there, and so here.
    row = (1, "a", "b", 1)
    same = columnar.encode_row(Insert(None, OID, image(row)))
    gone = columnar.encode_row(Delete(None, OID, "O", image(row)))
    sink = DuckDBSink(tmp_path / "w.duckdb", "p")
    applier = Applier(sink, {("public", "t"): full_table()}, BatchLimits())
    applier.feed_raw([relation(b"f")])
    for n, changes in enumerate([[same, same], [same], [gone]], start=1):  # one batch each
        applier.feed_raw([begin(1000 * n), *changes, commit(1000 * n + 50)])
        applier.flush()
    assert sink.con.execute("SELECT count(*) FROM public.t").fetchone() == (2,)
    applier.close()
    sink.close()


def bag_stream(rng: random.Random, txns: int) -> tuple[list[bytes], Counter[Row]]:
    """A random stream on a FULL-identity table that often holds the same row several times."""
    table: Counter[Row] = Counter()
    out = [relation(b"f")]
    pool: list[Row] = [(1, None, "b", None), (1, "a", "b", 1), (2, "it's", "big", 2), (3, None, "x", None)]
    lsn = 1000
    for _ in range(txns):
        lsn += 100
        out.append(begin(lsn))
        for _ in range(rng.choice([1, 3, 10, 40])):
            r, rows = rng.random(), list(table.elements())
            if r < 0.4 or not rows:
                row = rng.choice(pool) if rng.random() < 0.8 else (rng.randint(1, 5), "n", f"b{rng.random()}", 7)
                table[row] += 1
                out.append(columnar.encode_row(Insert(None, OID, image(row))))
            elif r < 0.7:  # one copy changes; an unchanged TOAST value comes from the old row
                old = rng.choice(rows)
                keep = rng.random() < 0.6
                new: Row = (old[0], rng.choice([None, "u", "a"]), old[2] if keep else rng.choice(["b", "x"]), 1)
                table[old] -= 1
                table[new] += 1
                msg = Update(None, OID, "O", image(old), image(new, unchanged_big=keep))
                out.append(columnar.encode_row(msg))
            elif r < 0.97:
                old = rng.choice(rows)
                table[old] -= 1
                out.append(columnar.encode_row(Delete(None, OID, "O", image(old))))
            else:
                table.clear()
                out.append(truncate())
            table = +table  # drop rows with no copies left
        out.append(commit(lsn + 50))
    return out, table


@pytest.mark.parametrize("vectorized", [True, False])
def test_random_stream_on_a_full_identity_table_keeps_every_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vectorized: bool
) -> None:
    if not vectorized:  # every chunk is folded one message at a time, as when the columnar decode declines

        def decline(*args: object) -> list[columnar.RowGroup]:
            raise columnar.Unsupported("test")

        monkeypatch.setattr(columnar, "decode_rows", decline)
    staged = []  # the vectorized staging of a bag table's groups, as taken (None: folded one by one)
    bag_arrays = apply._bag_arrays

    def recorded(*args: Any) -> dict[str, pa.Array] | None:
        staged.append(bag_arrays(*args))
        return staged[-1]

    monkeypatch.setattr(apply, "_bag_arrays", recorded)
    for seed in range(5):
        rng = random.Random(seed)
        payloads, expected = bag_stream(rng, 100)
        sink = DuckDBSink(tmp_path / f"w{seed}{vectorized}.duckdb", "p")
        applier = Applier(sink, {("public", "t"): full_table()}, BatchLimits(max_rows=rng.choice([5, 60, 50_000])))
        feed(applier, payloads, rng)
        rows = Counter(sink.con.execute("SELECT id, note, big, n FROM public.t").fetchall())
        assert rows == expected, seed
        applier.close()
        sink.close()
    assert (len(staged) > 100 and None not in staged) if vectorized else not staged


class RecordingSink(DuckDBSink):
    """The DuckDB sink, noting whether each staged batch was fresh (its inserted keys need no clearing)."""

    fresh: list[bool]

    def apply_staged(self, t: SinkTable, changes: StagedChanges) -> None:
        self.fresh.append(changes.fresh)
        super().apply_staged(t, changes)


def test_rows_copied_ahead_of_the_stream_are_not_doubled_then_inserts_skip_the_clearing(tmp_path: Path) -> None:
    def txn(lsn: int, *ids: int) -> list[bytes]:
        rows = [columnar.encode_row(Insert(None, OID, image((i, "a", "b", 1)))) for i in ids]
        return [begin(lsn), *rows, commit(lsn + 50)]

    sink = RecordingSink(tmp_path / "w.duckdb", "p")
    sink.fresh = []
    applier = Applier(sink, {("public", "t"): simple_table()}, BatchLimits())
    applier.feed_raw([relation(), *txn(1000, 1)])
    applier.flush()  # the first batch: no checkpoint before it, so it clears
    # A re-copy reads the source as of now: it holds row 2, inserted by a transaction (at 1100) the
    # stream has not applied yet, and is bounded by the WAL position 1300.
    sink.begin()
    sink.con.execute("INSERT INTO public.t VALUES (2, 'a', 'b', 1)")
    sink.note_copy(LSN(1300))
    sink.commit_meta()
    for lsn, ids in [(1100, (2,)), (1200, (3,)), (1400, (4, 5)), (1500, (6,))]:
        applier.feed_raw(txn(lsn, *ids))
        applier.flush()
    # Checkpoints (commit LSNs) 1050, 1150, 1250, 1450: only the batch after 1450 >= 1300 skips it.
    assert sink.fresh == [False, False, False, False, True]
    assert sink.con.execute("SELECT id, count(*) FROM public.t GROUP BY id ORDER BY id").fetchall() == [
        (i, 1) for i in range(1, 7)
    ]
    applier.close()
    sink.close()
    again = DuckDBSink(tmp_path / "w.duckdb", "p")
    assert again.copy_horizon() == LSN(1300)  # recorded with the copied rows
    again.close()


@pytest.mark.parametrize("vectorized", [True, False])
def test_a_change_to_a_full_identity_table_without_its_old_row_stops_that_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vectorized: bool
) -> None:
    # Without the old row no copy can be matched (its identity was changed behind the pipeline):
    # the table stops, with the reason in status, and nothing is applied twice or guessed.
    if not vectorized:

        def decline(*args: object) -> list[columnar.RowGroup]:
            raise columnar.Unsupported("test")

        monkeypatch.setattr(columnar, "decode_rows", decline)
    row, new = (1, "a", "b", 1), (1, "z", "b", 1)
    sink = DuckDBSink(tmp_path / "w.duckdb", "p")
    applier = Applier(sink, {("public", "t"): full_table()}, BatchLimits())
    applier.feed_raw([relation(b"f"), begin(1000), columnar.encode_row(Insert(None, OID, image(row))), commit(1050)])
    applier.flush()
    keyless = columnar.encode_row(Update(None, OID, None, None, image(new)))
    applier.feed_raw([begin(1100), keyless, commit(1150)])
    applier.flush()
    assert "public.t" in applier.broken and "whole old row" in applier.broken["public.t"]
    assert sink.con.execute("SELECT id, note FROM public.t").fetchall() == [(1, "a")]
    applier.close()
    # Recorded with the batch that skipped the change: a restart past it does not stream onto it.
    again = Applier(sink, {("public", "t"): full_table()}, BatchLimits())
    assert again.broken == applier.broken
    again.feed_raw([relation(b"f"), begin(1200), columnar.encode_row(Insert(None, OID, image(row))), commit(1250)])
    again.flush()
    assert sink.con.execute("SELECT count(*) FROM public.t").fetchone() == (1,)
    again.close()
    sink.close()
