"""`pipeline validate` and `pipeline resync TABLE` in the daemon, on a bare server: validation
catches rows changed in the warehouse behind the pipeline's back, tolerates changes in flight,
and `repair` / `resync` make the warehouse equal to the source again."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgbridge.cdc.pipeline import Pipeline, query, request
from tests.integration.daemon import Daemon, drop_inactive_slots, pipeline_config
from tests.pgserver import Server, bare_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg() -> Iterator[Server]:
    with bare_server("validate") as server:
        yield server


@pytest.fixture
def running(pg: Server, tmp_path: Path) -> Iterator[tuple[str, Daemon]]:
    s = f"v_{uuid.uuid4().hex[:6]}"
    pg.sql(f"CREATE SCHEMA {s}")
    pg.sql(f"CREATE TABLE {s}.items (id bigint PRIMARY KEY, qty int, note text)")
    pg.sql(f"CREATE TABLE {s}.tags (name text PRIMARY KEY, n int)")
    pg.sql(f"INSERT INTO {s}.items SELECT g, g % 7, 'n' || g FROM generate_series(1, 30000) g")
    pg.sql(f"INSERT INTO {s}.tags SELECT 't' || g, g FROM generate_series(1, 300) g")
    # No unique key: many identical rows, NULL in the column the ranges are cut by.
    pg.sql(f"CREATE TABLE {s}.events (kind text, qty int)")
    pg.sql(f"ALTER TABLE {s}.events REPLICA IDENTITY FULL")
    kind = "CASE WHEN g % 5 > 0 THEN 'k' || g % 3 END"
    pg.sql(f"INSERT INTO {s}.events SELECT {kind}, g % 2 FROM generate_series(1, 3000) g")
    pg.sql(f"CREATE PUBLICATION pub_{s} FOR TABLES IN SCHEMA {s}")
    cfg = pipeline_config(pg, s, tmp_path, "v")
    d = Daemon(cfg)
    d.start()
    try:
        converge(pg, Path(cfg.socket), f"{s}.items")
        # The loaded rows are queryable a moment before the phase turns to streaming, and validate
        # and resync answer only once it has.
        deadline = time.monotonic() + 30
        while d.pipeline is None or d.pipeline.status.phase != "streaming":
            assert time.monotonic() < deadline, "the pipeline did not start streaming"
            time.sleep(0.05)
        yield s, d
    finally:
        d.stop()
        drop_inactive_slots(pg)


def converge(pg: Server, sock: Path, table: str, timeout: float = 60) -> None:
    sql = f"SELECT count(*), sum(qty), sum(length(note)) FROM {table}"
    deadline, got, want = time.monotonic() + timeout, None, None
    while time.monotonic() < deadline:
        want = [int(v or 0) for v in pg.sql(sql)[0]]  # type: ignore[union-attr]
        got = query(sock, sql)
        if "error" not in got and [int(v or 0) for v in got["rows"][0]] == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"{table} did not converge: {got} vs {want}")


def validate(d: Daemon, **args: object) -> dict[str, dict[str, object]]:
    answer = request(Path(d.cfg.socket), {"op": "validate", **args}, timeout=600)
    assert "error" not in answer, answer
    return {t["table"]: t for t in answer["tables"]}


def tamper(p: Pipeline, sql: str) -> None:
    """Change the warehouse behind the pipeline's back (a bug, a manual edit, a bad restore)."""
    cur = p.sink.con.cursor()
    cur.execute(sql)
    cur.close()


def test_validate_finds_a_row_changed_in_the_warehouse_and_repair_fixes_it(running: tuple[str, Daemon]) -> None:
    s, d = running
    assert d.pipeline is not None
    result = validate(d)
    assert all(t["ok"] for t in result.values()), result
    assert result[f"{s}.items"]["source_rows"] == 30000
    tamper(d.pipeline, f'UPDATE "{s}"."items" SET qty = 99 WHERE id = 12345')
    tamper(d.pipeline, f'DELETE FROM "{s}"."tags" WHERE name = \'t7\'')
    tamper(d.pipeline, f'INSERT INTO "{s}"."tags" VALUES (\'zzz\', 1)')
    result = validate(d)
    items, tags = result[f"{s}.items"], result[f"{s}.tags"]
    assert not items["ok"] and not tags["ok"]
    diffs = items["differences"]
    assert isinstance(diffs, list) and len(diffs) == 1  # one key range, the one holding id 12345
    assert diffs[0]["low"] <= 12345 and (diffs[0]["high"] is None or diffs[0]["high"] > 12345)
    assert tags["warehouse_rows"] == tags["source_rows"]  # one row gone, one extra: counts alone miss it
    repaired = validate(d, repair=True)
    assert repaired[f"{s}.items"]["repaired"] and repaired[f"{s}.tags"]["repaired"]
    assert all(t["ok"] for t in validate(d).values())


def test_validate_tolerates_changes_in_flight(pg: Server, running: tuple[str, Daemon]) -> None:
    s, d = running
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            i = 0
            while not stop.is_set():
                i += 1
                c.execute(f"UPDATE {s}.items SET qty = qty + 1 WHERE id = %s", (1 + (i * 7919) % 30000,))
                c.execute(f"INSERT INTO {s}.items VALUES (%s, 1, 'live')", (100000 + i,))
                c.execute(f"DELETE FROM {s}.items WHERE id = %s", (1 + (i * 104729) % 30000,))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.5)
        result = validate(d)
    finally:
        stop.set()
        writer.join()
    assert all(t["ok"] for t in result.values()), result


def test_resync_table_recopies_it(pg: Server, running: tuple[str, Daemon]) -> None:
    s, d = running
    assert d.pipeline is not None
    tamper(d.pipeline, f'DELETE FROM "{s}"."items" WHERE id < 1000')
    answer = request(Path(d.cfg.socket), {"op": "resync", "tables": [f"{s}.items"]}, timeout=600)
    assert answer == {"tables": [{"table": f"{s}.items", "rows": 30000}]}
    pg.sql(f"UPDATE {s}.items SET note = 'after' WHERE id < 10")  # the stream goes on after it
    converge(pg, Path(d.cfg.socket), f"{s}.items")
    bad = request(Path(d.cfg.socket), {"op": "resync", "tables": [f"{s}.nope"]})
    assert "not a table this pipeline replicates" in bad["error"]


def test_validate_counts_copies_of_identical_rows_and_repair_restores_them(
    pg: Server, running: tuple[str, Daemon]
) -> None:
    s, d = running
    assert d.pipeline is not None
    events = f"{s}.events"
    one = f"ctid = (SELECT ctid FROM {events} WHERE kind = 'k2' AND qty = 1 LIMIT 1)"
    pg.sql(f"DELETE FROM {events} WHERE {one}")  # the stream removes one copy of 200
    pg.sql(f"UPDATE {events} SET qty = 5 WHERE {one}")
    assert validate(d, tables=[events])[events]["ok"]
    target = f'"{s}"."events"'
    tamper(d.pipeline, f"DELETE FROM {target} WHERE rowid = (SELECT min(rowid) FROM {target} WHERE kind IS NULL)")
    tamper(d.pipeline, f"INSERT INTO {target} VALUES ('k1', 1)")  # one more copy of a row it holds
    result = validate(d, tables=[events])[events]
    assert not result["ok"] and result["warehouse_rows"] == result["source_rows"], result
    # Copies of identical rows come and go while repair and resync run: rows copied ahead of the
    # stream would meet those changes again when it replays them, and be doubled or removed twice.
    churn = [
        f"INSERT INTO {events} VALUES ('k1', 1), ('k1', 1)",
        f"DELETE FROM {events} WHERE ctid = (SELECT ctid FROM {events} WHERE kind = 'k1' AND qty = 1 LIMIT 1)",
    ]
    with writing(pg, churn):
        assert validate(d, tables=[events], repair=True)[events]["repaired"]
    assert validate(d, tables=[events])[events]["ok"]
    with writing(pg, churn):
        answer = request(Path(d.cfg.socket), {"op": "resync", "tables": [events]}, timeout=600)
        assert "error" not in answer, answer
    assert validate(d, tables=[events])[events]["ok"]
    want = pg.sql(f"SELECT kind, qty, count(*) FROM {events} GROUP BY 1, 2 ORDER BY 1, 2")
    got = query(Path(d.cfg.socket), f"SELECT kind, qty, count(*) FROM {target} GROUP BY 1, 2 ORDER BY 1, 2")
    assert [tuple(r) for r in got["rows"]] == [tuple(r) for r in want]


@contextlib.contextmanager
def writing(pg: Server, statements: list[str]) -> Iterator[None]:
    """Run ``statements`` over and over, each in its own transaction, while the block runs."""
    stop, failed = threading.Event(), []

    def run() -> None:
        try:
            with psycopg.connect(pg.dsn, autocommit=True) as c:
                while not stop.is_set():
                    for statement in statements:
                        c.execute(statement.encode())
                    time.sleep(0.002)
        except Exception as e:  # reported by the test, not lost with the thread
            failed.append(e)

    writer = threading.Thread(target=run)
    writer.start()
    try:
        time.sleep(0.2)
        yield
    finally:
        stop.set()
        writer.join()
    assert not failed, failed


def test_a_keyless_table_stopped_by_an_identity_change_streams_again_after_resync(
    pg: Server, running: tuple[str, Daemon]
) -> None:
    s, d = running
    assert d.pipeline is not None
    t = f"{s}.tickets"
    pg.sql(f"CREATE TABLE {t} (n int NOT NULL, note text)")
    pg.sql(f"ALTER TABLE {t} REPLICA IDENTITY FULL")
    pg.sql(f"INSERT INTO {t} SELECT g, 'a' FROM generate_series(1, 100) g")
    sql = f"SELECT count(*), sum(n), string_agg(note, '' ORDER BY n) FROM {t}"
    converge_query(pg, Path(d.cfg.socket), sql)
    # With no DDL capture on this server, the pipeline learns of the new identity only from the
    # changes: old keys instead of whole old rows, which match no copy of a row.
    pg.sql(f"CREATE UNIQUE INDEX tickets_n ON {t} (n)")
    pg.sql(f"ALTER TABLE {t} REPLICA IDENTITY USING INDEX tickets_n")
    pg.sql(f"UPDATE {t} SET note = 'b' WHERE n <= 10")
    deadline = time.monotonic() + 30
    while t not in d.pipeline.status.needs_resync:
        assert time.monotonic() < deadline, "the table did not stop"
        time.sleep(0.1)
    answer = request(Path(d.cfg.socket), {"op": "resync", "tables": [t]}, timeout=600)
    assert answer == {"tables": [{"table": t, "rows": 100}]}, answer
    pg.sql(f"UPDATE {t} SET note = 'c' WHERE n <= 5")  # keyed now, and streamed again
    converge_query(pg, Path(d.cfg.socket), sql)
    deadline = time.monotonic() + 10  # the status is written once the loop is back from the job
    while t in d.pipeline.status.needs_resync:
        assert time.monotonic() < deadline, d.pipeline.status.needs_resync
        time.sleep(0.1)


def converge_query(pg: Server, sock: Path, sql: str, timeout: float = 60) -> None:
    deadline, got, want = time.monotonic() + timeout, None, None
    while time.monotonic() < deadline:
        want = [list(r) for r in pg.sql(sql)]
        got = query(sock, sql)
        if "error" not in got and got["rows"] == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"{sql} did not converge: {got} vs {want}")
