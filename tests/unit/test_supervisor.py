"""The supervisord config: each program's command line as supervisord will run it."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from pgbridge.home import Home
from pgbridge.platform.supervisor import Program, render_config
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
