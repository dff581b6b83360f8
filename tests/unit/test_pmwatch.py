"""pmwatch's reading of a member's postmaster.pid, against real processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from pgbridge.ops.pmwatch import dead_postmaster


def _pidfile(tmp_path: Path, pid: int) -> Path:
    (tmp_path / "postmaster.pid").write_text(f"{pid}\n{tmp_path}\n1700000000\n5432\n")
    return tmp_path


def test_a_running_postmaster_is_not_dead(tmp_path: Path) -> None:
    assert dead_postmaster(_pidfile(tmp_path, os.getpid())) is None


def test_no_pidfile_is_a_clean_shutdown(tmp_path: Path) -> None:
    assert dead_postmaster(tmp_path) is None


def test_a_single_user_backends_negative_pid_is_ignored(tmp_path: Path) -> None:
    assert dead_postmaster(_pidfile(tmp_path, -os.getpid())) is None


def test_an_unreaped_zombie_counts_as_dead_then_gone(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while dead_postmaster(_pidfile(tmp_path, child.pid)) is None and time.monotonic() < deadline:
        time.sleep(0.01)  # until it has exited: a zombie, as nobody waited for it yet
    assert dead_postmaster(tmp_path) == (child.pid, "zombie")
    child.wait()
    assert dead_postmaster(tmp_path) == (child.pid, "gone")
