"""PgBouncer: transaction pooling in front of the HAProxy writer and reader endpoints.

Applications open and close connections freely; PgBouncer keeps a few server connections per
database and lends them out one transaction at a time. Two logical databases point at the two
endpoints: ``<db>`` at the writer (always the primary) and ``<db>_ro`` at the reader (replicas
within the lag limit, else the primary), both naming the same real database. Users are looked up
in PostgreSQL itself (``auth_query`` through a SECURITY DEFINER function), so passwords rotated in
PostgreSQL work at once and no password file has to be kept in step: the only entries in
``userlist.txt`` are the auth user's own credentials and the console user's SCRAM secret.

PostgreSQL only ever sees the pooler's own address, so the deployment's "security group"
(``network.allowed_cidrs``) is enforced here too, by PgBouncer's hba file (``render_hba``).

The render functions are pure; ``PgBouncerConsole`` is the small client of the admin console used
around switchovers (PAUSE / RESUME) and by ``status`` (SHOW POOLS: clients active and waiting, server
connections per pool).
"""

from __future__ import annotations

import re
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import pq

from pgbridge.errors import DeploymentError, SpecError, TransientError
from pgbridge.platform.postgres import SCRAM_ITERATIONS, scram_verifier
from pgbridge.spec.models import IDENT_RE, normalize_cidr

READER_SUFFIX = "_ro"
ADMIN_DATABASE = "pgbouncer"
AUTH_SCHEMA = "pgbouncer"
AUTH_FUNCTION = f"{AUTH_SCHEMA}.user_lookup"
# PgBouncer runs this in the database the client asked for, as the auth user.
AUTH_QUERY = f"SELECT username, password FROM {AUTH_FUNCTION}($1)"

_IDENT_RE = re.compile(IDENT_RE)
_SCRAM_RE = re.compile(r"^SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$")
_MD5_RE = re.compile(r"^md5[0-9a-f]{32}$")


def reader_database(database: str) -> str:
    """The logical database that reaches the reader endpoint."""
    return database + READER_SUFFIX


@dataclass(frozen=True)
class PgBouncerInput:
    """Everything pgbouncer.ini and its hba file depend on; equal inputs render byte-identical files."""

    database: str
    writer_port: int  # HAProxy writer endpoint
    reader_port: int  # HAProxy reader endpoint
    listen_port: int
    socket_dir: Path
    auth_file: Path
    hba_file: Path
    auth_user: str
    console_user: str
    client_tls_cert: Path
    client_tls_key: Path
    server_tls_ca: Path
    allowed_cidrs: tuple[str, ...]  # the spec's client networks (the "security group")
    # Where pgbridge itself reaches the console over TCP (PAUSE/RESUME, SHOW POOLS): this host.
    console_cidrs: tuple[str, ...] = ("127.0.0.1/32",)
    listen_address: str = "127.0.0.1"
    endpoint_host: str = "127.0.0.1"
    pool_size: int = 20  # server connections per (database, user) on the writer
    reader_pool_size: int | None = None  # same as pool_size when not given
    reserve_pool_size: int = 5
    max_client_conn: int = 1000
    max_db_connections: int = 0  # 0: no cap across users
    stats_users: tuple[str, ...] = ()
    tls_min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    # PgBouncer refuses new server logins for this long after one failed (default 15s). During a
    # failover HAProxy briefly has no primary, so a long wait here would outlast the failover.
    server_login_retry_s: float = 0.5
    server_connect_timeout_s: float = 5.0
    query_wait_timeout_s: int = 120  # how long clients queue (e.g. during PAUSE) before an error
    ignore_startup_parameters: tuple[str, ...] = ("extra_float_digits",)

    def __post_init__(self) -> None:
        for what, name in (("database", self.database), ("auth user", self.auth_user)):
            _check_ident(what, name)
        for user in (self.console_user, *self.stats_users):
            _check_ident("console user", user)
        if self.database == ADMIN_DATABASE or reader_database(self.database) == ADMIN_DATABASE:
            raise SpecError(f"database name {self.database!r} clashes with PgBouncer's admin database")
        if len(reader_database(self.database)) > 63:
            raise SpecError(f"database name {self.database!r} is too long to add {READER_SUFFIX!r} (max 60)")
        if self.auth_user in (self.console_user, *self.stats_users):
            raise SpecError("the auth user must not be a console user (it only looks up passwords)")
        for port in (self.writer_port, self.reader_port, self.listen_port):
            if not 1 <= port <= 65535:
                raise SpecError(f"port {port} is outside 1..65535")
        sizes = [
            self.pool_size,
            self.max_client_conn,
            self.pool_size if self.reader_pool_size is None else self.reader_pool_size,
        ]
        if min(sizes) < 1 or self.reserve_pool_size < 0 or self.max_db_connections < 0:
            raise SpecError("PgBouncer pool sizes must be positive")
        paths = (self.socket_dir, self.auth_file, self.hba_file, self.client_tls_cert, self.client_tls_key)
        for path in (*paths, self.server_tls_ca):
            if any(c in str(path) for c in "\n\r;#") or not path.is_absolute():
                raise SpecError(f"PgBouncer cannot use the path {str(path)!r} (absolute, no ; or #)")
        _networks("allowed network", self.allowed_cidrs)
        if not _networks("console network", self.console_cidrs):
            raise SpecError("PgBouncer needs at least one console network (pgbridge pauses and resumes through it)")


def _networks(what: str, cidrs: object) -> list[str]:
    """Networks in the one form PgBouncer's hba parser takes (address/bits, no host bits set).

    PgBouncer 1.18 skips an hba line it cannot parse with nothing but a warning in its log, so a
    bad value here must never reach the file: one dropped line can let through what it refused.
    """
    if not isinstance(cidrs, tuple):
        raise SpecError(f"{what}s must be a tuple of CIDR strings, got {type(cidrs).__name__}")
    out = []
    for cidr in cidrs:
        try:
            if not isinstance(cidr, str):
                raise TypeError(f"{cidr!r} is not a string but {type(cidr).__name__}")
            out.append(normalize_cidr(cidr))
        except (TypeError, ValueError) as e:
            raise SpecError(f"{what} {e}") from None
    return list(dict.fromkeys(out))


def _check_ident(what: str, name: str) -> None:
    if not _IDENT_RE.match(name):
        raise SpecError(f"{what} {name!r} is not a lower-case SQL identifier")


def _seconds(value: float) -> str:
    return f"{value:g}"


def render_ini(inp: PgBouncerInput) -> str:
    """The whole pgbouncer.ini. No pidfile/logfile: supervisord runs it in the foreground (stderr)."""
    reader_pool = inp.reader_pool_size or inp.pool_size
    tls_protocols = "secure" if inp.tls_min_version == "TLSv1.2" else "tlsv1.3"
    stats = ",".join(dict.fromkeys((inp.console_user, *inp.stats_users)))
    host = inp.endpoint_host
    lines = [
        ";; written by pgbridge: edits are overwritten by `pgbridge up`",
        "[databases]",
        f"{inp.database} = host={host} port={inp.writer_port} dbname={inp.database} pool_size={inp.pool_size}",
        f"{reader_database(inp.database)} = host={host} port={inp.reader_port} dbname={inp.database} "
        f"pool_size={reader_pool}",
        "",
        "[pgbouncer]",
        f"listen_addr = {inp.listen_address}",
        f"listen_port = {inp.listen_port}",
        # The socket is for the operator and pgbridge (console user "pgbouncer" from the same OS
        # user needs no password there); applications use TCP with TLS.
        f"unix_socket_dir = {inp.socket_dir}",
        "unix_socket_mode = 0700",
        "pool_mode = transaction",
        f"max_client_conn = {inp.max_client_conn}",
        f"default_pool_size = {inp.pool_size}",
        f"reserve_pool_size = {inp.reserve_pool_size}",
        f"max_db_connections = {inp.max_db_connections}",
        # Who may log in from where is in the hba file (see render_hba); its password lines are
        # scram-sha-256, so clients authenticate exactly as they would with auth_type scram-sha-256.
        "auth_type = hba",
        f"auth_hba_file = {inp.hba_file}",
        f"auth_file = {inp.auth_file}",
        f"auth_user = {inp.auth_user}",
        f"auth_query = {AUTH_QUERY}",
        f"admin_users = {inp.console_user}",
        f"stats_users = {stats}",
        "client_tls_sslmode = require",
        f"client_tls_cert_file = {inp.client_tls_cert}",
        f"client_tls_key_file = {inp.client_tls_key}",
        f"client_tls_protocols = {tls_protocols}",
        # HAProxy passes TCP through, so this TLS session ends at PostgreSQL itself. verify-ca:
        # the certificate names the servers, not the HAProxy address PgBouncer dials.
        "server_tls_sslmode = verify-ca",
        f"server_tls_ca_file = {inp.server_tls_ca}",
        "server_tls_protocols = secure",
        # Transaction pooling never runs the reset query (clients may not rely on session state),
        # but keep the standard one for the day a pool is switched to session mode.
        "server_reset_query = DISCARD ALL",
        "server_reset_query_always = 0",
        f"server_login_retry = {_seconds(inp.server_login_retry_s)}",
        f"server_connect_timeout = {_seconds(inp.server_connect_timeout_s)}",
        f"query_wait_timeout = {inp.query_wait_timeout_s}",
        f"ignore_startup_parameters = {','.join(inp.ignore_startup_parameters)}",
        # One line per client login would flood the log under connection-per-request load;
        # pooler errors and the periodic stats line stay.
        "log_connections = 0",
        "log_disconnections = 0",
        "log_pooler_errors = 1",
    ]
    return "\n".join(lines) + "\n"


# Words PgBouncer's hba parser reads as keywords in the database and user fields; a role of that
# name must be quoted to mean itself.
_HBA_KEYWORDS = frozenset({"all", "sameuser", "samerole", "samegroup", "replication"})


def _hba_names(names: Sequence[str]) -> str:
    return ",".join(f'"{n}"' if n in _HBA_KEYWORDS else n for n in dict.fromkeys(names))


def render_hba(inp: PgBouncerInput) -> str:
    """PgBouncer's hba file: the deployment's allowed networks, enforced at the pooler.

    PostgreSQL sees every pooled client as the pooler's own address, so this is where
    ``allowed_cidrs`` takes effect for clients of the endpoints. The first matching line wins:

    - the auth user never logs in as a client (PgBouncer's own server logins for auth_query are
      not subject to this file); it could otherwise read every role's SCRAM secret;
    - the unix socket (mode 0700: the service user and root) keeps password logins, and
      PgBouncer's own "pgbouncer" console user from the same OS user, which never reaches hba;
    - console users reach only the console, over TLS with SCRAM, and only from the addresses
      pgbridge connects from (this host), never from the client networks;
    - clients from the allowed networks: TLS and SCRAM; everything else is rejected explicitly.

    PgBouncer (1.18) reads this file at start and on SIGHUP or RELOAD only. It runs auth_query
    before it consults the file, so a refused client's user name is still looked up in PostgreSQL
    (an unknown name is told "no such user", a known one "login rejected"); a file it cannot open
    on reload leaves every client rejected, not the old rules in force.
    """
    auth = _hba_names([inp.auth_user])
    console = _hba_names([inp.console_user, *inp.stats_users])
    console_nets = _networks("console network", inp.console_cidrs)
    client_nets = _networks("allowed network", inp.allowed_cidrs)
    lines = [
        "# written by pgbridge: edits are overwritten by `pgbridge up`",
        f"local all {auth} reject",
        f"host all {auth} 0.0.0.0/0 reject",
        f"host all {auth} ::/0 reject",
        "local all all scram-sha-256",
    ]
    lines += [f"hostssl {ADMIN_DATABASE} {console} {c} scram-sha-256" for c in console_nets]
    lines += [f"host all {console} 0.0.0.0/0 reject", f"host all {console} ::/0 reject"]
    lines += [f"hostssl all all {c} scram-sha-256" for c in client_nets]
    lines += ["host all all 0.0.0.0/0 reject", "host all all ::/0 reject"]
    return "\n".join(lines) + "\n"


def pgbouncer_command(pgbouncer: Path, ini: Path) -> list[str]:
    """Foreground (no -d): supervisord owns the pid; SIGHUP or the console's RELOAD re-reads files."""
    return [str(pgbouncer), str(ini)]


# --------------------------------------------------------------------------------- authentication


def auth_function_sql(auth_user: str, owner: str = "postgres") -> str:
    """SQL that lets `auth_user` look up login passwords and nothing else (run as a superuser,
    in every database clients connect to: PgBouncer runs auth_query in the target database).

    Why this shape: pg_authid is readable by superusers only, so the lookup is a SECURITY
    DEFINER function owned by `owner`, with a pinned search_path (no object of the caller's can
    be substituted), executable by the auth user alone. It returns a set, so an unknown or
    refused role yields no row rather than a row of NULLs. Superusers, replication roles, roles
    without LOGIN or password, and expired passwords are never returned: those roles cannot log
    in through the pooler at all.
    """
    _check_ident("auth user", auth_user)
    _check_ident("function owner", owner)
    return f"""\
CREATE SCHEMA IF NOT EXISTS {AUTH_SCHEMA} AUTHORIZATION {owner};
ALTER SCHEMA {AUTH_SCHEMA} OWNER TO {owner};
REVOKE ALL ON SCHEMA {AUTH_SCHEMA} FROM PUBLIC;
GRANT USAGE ON SCHEMA {AUTH_SCHEMA} TO {auth_user};
CREATE OR REPLACE FUNCTION {AUTH_FUNCTION}(p_username text)
RETURNS TABLE (username text, password text)
LANGUAGE sql STABLE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT a.rolname::text, a.rolpassword
    FROM pg_catalog.pg_authid AS a
    WHERE a.rolname = p_username
      AND a.rolcanlogin
      AND NOT a.rolsuper
      AND NOT a.rolreplication
      AND a.rolpassword IS NOT NULL
      AND (a.rolvaliduntil IS NULL OR a.rolvaliduntil > pg_catalog.now())
$fn$;
ALTER FUNCTION {AUTH_FUNCTION}(text) OWNER TO {owner};
REVOKE ALL ON FUNCTION {AUTH_FUNCTION}(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {AUTH_FUNCTION}(text) TO {auth_user};
"""


def scram_secret(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """A PostgreSQL-format SCRAM-SHA-256 secret (RFC 5803), as stored in pg_authid.

    Used for console users in userlist.txt, so their clear password is never on disk. Passwords
    are limited to printable ASCII, where SASLprep (which PostgreSQL applies) changes nothing.
    """
    if not password or not all(" " <= c <= "~" for c in password):
        raise DeploymentError("a SCRAM secret can only be computed here for a printable ASCII password")
    return scram_verifier(password, salt=salt, iterations=iterations)


def _quote(field: str) -> str:
    if any(c in field for c in "\n\r"):
        raise DeploymentError("userlist.txt fields cannot contain line breaks")
    return '"' + field.replace('"', '""') + '"'


def render_userlist(auth_user: str, auth_password: str, console: Sequence[tuple[str, str]] = ()) -> str:
    """userlist.txt (write it mode 0600, owned by the service user).

    The auth user's entry must be its clear-text password: PgBouncer logs in to PostgreSQL as the
    auth user on its own behalf, and a SCRAM secret can only be reused for a server login when a
    client of that same user has just authenticated with SCRAM (pgbouncer.ini(5), "Authentication
    file format"). Console users only ever authenticate to PgBouncer itself, so their entries
    should be SCRAM secrets (see ``scram_secret``).
    """
    _check_ident("auth user", auth_user)
    if _SCRAM_RE.match(auth_password) or _MD5_RE.match(auth_password):
        raise DeploymentError(
            f"the PgBouncer auth user {auth_user!r} needs its clear-text password in userlist.txt",
            hint="PgBouncer cannot log in to PostgreSQL (scram-sha-256) with a stored SCRAM secret or md5 hash",
        )
    if not auth_password:
        raise DeploymentError(f"the PgBouncer auth user {auth_user!r} has an empty password")
    lines = [f"{_quote(auth_user)} {_quote(auth_password)}"]
    for user, secret in console:
        _check_ident("console user", user)
        if user == auth_user:
            raise DeploymentError(f"{user!r} is both the auth user and a console user")
        lines.append(f"{_quote(user)} {_quote(secret)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ admin console


@dataclass(frozen=True)
class PoolStats:
    """One row of SHOW POOLS: a (database, user) pool."""

    database: str
    user: str
    cl_active: int
    cl_waiting: int
    sv_active: int
    sv_idle: int
    sv_used: int
    sv_login: int
    maxwait_s: float
    pool_mode: str


class PgBouncerConsole:
    """A client of the admin console (database ``pgbouncer``).

    The console speaks only the simple query protocol, so every command goes without parameters
    (psycopg then uses simple queries) on a fresh autocommit connection; nothing is prepared.
    `host` is a socket folder (starting with '/') or a TCP address; over the socket the user
    ``pgbouncer`` needs no password when it runs as the same OS user as PgBouncer.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str = "pgbouncer",
        password: str | None = None,
        sslmode: str | None = None,
        sslrootcert: Path | None = None,
        connect_timeout: int = 5,
    ) -> None:
        self._params: dict[str, Any] = {
            "host": host,
            "port": port,
            "user": user,
            "dbname": ADMIN_DATABASE,
            "connect_timeout": connect_timeout,
            "sslmode": sslmode or ("disable" if host.startswith("/") else "require"),
        }
        if password is not None:
            self._params["password"] = password
        if sslrootcert is not None:
            self._params["sslrootcert"] = str(sslrootcert)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(autocommit=True, prepare_threshold=None, **self._params)
        except psycopg.OperationalError as e:
            raise TransientError(f"PgBouncer console at {self._params['host']}:{self._params['port']}: {e}") from None

    def _rows(self, command: str) -> list[dict[str, Any]]:
        with self._connect() as conn:
            try:
                cur = conn.execute(command.encode())
                names = [d.name for d in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            except psycopg.Error as e:
                raise DeploymentError(f"PgBouncer refused {command!r}: {e}") from None

    def show_pools(self) -> list[PoolStats]:
        return [
            PoolStats(
                database=str(r["database"]),
                user=str(r["user"]),
                cl_active=int(r["cl_active"]),
                cl_waiting=int(r["cl_waiting"]),
                sv_active=int(r["sv_active"]),
                sv_idle=int(r["sv_idle"]),
                sv_used=int(r["sv_used"]),
                sv_login=int(r["sv_login"]),
                maxwait_s=int(r["maxwait"]) + int(r.get("maxwait_us") or 0) / 1e6,
                pool_mode=str(r["pool_mode"]),
            )
            for r in self._rows("SHOW POOLS")
        ]

    def show_databases(self) -> list[dict[str, Any]]:
        return self._rows("SHOW DATABASES")

    def paused(self, database: str) -> bool:
        for row in self.show_databases():
            if row.get("name") == database:
                return bool(int(row.get("paused") or 0))
        raise DeploymentError(f"PgBouncer has no database {database!r}")

    def pause(self, database: str | None = None, timeout: float = 30) -> None:
        """PAUSE: wait for running transactions to end, close server connections, queue new work.

        PAUSE blocks until every transaction in flight has finished; one that runs longer than
        `timeout` would hold the switchover (and every queued client) hostage, so past the
        deadline the pause is undone with RESUME and TransientError says why.
        """
        command = _target("PAUSE", database)
        conn = self._connect()
        try:
            finished = _run_with_deadline(conn, command, timeout)
        finally:
            conn.close()  # not `with`: on exit psycopg would send COMMIT behind an unfinished PAUSE
        if not finished:
            self.resume(database)
            raise TransientError(
                f"PgBouncer could not pause {database or 'all databases'} within {timeout:g}s: "
                "a transaction is still running; the pause was undone"
            )

    def resume(self, database: str | None = None) -> None:
        """RESUME after PAUSE; resuming something that is not paused is not an error."""
        command = _target("RESUME", database)
        with self._connect() as conn:
            try:
                conn.execute(command.encode())
            except psycopg.Error as e:
                if "not paused" not in str(e):
                    raise DeploymentError(f"PgBouncer refused {command!r}: {e}") from None


def _target(command: str, database: str | None) -> str:
    if database is None:
        return command
    _check_ident("database", database)
    return f"{command} {database}"


def _run_with_deadline(conn: psycopg.Connection[Any], command: str, timeout: float) -> bool:
    """Send one console command and wait at most `timeout` seconds for its answer.

    psycopg has no per-statement client timeout and the console has no statement_timeout, so
    this drives libpq directly: send, then poll the socket until the answer or the deadline.
    """
    pgconn = conn.pgconn
    deadline = time.monotonic() + timeout
    pgconn.send_query(command.encode())
    while pgconn.flush() != 0:
        select.select([], [pgconn.socket], [], max(0.0, deadline - time.monotonic()))
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        select.select([pgconn.socket], [], [], remaining)
    error = None
    while (res := pgconn.get_result()) is not None:
        if res.status == pq.ExecStatus.FATAL_ERROR:
            error = (res.error_message or b"").decode(errors="replace").strip()
    if error:
        raise DeploymentError(f"PgBouncer refused {command!r}: {error}")
    return True
