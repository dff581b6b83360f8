"""HAProxy endpoints: the rendered config, the state parsers, and the real haproxy routing to fake
Patroni members (tiny HTTP servers answering /primary and /replica?lag= like Patroni does)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from pgbridge.errors import HostError, SpecError, TransientError
from pgbridge.platform.haproxy import (
    READER,
    WRITER,
    HaproxyInput,
    HaproxyMember,
    HaproxyState,
    check_command,
    haproxy_command,
    parse_servers_state,
    parse_show_stat,
    query_stats_socket,
    read_state,
    render_config,
)
from pgbridge.platform.system import free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def _members(n: int = 3) -> tuple[HaproxyMember, ...]:
    return tuple(HaproxyMember(f"pg{i}", "127.0.0.1", 5432 + i, 8008 + i) for i in range(1, n + 1))


def _input(tmp: Path, **overrides: object) -> HaproxyInput:
    kwargs: dict[str, object] = {
        "members": _members(),
        "writer_port": 6000,
        "reader_port": 6001,
        "max_lag_bytes": 1048576,
        "stats_socket": tmp / "haproxy.sock",
    }
    kwargs.update(overrides)
    return HaproxyInput(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def haproxy_bin() -> Path:
    if not Path(HAPROXY).is_file():
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return Path(HAPROXY)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short path: the stats socket must fit in a unix socket address.
    path = Path(tempfile.mkdtemp(prefix="pgb-ha-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ render


def test_writer_checks_primary_and_cuts_sessions(tmp_path: Path) -> None:
    cfg = render_config(_input(tmp_path))
    writer = cfg.split("listen writer\n")[1].split("\n\n")[0]
    assert "bind 127.0.0.1:6000" in writer
    assert "http-check send meth GET uri /primary" in writer
    assert "http-check expect status 200" in writer
    for i in (1, 2, 3):
        assert f"server pg{i} 127.0.0.1:{5432 + i} check port {8008 + i}" in writer
    assert "backup" not in writer
    assert "on-marked-down shutdown-sessions" in cfg.split("defaults\n")[1].split("\n\n")[0]


def test_reader_checks_lag_and_falls_back_to_primary(tmp_path: Path) -> None:
    cfg = render_config(_input(tmp_path, max_lag_bytes=16 * 1024 * 1024))
    reader = cfg.split("listen reader\n")[1]
    assert "bind 127.0.0.1:6001" in reader
    assert "http-check send meth GET uri /replica?lag=16777216" in reader
    assert "balance leastconn" in reader
    for i in (1, 2, 3):
        assert (
            f"server pg{i} 127.0.0.1:{5432 + i} check port {8008 + i} on-marked-up shutdown-backup-sessions" in reader
        )
        # the fallback mirrors the writer's /primary check instead of running its own
        assert f"server pg{i}.primary 127.0.0.1:{5432 + i} backup track writer/pg{i}" in reader


def test_timing_foreground_and_socket(tmp_path: Path) -> None:
    cfg = render_config(
        _input(tmp_path, check_interval_ms=2000, fast_interval_ms=700, down_interval_ms=400, fall=3, rise=2)
    )
    assert "default-server inter 2000ms fastinter 700ms downinter 400ms fall 3 rise 2" in cfg
    assert f"stats socket {tmp_path / 'haproxy.sock'} mode 600 level admin" in cfg
    assert "daemon" not in cfg and "pidfile" not in cfg
    assert haproxy_command(Path("/usr/sbin/haproxy"), Path("/x/h.cfg")) == [
        "/usr/sbin/haproxy",
        "-W",
        "-db",
        "-f",
        "/x/h.cfg",
    ]


def test_render_is_deterministic_and_brackets_ipv6(tmp_path: Path) -> None:
    members = (HaproxyMember("a", "::1", 5432, 8008), HaproxyMember("b", "10.0.0.2", 5432, 8008))
    one = render_config(_input(tmp_path, members=members, bind_address="::1"))
    assert one == render_config(_input(tmp_path, members=members, bind_address="::1"))
    assert "bind [::1]:6000" in one
    assert "server a [::1]:5432 check port 8008" in one


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"members": ()}, SpecError),
        ({"members": (HaproxyMember("a", "127.0.0.1", 1, 2), HaproxyMember("a", "127.0.0.1", 3, 4))}, SpecError),
        ({"members": (HaproxyMember("pg.1", "127.0.0.1", 1, 2),)}, SpecError),
        ({"members": (HaproxyMember("pg1", "db.example", 1, 2),)}, SpecError),
        ({"members": (HaproxyMember("pg1", "127.0.0.1", 70000, 2),)}, SpecError),
        ({"reader_port": 6000}, SpecError),
        ({"max_lag_bytes": -1}, SpecError),
        ({"check_interval_ms": 10}, SpecError),
        ({"fall": 0}, SpecError),
        ({"stats_socket": Path("/tmp/" + "x" * 120)}, HostError),
    ],
)
def test_bad_inputs_are_refused(tmp_path: Path, overrides: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        _input(tmp_path, **overrides)


# ------------------------------------------------------------------------------------------ parsers

# Real answers carry ~80 columns; the parsers go by column name, so a subset in order will do.
SHOW_STAT = """\
# pxname,svname,qcur,scur,stot,status,weight,act,bck,chkfail
writer,FRONTEND,,0,0,OPEN,,,,
writer,pg1,0,0,0,UP,1,1,0,0
writer,pg2,0,0,0,DOWN,1,1,0,3
writer,pg3,0,0,0,DOWN 1/1,1,1,0,3
writer,BACKEND,0,0,0,UP,1,1,0,
reader,pg1,0,0,0,DOWN,1,1,0,2
reader,pg2,0,0,0,UP 1/2,1,1,0,1
reader,pg3,0,0,0,MAINT,1,1,0,0
reader,pg1.primary,0,0,0,UP,1,0,1,0
reader,pg2.primary,0,0,0,DOWN,1,0,1,0
"""

_STATE_COLUMNS = (
    "be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
    "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
    "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl "
    "srv_check_port srv_check_addr srv_agent_addr srv_agent_port"
)
SERVERS_STATE = f"""\
1
# {_STATE_COLUMNS}
2 writer 1 pg1 127.0.0.1 2 0 1 1 12 6 3 4 6 0 0 0 - 5433 - 0 8009 - - 0
2 writer 2 pg2 127.0.0.1 0 0 1 1 12 6 2 0 6 0 0 0 - 5434 - 0 8010 - - 0
3 reader 1 pg1 127.0.0.1 2 1 1 1 3 6 3 4 6 0 0 0 - 5433 - 0 8009 - - 0
3 reader 2 pg2 127.0.0.1 2 0 1 1 3 6 3 4 6 0 0 0 - 5434 - 0 8010 - - 0
"""


def test_parse_show_stat() -> None:
    state = parse_show_stat(SHOW_STAT)
    assert state.up(WRITER) == ("pg1",)
    assert state.targets(WRITER) == ("pg1",)
    assert state.up(READER) == ("pg2", "pg1.primary")
    assert state.targets(READER) == ("pg2",)
    fallback = HaproxyState(tuple(s for s in state.servers if s.server != "pg2"))
    assert fallback.targets(READER) == ("pg1.primary",)
    assert {s.detail for s in state.servers if s.backend == READER} >= {"MAINT", "UP 1/2"}


def test_parse_servers_state() -> None:
    state = parse_servers_state(SERVERS_STATE)
    assert state.up(WRITER) == ("pg1",)
    assert state.up(READER) == ("pg2",)  # pg1 is forced into maintenance
    with pytest.raises(TransientError):
        parse_servers_state("2\n# be_id\n")
    with pytest.raises(TransientError):
        parse_show_stat("")


# ------------------------------------------------------------------------------- the real haproxy


class FakeMember:
    """A Patroni stand-in: its REST port answers health checks by role, its "PostgreSQL" port
    sends the member name so a test can see where HAProxy routed a connection."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.role = "replica"  # primary | replica | down
        self.lag = 0
        member = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/primary":
                    ok = member.role == "primary"
                elif url.path == "/replica":
                    limit = int(parse_qs(url.query).get("lag", [str(2**62)])[0])
                    ok = member.role == "replica" and member.lag <= limit
                else:
                    ok = False
                if member.role == "down":
                    self.close_connection = True
                    return
                self.send_response(200 if ok else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.api = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.pg = socket.socket()
        self.pg.bind(("127.0.0.1", 0))
        self.pg.listen(16)
        self._threads = [
            threading.Thread(target=self.api.serve_forever, daemon=True),
            threading.Thread(target=self._serve_pg, daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def member(self) -> HaproxyMember:
        return HaproxyMember(self.name, "127.0.0.1", self.pg.getsockname()[1], self.api.server_address[1])

    def _serve_pg(self) -> None:
        while True:
            try:
                conn, _ = self.pg.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.name.encode() + b"\n")

    def close(self) -> None:
        self.api.shutdown()
        self.api.server_close()
        self.pg.close()


def _wait(what: str, probe: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, TransientError):
            if probe():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _route(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        return s.makefile().readline().strip()


def test_rendered_config_is_valid(haproxy_bin: Path, workdir: Path) -> None:
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(render_config(_input(workdir)))
    proc = subprocess.run(check_command(haproxy_bin, cfg), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_real_haproxy_routes_by_patroni_role(haproxy_bin: Path, workdir: Path) -> None:
    fakes = [FakeMember(f"pg{i}") for i in (1, 2, 3)]
    fakes[0].role = "primary"
    inp = HaproxyInput(
        members=tuple(f.member for f in fakes),
        writer_port=free_port(),
        reader_port=free_port(),
        max_lag_bytes=1000,
        stats_socket=workdir / "ha.sock",
        check_interval_ms=100,
        fast_interval_ms=100,
        check_timeout_ms=500,
    )
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(render_config(inp))
    log = open(workdir / "haproxy.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(haproxy_command(haproxy_bin, cfg), stdout=log, stderr=subprocess.STDOUT)
    sock = inp.stats_socket
    try:
        _wait("stats socket", lambda: sock.exists() and bool(query_stats_socket(sock, "show info")))
        # writer reaches only the primary; reader balances over the two replicas
        _wait("writer on pg1", lambda: read_state(sock).targets(WRITER) == ("pg1",))
        _wait("reader on pg2+pg3", lambda: set(read_state(sock).targets(READER)) == {"pg2", "pg3"})
        assert _route(inp.writer_port) == "pg1"
        assert {_route(inp.reader_port) for _ in range(6)} == {"pg2", "pg3"}
        assert parse_servers_state(query_stats_socket(sock, "show servers state")).up(WRITER) == ("pg1",)

        # a replica over the lag limit leaves the reader pool
        fakes[1].lag = 5000
        _wait("pg2 out of the reader", lambda: read_state(sock).targets(READER) == ("pg3",))
        assert {_route(inp.reader_port) for _ in range(4)} == {"pg3"}

        # no healthy replica: the reader falls back to the primary
        fakes[2].role = "down"
        _wait("reader falls back", lambda: read_state(sock).targets(READER) == ("pg1.primary",))
        assert _route(inp.reader_port) == "pg1"

        # switchover: pg1 demoted, pg3 promoted; both endpoints follow
        fakes[0].role = "replica"
        fakes[2].role = "primary"
        _wait("writer on pg3", lambda: read_state(sock).targets(WRITER) == ("pg3",))
        assert _route(inp.writer_port) == "pg3"
        # state changes reach stderr (kept by supervisord) without any log target configured
        _wait("DOWN logged", lambda: "writer/pg1 is DOWN" in (workdir / "haproxy.log").read_text())
        _wait("reader back on pg1", lambda: read_state(sock).targets(READER) == ("pg1",))
        assert _route(inp.reader_port) == "pg1"
        assert proc.poll() is None, "haproxy must stay in the foreground under its own pid"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        for f in fakes:
            f.close()
