"""A deployment's life through the CLI: up, check, status, data across down/up, idempotence,
parameters (dynamic reload, static pending-reboot), refusals, secrets hygiene, kill -9 recovery."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Env, make_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dep() -> Iterator[Env]:
    e = make_env("life")
    try:
        e.run("up")
        yield e
    finally:
        e.cleanup()


def connect(e: Env, user: str = "shop_app") -> psycopg.Connection:
    return psycopg.connect(e.dsn(user), autocommit=True, connect_timeout=5)


def wait_sql(e: Env, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(e) as c:
                c.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_check_passes_and_prints_version(dep: Env) -> None:
    r = dep.run("check")
    assert "SELECT version(): PostgreSQL 15" in r.stdout
    assert "fail" not in r.stdout
    assert "all 9 checks passed" in r.stdout


def test_second_up_changes_nothing(dep: Env) -> None:
    r = dep.run("up")
    assert "no changes" in r.stdout
    for word in ("created", "changed", "started"):
        assert f" {word} " not in r.stdout, r.stdout


def test_status_json(dep: Env) -> None:
    s = json.loads(dep.run("status", "--json").stdout)
    assert s["status"] == "available"
    assert s["members"][0]["role"] == "primary"
    assert s["data_checksums"] == "on"
    assert s["pending_reboot"] == []
    assert "password" not in s["endpoints"]["writer"]


def test_privileges(dep: Env) -> None:
    with connect(dep) as c:
        row = c.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, False, False)
        c.execute("CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY, total numeric)")
        c.execute("INSERT INTO orders VALUES (1, 9.99) ON CONFLICT DO NOTHING")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE ROLE sneaky")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE DATABASE sneaky")
    with connect(dep, "shop_ro") as c:
        assert c.execute("SELECT count(*) FROM orders").fetchone() == (1,)  # future tables readable
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO orders VALUES (2, 1)")


def test_refusals(dep: Env) -> None:
    plain = dep.dsn().replace("sslmode=verify-full", "sslmode=disable")
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(plain, connect_timeout=5)
    wrong = dep.dsn().replace(dep.secret("shop_app"), "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)
    # The admin and superuser roles never log in over TCP, whatever the password.
    admin = dep.dsn().replace("user=shop_app", "user=pgbridge_admin")
    with pytest.raises(psycopg.OperationalError, match="rejects connection"):
        psycopg.connect(admin, connect_timeout=5)


def test_secrets_never_leak(dep: Env) -> None:
    passwords = [dep.secret(u) for u in ("shop_app", "shop_ro", "shop_cdc", "pgbridge_replicator")]
    assert all(len(p) >= 24 for p in passwords)
    outputs = dep.run("status").stdout + dep.run("status", "--json").stdout + dep.run("check").stdout
    for p in passwords:
        assert p not in outputs
    for f in (dep.home / "logs").rglob("*"):
        if f.is_file():
            text = f.read_text(errors="replace")
            for p in passwords:
                assert p not in text, f"password found in {f}"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            for p in passwords:
                assert p not in cmd
    # At rest the store is ciphertext.
    blob = (dep.home / "secrets.enc").read_bytes()
    for p in passwords:
        assert p.encode() not in blob


def test_data_survives_down_and_up(dep: Env) -> None:
    with connect(dep) as c:
        c.execute("CREATE TABLE IF NOT EXISTS keep (id int)")
        c.execute("INSERT INTO keep SELECT generate_series(1, 1000)")
    r = dep.run("down")
    assert "stopped" in r.stdout
    assert json.loads(dep.run("status", "--json").stdout)["status"] == "stopped"
    dep.run("up")
    with connect(dep) as c:
        assert c.execute("SELECT count(*) FROM keep").fetchone() == (1000,)
    dep.run("check")


def test_dynamic_and_static_parameters(dep: Env) -> None:
    dep.write_spec("parameter_groups:\n  tune:\n    work_mem: 8MB\n    max_connections: 123\nparameter_group: tune\n")
    r = dep.run("up")
    assert "pending-reboot" in r.stdout
    with connect(dep) as c:
        assert c.execute("SHOW work_mem").fetchone() == ("8MB",)  # dynamic: applied by reload
        assert c.execute("SHOW max_connections").fetchone() != ("123",)  # static: waits for reboot
    s = json.loads(dep.run("status", "--json").stdout)
    assert s["status"] == "pending-reboot" and s["pending_reboot"] == ["max_connections"]
    p = json.loads(dep.run("params", "--diff", "--json").stdout)
    by_name = {row["name"]: row for row in p}
    assert by_name["work_mem"]["source"] == "group:tune"
    assert by_name["max_connections"]["pending_reboot"] is True
    assert by_name["shared_buffers"]["source"] == "class"
    assert by_name["ssl"]["source"] == "platform"
    dep.run("reboot")
    wait_sql(dep)
    with connect(dep) as c:
        assert c.execute("SHOW max_connections").fetchone() == ("123",)
    assert json.loads(dep.run("status", "--json").stdout)["pending_reboot"] == []
    # A bad value is refused with the name, the value and what is allowed; nothing changes.
    dep.write_spec("parameter_groups:\n  tune:\n    wal_sync_method: fast\nparameter_group: tune\n")
    r = dep.run("up", check=False)
    assert r.returncode == 2
    assert "wal_sync_method" in r.stderr and "fast" in r.stderr and "fsync" in r.stderr
    dep.write_spec()
    dep.run("up")


def _pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def test_kill_9_recovery(dep: Env) -> None:
    data = next((dep.home / "data").glob("*-1"))
    pm = _pid(data / "postmaster.pid")
    os.kill(pm, signal.SIGKILL)
    wait_sql(dep, timeout=120)
    assert _pid(data / "postmaster.pid") != pm
    s = json.loads(dep.run("status", "--json").stdout)
    patroni = next(v for k, v in s["processes"].items() if k.startswith("patroni"))
    os.kill(patroni["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = json.loads(dep.run("status", "--json").stdout)
        p = next(v for k, v in s["processes"].items() if k.startswith("patroni"))
        if p["pid"] not in (None, patroni["pid"]) and p["state"] == "RUNNING" and s["status"] == "available":
            break
        time.sleep(1)
    else:
        raise AssertionError(f"Patroni did not come back: {s}")
    wait_sql(dep)
    dep.run("check")


def test_connect_runs_psql(dep: Env) -> None:
    r = dep.run("connect", "-c", "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", "-At")
    assert r.stdout.strip() == "shop_app|t"


def test_ca_export(dep: Env, tmp_path: Path) -> None:
    out = tmp_path / "ca.pem"
    dep.run("ca", "-o", str(out))
    assert out.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_two_deployments_side_by_side(dep: Env) -> None:
    other = make_env("side")
    try:
        other.run("up")
        other.run("check")
        assert json.loads(dep.run("status", "--json").stdout)["status"] == "available"
        ports = json.loads(other.run("status", "--json").stdout)["ports"]
        mine = json.loads(dep.run("status", "--json").stdout)["ports"]
        assert not set(ports.values()) & set(mine.values())
        assert other.secret("shop_app") != dep.secret("shop_app")
    finally:
        other.cleanup()
    dep.run("check")
