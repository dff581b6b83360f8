"""The writer and reader endpoints of a deployment: HAProxy checking Patroni, PgBouncer in front.

`up` renders both configs, runs both as supervised programs, creates the pooler's auth role and
its lookup function, and reloads a running HAProxy or PgBouncer when their files change (members
added or removed, allowed networks changed). Clients reach PgBouncer, which admits only the
spec's allowed networks; its database ``<db>`` goes through HAProxy's writer (the member holding
Patroni's leader key) and ``<db>_ro`` through the reader (replicas within the lag limit, else the
primary).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from psycopg import sql

from pgbridge.errors import DeploymentError, HostError, NotFoundError, TransientError
from pgbridge.home import write_if_changed
from pgbridge.ops.context import Deployment, pooler_listen_addresses, secret_name_for_role
from pgbridge.ops.tasks import Report
from pgbridge.platform import haproxy, pgbouncer, system
from pgbridge.platform.postgres import LEAST, RoleSpec, admin_connection, ensure_role, verifier_matches
from pgbridge.platform.supervisor import Program

POOLER_ROLE = "pgbridge_pooler"  # PgBouncer's auth_user: may only call the lookup function
CONSOLE_USER = "pgbridge_console"  # PgBouncer admin console user (PAUSE/RESUME, SHOW POOLS)
CONSOLE_SECRET = "pgbouncer:console"
HAPROXY = "haproxy"
PGBOUNCER = "pgbouncer"
POOLER_PORT_KEY = "pgbouncer"
PORT_KEYS = ("haproxy_writer", "haproxy_reader", POOLER_PORT_KEY)

Endpoint = Literal["writer", "reader"]


def enabled(dep: Deployment) -> bool:
    return dep.spec.effective_endpoints() is not None


def secret_names(dep: Deployment) -> list[str]:
    return [secret_name_for_role(POOLER_ROLE), CONSOLE_SECRET] if enabled(dep) else []


def _files(dep: Deployment) -> dict[str, Path]:
    etc = dep.home.etc
    return {
        "haproxy": etc / "haproxy.cfg",
        "ini": etc / "pgbouncer.ini",
        "hba": etc / "pgbouncer-hba.conf",
        "users": etc / "pgbouncer-users.txt",
        "stats": dep.home.run / "haproxy.sock",
    }


def haproxy_input(dep: Deployment, ports: dict[str, int]) -> haproxy.HaproxyInput:
    ep = dep.spec.effective_endpoints()
    assert ep is not None
    members = tuple(
        haproxy.HaproxyMember(
            m.name,
            "127.0.0.1",
            dep.spec.network.port if m.name == dep.primary_member else ports[f"postgres:{m.name}"],
            ports[f"patroni:{m.name}"],
        )
        for m in dep.members
    )
    return haproxy.HaproxyInput(
        members=members,
        writer_port=ports["haproxy_writer"],
        reader_port=ports["haproxy_reader"],
        max_lag_bytes=ep.max_reader_lag_mb * 1024 * 1024,
        stats_socket=_files(dep)["stats"],
    )


def pgbouncer_input(dep: Deployment, ports: dict[str, int]) -> pgbouncer.PgBouncerInput:
    ep = dep.spec.effective_endpoints()
    assert ep is not None
    tls = dep.home.tls
    return pgbouncer.PgBouncerInput(
        database=dep.spec.database.name,
        writer_port=ports["haproxy_writer"],
        reader_port=ports["haproxy_reader"],
        listen_port=ports[POOLER_PORT_KEY],
        listen_address=",".join(pooler_listen_addresses(dep.spec)),
        socket_dir=dep.home.socket_dir,
        auth_file=_files(dep)["users"],
        hba_file=_files(dep)["hba"],
        auth_user=POOLER_ROLE,
        console_user=CONSOLE_USER,
        client_tls_cert=tls / "server.crt",
        client_tls_key=tls / "server.key",
        server_tls_ca=tls / "ca.crt",
        allowed_cidrs=tuple(dep.spec.network.allowed_cidrs),
        # pgbridge reaches the console at its own target, an address of this host (the input
        # normalises it to a one-address network).
        console_cidrs=(dep.client_host(),),
        pool_size=ep.pooler.pool_size,
        reader_pool_size=ep.pooler.reader_pool_size,
        reserve_pool_size=ep.pooler.reserve_pool_size,
        max_client_conn=ep.pooler.max_client_conn,
        tls_min_version=dep.spec.tls.min_version,
    )


def render(dep: Deployment, ports: dict[str, int]) -> tuple[list[Program], set[str]]:
    """Write HAProxy's and PgBouncer's files; the programs to run and those whose files changed."""
    if not enabled(dep):
        for f in _files(dep).values():
            if f.suffix != ".sock":
                f.unlink(missing_ok=True)
        return [], set()
    haproxy_bin, pgbouncer_bin = dep.settings.binaries.endpoint_tools()
    files, user, store = _files(dep), dep.settings.user, dep.secrets
    # Both inputs are checked before anything is written: a bad value leaves every file as it was.
    cfg = haproxy.render_config(haproxy_input(dep, ports))
    pgb = pgbouncer_input(dep, ports)
    ini, hba = pgbouncer.render_ini(pgb), pgbouncer.render_hba(pgb)
    changed: set[str] = set()
    if _write_checked(files["haproxy"], cfg, haproxy_bin):
        changed.add(HAPROXY)
    console_password = store.get(CONSOLE_SECRET).reveal()
    users_now = files["users"].read_text() if files["users"].exists() else ""
    pooler_password = store.get(secret_name_for_role(POOLER_ROLE)).reveal()
    # The console entry is a SCRAM secret with a random salt: keep the one on disk while it
    # still matches the password, so an unchanged deployment rewrites nothing.
    kept = _kept_console_secret(users_now, console_password) or pgbouncer.scram_secret(console_password)
    users = pgbouncer.render_userlist(POOLER_ROLE, pooler_password, [(CONSOLE_USER, kept)])
    # The hba file first: an ini that names it must never be read before it exists.
    if write_if_changed(files["hba"], hba, mode=0o644):
        changed.add(PGBOUNCER)
    if write_if_changed(files["ini"], ini, mode=0o644):
        changed.add(PGBOUNCER)
    if write_if_changed(files["users"], users, mode=0o600):
        changed.add(PGBOUNCER)
    system.chown(files["users"], user)
    programs = [
        Program(HAPROXY, haproxy.haproxy_command(haproxy_bin, files["haproxy"]), priority=30, stop_wait=10),
        Program(
            PGBOUNCER,
            pgbouncer.pgbouncer_command(pgbouncer_bin, files["ini"]),
            priority=40,
            stop_wait=10,
            # PgBouncer reads listen_addr at start only (a SIGHUP leaves it): naming the addresses
            # here makes a change of them a changed program, which the supervisor restarts.
            environment={"PGBRIDGE_LISTEN": pgb.listen_address},
        ),
    ]
    return programs, changed


def _kept_console_secret(userlist: str, password: str) -> str | None:
    for line in userlist.splitlines():
        parts = line.split('" "')
        if len(parts) == 2 and parts[0].strip('"') == CONSOLE_USER:
            secret = parts[1].strip('"')
            return secret if verifier_matches(secret, password) else None
    return None


def _write_checked(path: Path, text: str, haproxy_bin: Path) -> bool:
    """Replace HAProxy's config only with one HAProxy itself accepts."""
    if path.exists() and path.read_text() == text:
        return False
    candidate = path.with_suffix(".new")
    candidate.write_text(text)
    try:
        system.run(haproxy.check_command(haproxy_bin, candidate), what="HAProxy config check", timeout=30)
    except DeploymentError:
        candidate.unlink(missing_ok=True)
        raise
    os.replace(candidate, path)
    os.chmod(path, 0o644)
    return True


def reload(dep: Deployment, changed: set[str]) -> None:
    """HAProxy reloads on SIGUSR2 (sessions kept), PgBouncer on SIGHUP."""
    signals = {HAPROXY: "USR2", PGBOUNCER: "HUP"}
    for name in sorted(changed):
        dep.supervisor.signal(name, signals[name])


def ensure_auth(dep: Deployment, report: Report) -> None:
    """The auth role PgBouncer logs in as, and the function it may call (in the app database)."""
    if not enabled(dep):
        return
    password = dep.secrets.get(secret_name_for_role(POOLER_ROLE)).reveal()
    with admin_connection(dep.admin) as c:
        report.add(f"role {POOLER_ROLE}", ensure_role(c, RoleSpec(POOLER_ROLE, password, LEAST)))  # type: ignore[arg-type]
        c.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(dep.spec.database.name), sql.Identifier(POOLER_ROLE)
            )
        )
    with admin_connection(dep.admin, dep.spec.database.name) as c:
        row = c.execute(
            "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s AND p.proname = 'user_lookup'",
            (pgbouncer.AUTH_SCHEMA,),
        ).fetchone()
        c.execute(pgbouncer.auth_function_sql(POOLER_ROLE).encode())
        report.add("pooler auth function", "unchanged" if row else "created")


def console(dep: Deployment) -> pgbouncer.PgBouncerConsole:
    return pgbouncer.PgBouncerConsole(
        host=dep.client_host(),
        port=dep.port("pgbouncer"),
        user=CONSOLE_USER,
        password=dep.secrets.get(CONSOLE_SECRET).reveal(),
        sslmode="verify-ca",
        sslrootcert=dep.home.tls / "ca.crt",
    )


def haproxy_state(dep: Deployment) -> haproxy.HaproxyState:
    return haproxy.read_state(_files(dep)["stats"])


def point_writer(dep: Deployment, leader: str) -> None:
    """Tell HAProxy at once who the primary is, instead of waiting for its next checks.

    Only used after a switchover, once the new primary answers out of recovery; the regular checks
    keep running and would correct any mistake within a second or two.
    """
    path = _files(dep)["stats"]
    for m in dep.recorded_members():
        health = "up" if m == leader else "down"
        haproxy.query_stats_socket(path, f"set server {haproxy.WRITER}/{m} health {health}")


def wait_writer(dep: Deployment, timeout: float, member: str | None = None) -> str:
    """Until HAProxy's writer endpoint has exactly one member UP (`member`, when given); returns it."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            up = haproxy_state(dep).up(haproxy.WRITER)
            if len(up) == 1 and member in (None, up[0]):
                return up[0]
            last = f"writer servers up: {list(up)}"
        except (TransientError, HostError) as e:
            last = e.message
        time.sleep(0.1)
    raise DeploymentError(f"the writer endpoint did not reach {member or 'a primary'} within {timeout:.0f}s ({last})")


def dsn(dep: Deployment, role: str, endpoint: Endpoint = "writer", *, password: bool = False) -> str:
    """A libpq DSN for a client of the pooled writer or reader endpoint."""
    if not enabled(dep):
        raise NotFoundError(
            "this deployment has no endpoints", hint="set multi_az, replicas or an endpoints: section and run `up`"
        )
    db = dep.spec.database.name
    dbname = db if endpoint == "writer" else pgbouncer.reader_database(db)
    return dep.dsn(role, password=password, dbname=dbname, port=dep.port("pgbouncer"))
