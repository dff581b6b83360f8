"""`pgbridge check`: the Day-3 validation, as a list of pass/fail results.

It proves from the outside what `up` promised: the app user gets in over TLS with full
verification, is not privileged, and plain-text or unlisted-address connections are refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import psycopg

from pgbridge.errors import PgbridgeError
from pgbridge.ops.context import Deployment
from pgbridge.ops.probe import startup_probe
from pgbridge.platform.postgres import admin_connection

Outcome = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: Outcome
    detail: str


def _connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, connect_timeout=5, autocommit=True)


def _err(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def outside_source(dep: Deployment) -> str | None:
    """A loopback source address that no allowed CIDR contains, if the instance listens on loopback."""
    host = ipaddress.ip_address(dep.client_host())
    if not host.is_loopback or host.version != 4:
        return None
    nets = [ipaddress.ip_network(c) for c in dep.spec.network.allowed_cidrs]
    for last in range(2, 255):
        cand = ipaddress.ip_address(f"127.0.0.{last}")
        if not any(cand in n for n in nets):
            return str(cand)
    return None


def run_checks(dep: Deployment) -> tuple[list[CheckResult], str | None]:
    """Returns the results and the `SELECT version()` row (if the app user got in)."""
    dep.home.require()
    spec = dep.spec
    app = spec.database.users.app
    results: list[CheckResult] = []
    version: str | None = None

    def add(name: str, fn: Callable[[], tuple[Outcome, str]]) -> None:
        try:
            outcome, detail = fn()
        except PgbridgeError as e:
            outcome, detail = "fail", e.message
        except (psycopg.Error, OSError) as e:
            outcome, detail = "fail", _err(e)
        results.append(CheckResult(name, outcome, detail))

    def patroni() -> tuple[Outcome, str]:
        leader = dep.leader()  # after a failover the primary is another member than the first
        m = dep.patroni(leader).member()
        ok = m.get("state") == "running" and m.get("role") == "primary"
        return ("pass" if ok else "fail"), f"{leader}: {m.get('role')}, {m.get('state')}"

    add("primary running (Patroni)", patroni)

    conn: psycopg.Connection | None = None

    def connect_app() -> tuple[Outcome, str]:
        nonlocal conn, version
        conn = _connect(dep.dsn(app, password=True))
        row = conn.execute("SELECT version()").fetchone()
        version = str(row[0]) if row else None
        return "pass", f"{app}@{dep.client_host()}:{spec.network.port} sslmode=verify-full"

    add("app user connects with TLS verify-full", connect_app)

    def tls_in_use() -> tuple[Outcome, str]:
        if conn is None:
            return "fail", "no connection"
        row = conn.execute("SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        if not row or not row[0]:
            return "fail", "connection is not encrypted"
        ok = row[1] in ("TLSv1.2", "TLSv1.3")
        return ("pass" if ok else "fail"), f"{row[1]} {row[2]}"

    add("TLS in use (1.2 or newer)", tls_in_use)

    def not_privileged() -> tuple[Outcome, str]:
        if conn is None:
            return "fail", "no connection"
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        names = ("superuser", "createrole", "createdb", "replication", "bypassrls")
        held = [n for n, v in zip(names, row or (), strict=False) if v]
        return ("fail", "has " + ", ".join(held)) if held else ("pass", "no superuser, createrole, createdb")

    add("app user is not privileged", not_privileged)

    def works_in_schema() -> tuple[Outcome, str]:
        if conn is None:
            return "fail", "no connection"
        with conn.transaction(force_rollback=True):
            conn.execute("CREATE TABLE pgbridge_check_probe (id int)")
            schema = conn.execute(
                "SELECT schemaname FROM pg_tables WHERE tablename = 'pgbridge_check_probe'"
            ).fetchone()
        where = schema[0] if schema else "?"
        ok = where == spec.database.schema_
        return ("pass" if ok else "fail"), f"creates tables in schema {where}"

    add("app user works in its schema", works_in_schema)
    if conn is not None:
        conn.close()

    def plain_refused() -> tuple[Outcome, str]:
        if spec.tls.mode != "required":
            return "skip", "tls.mode is preferred: plain-text connections are allowed"
        dsn = dep.dsn(app, password=True).replace("sslmode=verify-full", "sslmode=disable")
        try:
            _connect(dsn).close()
        except psycopg.OperationalError as e:
            msg = _err(e)
            if "pg_hba.conf" in msg or "no encryption" in msg:
                return "pass", "refused: " + msg.split("FATAL:")[-1].strip()[:120]
            return "fail", f"failed for another reason: {msg}"
        return "fail", "a plain-text connection was accepted"

    add("plain-text connection refused", plain_refused)

    def outside_refused() -> tuple[Outcome, str]:
        src = outside_source(dep)
        if src is None:
            return rule_in_place()
        r = startup_probe(
            source=src,
            host=dep.client_host(),
            port=spec.network.port,
            user=app,
            database=spec.database.name,
            cafile=dep.home.tls / "ca.crt",
        )
        if r.accepted:
            return "fail", f"a connection from {src} was accepted"
        if r.code == "28000":
            return "pass", f"from {src}: {r.message[:100]}"
        return "fail", f"from {src}: unexpected answer {r.code} {r.message[:100]}"

    def rule_in_place() -> tuple[Outcome, str]:
        with admin_connection(dep.admin) as c:
            rows = c.execute(
                "SELECT type, database, user_name, address, netmask, auth_method FROM pg_hba_file_rules"
                " WHERE error IS NULL ORDER BY line_number"
            ).fetchall()
        last = [r for r in rows if r[5] == "reject" and r[2] == ["all"] and r[3] in ("0.0.0.0", "::")]
        if len(last) >= 1:
            return "pass", "cannot originate from outside here; catch-all reject rule is in place"
        return "fail", "no catch-all reject rule in pg_hba"

    add("connection from outside allowed CIDRs refused", outside_refused)

    def checksums() -> tuple[Outcome, str]:
        with admin_connection(dep.admin) as c:
            row = c.execute("SHOW data_checksums").fetchone()
        on = bool(row and row[0] == "on")
        return ("pass" if on else "fail"), f"data_checksums = {row[0] if row else '?'}"

    add("data checksums on", checksums)

    def readonly_cannot_write() -> tuple[Outcome, str]:
        ro = spec.database.users.readonly
        with _connect(dep.dsn(ro, password=True)) as c:
            try:
                c.execute(f'CREATE TABLE "{spec.database.schema_}".pgbridge_ro_probe (id int)')
            except psycopg.errors.InsufficientPrivilege:
                return "pass", f"{ro} cannot create tables"
            c.execute(f'DROP TABLE "{spec.database.schema_}".pgbridge_ro_probe')
        return "fail", f"{ro} could create a table"

    add("read-only user cannot write", readonly_cannot_write)
    return results, version
