"""Host-level helpers: ports, ownership, permissions and running programs.

This is the only place that shells out; failures become pgbridge errors with the program's
own last words, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import psutil

from pgbridge.errors import CommandFailed, DeploymentError, HostError, PortInUseError
from pgbridge.settings import ServiceUser


def port_owner(port: int) -> str:
    """Best-effort description of who listens on `port` (needs root for other users' sockets)."""
    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections(kind="inet"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(c.pid)
                    return f" by pid {c.pid} ({p.name()})"
                return f" by pid {c.pid}"
    return ""


def check_port_free(port: int, addresses: Iterable[str], what: str) -> None:
    """Raise PortInUseError when `port` cannot be bound on one of `addresses`."""
    for addr in addresses:
        host = "0.0.0.0" if addr == "*" else addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        # Like the servers themselves: TIME_WAIT leftovers do not make a port busy, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"port {port} on {addr} ({what}) is already in use{port_owner(port)}",
                    hint="choose another port in the spec, or stop the program that holds it",
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise HostError(
                    f"cannot listen on {addr}: the address is not on this host ({what})",
                    hint="fix network.listen_addresses in the spec",
                ) from None
            raise
        finally:
            s.close()


def free_port(exclude: Iterable[int] = (), host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (used for internal ports, then recorded in state)."""
    taken = set(exclude)
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            return port
    raise HostError("could not find a free TCP port on loopback")


def chown(path: Path, user: ServiceUser, *, recursive: bool = False) -> None:
    if not user.switch:
        return
    os.chown(path, user.uid, user.gid)
    if recursive:
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), user.uid, user.gid)


def make_dir(path: Path, mode: int, owner: ServiceUser | None = None) -> bool:
    """Create a folder with an exact mode (and owner); returns True when created."""
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        chown(path, owner)
    return created


def check_reachable_by(path: Path, user: ServiceUser) -> None:
    """The service user must be able to traverse every parent folder of `path`."""
    if not user.switch:
        return
    p = path.resolve()
    for parent in [*reversed(p.parents)]:
        if not parent.exists():
            break
        st = parent.stat()
        if st.st_uid == user.uid:
            continue
        if not st.st_mode & stat.S_IXOTH and not (st.st_gid == user.gid and st.st_mode & stat.S_IXGRP):
            raise HostError(
                f"the servers run as OS user '{user.name}', who cannot enter {parent}",
                hint=f"put the deployment home elsewhere (--home, PGBRIDGE_HOME_BASE), e.g. /var/lib/pgbridge,"
                f" or `chmod o+x {parent}`",
            )


def run(
    argv: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> str:
    """Run a program; on failure raise DeploymentError with the tail of its output."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError:
        raise HostError(f"{what}: program {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise DeploymentError(f"{what}: {argv[0]} did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise CommandFailed(f"{what} failed (exit {proc.returncode}):\n{tail}", proc.returncode)
    return proc.stdout


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
