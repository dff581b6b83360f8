"""Multi-AZ through the CLI: a synchronous standby, a read replica, both endpoints, switchover, drills."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import Env, make_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which("haproxy") and shutil.which("pgbouncer")), reason="needs haproxy, pgbouncer"),
]

SPEC = """\
multi_az: true
failover_profile: fast
replicas:
  - {name: r1, region: zone-c}
"""


@pytest.fixture(scope="module")
def dep() -> Iterator[Env]:
    e = make_env("maz")
    e.write_spec(SPEC)
    try:
        e.run("up", timeout=900)
        yield e
    finally:
        e.cleanup()


def status(e: Env) -> dict:
    return json.loads(e.run("status", "--json").stdout)  # type: ignore[no-any-return]


def endpoint(e: Env, kind: str) -> str:
    s = status(e)
    return f"{s['endpoints'][kind]} password={e.secret('shop_app')}"


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=5)


def role_of(dsn: str) -> bool:
    for _ in range(20):  # the pooler may still be retrying a server login after a change
        try:
            with connect(dsn) as c:
                row = c.execute("SELECT pg_is_in_recovery()").fetchone()
                assert row is not None
                return bool(row[0])
        except psycopg.OperationalError:
            time.sleep(0.5)
    raise AssertionError(f"cannot connect to {dsn.split(' password')[0]}")


def roles(e: Env) -> dict[str, str]:
    return {m["name"]: m["role"] for m in status(e)["members"]}


def test_members_sync_standby_and_both_endpoints(dep: Env) -> None:
    s = status(dep)
    by_role = sorted(m["role"] for m in s["members"])
    assert by_role == ["primary", "replica", "sync standby"], s["members"]
    replica = next(m for m in s["members"] if m["name"].endswith("-r1"))
    assert replica["region"] == "zone-c" and replica["promotable"] is False and replica["lag_bytes"] is not None
    assert role_of(endpoint(dep, "writer")) is False
    assert role_of(endpoint(dep, "reader")) is True
    # `connect --endpoint reader` reaches a replica through the pooler
    r = dep.run("connect", "--endpoint", "reader", "--", "-Atc", "SELECT pg_is_in_recovery()")
    assert r.stdout.strip() == "t"
    # RPO 0: the primary waits for its standby (strict synchronous mode)
    with connect(endpoint(dep, "writer")) as c:
        row = c.execute("SELECT current_setting('synchronous_standby_names')").fetchone()
        assert row is not None and row[0] not in ("", "*")
    assert dep.run("up").stdout.strip().endswith("no changes")


def test_switchover_pauses_writers_without_errors(dep: Env) -> None:
    writer = endpoint(dep, "writer")
    with connect(writer) as c:
        c.execute("CREATE TABLE IF NOT EXISTS sw (n int PRIMARY KEY)")
    before = {n for n, r in roles(dep).items() if r == "primary"}
    errors: list[str] = []
    done = threading.Event()
    written: list[int] = []

    def write() -> None:
        n = 0
        with connect(writer) as c:
            while not done.is_set():
                n += 1
                try:
                    c.execute("INSERT INTO sw VALUES (%s)", (n,))
                    written.append(n)
                except psycopg.Error as e:
                    errors.append(str(e))
                    return
                time.sleep(0.01)

    t = threading.Thread(target=write)
    t.start()
    time.sleep(1)
    out = json.loads(dep.run("failover", "--json").stdout)
    time.sleep(1)
    done.set()
    t.join()
    assert not errors, errors  # one pooled connection kept working across the switchover
    assert out["old"] in before and out["new"] not in before
    assert roles(dep)[out["new"]] == "primary"
    with connect(writer) as c:
        row = c.execute("SELECT count(*) FROM sw").fetchone()
        assert row is not None and row[0] == len(written)
    bad = dep.run("failover", "--to", "nobody", check=False)
    assert bad.returncode != 0 and "nobody" in bad.stderr


def test_failover_drill_keeps_every_acknowledged_write_and_the_old_primary_rejoins(dep: Env) -> None:
    refused = dep.run("drill", "failover", check=False)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    old = next(n for n, r in roles(dep).items() if r == "primary")
    r = json.loads(dep.run("drill", "failover", "--mode", "kill", "--yes", "--json", timeout=600).stdout)
    assert r["old_primary"] == old and r["new_primary"] != old
    assert r["rpo_lost"] == 0 and r["acked"] > 0
    assert r["rejoined"], r
    assert 0 < r["rto_s"] < 60
    assert roles(dep)[old] in ("replica", "sync standby")
    kinds = [e["kind"] for e in json.loads(dep.run("events", "--json").stdout)]
    assert "drill-failover" in kinds and "switchover" in kinds


def test_replicas_follow_the_spec(dep: Env) -> None:
    with_r2 = SPEC.replace("  - {name: r1, region: zone-c}", "  - {name: r2, region: zone-d, promotable: true}")
    dep.write_spec(with_r2)
    report = dep.run("up", timeout=900).stdout
    assert "-r2" in report and "removed" in report
    names = set(roles(dep))
    assert any(n.endswith("-r2") for n in names) and not any(n.endswith("-r1") for n in names)
    assert not (dep.home / "data" / f"{dep.name}-r1").exists()
    # Multi-AZ off: synchronous replication goes first, then the standby
    dep.write_spec(with_r2.replace("multi_az: true", "multi_az: false"))
    dep.run("up", timeout=900)
    assert "sync standby" not in roles(dep).values()
    with connect(endpoint(dep, "writer")) as c:
        row = c.execute("SELECT current_setting('synchronous_standby_names')").fetchone()
        assert row is not None and row[0] == ""
        c.execute("INSERT INTO sw VALUES (-1)")  # writes are not blocked
