"""The supervisord config: each program's command line as supervisord will run it; and the reaper
supervisord runs under."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from pgbridge.home import Home
from pgbridge.platform.supervisor import REAPER, Program, render_config
from pgbridge.settings import ServiceUser


def _command(conf: str, name: str) -> list[str]:
    section = conf.split(f"[program:{name}]\n", 1)[1]
    line = next(x for x in section.splitlines() if x.startswith("command="))
    return shlex.split(line.removeprefix("command="))  # as supervisord splits it


def test_programs_read_dev_null_not_supervisords_stdin_pipe(tmp_path: Path) -> None:
    # A PostgreSQL backend orphaned by a crashed postmaster can end up reading stdin; on
    # supervisord's pipe it would block forever and keep the member's shared memory in use.
    probe = Program("probe", ["/bin/sh", "-c", 'readlink /proc/self/fd/0; echo "$1|$2"', "sh", "a b", 'q"uote'])
    conf = render_config(Home(tmp_path), "t", ServiceUser("postgres", 0, 0, switch=False), [probe])
    argv = _command(conf, "probe")
    out = subprocess.run(argv, stdin=subprocess.PIPE, capture_output=True, text=True, timeout=10, check=True)
    assert out.stdout.splitlines() == ["/dev/null", 'a b|q"uote']


def test_exec_keeps_the_pid_supervisord_watches(tmp_path: Path) -> None:
    probe = Program("probe", ["/bin/sh", "-c", "echo $$"])
    conf = render_config(Home(tmp_path), "t", ServiceUser("postgres", 0, 0, switch=False), [probe])
    proc = subprocess.Popen(_command(conf, "probe"), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=10)
    assert int(out) == proc.pid


@contextlib.contextmanager
def _under_reaper(stand_in: str) -> Iterator[subprocess.Popen[bytes]]:
    """The reaper running a shell script in the place of supervisord; both killed on the way out."""
    reaper = subprocess.Popen([sys.executable, "-c", REAPER, "/bin/sh", "-c", stand_in], start_new_session=True)
    try:
        yield reaper
    finally:
        with contextlib.suppress(ProcessLookupError):  # the stand-in too (start_new_session: its group)
            os.killpg(reaper.pid, signal.SIGKILL)
        reaper.wait()


def test_the_reaper_adopts_and_reaps_an_orphan_at_once(tmp_path: Path) -> None:
    # As Patroni starts a postmaster: a helper starts it detached and exits; the orphan's parent is
    # the reaper (not supervisord, not the host's init), and its exit leaves no zombie behind.
    pidfile = tmp_path / "orphan.pid"
    stand_in = f"(sleep 0.5 & echo $! > {pidfile}); sleep 1.5; exit 7"  # in the place of supervisord
    with _under_reaper(stand_in) as reaper:
        deadline = time.monotonic() + 5
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline, "the stand-in did not start its orphan"
            time.sleep(0.01)
        orphan = psutil.Process(int(pidfile.read_text()))
        while orphan.ppid() != reaper.pid:  # adopted once the subshell that started it has exited
            assert time.monotonic() < deadline, f"the orphan's parent is {orphan.ppid()}, not the reaper"
            time.sleep(0.01)
        zombie_since: float | None = None  # a zombie for a moment at most, between its exit and the reap
        gone: float | None = None
        deadline = time.monotonic() + 5
        while gone is None and time.monotonic() < deadline:
            try:
                if orphan.status() == psutil.STATUS_ZOMBIE and zombie_since is None:
                    zombie_since = time.monotonic()
            except psutil.NoSuchProcess:
                gone = time.monotonic()
            time.sleep(0.005)
        assert gone is not None, "the orphan was not reaped"
        assert gone - (zombie_since or gone) < 0.5  # supervisord reaped at its next 1 s tick
        assert reaper.wait(timeout=10) == 7  # the stand-in's status, once it has exited too


def test_the_reaper_passes_a_stop_signal_to_supervisord(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stand_in = f"trap 'exit 5' TERM; touch {ready}; while :; do sleep 0.05; done"
    with _under_reaper(stand_in) as reaper:
        deadline = time.monotonic() + 5
        while not ready.exists():
            assert time.monotonic() < deadline, "the stand-in did not start"
            time.sleep(0.01)
        reaper.send_signal(signal.SIGTERM)
        assert reaper.wait(timeout=10) == 5
