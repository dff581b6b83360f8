"""SQL adapter: the admin connection and the bootstrap of database, schema and roles.

pgbridge reaches the server as `pgbridge_admin` over the local socket, authenticated by the OS
identity (pg_ident), so no admin password exists to leak. Role passwords are sent as SCRAM
verifiers computed here, so the clear text never reaches the server's logs.
"""

from __future__ import annotations

import base64
import hmac
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from pgbridge.errors import DeploymentError, TransientError
from pgbridge.plan.hba import ADMIN_ROLE
from pgbridge.scram import keys

SCRAM_ITERATIONS = 4096


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    salt = salt if salt is not None else os.urandom(16)
    k = keys(password, salt, iterations)
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(k.stored).decode()}:{b64(k.server).decode()}"


def verifier_matches(verifier: str | None, password: str) -> bool:
    """True when `verifier` (pg_authid.rolpassword) was made from `password`."""
    if not verifier or not verifier.startswith("SCRAM-SHA-256$"):
        return False
    try:
        head, _keys = verifier.split("$", 2)[1:]
        iters_s, salt_b64 = head.split(":")
        expected = scram_verifier(password, salt=base64.b64decode(salt_b64), iterations=int(iters_s))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, verifier)


@dataclass(frozen=True)
class AdminTarget:
    socket_dir: Path
    port: int

    def conninfo(self, dbname: str = "postgres") -> str:
        return psycopg.conninfo.make_conninfo(
            host=str(self.socket_dir),
            port=str(self.port),
            user=ADMIN_ROLE,
            dbname=dbname,
            application_name="pgbridge",
            connect_timeout="5",
        )


@contextmanager
def admin_connection(target: AdminTarget, dbname: str = "postgres") -> Iterator[psycopg.Connection]:
    try:
        conn = psycopg.connect(target.conninfo(dbname), autocommit=True)
    except psycopg.OperationalError as e:
        raise TransientError(f"cannot reach PostgreSQL as {ADMIN_ROLE}: {str(e).strip()}") from None
    try:
        # Nothing pgbridge sends as admin belongs in the statement log.
        conn.execute("SET log_statement = 'none'")
        conn.execute("SET log_min_duration_statement = -1")
        yield conn
    finally:
        conn.close()


def wait_admin(target: AdminTarget, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with admin_connection(target) as c:
                c.execute("SELECT 1")
                return
        except TransientError as e:
            last = e.message
        time.sleep(0.3)
    raise DeploymentError(f"PostgreSQL did not accept the admin connection within {timeout:.0f}s: {last}")


@dataclass(frozen=True)
class RoleSpec:
    name: str
    password: str
    attributes: tuple[str, ...]  # e.g. ("LOGIN", "NOSUPERUSER", ...)


_ATTR_COLUMNS = {
    "SUPERUSER": "rolsuper",
    "CREATEDB": "rolcreatedb",
    "CREATEROLE": "rolcreaterole",
    "REPLICATION": "rolreplication",
    "BYPASSRLS": "rolbypassrls",
    "LOGIN": "rolcanlogin",
    "INHERIT": "rolinherit",
}


def ensure_role(conn: psycopg.Connection, role: RoleSpec) -> str:
    """Create or correct a role; returns 'created', 'changed' or 'unchanged'."""
    row = conn.execute(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin,"
        " rolinherit, rolpassword FROM pg_authid WHERE rolname = %s",
        (role.name,),
    ).fetchone()
    attrs = sql.SQL(" ").join(sql.SQL(a) for a in role.attributes)
    if row is None:
        conn.execute(
            sql.SQL("CREATE ROLE {} {} PASSWORD {}").format(
                sql.Identifier(role.name), attrs, sql.Literal(scram_verifier(role.password))
            )
        )
        return "created"
    current = dict(zip(_ATTR_COLUMNS.values(), row[:7], strict=True))
    changed = False
    for attr in role.attributes:
        want = not attr.startswith("NO")
        col = _ATTR_COLUMNS[attr.removeprefix("NO")]
        if current[col] != want:
            changed = True
    if changed:
        conn.execute(sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role.name), attrs))
    if not verifier_matches(row[7], role.password):
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role.name), sql.Literal(scram_verifier(role.password))
            )
        )
        changed = True
    return "changed" if changed else "unchanged"


LEAST = ("LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE", "NOREPLICATION", "NOBYPASSRLS", "INHERIT")
CDC = ("LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE", "REPLICATION", "NOBYPASSRLS", "INHERIT")


def _acl_fingerprint(conn: psycopg.Connection, db: str, schema: str) -> str:
    row = conn.execute(
        """
        SELECT coalesce((SELECT datacl::text FROM pg_database WHERE datname = %(db)s), '')
            || '|' || coalesce((SELECT nspacl::text FROM pg_namespace WHERE nspname = %(s)s), '')
            || '|' || coalesce((SELECT string_agg(defaclacl::text, ',' ORDER BY oid) FROM pg_default_acl), '')
            || '|' || coalesce((SELECT string_agg(setconfig::text, ',' ORDER BY setrole, setdatabase)
                                FROM pg_db_role_setting), '')
            || '|' || coalesce((SELECT string_agg(relacl::text, ',' ORDER BY c.oid) FROM pg_class c
                                JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s), '')
        """,
        {"db": db, "s": schema},
    ).fetchone()
    return str(row[0]) if row else ""


def ensure_database(target: AdminTarget, *, db: str, schema: str, app: str, readonly: str, cdc: str) -> dict[str, str]:
    """Create the database and the app schema and grant least privilege; reports per object."""
    report: dict[str, str] = {}
    with admin_connection(target) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(ADMIN_ROLE)))
        report[f"database {db}"] = "unchanged" if exists else "created"
    d, s, a, r, c = (sql.Identifier(x) for x in (db, schema, app, readonly, cdc))
    with admin_connection(target, db) as conn:
        before = _acl_fingerprint(conn, db, schema)
        has_schema = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        statements: list[sql.Composed | sql.SQL] = [
            # Nobody but the named roles may connect; the app never sees the maintenance DBs.
            sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC"),
            sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE template1 FROM PUBLIC"),
            sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(d),
            sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(d, a),
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(d, r, c),
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(s, a),
            sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(s, a),
            sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"),
            sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(s),
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, {}").format(s, r, c),
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}, {}").format(s, r, c),
            sql.SQL("GRANT SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, r),
            sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}, {}").format(
                a, s, r, c
            ),
            sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON SEQUENCES TO {}").format(
                a, s, r
            ),
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = {}, public").format(a, d, s),
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = {}, public").format(r, d, s),
        ]
        with conn.transaction():
            for st in statements:
                conn.execute(st)
        after = _acl_fingerprint(conn, db, schema)
        report[f"schema {schema}"] = "unchanged" if has_schema else "created"
    report["privileges"] = "unchanged" if before == after else ("created" if not exists else "changed")
    return report
