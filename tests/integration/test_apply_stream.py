"""Differential oracle for the streaming path: random DML on PostgreSQL, replicated through the
real slot, decoder, applier and DuckDB sink, must leave the warehouse equal to the source."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from pgbridge.cdc.apply import Applier, BatchLimits
from pgbridge.cdc.pipeline import pump
from pgbridge.cdc.sinks.base import SinkColumn, SinkTable
from pgbridge.cdc.sinks.duckdb import DuckDBSink
from pgbridge.cdc.source import ReplicationStream, StreamOptions, create_slot
from pgbridge.cdc.typemap import PG_SESSION_OPTIONS, duckdb_type
from pgbridge.types import LSN
from tests.pgserver import Server, bare_server

pytestmark = pytest.mark.integration

COLUMNS = [("id", 20, -1), ("note", 25, -1), ("price", 1700, ((12 << 16) | 2) + 4), ("doc", 25, -1)]


@pytest.fixture(scope="module")
def pg() -> Iterator[Server]:
    with bare_server("apply") as server:
        yield server


def table_def(name: str) -> SinkTable:
    return SinkTable("public", name, tuple(SinkColumn(n, duckdb_type(oid, mod)) for n, oid, mod in COLUMNS), key=(0,))


def source_rows(pg: Server, name: str) -> dict[int, tuple[object, ...]]:
    rows = pg.sql(f"SELECT id, note, price, doc FROM {name}")
    return {int(r[0]): tuple(r) for r in rows}  # type: ignore[call-overload]


def warehouse_rows(sink: DuckDBSink, name: str) -> dict[int, tuple[object, ...]]:
    return {r[0]: tuple(r) for r in sink.con.execute(f'SELECT * FROM "public"."{name}"').fetchall()}


def drain(pg: Server, stream: ReplicationStream, applier: Applier, until: LSN, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pump(stream, applier)
        if applier.applied_end is not None and applier.applied_end >= until and applier.idle:
            return
    raise AssertionError(f"did not catch up to {until} (applied {applier.applied_end})")


def random_dml(pg: Server, name: str, rng: random.Random, n: int) -> None:
    big = "".join(uuid.uuid4().hex for _ in range(400))  # ~12 kB, stored out of line (TOAST)
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        for _ in range(n):
            ids = [r[0] for r in c.execute(f"SELECT id FROM {name} ORDER BY random() LIMIT 3").fetchall()]
            op = rng.random()
            with c.transaction():
                if op < 0.35 or not ids:
                    for _ in range(rng.randint(1, 5)):
                        c.execute(
                            f"INSERT INTO {name} (note, price, doc) VALUES (%s, %s, %s)",
                            (rng.choice([None, "n", "tab\there", "q'\"\\"]), rng.choice([None, "1.25", "-7.50"]),
                             rng.choice([None, big, "small"])),
                        )  # fmt: skip
                elif op < 0.6:  # update without touching the TOASTed column: sent as 'u'
                    c.execute(f"UPDATE {name} SET note = %s WHERE id = ANY(%s)", (f"u{rng.random()}", ids))
                elif op < 0.7:
                    c.execute(f"UPDATE {name} SET doc = %s WHERE id = %s", (big[::-1], ids[0]))
                elif op < 0.8:  # primary-key change moves the row (with its TOAST value)
                    c.execute(f"UPDATE {name} SET id = id + 1000000, note = 'moved' WHERE id = %s", (ids[0],))
                elif op < 0.97:
                    c.execute(f"DELETE FROM {name} WHERE id = ANY(%s)", (ids[:2],))
                else:
                    c.execute(f"TRUNCATE {name}")


def test_random_dml_large_txn_and_restart_leave_warehouse_equal(pg: Server, tmp_path: Path) -> None:
    name = f"items_{uuid.uuid4().hex[:6]}"
    pg.sql(f"CREATE TABLE {name} (id bigserial PRIMARY KEY, note text, price numeric(12,2), doc text)")
    pg.sql(f"CREATE PUBLICATION pub_{name} FOR TABLE {name}")
    slot = f"slot_{name}"
    with create_slot(pg.dsn, slot) as s:
        start = s.consistent_lsn
    dsn = pg.dsn + f" options='{PG_SESSION_OPTIONS}'"
    opts = StreamOptions(publications=(f"pub_{name}",))
    tables = {("public", name): table_def(name)}
    wh = tmp_path / "w.duckdb"
    rng = random.Random(11)

    sink = DuckDBSink(wh, "t")
    applier = Applier(sink, tables, BatchLimits(max_rows=5_000, max_wait_s=0.1))
    with ReplicationStream.start(dsn, slot, opts, start_lsn=start) as stream:
        random_dml(pg, name, rng, 150)
        # one large transaction, larger than the batch limit: applied in chunks, committed once
        pg.sql(f"INSERT INTO {name} (note, price) SELECT 'bulk', 1 FROM generate_series(1, 30000)")
        drain(pg, stream, applier, pg.lsn())
    assert warehouse_rows(sink, name) == source_rows(pg, name)
    assert applier.stats.transactions > 100 and applier.stats.changes > 30_000

    # Crash mid-batch: fold changes but never commit them, then restart from the checkpoint.
    applier.close()
    applier = Applier(sink, tables, BatchLimits(max_rows=5_000, max_wait_s=60, min_wait_s=60))
    random_dml(pg, name, rng, 60)
    with ReplicationStream.start(dsn, slot, opts) as stream:
        for msg in stream.read_batch(max_messages=200, max_wait_s=1).messages:
            applier.feed(msg)
    applier.abort()
    sink.close()
    sink = DuckDBSink(wh, "t")
    applier = Applier(sink, tables, BatchLimits(max_rows=5_000, max_wait_s=0.1))
    with ReplicationStream.start(dsn, slot, opts) as stream:
        random_dml(pg, name, rng, 60)
        drain(pg, stream, applier, pg.lsn())
    assert warehouse_rows(sink, name) == source_rows(pg, name)
    sink.close()


def as_bag(rows: list[tuple[object, ...]]) -> Counter[tuple[object, ...]]:
    """Rows as a multiset; NaN (never equal to itself) as a marker that is."""
    return Counter(tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in r) for r in rows)


def test_a_full_identity_table_without_a_key_keeps_identical_rows(pg: Server, tmp_path: Path) -> None:
    # No unique key: the source holds the same row several times and each change touches one copy
    # (by ctid), or every copy matching a condition; the warehouse must hold the same multiset.
    name = f"events_{uuid.uuid4().hex[:6]}"
    numeric_12_2 = ((12 << 16) | 2) + 4
    cols = [("kind", 25, -1), ("qty", 23, -1), ("price", 1700, numeric_12_2), ("doc", 25, -1), ("score", 701, -1)]
    pg.sql(f"CREATE TABLE {name} (kind text, qty int, price numeric(12,2), doc text, score float8)")
    pg.sql(f"ALTER TABLE {name} REPLICA IDENTITY FULL")
    pg.sql(f"CREATE PUBLICATION pub_{name} FOR TABLE {name}")
    with create_slot(pg.dsn, f"slot_{name}") as s:
        start = s.consistent_lsn
    table = SinkTable("public", name, tuple(SinkColumn(n, duckdb_type(o, m)) for n, o, m in cols), (0, 1, 2, 3, 4))
    assert table.bag
    big = "".join(uuid.uuid4().hex for _ in range(400))  # stored out of line: an update of qty sends it as 'u'
    pool = [("a", 1, "1.25", None, 0.5), ("a", 1, "1.25", None, 0.5), (None, None, None, None, None),
            ("b", 2, "-7.50", big, float("nan")), ("c", 3, None, "small", float("inf"))]  # fmt: skip
    one = "ctid = (SELECT ctid FROM {t} WHERE kind IS NOT DISTINCT FROM %s LIMIT 1)"
    rng = random.Random(5)
    sink = DuckDBSink(tmp_path / "w.duckdb", "t")
    applier = Applier(sink, {("public", name): table}, BatchLimits(max_rows=3_000, max_wait_s=0.1))
    dsn = pg.dsn + f" options='{PG_SESSION_OPTIONS}'"
    opts = StreamOptions(publications=(f"pub_{name}",))
    with ReplicationStream.start(dsn, f"slot_{name}", opts, start_lsn=start) as stream, psycopg.connect(pg.dsn) as c:
        for _ in range(200):
            op, kind = rng.random(), rng.choice(["a", "b", "c", None])
            with c.transaction():
                if op < 0.4:
                    for _ in range(rng.randint(1, 4)):
                        c.execute(f"INSERT INTO {name} VALUES (%s, %s, %s, %s, %s)", rng.choice(pool))
                elif op < 0.6:
                    c.execute(f"UPDATE {name} SET qty = coalesce(qty, 0) + 1 WHERE {one.format(t=name)}", (kind,))
                elif op < 0.65:  # every copy of a row at once
                    c.execute(f"UPDATE {name} SET price = price + 1 WHERE kind IS NOT DISTINCT FROM %s", (kind,))
                elif op < 0.9:
                    c.execute(f"DELETE FROM {name} WHERE {one.format(t=name)}", (kind,))
                elif op < 0.98:
                    c.execute(f"DELETE FROM {name} WHERE qty > 3")
                else:
                    c.execute(f"TRUNCATE {name}")
            pump(stream, applier)
        with c.transaction():  # a large transaction of identical rows, then half of them deleted
            c.execute(f"INSERT INTO {name} SELECT 'bulk', 1, 1, NULL, 1 FROM generate_series(1, 20000)")
            c.execute(f"DELETE FROM {name} WHERE ctid IN (SELECT ctid FROM {name} WHERE kind = 'bulk' LIMIT 10000)")
        drain(pg, stream, applier, pg.lsn())
    source = as_bag(pg.sql(f"SELECT kind, qty, price, doc, score FROM {name}"))
    assert source["bulk", 1, Decimal(1), None, 1.0] == 10_000 and max(source.values()) > 1
    assert as_bag(sink.con.execute(f'SELECT * FROM "public"."{name}"').fetchall()) == source
    applier.close()
    sink.close()
