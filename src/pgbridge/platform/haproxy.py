"""HAProxy: the writer and reader endpoints in front of the Patroni members.

Clients (through PgBouncer) never know which member is the primary. HAProxy asks each member's
Patroni REST API and routes accordingly: the writer endpoint reaches only the member that answers
``GET /primary`` with 200 (Patroni holds the leader key there), the reader endpoint balances over
members that answer ``GET /replica?lag=<bytes>`` with 200 (running replica, no ``noloadbalance`` tag,
replay lag under the limit) and falls back to the primary when no replica qualifies.

The config is rendered here from a frozen input (pure); ``query_stats_socket`` and the parsers read
the running state back from HAProxy's stats socket so ``status``, switchover and drills can see
which member each endpoint reaches right now.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from pgbridge.errors import HostError, SpecError, TransientError

WRITER = "writer"
READER = "reader"
# Suffix of the reader's fallback entries; member names may not contain '.', so no clash.
PRIMARY_SUFFIX = ".primary"

_MEMBER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
# Linux sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class HaproxyMember:
    """One Patroni member: where PostgreSQL listens and where its REST API answers health checks."""

    name: str
    host: str
    pg_port: int
    api_port: int


@dataclass(frozen=True)
class HaproxyInput:
    """Everything the config depends on; equal inputs render byte-identical configs.

    Check timing defaults (``inter`` 1s, ``fastinter`` 500ms, ``fall`` 2, ``rise`` 1) are chosen for
    fast failover without flapping:

    - ``rise 1``: one 200 from ``/primary`` is authoritative. Patroni answers 200 only while it holds
      the leader key in etcd and PostgreSQL runs as primary, so waiting for a second confirmation
      would only add a second of write outage after every promotion.
    - ``fall 2`` with ``fastinter``: a single lost check (a slow REST answer under load) must not mark
      the primary down, because ``on-marked-down shutdown-sessions`` then cuts every session through
      it. The second check follows after ``fastinter``, so a dead primary leaves the writer pool
      within about ``inter + fastinter + timeout check`` (~2.5s with the defaults), which is far
      below Patroni's own detection (ttl 20-30s) and does not dominate a switchover.
    - ``downinter`` 300ms: a server that is down (in the writer pool: every standby) is checked
      three times a second, so a promoted standby takes writes within 0.3s of Patroni saying so;
      each check is one REST GET to an idle Patroni.
    """

    members: tuple[HaproxyMember, ...]
    writer_port: int
    reader_port: int
    max_lag_bytes: int
    stats_socket: Path
    bind_address: str = "127.0.0.1"
    check_interval_ms: int = 1000
    down_interval_ms: int = 300
    fast_interval_ms: int = 500
    check_timeout_ms: int = 1000
    fall: int = 2
    rise: int = 1
    connect_timeout_ms: int = 2000
    # Pooled server connections sit idle for long stretches; PgBouncer closes them itself
    # (server_idle_timeout), so HAProxy must not cut them first.
    client_timeout_s: int = 3600
    server_timeout_s: int = 3600
    max_connections: int = 4000

    def __post_init__(self) -> None:
        if not self.members:
            raise SpecError("HAProxy needs at least one Patroni member to route to")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise SpecError(f"Patroni member names must be unique, got {names}")
        for m in self.members:
            if not _MEMBER_NAME_RE.match(m.name):
                raise SpecError(f"member name {m.name!r} cannot be an HAProxy server name (use letters, digits, - _)")
            _check_host(m.host)
            for port in (m.pg_port, m.api_port):
                _check_port(port)
        for port in (self.writer_port, self.reader_port):
            _check_port(port)
        if self.writer_port == self.reader_port:
            raise SpecError(f"writer and reader endpoints need different ports (both are {self.writer_port})")
        _check_host(self.bind_address)
        if self.max_lag_bytes < 0:
            raise SpecError("the reader lag limit cannot be negative")
        if min(self.check_interval_ms, self.fast_interval_ms, self.down_interval_ms, self.check_timeout_ms) < 100:
            raise SpecError("HAProxy check intervals and timeouts must be at least 100ms")
        if self.fall < 1 or self.rise < 1:
            raise SpecError("HAProxy fall and rise must be at least 1")
        if len(str(self.stats_socket).encode()) > _MAX_SOCKET_PATH:
            raise HostError(
                f"HAProxy stats socket path is too long for a unix socket: {self.stats_socket}",
                hint="use a shorter deployment home folder",
            )


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise SpecError(f"port {port} is outside 1..65535")


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SpecError(f"{host!r} is not an IP address (HAProxy must not depend on DNS here)") from None


def _addr(host: str, port: int) -> str:
    # HAProxy reads the port after the last colon; brackets keep IPv6 addresses unambiguous.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_config(inp: HaproxyInput) -> str:
    """The whole haproxy.cfg. No ``daemon``/``pidfile``: supervisord runs it in the foreground."""
    lines = [
        "# written by pgbridge: edits are overwritten by `pgbridge up`",
        # No log target: in foreground mode (-db) HAProxy writes server state changes (UP/DOWN,
        # "no server available") to stderr, which supervisord keeps; per-connection lines would
        # only log every pooled reconnect, twice with a `log stdout` target.
        "global",
        f"    stats socket {inp.stats_socket} mode 600 level admin",
        "    stats timeout 30s",
        f"    maxconn {inp.max_connections}",
        "",
        "defaults",
        "    mode tcp",
        # A connection to a member that just died is retried once, then redispatched elsewhere.
        "    retries 1",
        "    option redispatch",
        f"    timeout connect {inp.connect_timeout_ms}ms",
        f"    timeout client {inp.client_timeout_s}s",
        f"    timeout server {inp.server_timeout_s}s",
        f"    timeout check {inp.check_timeout_ms}ms",
        f"    default-server inter {inp.check_interval_ms}ms fastinter {inp.fast_interval_ms}ms "
        f"downinter {inp.down_interval_ms}ms fall {inp.fall} rise {inp.rise} on-marked-down shutdown-sessions",
        "",
        # Writer: only the leader answers /primary with 200. Sessions to a member that loses the
        # role are cut at once, so no client keeps writing to a demoted (read-only) server.
        f"listen {WRITER}",
        f"    bind {_addr(inp.bind_address, inp.writer_port)}",
        "    option httpchk",
        "    http-check send meth GET uri /primary",
        "    http-check expect status 200",
    ]
    for m in inp.members:
        lines.append(f"    server {m.name} {_addr(m.host, m.pg_port)} check port {m.api_port}")
    lines += [
        "",
        # Reader: healthy replicas within the lag limit; long-lived pooled sessions balance best
        # by connection count. The ".primary" entries are backups that mirror the writer's checks
        # (track), so the reader falls back to whichever member is primary when no replica is
        # healthy; when a replica comes back, sessions parked on the primary are moved back to it.
        f"listen {READER}",
        f"    bind {_addr(inp.bind_address, inp.reader_port)}",
        "    balance leastconn",
        "    option httpchk",
        f"    http-check send meth GET uri /replica?lag={inp.max_lag_bytes}",
        "    http-check expect status 200",
    ]
    for m in inp.members:
        lines.append(
            f"    server {m.name} {_addr(m.host, m.pg_port)} check port {m.api_port} "
            "on-marked-up shutdown-backup-sessions"
        )
    for m in inp.members:
        lines.append(f"    server {m.name}{PRIMARY_SUFFIX} {_addr(m.host, m.pg_port)} backup track {WRITER}/{m.name}")
    return "\n".join(lines) + "\n"


def haproxy_command(haproxy: Path, config: Path) -> list[str]:
    """Foreground master-worker: supervisord owns the pid; SIGUSR2 to it reloads without dropping sessions."""
    return [str(haproxy), "-W", "-db", "-f", str(config)]


def check_command(haproxy: Path, config: Path) -> list[str]:
    """Validate a config without binding anything (run before replacing the live file)."""
    return [str(haproxy), "-c", "-q", "-f", str(config)]


# ------------------------------------------------------------------------------------ running state


@dataclass(frozen=True)
class ServerState:
    backend: str
    server: str
    up: bool  # routable: operationally up (possibly going down) and not in maintenance
    backup: bool | None  # None when the source does not say (``show servers state``)
    detail: str  # HAProxy's own words: "UP", "DOWN 1/2", "MAINT", or the numeric states


@dataclass(frozen=True)
class HaproxyState:
    servers: tuple[ServerState, ...]

    def up(self, backend: str) -> tuple[str, ...]:
        """Names of routable servers in `backend`, backups included."""
        return tuple(s.server for s in self.servers if s.backend == backend and s.up)

    def targets(self, backend: str) -> tuple[str, ...]:
        """Servers new connections reach: up non-backups, else the first up backup (HAProxy's rule)."""
        mine = [s for s in self.servers if s.backend == backend and s.up]
        active = [s.server for s in mine if not s.backup]
        if active:
            return tuple(active)
        backups = [s.server for s in mine if s.backup]
        return tuple(backups[:1])


def parse_show_stat(text: str) -> HaproxyState:
    """Parse ``show stat`` CSV; FRONTEND/BACKEND aggregate rows are skipped."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise TransientError("HAProxy 'show stat' answered without a header line")
    reader = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    servers = []
    for row in reader:
        name = row.get("svname") or ""
        if name in ("FRONTEND", "BACKEND") or not name:
            continue
        status = (row.get("status") or "").strip()
        servers.append(
            ServerState(
                backend=row.get("pxname") or "",
                server=name,
                # "UP 1/2" is still up (one failed check of `fall`); "DOWN 1/2" is not up yet.
                up=status.startswith("UP") or status == "no check",
                backup=(row.get("bck") or "0") == "1",
                detail=status,
            )
        )
    return HaproxyState(tuple(servers))


# srv_admin_state bits that take a server out of rotation (forced, inherited, config, DNS maintenance).
_MAINT_MASK = 0x01 | 0x02 | 0x04 | 0x20
_SRV_STOPPED = 0


def parse_servers_state(text: str) -> HaproxyState:
    """Parse ``show servers state`` (format version 1, space separated)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines or lines[0].strip() != "1":
        raise TransientError(f"HAProxy 'show servers state' has an unknown format: {lines[:1]}")
    header: list[str] = []
    servers = []
    for line in lines[1:]:
        if line.startswith("#"):
            header = header or line[1:].split()
            continue
        if not header:
            raise TransientError("HAProxy 'show servers state' answered without column names")
        row = dict(zip(header, line.split(), strict=False))
        op_state = int(row["srv_op_state"])
        admin_state = int(row["srv_admin_state"])
        servers.append(
            ServerState(
                backend=row["be_name"],
                server=row["srv_name"],
                up=op_state != _SRV_STOPPED and not admin_state & _MAINT_MASK,
                backup=None,
                detail=f"op_state={op_state} admin_state={admin_state:#x}",
            )
        )
    return HaproxyState(tuple(servers))


def query_stats_socket(path: Path, command: str, timeout: float = 5) -> str:
    """Send one command to the stats socket and return HAProxy's whole answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError as e:
        raise TransientError(f"HAProxy stats socket {path} is not answering ({e})") from None
    return b"".join(chunks).decode(errors="replace")


def read_state(path: Path, timeout: float = 5) -> HaproxyState:
    return parse_show_stat(query_stats_socket(path, "show stat", timeout))
