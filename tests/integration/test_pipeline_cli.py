"""The pipeline as a user meets it: declared in the spec, started by `up`, supervised, queried."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import Env, make_env

pytestmark = pytest.mark.integration

PIPELINE = """\
pipeline:
  name: analytics
  tables: {exclude: [shop.secret_*], exclude_columns: {shop.customers: [password_hash]}}
  batch: {max_wait_ms: 100}
"""


@pytest.fixture(scope="module")
def dep() -> Iterator[Env]:
    e = make_env("cdc")
    e.write_spec(PIPELINE)
    try:
        e.run("up")
        yield e
    finally:
        e.cleanup()


def app(e: Env) -> psycopg.Connection:
    return psycopg.connect(e.dsn(), autocommit=True, connect_timeout=5)


def warehouse(e: Env, sql: str) -> list[dict[str, object]]:
    return json.loads(e.run("query", sql, "--json").stdout)  # type: ignore[no-any-return]


def wait_same(e: Env, source_sql: str, warehouse_sql: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with app(e) as c:
            want = [list(r) for r in c.execute(source_sql).fetchall()]
        r = e.run("query", warehouse_sql, "--json", check=False)
        got = [list(d.values()) for d in json.loads(r.stdout)] if r.returncode == 0 else None
        if got is not None and [[str(v) for v in row] for row in got] == [[str(v) for v in row] for row in want]:
            return
        if time.monotonic() > deadline:
            log = e.home / "logs" / "pipeline-analytics.log"
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            status = e.run("pipeline", "status", "--json", check=False).stdout
            raise AssertionError(f"warehouse {got} != source {want}\n{r.stderr}\nstatus: {status}\nlog:\n{tail}")
        time.sleep(0.3)


CHECK_SRC = "SELECT count(*), coalesce(sum(total), 0), coalesce(sum(length(email)), 0) FROM customers"
CHECK_WH = "SELECT count(*), coalesce(sum(total), 0), coalesce(sum(length(email)), 0) FROM shop.customers"


def test_tables_created_after_up_replicate_and_are_queryable(dep: Env) -> None:
    with app(dep) as c:
        c.execute(
            "CREATE TABLE customers (id bigserial PRIMARY KEY, email text, password_hash text, total numeric(12,2))"
        )
        c.execute("CREATE TABLE secret_notes (id int PRIMARY KEY, body text)")
        c.execute(
            "INSERT INTO customers (email, password_hash, total)"
            " SELECT 'u' || g || '@x', 'h', g FROM generate_series(1, 3000) g"
        )
        c.execute("INSERT INTO secret_notes VALUES (1, 'x')")
        c.execute("UPDATE customers SET total = total * 2 WHERE mod(id, 3) = 0")
        c.execute("DELETE FROM customers WHERE id > 2900")
    wait_same(dep, CHECK_SRC, CHECK_WH)
    cols = [
        r["column_name"]
        for r in warehouse(dep, "SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'")
    ]
    assert "password_hash" not in cols and "email" in cols
    r = dep.run("query", "SELECT * FROM shop.secret_notes", check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr  # excluded by the spec
    r = dep.run("query", "DROP TABLE shop.customers", check=False)
    assert r.returncode == 2 and "read-only" in r.stderr
    csv_out = dep.run("query", "SELECT 1 AS a, 'x' AS b", "--csv").stdout
    assert csv_out.splitlines() == ["a,b", "1,x"]


def test_status_reports_streaming_and_slot(dep: Env) -> None:
    s = json.loads(dep.run("pipeline", "status", "--json").stdout)
    assert s["state"] == "running" and s["phase"] == "streaming"
    assert s["slot"]["exists"] and s["slot"]["active"]
    assert s["process"]["state"] == "RUNNING"
    assert s["last_applied_lsn"]
    assert s["lag_seconds"] is not None and s["lag_seconds"] < 60


def test_kill_9_of_the_daemon_loses_nothing(dep: Env) -> None:
    pid = json.loads(dep.run("pipeline", "status", "--json").stdout)["process"]["pid"]
    with app(dep) as c:
        c.execute("INSERT INTO customers (email, total) SELECT 'k' || g, 1 FROM generate_series(1, 500) g")
        os.kill(pid, signal.SIGKILL)
        c.execute("UPDATE customers SET total = total + 1 WHERE mod(id, 7) = 0")
    wait_same(dep, CHECK_SRC, CHECK_WH, timeout=90)
    assert json.loads(dep.run("pipeline", "status", "--json").stdout)["process"]["pid"] != pid


def test_stop_start_and_up_keeps_it_stopped(dep: Env) -> None:
    dep.run("pipeline", "stop")
    with app(dep) as c:
        c.execute("INSERT INTO customers (email, total) VALUES ('while-stopped', 5)")
    # Longer than Patroni's HA cycle: Patroni drops slots it does not know unless told to ignore them.
    time.sleep(12)
    assert json.loads(dep.run("pipeline", "status", "--json").stdout)["slot"]["exists"]
    dep.run("up")  # a stopped pipeline stays stopped
    assert json.loads(dep.run("pipeline", "status", "--json").stdout)["process"]["state"] != "RUNNING"
    dep.run("pipeline", "start")
    wait_same(dep, CHECK_SRC, CHECK_WH)
