"""supervisord: the process manager that keeps a deployment's daemons alive.

One supervisord per deployment, its config and control socket in the home. It drops to the
service user, starts etcd and Patroni (which runs PostgreSQL), and restarts any of them that dies.
pgbridge talks to it over its XML-RPC unix socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgbridge.errors import DeploymentError
from pgbridge.home import Home, write_if_changed
from pgbridge.platform.system import pid_alive, read_pid
from pgbridge.settings import ServiceUser

# supervisord children get this environment and nothing else: no secret from the caller's
# environment (e.g. PGBRIDGE_MASTER_KEY) may leak into the servers' /proc/<pid>/environ.
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


# supervisord gives each child a pipe as stdin and keeps it open; PostgreSQL inherits it through
# Patroni. A backend whose postmaster dies while it waits for the synchronous standby switches to
# "interactive" input and reads stdin: on that pipe it blocks forever, keeps the shared memory
# attached, and the member can never start again. Every program therefore reads /dev/null (exec
# keeps the pid supervisord watches).
NO_STDIN = ("/bin/sh", "-c", 'exec "$0" "$@" </dev/null')

# supervisord XML-RPC fault codes that mean "already in the state you asked for".
_ALREADY_STARTED = 60
_NOT_RUNNING = 70
_LIVE = ("STARTING", "RUNNING", "BACKOFF", "STOPPING")
# A program this young when stopped may have lost its stop signal (see Supervisor._stop_all).
_YOUNG_S = 2
_RESEND_AFTER_S = 2.0


@dataclass(frozen=True)
class Program:
    name: str
    command: Sequence[str]
    priority: int = 50
    stop_wait: int = 30
    stop_signal: str = "TERM"
    environment: dict[str, str] = field(default_factory=dict)
    autostart: bool = True


def _quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./=:,@+%" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(home: Home, name: str, user: ServiceUser, programs: Sequence[Program]) -> str:
    lines = [
        "; written by pgbridge: edits are overwritten by `pgbridge up`",
        "[unix_http_server]",
        f"file={home.supervisor_sock}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={home.logs / 'supervisord.log'}",
        "logfile_maxbytes=10MB",
        "logfile_backups=3",
        f"pidfile={home.supervisor_pid}",
        f"childlogdir={home.logs}",
        f"directory={home.root}",
        f"identifier=pgbridge-{name}",
        "minfds=4096",
    ]
    if user.switch:
        lines.append(f"user={user.name}")
    lines += [
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{home.supervisor_sock}",
    ]
    for p in programs:
        env = {**CLEAN_ENV, "HOME": str(home.run), **p.environment}
        lines += [
            "",
            f"[program:{p.name}]",
            "command=" + " ".join(_quote(a) for a in (*NO_STDIN, *p.command)),
            f"priority={p.priority}",
            f"autostart={'true' if p.autostart else 'false'}",
            "autorestart=true",
            "startsecs=1",
            "startretries=100",
            f"stopsignal={p.stop_signal}",
            f"stopwaitsecs={p.stop_wait}",
            "stopasgroup=false",
            "killasgroup=false",
            "redirect_stderr=true",
            f"stdout_logfile={home.logs / (p.name + '.log')}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=3",
            "environment=" + ",".join(f'{k}="{v}"' for k, v in env.items()),
        ]
    return "\n".join(lines) + "\n"


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = str(path)

    def make_connection(self, host: Any) -> Any:
        import http.client
        import socket

        path = self._path

        class _Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(30)
                self.sock.connect(path)

        return _Conn("localhost")


# supervisord runs as the child of this small process, a child subreaper that waits for any child
# at once. Patroni starts the postmaster detached, so the postmaster's parent is the nearest
# subreaper (else the host's init), and Patroni counts a dead postmaster as running until its zombie
# is reaped: on some hosts init takes seconds, in a container without an init it never does, and
# supervisord (which could be the subreaper itself) only reaps at its next one-second tick, because
# Python retries its poll after SIGCHLD. During a switchover Patroni checks the stopping postmaster
# once a second; a zombie there makes it wait one second more before it hands the leader key over.
# The attribute survives exec, not fork: supervisord runs in the foreground of its own session
# (-n) rather than daemonizing. Signals for the reaper go to supervisord; it exits with
# supervisord's status once no child of its own is left (also orphans still shutting down).
REAPER = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    print("pgbridge reaper: prctl(PR_SET_CHILD_SUBREAPER) failed, errno", ctypes.get_errno(), file=sys.stderr)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)  # held until the handler can forward them
child = os.fork()
if child == 0:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # the mask survives exec
    try:
        os.execv(sys.argv[1], sys.argv[1:])
    except OSError as e:
        print(f"pgbridge reaper: cannot run {sys.argv[1]}: {e}", file=sys.stderr)
    os._exit(127)
def forward(sig, frame):
    if child:  # not once reaped: its pid may be someone else's by now
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            pass
for sig in STOPS:
    signal.signal(sig, forward)
signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
code = 0
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == child:
        code, child = os.waitstatus_to_exitcode(status), 0
sys.exit(code if code >= 0 else 128 - code)
"""


class Supervisor:
    """Control of one deployment's supervisord."""

    def __init__(self, home: Home, executable: Path) -> None:
        self.home = home
        self.executable = executable

    def _proxy(self) -> Any:
        return xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(self.home.supervisor_sock))

    def pid(self) -> int | None:
        pid = read_pid(self.home.supervisor_pid)
        return pid if pid and pid_alive(pid) else None

    def running(self) -> bool:
        if self.pid() is None:
            return False
        try:
            return bool(self._proxy().supervisor.getState()["statename"] == "RUNNING")
        except (OSError, xmlrpc.client.Error):
            return False

    def write_config(self, text: str) -> bool:
        return write_if_changed(self.home.supervisor_conf, text, mode=0o644)

    def start(self, timeout: float = 30) -> None:
        """Start supervisord in the background, under a reaper (see `REAPER`)."""
        if self.running():
            return
        log = self.home.logs / "supervisord.start.log"
        argv = [sys.executable, "-c", REAPER, str(self.executable), "-n", "-s", "-c", str(self.home.supervisor_conf)]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=CLEAN_ENV,
                cwd=self.home.root,
                start_new_session=True,
            )
        self.home.reaper_pid.write_text(f"{proc.pid}\n")  # a last-resort cleanup kills its tree too
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.running():
                return
            if proc.poll() is not None:
                raise DeploymentError(f"supervisord did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise DeploymentError(f"supervisord did not come up within {timeout:.0f}s; see {self.home.logs}")

    def reread(
        self, around: Callable[[list[str]], AbstractContextManager[object]] | None = None
    ) -> dict[str, list[str]]:
        """Load a changed config: add new programs, restart changed ones, remove dropped ones.

        A changed program that was running runs again afterwards, also one that does not start
        by itself (``autostart=false``: e.g. a joining standby's Patroni). ``around(changed)``,
        if given, wraps the restarts (e.g. to keep PostgreSQL up while Patroni restarts).
        """
        proxy = self._proxy()
        added, changed, removed = proxy.supervisor.reloadConfig()[0]
        states = self.processes() if changed else {}
        running = {n for n, i in states.items() if i.get("statename") in ("RUNNING", "STARTING", "BACKOFF")}
        for name in removed:
            with contextlib.suppress(xmlrpc.client.Fault):
                proxy.supervisor.stopProcessGroup(name)
            proxy.supervisor.removeProcessGroup(name)
        with around(changed) if around is not None and changed else contextlib.nullcontext():
            for name in changed:
                with contextlib.suppress(xmlrpc.client.Fault):
                    proxy.supervisor.stopProcessGroup(name)
                proxy.supervisor.removeProcessGroup(name)
                proxy.supervisor.addProcessGroup(name)
                if name in running:
                    self.start_program(name)
        for name in added:
            proxy.supervisor.addProcessGroup(name)
        return {"added": added, "changed": changed, "removed": removed}

    def processes(self) -> dict[str, dict[str, Any]]:
        try:
            infos = self._proxy().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error):
            return {}
        return {i["name"]: i for i in infos}

    def start_program(self, name: str) -> None:
        try:
            self._proxy().supervisor.startProcess(name, True)
        except xmlrpc.client.Fault as f:
            if f.faultCode != _ALREADY_STARTED:
                raise DeploymentError(
                    f"supervisord could not start {name}: {f.faultString}",
                    hint=f"see {self.home.logs / (name + '.log')}",
                ) from None

    def stop_program(self, name: str, wait: bool = True) -> None:
        try:
            self._proxy().supervisor.stopProcess(name, wait)
        except xmlrpc.client.Fault as f:
            if f.faultCode != _NOT_RUNNING:
                raise DeploymentError(f"supervisord could not stop {name}: {f.faultString}") from None

    def signal(self, name: str, sig: str) -> None:
        """Send a signal (e.g. HUP to reload) to a running program; a stopped one is left alone."""
        try:
            self._proxy().supervisor.signalProcess(name, sig)
        except xmlrpc.client.Fault as f:
            if f.faultCode != _NOT_RUNNING:
                raise DeploymentError(f"supervisord could not signal {name}: {f.faultString}") from None

    def _stop_all(self, proxy: Any, deadline: float) -> None:
        """Stop every program, in reverse priority so Patroni shuts PostgreSQL down while etcd runs.

        What supervisord's ``stopAllProcesses`` does, but a program stopped within a moment of its
        spawn gets its stop signal once more: a signal that reaches supervisord's child between
        fork and exec is taken by supervisord's inherited handler and lost, and supervisord would
        then wait the program's whole ``stopwaitsecs`` (two minutes for Patroni) before killing it.
        That happens to a first `up` interrupted right after the processes start.
        """
        configs = proxy.supervisor.getAllConfigInfo()
        prio = {c["name"]: c["group_prio"] for c in configs}
        signals = {c["name"]: c["stopsignal"] for c in configs}
        running = {i["name"] for i in proxy.supervisor.getAllProcessInfo()}
        for level in sorted({prio.get(n, 0) for n in running}, reverse=True):
            names = {n for n in running if prio.get(n, 0) == level}
            young: set[str] = set()
            stopped_at = time.monotonic()
            while True:
                infos = {i["name"]: i for i in proxy.supervisor.getAllProcessInfo() if i["name"] in names}
                live = {n: i for n, i in infos.items() if i["statename"] in _LIVE}
                if not live:
                    break
                if time.monotonic() > deadline:
                    raise DeploymentError(f"supervisord did not stop {', '.join(sorted(live))} in time")
                for name, info in live.items():
                    if info["statename"] != "STOPPING":  # not asked yet, or started again meanwhile
                        if info["pid"] and info["now"] - info["start"] < _YOUNG_S:
                            young.add(name)
                        self.stop_program(name, wait=False)
                        stopped_at = time.monotonic()
                if young and time.monotonic() - stopped_at > _RESEND_AFTER_S:
                    for name in young & live.keys():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(live[name]["pid"], signals.get(name, signal.SIGTERM))
                    young = set()
                time.sleep(0.1)

    def shutdown(self, timeout: float = 180) -> None:
        """Stop every program cleanly, then supervisord itself; wait for its pid to go away."""
        pid = self.pid()
        if pid is None:
            return
        try:
            proxy = self._proxy()
            self._stop_all(proxy, time.monotonic() + timeout)
            proxy.supervisor.shutdown()
        except (OSError, xmlrpc.client.Error, DeploymentError):
            # supervisord's own shutdown stops what is left (and kills after each stopwaitsecs)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        reaper = read_pid(self.home.reaper_pid)
        while time.monotonic() < deadline:
            if not pid_alive(pid):  # the reaper reaps supervisord, and then exits itself
                if reaper:
                    with contextlib.suppress(ChildProcessError):  # if started by this very process
                        os.waitpid(reaper, os.WNOHANG)
                return
            time.sleep(0.1)
        raise DeploymentError(f"supervisord (pid {pid}) did not stop within {timeout:.0f}s")
