"""The pipeline as a user meets it: declared in the spec, started by `up`, supervised, queried."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import Env, deployed

pytestmark = pytest.mark.integration

PIPELINE = """\
pipeline:
  name: analytics
  tables: {exclude: [shop.secret_*], exclude_columns: {shop.customers: [password_hash]}}
  batch: {max_wait_ms: 100}
"""


@pytest.fixture(scope="module")
def dep() -> Iterator[Env]:
    with deployed("cdc", PIPELINE) as e:
        yield e


def app(e: Env) -> psycopg.Connection:
    return psycopg.connect(e.dsn(), autocommit=True, connect_timeout=5)


def warehouse(e: Env, sql: str) -> list[dict[str, object]]:
    return json.loads(e.run("query", sql, "--json").stdout)  # type: ignore[no-any-return]


def log_tail(e: Env) -> str:
    log = e.home / "logs" / "pipeline-analytics.log"
    return log.read_text()[-3000:] if log.exists() else "(no log)"


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
            status = e.run("pipeline", "status", "--json", check=False).stdout
            raise AssertionError(f"warehouse {got} != source {want}\n{r.stderr}\nstatus: {status}\nlog:\n{log_tail(e)}")
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
    ts = json.loads(dep.run("query", "SELECT TIMESTAMPTZ '2026-01-01 12:00:00+00' AS t", "--json").stdout)
    assert ts[0]["t"].startswith("2026-01-01 12:00:00")
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


def test_the_daemon_streams_over_the_loopback_and_up_mends_its_password_file(dep: Env) -> None:
    """The daemon logs in as the CDC role on 127.0.0.1 with the password in its 0600 file. A wrong
    password there is reported (never shown) and retried; `up` writes the right one back."""
    with psycopg.connect(dep.dsn("shop_cdc"), autocommit=True) as c:
        rows = c.execute("SELECT client_addr::text FROM pg_stat_replication WHERE application_name LIKE 'pgbridge-%'")
        assert [r[0] for r in rows.fetchall()] == ["127.0.0.1/32"]
    passfile = dep.home / "etc" / "pipeline-analytics.pgpass"
    assert passfile.stat().st_mode & 0o777 == 0o600
    good = passfile.read_text()
    assert good.rsplit(":", 1)[1].strip() == dep.secret("shop_cdc")
    assert dep.secret("shop_cdc") not in (dep.home / "etc" / "pipeline-analytics.json").read_text()
    passfile.write_text(good.rsplit(":", 1)[0] + ":wrong-password\n")
    pid = json.loads(dep.run("pipeline", "status", "--json").stdout)["process"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        s = json.loads(dep.run("pipeline", "status", "--json").stdout)
        # supervisord waits longer after each failed start: `up` starts one it waits on at once
        if "password authentication failed" in str(s.get("last_error")) and s["process"]["state"] == "BACKOFF":
            break
        assert time.monotonic() < deadline, f"{s}\nlog:\n{log_tail(dep)}"
        time.sleep(0.5)
    assert "wrong-password" not in str(s) and "wrong-password" not in log_tail(dep)
    assert "pipeline password file" in dep.run("up").stdout
    assert passfile.read_text() == good and passfile.stat().st_mode & 0o777 == 0o600
    with app(dep) as c:
        c.execute("INSERT INTO customers (email, total) VALUES ('after-the-password-file', 3)")
    wait_same(dep, CHECK_SRC, CHECK_WH, timeout=90)


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


def test_ddl_reaches_the_warehouse(dep: Env) -> None:
    with app(dep) as c:
        c.execute("ALTER TABLE customers ADD COLUMN tier text DEFAULT 'basic'")
        c.execute("UPDATE customers SET tier = 'gold' WHERE id <= 10")
        c.execute("ALTER TABLE customers RENAME COLUMN total TO lifetime_total")
    src = "SELECT count(*), sum(lifetime_total), count(*) FILTER (WHERE tier = 'gold') FROM customers"
    wait_same(dep, src, src.replace("FROM customers", "FROM shop.customers"))


def as_service_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def test_validate_catches_a_row_changed_in_the_warehouse_and_repair_fixes_it(dep: Env) -> None:
    assert dep.run("pipeline", "validate").returncode == 0
    dep.run("pipeline", "stop")
    warehouse_file = dep.home / "warehouse" / "analytics.duckdb"
    tamper = (
        f"import duckdb; c = duckdb.connect({str(warehouse_file)!r});"
        " c.execute('UPDATE shop.customers SET email = email || \\'!\\' WHERE id = 42'); c.close()"
    )
    subprocess.run(as_service_user([sys.executable, "-c", tamper]), check=True)
    dep.run("pipeline", "start")
    r = dep.run("pipeline", "validate", check=False)
    assert r.returncode == 7, r.stdout + r.stderr
    assert "shop.customers" in r.stdout and "contents differ" in r.stdout
    r = dep.run("pipeline", "validate", "--repair", "--json")
    (customers,) = [t for t in json.loads(r.stdout) if t["table"] == "shop.customers"]
    assert customers["repaired"] and customers["ok"]
    assert dep.run("pipeline", "validate", "shop.customers").returncode == 0
    bad = dep.run("pipeline", "validate", "shop.nope", check=False)
    assert bad.returncode == 5 and "not replicated" in bad.stderr


def test_lost_slot_is_reported_and_a_full_resync_killed_mid_load_still_converges(dep: Env) -> None:
    with app(dep) as c:
        c.execute("CREATE TABLE bulk (id bigint PRIMARY KEY, pad text)")
        c.execute("INSERT INTO bulk SELECT g, repeat('x', 40) FROM generate_series(1, 600000) g")
    wait_same(dep, "SELECT count(*) FROM bulk", "SELECT count(*) FROM shop.bulk", timeout=120)
    dep.run("pipeline", "stop")
    with psycopg.connect(dep.dsn("shop_cdc"), autocommit=True) as c:  # the slot vanishes (an operator, a bug)
        c.execute("SELECT pg_drop_replication_slot('pgbridge_analytics')")
    dep.run("pipeline", "start")
    deadline = time.monotonic() + 60
    while (s := json.loads(dep.run("pipeline", "status", "--json").stdout))["phase"] != "slot-lost":
        assert time.monotonic() < deadline, s
        time.sleep(0.3)
    assert s["state"] == "error" and "pipeline resync" in s["last_error"]
    assert not s["slot"]["exists"]  # never recreated silently
    status_file = dep.home / "run" / "pipeline-analytics.status.json"
    status_file.unlink()
    # Watched while `resync` runs: the load of 600k rows can end before the command returns
    # (it waits for supervisord to see the daemon running).
    resync = threading.Thread(target=dep.run, args=("pipeline", "resync"), kwargs={"check": False})
    resync.start()
    deadline = time.monotonic() + 60
    while True:  # the status file, not the CLI: the load takes well under a second
        with contextlib.suppress(OSError, ValueError):
            s = json.loads(status_file.read_text())
            if s["phase"] == "initial-load":
                break
        assert time.monotonic() < deadline, f"no initial load seen; status {s}\nlog:\n{log_tail(dep)}"
        time.sleep(0.005)
    os.kill(s["pid"], signal.SIGKILL)  # mid-load: supervisord restarts it, the load starts over
    resync.join(120)
    with app(dep) as c:
        c.execute("UPDATE bulk SET pad = 'changed' WHERE id % 1000 = 0")
    wait_same(dep, "SELECT count(*), count(*) FILTER (WHERE pad = 'changed') FROM bulk",
              "SELECT count(*), count(*) FILTER (WHERE pad = 'changed') FROM shop.bulk", timeout=180)  # fmt: skip
    assert dep.run("pipeline", "validate").returncode == 0


def test_an_idle_pipeline_lets_its_slot_advance(dep: Env) -> None:
    with app(dep) as c:  # WAL the pipeline has no use for: a table the spec excludes
        c.execute("INSERT INTO secret_notes SELECT g, 'x' FROM generate_series(100, 5000) g")
        row = c.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    target = [int(x, 16) for x in row[0].split("/")]
    deadline = time.monotonic() + 90
    while True:
        slot = json.loads(dep.run("pipeline", "status", "--json").stdout)["slot"]
        confirmed = [int(x, 16) for x in (slot["confirmed_flush_lsn"] or "0/0").split("/")]
        if confirmed >= target:
            break
        assert time.monotonic() < deadline, f"slot stuck at {slot} below {row[0]}"
        time.sleep(1)


SLOT = "pgbridge_analytics"


def test_a_pipeline_taken_out_of_the_spec_leaves_only_its_warehouse(dep: Env) -> None:
    """Runs last: the deployment has no pipeline afterwards."""
    dep.run("pipeline", "stop")  # a stop that must not outlive its pipeline
    dep.write_spec()  # the same deployment, without the pipeline section
    out = dep.run("up").stdout
    assert "old pipeline analytics" in out and "removed" in out and "ddl capture" in out, out
    left = sorted(p.name for d in ("etc", "run") for p in (dep.home / d).glob("pipeline-*"))
    assert left == [], left
    assert (dep.home / "warehouse" / "analytics.duckdb").exists()
    assert "pipeline_stopped" not in json.loads((dep.home / "state.json").read_text())
    r = dep.run("pipeline", "status", check=False)
    assert r.returncode != 0 and "has no pipeline" in r.stderr + r.stdout
    deadline = time.monotonic() + 60
    while True:  # the slot, which Patroni keeps no longer, goes: it would hold WAL back for good
        with app(dep) as c:
            row = c.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgbridge_analytics'"
            ).fetchone()
        if row == (0,):
            break
        assert time.monotonic() < deadline, "the slot of the removed pipeline is still there"
        time.sleep(1)
    with app(dep) as c:  # no pipeline left: the DDL capture goes, it would write every DDL into the WAL
        triggers = c.execute("SELECT evtname FROM pg_event_trigger WHERE evtname LIKE 'pgbridge%'").fetchall()
        schema = c.execute("SELECT 1 FROM pg_namespace WHERE nspname = '_pgbridge'").fetchone()
        c.execute("CREATE TABLE after_the_pipeline (id int PRIMARY KEY)")  # DDL still works
        c.execute("DROP TABLE after_the_pipeline")
    assert triggers == [] and schema is None, (triggers, schema)
    assert "ddl capture" not in dep.run("up").stdout  # nothing left to remove
