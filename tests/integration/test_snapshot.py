"""The initial load against a real PostgreSQL 15: discovery, exact copies, snapshot isolation, resume."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from pgbridge.cdc import copybinary, copytext, snapshot
from pgbridge.cdc.catalog import SnapshotError, SourceTable, sink_table
from pgbridge.cdc.columnar import Unsupported
from pgbridge.cdc.copybinary import BinaryPlan, binary_plan
from pgbridge.cdc.sinks.duckdb import DuckDBSink, SinkError
from pgbridge.cdc.snapshot import LoadProgress, load_snapshot, plan_ranges
from pgbridge.cdc.source import SnapshotSlot, drop_slot
from pgbridge.cdc.typemap import MappingPolicy, duckdb_type
from tests.pgserver import Server, bare_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg() -> Iterator[Server]:
    with bare_server("snap") as server:
        yield server


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[DuckDBSink]:
    s = DuckDBSink(tmp_path / "warehouse.duckdb", "test")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def slot(pg: Server) -> Iterator[str]:
    name = f"snap_{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        drop_slot(pg.dsn, name, terminate_active=True)


def _schema(pg: Server) -> str:
    name = f"s_{uuid.uuid4().hex[:8]}"
    pg.sql(f"CREATE SCHEMA {name}")
    return name


def _pages(pg: Server, table: str) -> int:
    return int(pg.sql(f"SELECT pg_relation_size('{table}') / 8192")[0][0])


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def test_plan_ranges_covers_every_page_once() -> None:
    assert plan_ranges(0, 4) == [(0, None)]
    assert plan_ranges(10, 4) == [(0, 4), (4, 8), (8, None)]
    assert plan_ranges(10, 4, [(0, 4), (8, None)]) == [(4, 8)]
    assert plan_ranges(10, 4, [(4, 8)]) == [(0, 4), (8, None)]
    assert plan_ranges(10, 4, [(0, 4), (4, 8), (8, None)]) == []


def test_discovery_globs_keys_and_problems(pg: Server) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TYPE {s}.mood AS ENUM ('sad', 'ok', 'happy')")
    pg.sql(f"CREATE DOMAIN {s}.qty AS integer CHECK (VALUE > 0)")
    pg.sql(
        f"CREATE TABLE {s}.customers (secret text, id bigint, name text, mood {s}.mood, moods {s}.mood[],"
        f" q {s}.qty, tags text[], doubled bigint GENERATED ALWAYS AS (id * 2) STORED, PRIMARY KEY (id))"
    )
    pg.sql(f"ALTER TABLE {s}.customers DROP COLUMN name")
    pg.sql(f"CREATE TABLE {s}.audit_log (id int PRIMARY KEY)")
    pg.sql(f"CREATE TABLE {s}.audit_x (id int PRIMARY KEY)")
    pg.sql(f"CREATE TABLE {s}.nokey (a int, b text)")
    pg.sql(f"CREATE TABLE {s}.full_rows (a int, b text)")
    pg.sql(f"ALTER TABLE {s}.full_rows REPLICA IDENTITY FULL")
    pg.sql(f"CREATE TABLE {s}.by_index (a int NOT NULL, b int NOT NULL, c text, PRIMARY KEY (a))")
    pg.sql(f"CREATE UNIQUE INDEX by_index_b ON {s}.by_index (b)")
    pg.sql(f"ALTER TABLE {s}.by_index REPLICA IDENTITY USING INDEX by_index_b")
    pg.sql(f"CREATE UNLOGGED TABLE {s}.scratch (id int PRIMARY KEY)")
    other = _schema(pg)
    pg.sql(f"CREATE TABLE {other}.elsewhere (id int PRIMARY KEY)")

    found = {t.name: t for t in pg.tables([f"{s}.*"], [f"{s}.audit_*"], {f"{s}.customers": ["secret"]})}
    assert sorted(found) == ["by_index", "customers", "full_rows", "nokey"]

    customers = found["customers"]
    assert [c.name for c in customers.columns] == ["secret", "id", "mood", "moods", "q", "tags"]  # no dropped/generated
    assert [c.excluded for c in customers.columns] == [True, False, False, False, False, False]
    assert customers.key == (1,) and customers.problem is None and customers.replica_identity == "d"
    assert customers.columns[2].enum_labels == ("sad", "ok", "happy")
    st = sink_table(customers)
    assert [c.name for c in st.columns] == ["id", "mood", "moods", "q", "tags"]
    assert st.key == (0,)  # re-indexed past the excluded column
    assert [c.ctype.sql_type for c in st.columns] == ["BIGINT", "VARCHAR", "VARCHAR[]", "INTEGER", "VARCHAR[]"]
    # mapped the way the stream maps a Relation column (a builtin array by its oid, a domain by its base name)
    assert st.columns[4].ctype == duckdb_type(1009, -1)
    assert st.columns[3].ctype == duckdb_type(customers.columns[4].type_oid, -1, type_name="int4")

    nokey = found["nokey"]
    assert nokey.problem == (
        f"table {s}.nokey has no primary key; add one or ALTER TABLE {s}.nokey REPLICA IDENTITY FULL"
    )
    with pytest.raises(SnapshotError, match="has no primary key"):
        sink_table(nokey)

    full = found["full_rows"]
    assert full.problem is None and full.replica_identity == "f" and full.key == (0, 1)
    assert sink_table(full).key == (0, 1)

    by_index = found["by_index"]
    assert by_index.replica_identity == "i" and by_index.key == (1,)

    everything = {t.qualified for t in pg.tables([])}
    assert f"{other}.elsewhere" in everything and f"{s}.scratch" not in everything
    assert not any(name.startswith(("pg_catalog.", "information_schema.")) for name in everything)

    excluded_key = pg.tables([f"{s}.customers"], [], {f"{s}.*": ["id"]})[0]
    assert excluded_key.problem is not None and "key column(s) id cannot be excluded" in excluded_key.problem


def test_tables_with_problems_are_refused(pg: Server, sink: DuckDBSink) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.nokey (a int)")
    with pytest.raises(SnapshotError, match="has no primary key"):
        load_snapshot(pg.dsn, "unused", pg.tables([f"{s}.*"]), sink)


# --------------------------------------------------------------------------------------------
# Exact copies
# --------------------------------------------------------------------------------------------

_NASTY_TEXT = ["tab\there", "new\nline", "cr\rret", "back\\slash", "\\N", "\\", "", "é✓ ünïcode", "a\\tb", "x\x01y"]

# Canonical forms that PostgreSQL and DuckDB print the same way.
_PG_CANON = """SELECT id, t, n::text, u::text, (extract(epoch FROM ts) * 1000000)::bigint, upper(encode(b, 'hex')),
       arr, j::text FROM {table} ORDER BY id"""
_DUCK_CANON = """SELECT id, t, CAST(n AS VARCHAR), u, epoch_us(ts), hex(b), arr, CAST(j AS VARCHAR)
       FROM {table} ORDER BY id"""


def _mixed_table(pg: Server, table: str, rows: int) -> None:
    pg.sql(
        f"CREATE TABLE {table} (id int8 PRIMARY KEY, t text, n numeric(12,2), u numeric, ts timestamptz, b bytea,"
        " arr text[], j jsonb, filler text) WITH (fillfactor = 50)"
    )
    with psycopg.connect(pg.dsn, autocommit=True) as conn, conn.cursor() as cur:
        data = []
        for i in range(rows):
            k = i % 13
            data.append(
                (
                    i,
                    None if k == 0 else _NASTY_TEXT[i % len(_NASTY_TEXT)] + str(i),
                    None if k == 1 else f"{(i * 7919) % 10**9 / 100:.2f}",
                    None if k == 2 else ("NaN" if k == 3 else f"{i}.{'0' * (i % 5)}1e{i % 30}"),
                    None if k == 4 else ("0044-03-15 12:00:00+00 BC" if k == 5 else "2024-01-01 00:00:00+00"),
                    None if k == 6 else bytes([i % 256, 0, 92, 9, 10]) * (i % 4),
                    None if k == 7 else ["a,b", None, 'q"uote', "NULL", "{br}", "back\\slash", "tab\t", ""][: i % 9],
                    None if k == 8 else json.dumps({"i": i, "s": "x\ty\\z\n", "u": "é", "l": [1, None, True]}),
                    "f" * (i % 200),
                )
            )
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s, %s, %s::numeric, %s::timestamptz + %s * interval '1 second',"
            " %s, %s, %s, %s)",
            [(r[0], r[1], r[2], r[3], r[4], r[0], r[5], r[6], r[7], r[8]) for r in data],
        )


def _pg_rows(pg: Server, table: str) -> list[tuple[Any, ...]]:
    return [(*r[:7], json.loads(r[7]) if r[7] is not None else None) for r in pg.sql(_PG_CANON.format(table=table))]


def _duck_rows(sink: DuckDBSink, table: str) -> list[tuple[Any, ...]]:
    rows = sink.con.execute(_DUCK_CANON.format(table=table)).fetchall()
    return [(*r[:7], json.loads(r[7]) if r[7] is not None else None) for r in rows]


def test_multi_range_load_equals_source(pg: Server, sink: DuckDBSink, slot: str) -> None:
    s = _schema(pg)
    _mixed_table(pg, f"{s}.mixed", 3000)
    pg.sql(f"VACUUM ANALYZE {s}.mixed")
    assert _pages(pg, f"{s}.mixed") >= 20
    [table] = pg.tables([f"{s}.mixed"], [], {f"{s}.mixed": ["filler"]})
    seen: list[LoadProgress] = []
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        report = load_snapshot(
            pg.dsn,
            snap.snapshot_name,
            [table],
            sink,
            workers=3,
            pages_per_range=3,
            consistent_lsn=snap.consistent_lsn,
            progress=seen.append,
            progress_every_s=0,
        )
    [t] = report.tables
    assert t.rows == t.rows_total == 3000 and t.ranges >= 7 and t.ranges_skipped == 0
    assert t.snapshot_lsn == snap.consistent_lsn and not t.reused
    assert seen[-1].rows_done == 3000 and seen[-1].ranges_done == seen[-1].ranges_total == t.ranges
    assert seen[-1].eta_s == 0.0
    expected = _pg_rows(pg, f"{s}.mixed")
    assert _duck_rows(sink, f'"{s}".mixed') == expected
    assert "filler" not in [r[0] for r in sink.con.execute(f'DESCRIBE "{s}".mixed').fetchall()]
    ranges = sink.con.execute(
        'SELECT range_start, range_end, rows FROM _pgbridge.load_progress WHERE "table" = ? ORDER BY range_start',
        [f"{s}.mixed"],
    ).fetchall()
    assert len(ranges) == t.ranges and sum(r[2] for r in ranges) == 3000 and ranges[-1][1] is None


def test_a_range_read_in_several_copies_equals_source(
    pg: Server, sink: DuckDBSink, slot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader copies a range as several COPY statements over page spans sized from what came back."""
    s = _schema(pg)
    _mixed_table(pg, f"{s}.mixed", 3000)
    pg.sql(f"VACUUM ANALYZE {s}.mixed")
    [table] = pg.tables([f"{s}.mixed"])
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 20_000)  # spans are sized by it
    monkeypatch.setattr(copytext, "CHUNK_BYTES", 20_000)  # spans are cut in pieces by it
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        pg.sql(f"INSERT INTO {s}.mixed (id) SELECT g FROM generate_series(100001, 103000) g")  # new pages: not seen
        report = load_snapshot(pg.dsn, snap.snapshot_name, [table], sink, workers=2, pages_per_range=7)
    [t] = report.tables
    assert t.rows == 3000 and t.ranges == len(plan_ranges(table.pages, 7))
    pg.sql(f"DELETE FROM {s}.mixed WHERE id > 100000")
    assert _duck_rows(sink, f'"{s}".mixed') == _pg_rows(pg, f"{s}.mixed")


def test_load_is_as_of_the_slot_snapshot(pg: Server, sink: DuckDBSink, slot: str) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.items (id int PRIMARY KEY, v text)")
    pg.sql(f"INSERT INTO {s}.items SELECT g, 'v' || g FROM generate_series(1, 5000) g")
    tables = pg.tables([f"{s}.*"])
    before = pg.sql(f"SELECT id, v FROM {s}.items ORDER BY id")
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        pg.sql(f"INSERT INTO {s}.items SELECT g, 'late' FROM generate_series(5001, 6000) g")
        pg.sql(f"DELETE FROM {s}.items WHERE id <= 1000")
        pg.sql(f"UPDATE {s}.items SET v = 'changed' WHERE id % 2 = 0")
        report = load_snapshot(pg.dsn, snap.snapshot_name, tables, sink, workers=2, pages_per_range=4)
    assert report.rows == 5000 and report.tables[0].ranges > 2
    assert sink.con.execute(f'SELECT id, v FROM "{s}".items ORDER BY id').fetchall() == before


def test_gone_snapshot_is_a_clear_error(pg: Server, sink: DuckDBSink, slot: str) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.items (id int PRIMARY KEY)")
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        name = snap.snapshot_name
    with pytest.raises(SnapshotError, match="snapshot") as err:
        load_snapshot(pg.dsn, name, pg.tables([f"{s}.*"]), sink)
    assert err.value.hint is not None and "connection open" in err.value.hint


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def _crash_after(ranges: int) -> Callable[[LoadProgress], None]:
    def progress(p: LoadProgress) -> None:
        if p.ranges_done >= ranges:
            raise Crash

    return progress


def _two_tables(pg: Server) -> tuple[str, list[SourceTable]]:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.small (id int PRIMARY KEY, v text)")
    pg.sql(f"INSERT INTO {s}.small SELECT g, 's' || g FROM generate_series(1, 100) g")
    pg.sql(f"CREATE TABLE {s}.big (id int PRIMARY KEY, v text)")
    pg.sql(f"INSERT INTO {s}.big SELECT g, repeat('b', 50) || g FROM generate_series(1, 4000) g")
    pg.sql(f"VACUUM ANALYZE {s}.big")
    tables = sorted(pg.tables([f"{s}.*"]), key=lambda t: t.name)  # big, small
    assert _pages(pg, f"{s}.big") >= 20
    return s, tables


def _warehouse(sink: DuckDBSink, s: str, name: str) -> list[tuple[Any, ...]]:
    return sink.con.execute(f'SELECT id, v FROM "{s}".{name} ORDER BY id').fetchall()


def test_resume_under_the_same_snapshot_skips_recorded_ranges(pg: Server, sink: DuckDBSink, slot: str) -> None:
    s, (big, small) = _two_tables(pg)
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        args: dict[str, Any] = {"pages_per_range": 4, "consistent_lsn": snap.consistent_lsn, "workers": 1}
        load_snapshot(pg.dsn, snap.snapshot_name, [small], sink, **args)
        with pytest.raises(Crash):
            load_snapshot(
                pg.dsn,
                snap.snapshot_name,
                [big],
                sink,
                resume=True,
                progress=_crash_after(3),
                progress_every_s=0,
                **args,
            )
        done = sink.con.execute(
            'SELECT count(*), sum(rows) FROM _pgbridge.load_progress WHERE "table" = ?', [big.qualified]
        ).fetchone()
        assert done is not None and done[0] == 3
        assert sink.con.execute(f'SELECT count(*) FROM "{s}".big').fetchone() == (done[1],)  # nothing half-done

        report = load_snapshot(pg.dsn, snap.snapshot_name, [big, small], sink, resume=True, **args)
    by_name = {t.table: t for t in report.tables}
    assert by_name[small.qualified].ranges == 0 and by_name[small.qualified].ranges_skipped == 1
    r = by_name[big.qualified]
    assert r.ranges_skipped == 3 and r.ranges >= 2 and r.rows == 4000 - done[1] and r.rows_total == 4000
    assert _warehouse(sink, s, "big") == pg.sql(f"SELECT id, v FROM {s}.big ORDER BY id")
    assert _warehouse(sink, s, "small") == pg.sql(f"SELECT id, v FROM {s}.small ORDER BY id")


def test_resume_under_a_new_snapshot_keeps_complete_tables_and_reloads_partial_ones(
    pg: Server, sink: DuckDBSink, slot: str
) -> None:
    s, (big, small) = _two_tables(pg)
    args: dict[str, Any] = {"pages_per_range": 4, "workers": 2}
    with SnapshotSlot.create(pg.dsn, slot) as first:
        small_then = pg.sql(f"SELECT id, v FROM {s}.small ORDER BY id")
        load_snapshot(pg.dsn, first.snapshot_name, [small], sink, consistent_lsn=first.consistent_lsn, **args)
        with pytest.raises(Crash):
            load_snapshot(
                pg.dsn,
                first.snapshot_name,
                [big],
                sink,
                consistent_lsn=first.consistent_lsn,
                progress=_crash_after(2),
                progress_every_s=0,
                **args,
            )
    # The first snapshot is gone; the source moves on; a temporary slot provides the new snapshot.
    pg.sql(f"UPDATE {s}.small SET v = 'new' WHERE id <= 10")
    pg.sql(f"UPDATE {s}.big SET v = 'new' WHERE id % 3 = 0")
    pg.sql(f"INSERT INTO {s}.big SELECT g, 'late' FROM generate_series(4001, 4500) g")
    with SnapshotSlot.create(pg.dsn, f"{slot}_t", temporary=True) as second:
        report = load_snapshot(
            pg.dsn, second.snapshot_name, [big, small], sink, resume=True, consistent_lsn=second.consistent_lsn, **args
        )
    by_name = {t.table: t for t in report.tables}
    kept = by_name[small.qualified]
    assert kept.reused and kept.snapshot_lsn == first.consistent_lsn and kept.ranges == 0
    assert _warehouse(sink, s, "small") == small_then  # as of the first snapshot; the stream brings the rest
    again = by_name[big.qualified]
    assert not again.reused and again.snapshot_lsn == second.consistent_lsn
    assert again.ranges_skipped == 0 and again.rows == again.rows_total == 4500
    assert _warehouse(sink, s, "big") == pg.sql(f"SELECT id, v FROM {s}.big ORDER BY id")
    lsns = sink.con.execute(
        'SELECT DISTINCT consistent_lsn FROM _pgbridge.load_progress WHERE "table" = ?', [big.qualified]
    ).fetchall()
    assert lsns == [(second.consistent_lsn.value,)]


def test_fresh_load_replaces_earlier_data(pg: Server, sink: DuckDBSink, slot: str) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.items (id int PRIMARY KEY)")
    pg.sql(f"INSERT INTO {s}.items SELECT generate_series(1, 10)")
    tables = pg.tables([f"{s}.*"])
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        load_snapshot(pg.dsn, snap.snapshot_name, tables, sink)
        report = load_snapshot(pg.dsn, snap.snapshot_name, tables, sink)
    assert report.rows == 10
    assert sink.con.execute(f'SELECT count(*) FROM "{s}".items').fetchone() == (10,)


def test_empty_tables_and_empty_lines(pg: Server, sink: DuckDBSink, slot: str) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.empty (id int PRIMARY KEY)")
    pg.sql(f"CREATE TABLE {s}.one (t text)")
    pg.sql(f"ALTER TABLE {s}.one REPLICA IDENTITY FULL")
    pg.sql(f"INSERT INTO {s}.one VALUES (''), (NULL), ('x'), (''), (E'\\\\N')")
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        report = load_snapshot(pg.dsn, snap.snapshot_name, pg.tables([f"{s}.*"]), sink)
    assert {t.table: t.rows for t in report.tables} == {f"{s}.empty": 0, f"{s}.one": 5}
    rows = sink.con.execute(f'SELECT t FROM "{s}".one').fetchall()
    assert sorted(rows, key=repr) == sorted([("",), (None,), ("x",), ("",), ("\\N",)], key=repr)


def test_failures_stop_the_load_and_leave_no_half_range(pg: Server, sink: DuckDBSink, slot: str) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.prices (id int PRIMARY KEY, p numeric(12,2), pad text)")
    pg.sql(f"INSERT INTO {s}.prices SELECT g, g / 100.0, repeat('x', 100) FROM generate_series(1, 3000) g")
    pg.sql(f"UPDATE {s}.prices SET p = 'NaN' WHERE id = 2999")  # DECIMAL(12,2) cannot hold it
    pg.sql(f"CREATE TABLE {s}.gone (id int PRIMARY KEY)")
    tables = {t.name: t for t in pg.tables([f"{s}.*"])}
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        with pytest.raises(SinkError, match=r"NaN"):
            load_snapshot(pg.dsn, snap.snapshot_name, [tables["prices"]], sink, pages_per_range=4, workers=2)
        loaded = sink.con.execute(f'SELECT count(*) FROM "{s}".prices').fetchone()
        recorded = sink.con.execute(
            'SELECT coalesce(sum(rows), 0) FROM _pgbridge.load_progress WHERE "table" = ?', [f"{s}.prices"]
        ).fetchone()
        assert loaded == recorded and loaded is not None and loaded[0] < 3000
        pg.sql(f"DROP TABLE {s}.gone")
        with pytest.raises(SnapshotError, match="does not exist"):
            load_snapshot(pg.dsn, snap.snapshot_name, [tables["gone"]], sink)


@pytest.mark.parametrize("fail_at", [2, 9, 23])
def test_a_failure_mid_load_leaves_every_recorded_range_whole(
    pg: Server, sink: DuckDBSink, slot: str, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """Two readers and writers, ranges read in several spans and pieces: a parse fails at some piece.

    Every range the warehouse records must hold exactly the source's rows of those pages, and the
    warehouse nothing else: a range whose end arrived without all its pieces, or a writer that went
    on after the stop, would show up here. Then a resume under the same snapshot completes it.
    """
    s = _schema(pg)
    _mixed_table(pg, f"{s}.mixed", 3000)
    pg.sql(f"VACUUM ANALYZE {s}.mixed")
    [table] = pg.tables([f"{s}.mixed"])
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 20_000)
    monkeypatch.setattr(copytext, "CHUNK_BYTES", 8_000)
    calls, parse = itertools.count(1), snapshot.parse_copy_text  # next() is atomic: parsers run in threads

    def failing(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == fail_at:
            raise UnicodeError("injected")
        return parse(*args, **kwargs)

    monkeypatch.setattr(snapshot, "parse_copy_text", failing)
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        args: dict[str, Any] = {"pages_per_range": 6, "workers": 2, "consistent_lsn": snap.consistent_lsn}
        with pytest.raises(SnapshotError, match="injected"):
            load_snapshot(pg.dsn, snap.snapshot_name, [table], sink, **args)
        ranges = sink.con.execute(
            'SELECT range_start, range_end, rows FROM _pgbridge.load_progress WHERE "table" = ?', [table.qualified]
        ).fetchall()
        held: set[int] = set()
        with psycopg.connect(pg.dsn) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            conn.execute(f"SET TRANSACTION SNAPSHOT '{snap.snapshot_name}'")
            for start, end, rows in ranges:
                bound = f" AND ctid < '({end},0)'::tid" if end is not None else ""
                ids = {r[0] for r in conn.execute(f"SELECT id FROM {s}.mixed WHERE ctid >= '({start},0)'::tid{bound}")}
                assert len(ids) == rows, (start, end)
                held |= ids
        assert {r[0] for r in sink.con.execute(f'SELECT id FROM "{s}".mixed').fetchall()} == held
        assert len(ranges) < len(plan_ranges(table.pages, 6))

        monkeypatch.setattr(snapshot, "parse_copy_text", parse)
        report = load_snapshot(pg.dsn, snap.snapshot_name, [table], sink, resume=True, **args)
    assert report.tables[0].ranges_skipped == len(ranges) and report.tables[0].rows_total == 3000
    assert _duck_rows(sink, f'"{s}".mixed') == _pg_rows(pg, f"{s}.mixed")


def test_a_wide_table_after_a_narrow_one_starts_with_small_spans(
    pg: Server, sink: DuckDBSink, slot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A span's size is learned per table: after a narrow table's spans grew to thousands of pages, a
    table of TOASTed rows must not be read that many pages at a time (it would be one COPY of all of it).
    """
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.a_narrow (id int PRIMARY KEY, v int)")
    pg.sql(f"INSERT INTO {s}.a_narrow SELECT g, g FROM generate_series(1, 200000) g")
    # three rows a page (a 2 kB inline pad), each with 100 kB of incompressible TOASTed text
    pg.sql(f"CREATE TABLE {s}.b_wide (id int PRIMARY KEY, pad text, doc text)")
    pg.sql(f"ALTER TABLE {s}.b_wide ALTER pad SET STORAGE PLAIN, ALTER doc SET STORAGE EXTERNAL")
    pg.sql(
        f"INSERT INTO {s}.b_wide SELECT 1000000 + g, repeat('p', 2000),"
        " (SELECT string_agg(md5(g::text || '.' || i), '') FROM generate_series(1, 3125) i)"
        " FROM generate_series(1, 160) g"
    )
    pg.sql(f"VACUUM ANALYZE {s}.a_narrow, {s}.b_wide")
    tables = pg.tables([f"{s}.*"])
    assert {t.name: t.pages < 100 for t in tables} == {"a_narrow": False, "b_wide": True}
    spans: list[tuple[bool, int]] = []  # (a span of the wide table, its COPY output's size)
    decode = snapshot.decode_binary

    def recorded(buf: bytes, plan: BinaryPlan) -> tuple[pa.Table, bool]:
        spans.append(("b_wide" in plan.select_text, len(buf)))
        return decode(buf, plan)

    monkeypatch.setattr(snapshot, "decode_binary", recorded)
    with SnapshotSlot.create(pg.dsn, slot) as snap:
        report = load_snapshot(pg.dsn, snap.snapshot_name, tables, sink, workers=1, pages_per_range=100_000)
    assert {t.table: t.rows for t in report.tables} == {f"{s}.a_narrow": 200000, f"{s}.b_wide": 160}
    wide = [size for is_wide, size in spans if is_wide]
    assert sum(wide) > 3 * snapshot.CHUNK_BYTES  # the wide table is several chunks' worth
    assert len(wide) >= 3 and max(wide) <= snapshot.CHUNK_BYTES * 3 // 2, wide
    digest = "SELECT id, md5(pad), md5(doc) FROM {}b_wide ORDER BY id"
    assert sink.con.execute(digest.format(f'"{s}".')).fetchall() == pg.sql(digest.format(f"{s}."))


# --------------------------------------------------------------------------------------------
# Binary COPY: the same warehouse as the text path
# --------------------------------------------------------------------------------------------

_EVERY_TYPE = """(
    id int8 PRIMARY KEY, a int2, b int4, c oid, d float4, e float8, f bool, g date, h timestamp,
    i timestamptz, j numeric(12,2), k numeric(18,6), l numeric(5,-2), m numeric(3,5), n text,
    o varchar(20), p char(5), q name, r uuid, s jsonb, t int4[], u interval, v time, w bytea,
    x inet, y cidr, z xml, aa "char", ab {s}.mood, ac json, ad timetz, ae text[], af {s}.pair,
    ag {s}.code, ah {s}.host
)"""
_EVERY_TYPE_SETUP = (
    "CREATE TYPE {s}.mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TYPE {s}.pair AS (a int, b text)",
    "CREATE DOMAIN {s}.code AS char(4)",
    "CREATE DOMAIN {s}.host AS inet",
)
_EVERY_VALUE = """SELECT g,
    CASE g % 7 WHEN 0 THEN NULL WHEN 1 THEN -32768 WHEN 2 THEN 32767 ELSE (g * 37 % 65536 - 32768) END,
    CASE WHEN g % 11 = 0 THEN NULL ELSE (g * 7919 % 4294967296 - 2147483648)::int4 END,
    CASE WHEN g % 13 = 0 THEN NULL ELSE (g * 104729 % 4294967296)::oid END,
    CASE g % 9 WHEN 0 THEN NULL WHEN 1 THEN 'NaN'::float4 WHEN 2 THEN '-Infinity'::float4 WHEN 3 THEN '-0'::float4
        ELSE (g / 7.0)::float4 END,
    CASE g % 9 WHEN 0 THEN NULL WHEN 1 THEN 'Infinity'::float8 WHEN 2 THEN '-0'::float8 WHEN 3 THEN 1e308::float8
        ELSE (-g / 3.0)::float8 END,
    CASE g % 3 WHEN 0 THEN NULL ELSE g % 3 = 1 END,
    CASE g % 6 WHEN 0 THEN NULL WHEN 1 THEN date '0001-01-01' WHEN 2 THEN date '9999-12-31'
        ELSE date '1970-01-01' + (g * 97 % 40000 - 20000) END,
    CASE g % 6 WHEN 0 THEN NULL WHEN 1 THEN timestamp '0001-01-01 00:00:00'
        WHEN 2 THEN timestamp '9999-12-31 23:59:59.999999' ELSE timestamp '2000-01-01' + g * interval '1.000001 s' END,
    CASE g % 5 WHEN 0 THEN NULL ELSE timestamptz '1999-12-31 23:00:00+00' + g * interval '17 min 0.5 s' END,
    CASE g % 8 WHEN 0 THEN NULL WHEN 1 THEN 9999999999.99 WHEN 2 THEN -9999999999.99 WHEN 3 THEN 0
        ELSE ((g * 7919) % 10000000 - 5000000) / 100.0 END,
    CASE g % 8 WHEN 0 THEN NULL WHEN 1 THEN 999999999999.999999 WHEN 2 THEN -0.000001
        ELSE (g * 104729 % 1000000007 - 500000000) / 1000.0 * (10::numeric ^ (g % 7)) END,
    CASE WHEN g % 4 = 0 THEN NULL ELSE (g * 31 % 2000 - 1000) * 1234.5 END,
    CASE WHEN g % 4 = 0 THEN NULL ELSE (g % 199 - 99) / 100000.0 END,
    CASE g % 6 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN E'tab\\there\\nline\\\\back' WHEN 3 THEN 'é ✓ 😀'
        ELSE repeat('x', g % 50) END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE 'v' || g END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE left(g::text, 3) END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE ('n' || g)::name END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE md5(g::text)::uuid END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE jsonb_build_object('g', g, 's', E'a\\tb') END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE ARRAY[g::int4, NULL, -1] END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE make_interval(months => g % 30, days => g % 40, secs => g / 3.0) END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE time '00:00' + g * interval '1.5 s' END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END,
    CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN inet '10.0.0.1' WHEN 2 THEN inet '10.1.0.0/16' ELSE inet '::1' END,
    CASE g % 3 WHEN 0 THEN NULL ELSE cidr '10.0.0.0/8' END,
    CASE g % 3 WHEN 0 THEN NULL WHEN 1 THEN xml '<?xml version="1.0"?><a>1</a>' ELSE xml '<b/>' END,
    CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN 'a'::"char" ELSE chr(128 + g % 100)::"char" END,
    (ARRAY[NULL, 'sad', 'ok', 'happy']::{s}.mood[])[1 + g % 4],
    CASE WHEN g % 5 = 0 THEN NULL ELSE json_build_object('g', g) END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE timetz '12:00:00+02' + g * interval '1 s' END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE ARRAY[E'a\tb', 'c"d', NULL, E'back\\slash', '', 'x,y'] END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE ROW(g, E'q\t"')::{s}.pair END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE 'ab' END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE inet '192.168.0.1' END
FROM generate_series(1, %s) g"""


def _load_both_ways(
    pg: Server,
    tables: list[SourceTable],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    policy: MappingPolicy | None = None,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], dict[str, int]]:
    """The table loaded by the binary path and by the text path; and how the binary spans went."""
    spans = {"decoded": 0, "as text": 0}
    decode = snapshot.decode_binary

    def counted(buf: bytes, plan: BinaryPlan) -> tuple[pa.Table, bool]:
        try:
            out = decode(buf, plan)
        except Unsupported:
            spans["as text"] += 1
            raise
        spans["decoded"] += 1
        return out

    monkeypatch.setattr(snapshot, "decode_binary", counted)
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 64_000)  # many spans
    loaded = []
    for way in ("binary", "text"):
        if way == "text":
            monkeypatch.setattr(snapshot, "binary_plan", lambda *args: None)
        sink = DuckDBSink(tmp_path / f"{way}.duckdb", "test")
        try:
            slot = f"snap_{uuid.uuid4().hex[:8]}"
            with SnapshotSlot.create(pg.dsn, slot, temporary=True) as snap:
                load_snapshot(pg.dsn, snap.snapshot_name, tables, sink, workers=2, pages_per_range=50, policy=policy)
            rows = sink.con.execute(f"SELECT * FROM {name} ORDER BY id").fetchall()
            # floats by their repr: NaN equals NaN, and -0.0 does not equal 0.0
            loaded.append([tuple(repr(v) if isinstance(v, float) else v for v in r) for r in rows])
        finally:
            sink.close()
    return loaded[0], loaded[1], spans


def test_the_binary_copy_loads_what_the_text_copy_loads(
    pg: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _schema(pg)
    for statement in _EVERY_TYPE_SETUP:
        pg.sql(statement.format(s=s))
    pg.sql(f"CREATE TABLE {s}.every " + _EVERY_TYPE.replace("{s}", s))
    pg.sql(f"INSERT INTO {s}.every " + _EVERY_VALUE.replace("%s", "20000").replace("{s}", s))
    pg.sql(f"VACUUM ANALYZE {s}.every")
    tables = pg.tables([f"{s}.every"])
    binary, text, spans = _load_both_ways(pg, tables, tmp_path, monkeypatch, f'"{s}".every')
    assert len(binary) == 20000 and binary == text
    assert spans["decoded"] >= 10 and spans["as text"] == 0, spans  # every span went the binary way
    assert {r[4] for r in binary if r[0] % 9 in (1, 2, 3)} == {"nan", "-inf", "-0.0"}
    assert {r[24] for r in binary} == {None, "10.0.0.1", "10.1.0.0/16", "::1"}  # inet as COPY writes it
    assert {r[26] for r in binary} == {None, "<a>1</a>", "<b/>"}  # xml too (its ::text keeps the declaration)
    assert {r[33] for r in binary} == {None, "ab  "} and {r[34] for r in binary} == {None, "192.168.0.1"}


def test_a_span_the_binary_decoder_refuses_is_copied_as_text(
    pg: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values the typed parse refuses too (infinity, BC, NaN in a numeric) take the text path, span by span."""
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.odd (id int8 PRIMARY KEY, ts timestamptz, d date, n numeric(10,3), pad text)")
    pg.sql(  # three rows far apart, in three spans
        f"INSERT INTO {s}.odd SELECT g,"
        " CASE g WHEN 3000 THEN 'infinity' ELSE timestamptz '2024-01-01' + g * interval '1 s' END,"
        " CASE g WHEN 9000 THEN '0044-03-15 BC' ELSE date '2024-01-01' + g % 1000 END,"
        " CASE g WHEN 15000 THEN 'NaN' ELSE g / 7.0 END, repeat('p', 100) FROM generate_series(1, 20000) g"
    )
    pg.sql(f"VACUUM ANALYZE {s}.odd")
    tables = pg.tables([f"{s}.odd"])
    nan_is_null = MappingPolicy(numeric_nan="null")
    binary, text, spans = _load_both_ways(pg, tables, tmp_path, monkeypatch, f'"{s}".odd', nan_is_null)
    assert len(binary) == 20000 and binary == text
    assert spans["as text"] == 3 and spans["decoded"] >= 10, spans
    assert [r[3] for r in binary if r[0] == 15000] == [None]  # NaN, as the policy says


def test_a_table_with_such_values_throughout_goes_over_to_text(
    pg: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not every span read twice: after a few refusals the rest of the table is read as text."""
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.open (id int8 PRIMARY KEY, valid_to timestamptz, pad text)")
    pg.sql(f"INSERT INTO {s}.open SELECT g, 'infinity', repeat('p', 100) FROM generate_series(1, 20000) g")
    pg.sql(f"VACUUM ANALYZE {s}.open")
    binary, text, spans = _load_both_ways(pg, pg.tables([f"{s}.open"]), tmp_path, monkeypatch, f'"{s}".open')
    assert len(binary) == 20000 and binary == text
    # when the third refusal switches the table over, each of the two readers may hold a span read in
    # binary and be reading the next
    assert spans["decoded"] == 0 and 3 <= spans["as text"] <= 3 + 2 * 2, spans


def test_a_table_with_a_wide_numeric_is_copied_as_text(pg: Server) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.wide (id int8 PRIMARY KEY, n numeric(30,4))")
    pg.sql(f"CREATE TABLE {s}.narrow (id int8 PRIMARY KEY, n numeric(18,4), u numeric, i interval)")
    for st in pg.tables([f"{s}.*"]):
        stt = sink_table(st)
        plan = binary_plan(st, stt, copytext.copy_plan(st, stt, "x"))
        assert (plan is None) == (st.name == "wide"), st.name
        if plan is not None:  # the columns without a decoder are selected as text
            assert plan.kinds == b"lnTT" and '"u"::text' in plan.select_text and '"i"::text' in plan.select_text


def test_without_the_extension_every_table_is_copied_as_text(pg: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _schema(pg)
    pg.sql(f"CREATE TABLE {s}.t (id int8 PRIMARY KEY, v text)")
    [st] = pg.tables([f"{s}.t"])
    stt = sink_table(st)
    plan = copytext.copy_plan(st, stt, "x")
    assert binary_plan(st, stt, plan) is not None
    monkeypatch.setattr(copybinary, "_copybin", None)  # as when no compiler built it
    assert binary_plan(st, stt, plan) is None
