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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from pgbridge.errors import DeploymentError, SpecError, TransientError
from pgbridge.ops.context import listen_addresses
from pgbridge.platform.pgbouncer import (
    AUTH_QUERY,
    PgBouncerConsole,
    PgBouncerInput,
    auth_function_sql,
    pgbouncer_command,
    reader_database,
    render_hba,
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
        "hba_file": base / "pgbouncer-hba.conf",
        "auth_user": AUTH_USER,
        "console_user": CONSOLE_USER,
        "client_tls_cert": base / "tls" / "server.crt",
        "client_tls_key": base / "tls" / "server.key",
        "server_tls_ca": base / "tls" / "ca.crt",
        "allowed_cidrs": ("127.0.0.1/32",),
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
    assert (s["auth_type"], s["auth_hba_file"]) == ("hba", str(tmp_path / "pgbouncer-hba.conf"))
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


def test_hba_admits_allowed_networks_over_tls_and_rejects_the_rest(tmp_path: Path) -> None:
    inp = _input(tmp_path, allowed_cidrs=("10.0.0.0/16", "2001:db8::/32"), console_cidrs=("10.0.0.5/32",))
    assert render_hba(inp).splitlines() == [
        "# written by pgbridge: edits are overwritten by `pgbridge up`",
        # the auth user only looks passwords up; it never logs in as a client, not even locally
        f"local all {AUTH_USER} reject",
        f"host all {AUTH_USER} 0.0.0.0/0 reject",
        f"host all {AUTH_USER} ::/0 reject",
        "local all all scram-sha-256",
        # the console: only its own database, only from this host
        f"hostssl pgbouncer {CONSOLE_USER} 10.0.0.5/32 scram-sha-256",
        f"host all {CONSOLE_USER} 0.0.0.0/0 reject",
        f"host all {CONSOLE_USER} ::/0 reject",
        "hostssl all all 10.0.0.0/16 scram-sha-256",
        "hostssl all all 2001:db8::/32 scram-sha-256",
        "host all all 0.0.0.0/0 reject",
        "host all all ::/0 reject",
    ]
    rules = render_hba(inp).splitlines()
    assert all(" trust" not in r and " md5" not in r and " password" not in r for r in rules)
    assert all(r.endswith(" reject") for r in rules if r.startswith("host "))  # no TLS, no entry


def test_hba_is_byte_identical_for_equal_inputs_and_follows_the_networks(tmp_path: Path) -> None:
    inp = _input(tmp_path, allowed_cidrs=("10.0.0.0/8", "192.168.1.0/24"))
    assert render_hba(inp) == render_hba(_input(tmp_path, allowed_cidrs=("10.0.0.0/8", "192.168.1.0/24")))
    narrowed = render_hba(replace(inp, allowed_cidrs=("10.0.0.0/8",)))
    assert narrowed != render_hba(inp) and "192.168.1.0/24" not in narrowed
    # no networks: only the console (from this host) and the socket remain
    closed = render_hba(replace(inp, allowed_cidrs=()))
    assert not any(r.startswith("hostssl all all") for r in closed.splitlines())
    # one form only, what PgBouncer parses: address/bits, each network once
    same = render_hba(replace(inp, allowed_cidrs=("10.0.0.5", "10.0.0.5/32", "::1")))
    assert same.count("hostssl all all 10.0.0.5/32 scram-sha-256") == 1
    assert "hostssl all all ::1/128 scram-sha-256" in same
    # a role named like an hba keyword is quoted, so it means itself and not "every user"
    keyword = render_hba(replace(inp, stats_users=("all",)))
    assert f'hostssl pgbouncer {CONSOLE_USER},"all" 127.0.0.1/32 scram-sha-256' in keyword.splitlines()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"allowed_cidrs": ("10.0.0.1/8",)}, "'10.0.0.1/8' is not a network in CIDR form"),  # host bits set
        ({"allowed_cidrs": ("10.0.0.0/33",)}, "allowed network '10.0.0.0/33'"),
        ({"allowed_cidrs": ("10.0.0.0/8 trust",)}, "allowed network '10.0.0.0/8 trust'"),
        ({"allowed_cidrs": ("db.example.com/24",)}, "allowed network 'db.example.com/24'"),
        ({"allowed_cidrs": (167772160,)}, "allowed network 167772160"),
        ({"allowed_cidrs": "10.0.0.0/8"}, "allowed networks must be a tuple"),
        ({"allowed_cidrs": ("fe80::/64%eth0",)}, "IPv6 scope"),  # PgBouncer would skip the line
        ({"console_cidrs": ("fe80::1%eth0",)}, "console network 'fe80::1%eth0'"),
        ({"console_cidrs": ()}, "at least one console network"),
        ({"console_cidrs": ("localhost",)}, "console network 'localhost'"),
        ({"hba_file": Path("relative/hba.conf")}, "cannot use the path"),
        ({"hba_file": Path("/tmp/a#b")}, "cannot use the path"),
    ],
)
def test_bad_networks_are_refused_with_the_input(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _input(tmp_path, **overrides)


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
    _write(env, inp.hba_file, render_hba(inp), 0o644)
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


def test_servers_listen_where_pgbridge_connects() -> None:
    # only wildcards: pgbridge connects to 127.0.0.1, which :: alone does not serve
    assert listen_addresses(["::"]) == ("::", "127.0.0.1")
    for covered in (["127.0.0.1"], ["*"], ["0.0.0.0"], ["::", "0.0.0.0"]):
        assert listen_addresses(covered) == tuple(covered)
    # a named address is where pgbridge connects; with loopback (members behind HAProxy) 127.0.0.1 too
    assert listen_addresses(["10.1.2.3"]) == ("10.1.2.3",)
    assert listen_addresses(["10.1.2.3"], loopback=True) == ("10.1.2.3", "127.0.0.1")
    assert listen_addresses(["::"], loopback=True) == ("::", "127.0.0.1")
    assert listen_addresses(["0.0.0.0"], loopback=True) == ("0.0.0.0",)  # it already serves 127.0.0.1
    assert listen_addresses(["::1"]) == ("::1",)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_an_ipv6_only_listener_still_serves_pgbridge_on_loopback(pgbouncer_bin: Path, env: Env) -> None:
    """`listen_addresses: ["::"]` alone: PgBouncer binds :: for IPv6 only, and pgbridge's console
    target (status, switchover) is 127.0.0.1, so the pooler listens there too."""
    listen = ",".join(listen_addresses(["::"]))
    inp = _input(
        env.base, listen_port=free_port(), writer_port=free_port(), reader_port=free_port(), listen_address=listen
    )
    _write(env, inp.auth_file, _userlist())
    with running_pgbouncer(pgbouncer_bin, env, inp) as proc:  # it waits until 127.0.0.1 answers
        assert ("pgbouncer", "pgbouncer") in {(p.database, p.user) for p in _console(env, inp).show_pools()}
        with socket.create_connection(("::1", inp.listen_port), timeout=5):
            pass  # and the spec's own address
        assert proc.poll() is None


def _reload_hba(env: Env, proc: subprocess.Popen[bytes], inp: PgBouncerInput) -> None:
    """What `up` does when the allowed networks change: rewrite the hba file, then SIGHUP."""
    _write(env, inp.hba_file, render_hba(inp), 0o644)
    proc.send_signal(signal.SIGHUP)


def _login_error(env: Env, inp: PgBouncerInput, **who: str) -> str | None:
    """None when the client gets in, else PgBouncer's reason."""
    try:
        with _client(env, inp, **who) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.OperationalError as e:
        return str(e)


def _console_error(env: Env, inp: PgBouncerInput) -> str | None:
    """None when pgbridge's console login from this host gets in, else the reason."""
    try:
        _console(env, inp).show_pools()
        return None
    except TransientError as e:
        return str(e)


def _settles(check: Callable[[], bool], timeout: float = 10) -> bool:
    """PgBouncer applies a SIGHUP on its next event loop turn: poll briefly for the outcome."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.integration
def test_hba_admits_only_the_allowed_networks(pgbouncer_bin: Path, env: Env) -> None:
    """PgBouncer enforces allowed_cidrs itself (PostgreSQL only sees the pooler's address).

    Every client here comes from 127.0.0.1, so "outside" is the same client after the networks are
    narrowed to 10.0.0.0/8 and PgBouncer reloaded, as `up` does on a running deployment. pgbridge's
    own console login from this host must keep working throughout.
    """
    with shop_server(env) as pg:
        inside = _input(env.base, listen_port=free_port(), writer_port=pg.port, reader_port=pg.port)
        outside = replace(inside, allowed_cidrs=("10.0.0.0/8",))
        _write(env, inside.auth_file, _userlist())
        with running_pgbouncer(pgbouncer_bin, env, inside) as proc:
            assert _login_error(env, inside) is None, "a client from an allowed network was refused"
            connected = _client(env, inside)
            connected.execute("SELECT 1")
            connected.commit()

            _reload_hba(env, proc, outside)
            refused = _settles(lambda: _login_error(env, inside) is not None)
            assert refused, (
                "PgBouncer still admits a client from 127.0.0.1 with allowed_cidrs [10.0.0.0/8]: "
                "the pooler does not enforce the allowed networks"
            )
            assert "login rejected" in (_login_error(env, inside) or ""), "refused, but not by the hba rules"
            # PgBouncer runs auth_query before it reads its hba rules: a name that is no role is
            # told so even from outside
            assert "no such user" in (_login_error(env, inside, user="nobody", password="x") or "")
            # a reload only governs new logins: the client already connected keeps working
            assert connected.execute("SELECT 1").fetchone() == (1,)
            connected.close()
            console = _console(env, inside)  # from this host, over TLS with SCRAM, as pgbridge does
            console.pause("shop")
            console.resume("shop")
            assert ("pgbouncer", "pgbouncer") in {(p.database, p.user) for p in console.show_pools()}

            # the console only from its own network: with 127.0.0.1 outside it, pgbridge's login there is
            # refused too, while clients of the allowed networks are not
            _reload_hba(env, proc, replace(inside, console_cidrs=("10.0.0.1/32",)))
            assert _settles(lambda: _console_error(env, inside) is not None), "the console admits a foreign network"
            assert "login rejected" in (_console_error(env, inside) or ""), "refused, but not by the hba rules"
            assert _login_error(env, inside) is None

            _reload_hba(env, proc, inside)
            assert _settles(lambda: _login_error(env, inside) is None), "widening the networks again did not admit"
            assert _settles(lambda: _console_error(env, inside) is None), "the console's own network was refused"
            # from an allowed network too, neither the auth user (it could read every SCRAM secret)
            # nor the console user gets a database through the pooler
            for user, password in ((AUTH_USER, AUTH_PASSWORD), (CONSOLE_USER, CONSOLE_PASSWORD)):
                error = _login_error(env, inside, user=user, password=password)
                assert error is not None and "login rejected" in error, f"{user} got in: {error}"
            assert proc.poll() is None


def test_input_is_frozen(tmp_path: Path) -> None:
    inp = _input(tmp_path)
    with pytest.raises(AttributeError):
        inp.pool_size = 3  # type: ignore[misc]
    assert replace(inp, pool_size=3).pool_size == 3
