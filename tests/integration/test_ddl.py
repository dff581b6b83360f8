"""Schema changes reach the warehouse in order with the data: the DDL capture's event triggers, the
pipeline daemon and DuckDB, on a bare server. Each step is checked against the source exactly
(column names and types' values, every row), and a restart replays DDL made while it was down."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import psycopg
import pytest

from pgbridge.cdc import ddl
from pgbridge.cdc.pipeline import query, request
from pgbridge.ops.pipeline import remove_source_functions
from tests.integration.daemon import Daemon, drop_inactive_slots, pipeline_config
from tests.pgserver import Server, bare_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg() -> Iterator[Server]:
    with bare_server("ddl") as server:
        with psycopg.connect(server.dsn, autocommit=True) as c:
            for statement in ddl.install_sql():
                c.execute(statement.encode())
        yield server


def norm(v: object) -> object:
    """Values as the query socket's JSON carries them (decimals and UUIDs as text)."""
    if isinstance(v, Decimal | UUID):
        return str(v)
    if isinstance(v, float):
        return round(v, 9)
    return v


def source(pg: Server, table: str) -> tuple[list[str], list[tuple[object, ...]]]:
    with psycopg.connect(pg.dsn) as c:
        cur = c.execute(f"SELECT * FROM {table} ORDER BY 1")
        cols = [d.name for d in cur.description or ()]
        return cols, [tuple(norm(v) for v in r) for r in cur.fetchall()]


def warehouse(sock: Path, table: str) -> tuple[list[str], list[tuple[object, ...]]] | None:
    r = query(sock, f"SELECT * FROM {table} ORDER BY 1")
    if "error" in r:
        return None
    return list(r["columns"]), [tuple(norm(v) for v in row) for row in r["rows"]]


def converge(pg: Server, sock: Path, table: str, timeout: float = 60) -> None:
    deadline, got = time.monotonic() + timeout, None
    want = source(pg, table)
    while time.monotonic() < deadline:
        want = source(pg, table)
        got = warehouse(sock, table)
        if got == want:
            return
        time.sleep(0.2)
    diff = [(w, g) for w, g in zip(want[1], got[1] if got else [], strict=False) if w != g][:5]
    raise AssertionError(f"{table}: warehouse {got and got[0]} vs source {want[0]}; first differences {diff}")


def publish_and_start(pg: Server, schema: str, tmp_path: Path, name: str, **batch: int) -> Daemon:
    """Publish every table of ``schema`` and start a pipeline daemon on it."""
    pg.sql(f"CREATE PUBLICATION pub_{schema} FOR TABLES IN SCHEMA {schema}")
    d = Daemon(pipeline_config(pg, schema, tmp_path, name, **batch))
    d.start()
    return d


def gone(sock: Path, table: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if warehouse(sock, table) is None:
            return
        time.sleep(0.2)
    raise AssertionError(f"{table} still in the warehouse")


def test_ddl_reaches_the_warehouse_in_order_with_the_data(pg: Server, tmp_path: Path) -> None:
    s = f"d_{uuid.uuid4().hex[:6]}"
    a, b = f"{s}.a", f"{s}.b"
    pg.sql(f"CREATE SCHEMA {s}")
    pg.sql(f"CREATE TABLE {a} (id int PRIMARY KEY, v text, n numeric(10,2))")
    pg.sql(f"INSERT INTO {a} SELECT g, 'v' || g, g / 4.0 FROM generate_series(1, 500) g")
    d = publish_and_start(pg, s, tmp_path, "ddl")
    sock = Path(d.cfg.socket)
    try:
        converge(pg, sock, a)  # the initial load
        # ADD COLUMN with a default: existing rows read it, though no row change is in the WAL.
        pg.sql(f"ALTER TABLE {a} ADD COLUMN c int DEFAULT 7")
        pg.sql(f"INSERT INTO {a} (id, v, n, c) VALUES (501, 'x', 1.5, 9)")
        converge(pg, sock, a)
        # RENAME keeps the values; changes under the new name follow.
        pg.sql(f"ALTER TABLE {a} RENAME COLUMN v TO w")
        pg.sql(f"UPDATE {a} SET w = 'renamed' WHERE id <= 10")
        converge(pg, sock, a)
        # Type changes rewrite the table (with a USING expression the warehouse could never guess).
        pg.sql(f"ALTER TABLE {a} ALTER COLUMN id TYPE bigint")
        pg.sql(f"ALTER TABLE {a} ALTER COLUMN n TYPE numeric(12,3) USING n * 2")
        pg.sql(f"INSERT INTO {a} (id, w, n, c) VALUES (5000000000, 'big', 2.125, 1)")
        converge(pg, sock, a)
        # DDL in the middle of a transaction: rows before it have the old shape, rows after the new.
        with psycopg.connect(pg.dsn) as c:
            c.execute(f"INSERT INTO {a} (id, w) VALUES (600, 'before')")
            c.execute(f"ALTER TABLE {a} ADD COLUMN e text")
            c.execute(f"INSERT INTO {a} (id, w, e) VALUES (601, 'after', 'e')")
            c.execute(f"UPDATE {a} SET e = 'both' WHERE id = 600")
        pg.sql(f"ALTER TABLE {a} DROP COLUMN c")
        pg.sql(f"ALTER TABLE {a} ADD COLUMN r float8 DEFAULT random()")  # volatile: a rewrite
        converge(pg, sock, a)
        # CREATE TABLE: present (empty) before any row, then filled; DROP TABLE removes it.
        pg.sql(f"CREATE TABLE {b} (k uuid PRIMARY KEY, n int)")
        converge(pg, sock, b)
        pg.sql(f"INSERT INTO {b} SELECT gen_random_uuid(), g FROM generate_series(1, 20) g")
        converge(pg, sock, b)
        pg.sql(f"DROP TABLE {b}")
        gone(sock, b)
        # DDL while the pipeline is down is replayed from the checkpoint, with the shapes of then.
        d.stop()
        pg.sql(f"ALTER TABLE {a} ADD COLUMN f int")
        pg.sql(f"UPDATE {a} SET f = id % 3")
        pg.sql(f"ALTER TABLE {a} RENAME COLUMN e TO e2")
        pg.sql(f"ALTER TABLE {a} DROP COLUMN r")
        pg.sql(f"DELETE FROM {a} WHERE id % 5 = 0")
        d.start()
        converge(pg, sock, a)
        assert not d.pipeline or not d.pipeline.status.needs_resync
    finally:
        d.stop()
        drop_inactive_slots(pg)


def test_random_dml_interleaved_with_random_ddl(pg: Server, tmp_path: Path) -> None:
    """The differential oracle with schema changes in the mix, a TOASTed column left unchanged by
    updates, key moves, a TRUNCATE and one transaction larger than the batch limit."""
    import random

    rng = random.Random(20261121)
    s = f"r_{uuid.uuid4().hex[:6]}"
    t = f"{s}.t"
    pg.sql(f"CREATE SCHEMA {s}")
    pg.sql(f"CREATE TABLE {t} (id int PRIMARY KEY, doc text, c0 int)")
    d = publish_and_start(pg, s, tmp_path, "rnd", max_rows=2000)
    big = "".join(uuid.uuid4().hex for _ in range(400))  # stored out of line
    extra: list[str] = ["c0"]
    next_id, serial = 1, 1
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            for step in range(120):
                op = rng.random()
                with c.transaction():
                    if op < 0.08:  # schema change, sometimes with rows around it in the same transaction
                        c.execute(f"INSERT INTO {t} (id, doc) VALUES (%s, 'pre')", (next_id,))
                        next_id += 1
                        kind = rng.choice(["add", "drop", "rename", "type"] if extra else ["add"])
                        if kind == "add":
                            name = f"c{serial}"
                            serial += 1
                            c.execute(f"ALTER TABLE {t} ADD COLUMN {name} int DEFAULT {rng.randint(0, 9)}")
                            extra.append(name)
                        elif kind == "drop":
                            c.execute(f"ALTER TABLE {t} DROP COLUMN {extra.pop(rng.randrange(len(extra)))}")
                        elif kind == "rename":
                            i, name = rng.randrange(len(extra)), f"c{serial}"
                            serial += 1
                            c.execute(f"ALTER TABLE {t} RENAME COLUMN {extra[i]} TO {name}")
                            extra[i] = name
                        else:
                            col = rng.choice(extra)
                            c.execute(f"ALTER TABLE {t} ALTER COLUMN {col} TYPE bigint USING {col} * 3")
                    elif op < 0.45 or next_id < 20:
                        for _ in range(rng.randint(1, 8)):
                            cols = ["id", "doc", *extra]
                            vals = [next_id, rng.choice([None, big, "small"])] + [
                                rng.choice([None, rng.randint(-5, 5)]) for _ in extra
                            ]
                            c.execute(
                                f"INSERT INTO {t} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})", vals
                            )
                            next_id += 1
                    elif op < 0.7 and extra:  # leaves doc (maybe TOASTed) unchanged
                        c.execute(f"UPDATE {t} SET {rng.choice(extra)} = %s WHERE id %% 5 = %s", (step, step % 5))
                    elif op < 0.78:
                        c.execute(f"UPDATE {t} SET id = id + 100000 WHERE id = (SELECT min(id) FROM {t})")
                    elif op < 0.95:
                        c.execute(f"DELETE FROM {t} WHERE id %% 7 = %s", (step % 7,))
                    elif op < 0.97:
                        c.execute(f"TRUNCATE {t}")
                    else:
                        c.execute(f"UPDATE {t} SET doc = %s WHERE id %% 3 = 0", (big[::-1],))
            with c.transaction():  # larger than max_rows: applied in chunks inside one warehouse transaction
                c.execute(
                    f"INSERT INTO {t} (id, doc) SELECT g, 'bulk' FROM generate_series(%s::int, %s::int) g",
                    (next_id, next_id + 7000),
                )
                c.execute(f"UPDATE {t} SET doc = 'bulk2' WHERE id > %s", (next_id + 3500,))
        converge(pg, Path(d.cfg.socket), f"(SELECT * FROM {t} ORDER BY id LIMIT 10000) q")
        converge(pg, Path(d.cfg.socket), f"(SELECT count(*) AS n, sum(length(doc)) AS l FROM {t}) q")
        assert d.pipeline is not None and not d.pipeline.status.needs_resync
    finally:
        d.stop()
        drop_inactive_slots(pg)


def test_a_rewrite_of_a_table_without_a_key_is_resynced_exactly(pg: Server, tmp_path: Path) -> None:
    # REPLICA IDENTITY FULL, no unique key: the rows re-copied after a rewrite are read "as of now",
    # and the stream replays the changes between; the pipeline resyncs the table exactly after it.
    s = f"f_{uuid.uuid4().hex[:6]}"
    t = f"{s}.events"
    pg.sql(f"CREATE SCHEMA {s}")
    pg.sql(f"CREATE TABLE {t} (kind text, qty int)")
    pg.sql(f"ALTER TABLE {t} REPLICA IDENTITY FULL")
    pg.sql(f"INSERT INTO {t} SELECT 'k' || g % 3, g % 2 FROM generate_series(1, 300) g")
    d = publish_and_start(pg, s, tmp_path, "ddlbag")
    sock = Path(d.cfg.socket)
    sql = f"SELECT kind, qty::text, count(*) FROM {t} GROUP BY 1, 2 ORDER BY 1, 2"
    try:
        converge_rows(pg, sock, sql)
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            deadline, altered = time.monotonic() + 1.5, False
            while time.monotonic() < deadline:  # identical rows come and go before and after the rewrite
                c.execute(f"INSERT INTO {t} VALUES ('k1', 1), ('k1', 1)".encode())
                c.execute(f"DELETE FROM {t} WHERE ctid = (SELECT ctid FROM {t} WHERE kind = 'k1' LIMIT 1)".encode())
                if not altered and time.monotonic() > deadline - 1.2:
                    c.execute(f"ALTER TABLE {t} ALTER COLUMN qty TYPE bigint".encode())
                    altered = True
                time.sleep(0.005)
        converge_rows(pg, sock, sql)
        wait_resynced(d)
    finally:
        d.stop()
        drop_inactive_slots(pg)


def wait_resynced(d: Daemon, timeout: float = 10) -> None:
    """Wait until no table waits for a resync: the status is written once the loop is back from it."""
    deadline = time.monotonic() + timeout
    while d.pipeline is None or d.pipeline.status.needs_resync:
        assert time.monotonic() < deadline, d.pipeline and d.pipeline.status.needs_resync
        time.sleep(0.1)


def converge_rows(pg: Server, sock: Path, sql: str, timeout: float = 60) -> None:
    """Wait until ``sql`` gives the same rows on the source and in the warehouse."""
    deadline, got, want = time.monotonic() + timeout, None, None
    while time.monotonic() < deadline:
        want = [tuple(norm(v) for v in r) for r in pg.sql(sql)]
        r = query(sock, sql)
        got = None if "error" in r else [tuple(norm(v) for v in row) for row in r["rows"]]
        if got == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"warehouse {got} vs source {want}")


def test_a_stopped_table_stays_stopped_through_later_ddl_and_a_rename(pg: Server, tmp_path: Path) -> None:
    """A table stops when it loses its key; the rows it misses are not brought back by a key added
    again or a rename, so it stays stopped (under its new name) until a resync copies it."""
    s = f"k_{uuid.uuid4().hex[:6]}"
    pg.sql(f"CREATE SCHEMA {s}")
    pg.sql(f"CREATE TABLE {s}.t (id int PRIMARY KEY, v text)")
    pg.sql(f"INSERT INTO {s}.t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    d = publish_and_start(pg, s, tmp_path, "ddlstop")
    sock = Path(d.cfg.socket)

    def stopped(table: str) -> dict[str, str]:
        deadline = time.monotonic() + 30
        while d.pipeline is None or table not in d.pipeline.status.needs_resync:
            assert time.monotonic() < deadline, d.pipeline and d.pipeline.status.needs_resync
            time.sleep(0.1)
        return d.pipeline.status.needs_resync

    try:
        converge(pg, sock, f"{s}.t")
        pg.sql(f"ALTER TABLE {s}.t DROP CONSTRAINT t_pkey")
        stopped(f"{s}.t")
        pg.sql(f"INSERT INTO {s}.t SELECT g, 'missed' FROM generate_series(101, 150) g")
        pg.sql(f"ALTER TABLE {s}.t ADD PRIMARY KEY (id)")
        pg.sql(f"ALTER TABLE {s}.t RENAME TO t2")
        pg.sql(f"INSERT INTO {s}.t2 VALUES (151, 'after')")
        why = stopped(f"{s}.t2")
        assert f"{s}.t" not in why and f"resync {s}.t2" in why[f"{s}.t2"]
        time.sleep(1)  # the insert after the rename is streamed: the table must still be stopped
        assert f"{s}.t2" in d.pipeline.status.needs_resync  # type: ignore[union-attr]
        answer = request(sock, {"op": "resync", "tables": [f"{s}.t2"]}, timeout=120)
        assert "error" not in answer, answer
        converge(pg, sock, f"{s}.t2")
        wait_resynced(d)
    finally:
        d.stop()
        drop_inactive_slots(pg)


def test_the_capture_is_removed_and_its_schema_only_when_nothing_else_lives_there() -> None:
    """What `up` does once the spec has no pipeline (ops.pipeline.remove_source_functions)."""

    def installed(c: psycopg.Connection) -> tuple[int, bool]:
        triggers = c.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgbridge%'").fetchone()
        schema = c.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (ddl.SCHEMA,)).fetchone()
        assert triggers is not None
        return triggers[0], schema is not None

    with bare_server("uninstall") as srv, psycopg.connect(srv.dsn, autocommit=True) as c:
        assert not remove_source_functions(c)  # never installed: nothing to do
        for statement in ddl.install_sql():
            c.execute(statement.encode())
        c.execute(f"CREATE TABLE {ddl.SCHEMA}.someone_elses (id int)")
        c.execute(f"CREATE FUNCTION {ddl.SCHEMA}.theirs() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        assert installed(c) == (3, True)
        assert remove_source_functions(c)
        assert installed(c) == (0, True)  # the schema holds another table: it stays, with it
        assert not remove_source_functions(c)  # nothing of pgbridge's left to remove
        c.execute("CREATE TABLE t (id int)")  # DDL runs without the capture
        for statement in ddl.install_sql():
            c.execute(statement.encode())
        c.execute(f"DROP TABLE {ddl.SCHEMA}.someone_elses")
        c.execute(f"DROP FUNCTION {ddl.SCHEMA}.theirs()")
        assert remove_source_functions(c)
        assert installed(c) == (0, False)
