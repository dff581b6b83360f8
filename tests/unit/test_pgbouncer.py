"""PgBouncer: rendered ini, userlist and auth function, then the real pgbouncer accepting the config
(TLS, console login with a SCRAM secret, PAUSE/RESUME), and one run against a real PostgreSQL that
proves auth_query with SCRAM pass-through."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from pgbridge.errors import DeploymentError, SpecError, TransientError
from pgbridge.platform.pgbouncer import (
    AUTH_QUERY,
    PgBouncerConsole,
    PgBouncerInput,
    auth_function_sql,
    pgbouncer_command,
    reader_database,
    render_ini,
    render_userlist,
    scram_secret,
)
from pgbridge.platform.system import free_port
from pgbridge.platform.tls import ensure_ca, ensure_server_cert

if TYPE_CHECKING:
    from tests.pgserver import Server

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
CONSOLE_USER = "pgb_console"
CONSOLE_PASSWORD = "console-Secret-1"
AUTH_USER = "pgb_auth"
AUTH_PASSWORD = "auth-Secret-2"


def _input(base: Path, **overrides: object) -> PgBouncerInput:
    kwargs: dict[str, object] = {
        "database": "shop",
        "writer_port": 7000,
        "reader_port": 7001,
        "listen_port": 6432,
        "socket_dir": base / "run",
        "auth_file": base / "userlist.txt",
        "auth_user": AUTH_USER,
        "console_user": CONSOLE_USER,
        "client_tls_cert": base / "tls" / "server.crt",
        "client_tls_key": base / "tls" / "server.key",
        "server_tls_ca": base / "tls" / "ca.crt",
    }
    kwargs.update(overrides)
    return PgBouncerInput(**kwargs)  # type: ignore[arg-type]


def _settings(ini: str) -> dict[str, str]:
    section = ini.split("[pgbouncer]\n")[1]
    pairs = (line.split(" = ", 1) for line in section.splitlines() if " = " in line)
    return {k: v for k, v in pairs}


# ------------------------------------------------------------------------------------------ render


def test_ini_two_databases_transaction_pooling_tls(tmp_path: Path) -> None:
    ini = render_ini(_input(tmp_path, pool_size=30, reader_pool_size=50, max_client_conn=5000))
    dbs = ini.split("[databases]\n")[1].split("\n\n")[0].splitlines()
    assert dbs == [
        "shop = host=127.0.0.1 port=7000 dbname=shop pool_size=30",
        "shop_ro = host=127.0.0.1 port=7001 dbname=shop pool_size=50",
    ]
    s = _settings(ini)
    assert s["pool_mode"] == "transaction"
    assert (s["default_pool_size"], s["max_client_conn"]) == ("30", "5000")
    assert (s["listen_addr"], s["listen_port"]) == ("127.0.0.1", "6432")
    assert s["auth_type"] == "scram-sha-256"
    assert (s["auth_user"], s["auth_query"]) == (AUTH_USER, AUTH_QUERY)
    assert s["auth_query"] == "SELECT username, password FROM pgbouncer.user_lookup($1)"
    assert (s["admin_users"], s["stats_users"]) == (CONSOLE_USER, CONSOLE_USER)
    assert s["client_tls_sslmode"] == "require"
    assert s["client_tls_cert_file"].endswith("server.crt") and s["client_tls_key_file"].endswith("server.key")
    assert (s["server_tls_sslmode"], s["server_tls_ca_file"]) == ("verify-ca", str(tmp_path / "tls" / "ca.crt"))
    assert s["unix_socket_dir"] == str(tmp_path / "run")
    assert s["server_login_retry"] == "0.5"
    assert "pidfile" not in s and "logfile" not in s
    assert reader_database("shop") == "shop_ro"


def test_ini_options(tmp_path: Path) -> None:
    ini = render_ini(_input(tmp_path, stats_users=("monitor",), tls_min_version="TLSv1.3", server_login_retry_s=2))
    s = _settings(ini)
    assert s["stats_users"] == f"{CONSOLE_USER},monitor"
    assert s["client_tls_protocols"] == "tlsv1.3"
    assert s["server_login_retry"] == "2"
    assert "pool_size=20" in ini.split("shop_ro = ")[1].splitlines()[0]  # reader defaults to pool_size
    assert pgbouncer_command(Path("/usr/sbin/pgbouncer"), Path("/h/pgbouncer.ini")) == [
        "/usr/sbin/pgbouncer",
        "/h/pgbouncer.ini",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {"database": "Shop"},
        {"database": "pgbouncer"},
        {"database": "x" * 61},
        {"auth_user": CONSOLE_USER},
        {"stats_users": ("bad name",)},
        {"pool_size": 0},
        {"reader_pool_size": 0},
        {"listen_port": 0},
        {"auth_file": Path("relative/userlist.txt")},
        {"socket_dir": Path("/tmp/a;b")},
    ],
)
def test_bad_inputs_are_refused(tmp_path: Path, overrides: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        _input(tmp_path, **overrides)


def test_userlist_needs_clear_auth_password() -> None:
    secret = scram_secret(CONSOLE_PASSWORD)
    text = render_userlist(AUTH_USER, 'pa"ss', [(CONSOLE_USER, secret)])
    assert text == f'"{AUTH_USER}" "pa""ss"\n"{CONSOLE_USER}" "{secret}"\n'
    with pytest.raises(DeploymentError, match="clear-text"):
        render_userlist(AUTH_USER, scram_secret("x"))
    with pytest.raises(DeploymentError, match="clear-text"):
        render_userlist(AUTH_USER, "md5" + "0" * 32)
    with pytest.raises(DeploymentError):
        render_userlist(AUTH_USER, "")
    with pytest.raises(DeploymentError):
        render_userlist(AUTH_USER, "pw", [(AUTH_USER, secret)])


def test_scram_secret_format() -> None:
    secret = scram_secret("pencil", salt=b"0123456789abcdef", iterations=4096)
    assert secret.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    assert secret == scram_secret("pencil", salt=b"0123456789abcdef")
    assert scram_secret("pencil") != scram_secret("pencil")  # random salt
    with pytest.raises(DeploymentError):
        scram_secret("pässword")


def test_auth_function_sql_is_locked_down() -> None:
    sql = auth_function_sql(AUTH_USER)
    assert "SECURITY DEFINER" in sql
    assert "SET search_path = pg_catalog, pg_temp" in sql
    assert "RETURNS TABLE (username text, password text)" in sql
    assert "ALTER FUNCTION pgbouncer.user_lookup(text) OWNER TO postgres;" in sql
    assert "REVOKE ALL ON FUNCTION pgbouncer.user_lookup(text) FROM PUBLIC;" in sql
    assert f"GRANT EXECUTE ON FUNCTION pgbouncer.user_lookup(text) TO {AUTH_USER};" in sql
    assert "NOT a.rolsuper" in sql and "NOT a.rolreplication" in sql
    with pytest.raises(SpecError):
        auth_function_sql("x; DROP TABLE y")


# ----------------------------------------------------------------------------- the real pgbouncer


@dataclass
class Env:
    base: Path
    user: str | None  # OS user pgbouncer runs as (None: the current user)


@pytest.fixture
def pgbouncer_bin() -> Path:
    if not Path(PGBOUNCER).is_file():
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    return Path(PGBOUNCER)


@pytest.fixture
def env(pgbouncer_bin: Path) -> Iterator[Env]:
    """A folder with TLS material, owned by the user pgbouncer runs as (it refuses to run as root)."""
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' OS user to run pgbouncer as")
        user = "postgres"
    base = Path(tempfile.mkdtemp(prefix="pgb-pb-", dir="/tmp"))
    base.chmod(0o755)
    (base / "run").mkdir()
    ensure_ca(base / "tls", "pgbridge test CA")
    ensure_server_cert(base / "tls", common_name="localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    if user:
        for path in [base, *base.rglob("*")]:
            shutil.chown(path, user, user)
    try:
        yield Env(base, user)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _write(env: Env, path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)
    if env.user:
        shutil.chown(path, env.user, env.user)


@contextlib.contextmanager
def running_pgbouncer(pgbouncer: Path, env: Env, inp: PgBouncerInput) -> Iterator[subprocess.Popen[bytes]]:
    """Start pgbouncer in the foreground, wait until it listens, stop it by its own pid."""
    ini = env.base / "pgbouncer.ini"
    _write(env, ini, render_ini(inp))
    log_path = env.base / "pgbouncer.log"
    kwargs: dict[str, object] = {}
    if env.user:
        pw = pwd.getpwnam(env.user)
        kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(  # type: ignore[call-overload]
            pgbouncer_command(pgbouncer, ini), stdout=log, stderr=subprocess.STDOUT, cwd=env.base, **kwargs
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pgbouncer refused the config (exit {proc.returncode}):\n{log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", inp.listen_port), timeout=1):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"pgbouncer did not listen within 15s:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # safe shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def _userlist() -> str:
    return render_userlist(AUTH_USER, AUTH_PASSWORD, [(CONSOLE_USER, scram_secret(CONSOLE_PASSWORD))])


def _console(env: Env, inp: PgBouncerInput, password: str = CONSOLE_PASSWORD) -> PgBouncerConsole:
    return PgBouncerConsole(
        host="127.0.0.1",
        port=inp.listen_port,
        user=CONSOLE_USER,
        password=password,
        sslmode="verify-ca",
        sslrootcert=env.base / "tls" / "ca.crt",
    )


def test_real_pgbouncer_accepts_config_and_console(pgbouncer_bin: Path, env: Env) -> None:
    # Nothing listens on the endpoint ports: pgbouncer connects to servers lazily.
    inp = _input(env.base, listen_port=free_port(), writer_port=free_port(), reader_port=free_port())
    _write(env, inp.auth_file, _userlist())
    with running_pgbouncer(pgbouncer_bin, env, inp) as proc:
        console = _console(env, inp)
        # only the console's own pool: no client has asked for a database yet
        assert [(p.database, p.user) for p in console.show_pools()] == [("pgbouncer", "pgbouncer")]
        assert {d["name"] for d in console.show_databases()} >= {"shop", "shop_ro", "pgbouncer"}
        console.pause("shop")
        console.pause("shop")  # already paused
        assert console.paused("shop") and not console.paused("shop_ro")
        console.resume("shop")
        console.resume("shop")  # idempotent
        assert not console.paused("shop")
        console.pause()
        console.resume()
        # TLS is required from clients, and a wrong console password is refused
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                host="127.0.0.1", port=inp.listen_port, dbname="pgbouncer", user=CONSOLE_USER,
                password=CONSOLE_PASSWORD, sslmode="disable", connect_timeout=5,
            )  # fmt: skip
        with pytest.raises(TransientError):
            _console(env, inp, password="wrong").show_pools()
        assert proc.poll() is None


# --------------------------------------------------------------------- with a real PostgreSQL 15


@contextlib.contextmanager
def shop_server(env: Env) -> Iterator[Server]:
    """A real PostgreSQL 15 over TLS with database shop, roles shop_app (password shop_app-pw),
    boss (a superuser) and the auth user, and the lookup function installed in shop."""
    from tests.pgserver import PG_BIN, bare_server

    if not (PG_BIN / "postgres").is_file():
        pytest.skip(f"PostgreSQL 15 is not installed in {PG_BIN}")
    tls = env.base / "tls"
    hba = env.base / "pg_hba.conf"
    _write(env, hba, "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n", 0o644)
    settings = (
        f"-c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={tls / 'server.crt'} "
        f"-c ssl_key_file={tls / 'server.key'} -c hba_file={hba}"
    )
    with bare_server("pgb", settings=settings) as pg:
        pg.sql("CREATE DATABASE shop")
        for role, extra in (("shop_app", ""), (AUTH_USER, ""), ("boss", " SUPERUSER")):
            password = AUTH_PASSWORD if role == AUTH_USER else f"{role}-pw"
            pg.sql(f"CREATE ROLE {role} LOGIN{extra} PASSWORD '{password}'")
        with psycopg.connect(pg.dsn.replace("dbname=postgres", "dbname=shop"), autocommit=True) as conn:
            conn.execute(auth_function_sql(AUTH_USER).encode())
        yield pg


def _client(
    env: Env, inp: PgBouncerInput, dbname: str = "shop", user: str = "shop_app", password: str = "shop_app-pw"
) -> psycopg.Connection:
    """A TLS client of the pooler, from 127.0.0.1 like every client in these tests."""
    return psycopg.connect(
        host="127.0.0.1", port=inp.listen_port, dbname=dbname, user=user, password=password,
        sslmode="verify-ca", sslrootcert=str(env.base / "tls" / "ca.crt"), prepare_threshold=None, connect_timeout=5,
    )  # fmt: skip


@pytest.mark.integration
def test_auth_query_scram_pass_through_and_pause(pgbouncer_bin: Path, env: Env) -> None:
    with shop_server(env) as pg:
        with psycopg.connect(pg.dsn.replace("dbname=postgres", "dbname=shop"), autocommit=True) as conn:
            # the lookup is for the auth user alone
            may = "SELECT has_function_privilege(%s, 'pgbouncer.user_lookup(text)', 'EXECUTE')"
            assert conn.execute(may, ("shop_app",)).fetchone() == (False,)
            assert conn.execute(may, (AUTH_USER,)).fetchone() == (True,)
            row = conn.execute(b"SELECT count(*) FROM pgbouncer.user_lookup('boss')").fetchone()
            assert row == (0,)

        inp = _input(env.base, listen_port=free_port(), writer_port=pg.port, reader_port=pg.port)
        _write(env, inp.auth_file, _userlist())

        def connect(dbname: str, user: str = "shop_app", password: str = "shop_app-pw") -> psycopg.Connection:
            return _client(env, inp, dbname, user, password)

        with running_pgbouncer(pgbouncer_bin, env, inp):
            # shop_app is in no file: PgBouncer found its SCRAM secret through auth_query and
            # reused the client's SCRAM proof to log in to PostgreSQL over verify-ca TLS.
            for db in ("shop", "shop_ro"):
                with connect(db) as conn:
                    assert conn.execute(
                        "SELECT current_user, current_database(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                    ).fetchone() == ("shop_app", "shop", True)
            with pytest.raises(psycopg.OperationalError):
                connect("shop", password="wrong")
            with pytest.raises(psycopg.OperationalError):
                connect("shop", user="boss", password="boss-pw")  # superusers never get through

            console = _console(env, inp)
            pools = {(p.database, p.user): p for p in console.show_pools()}
            assert pools[("shop", "shop_app")].pool_mode == "transaction"

            # PAUSE waits for the open transaction; past the deadline it is undone
            busy = connect("shop")
            busy.execute("SELECT 1")  # opens a transaction (not autocommit)
            started = time.monotonic()
            with pytest.raises(TransientError, match="undone"):
                console.pause("shop", timeout=1)
            assert 0.9 < time.monotonic() - started < 10
            assert not console.paused("shop")
            busy.commit()
            busy.close()
            console.pause("shop", timeout=5)  # nothing in flight now: immediate
            console.resume("shop")
            with connect("shop") as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)


def test_input_is_frozen(tmp_path: Path) -> None:
    inp = _input(tmp_path)
    with pytest.raises(AttributeError):
        inp.pool_size = 3  # type: ignore[misc]
    assert replace(inp, pool_size=3).pool_size == 3
