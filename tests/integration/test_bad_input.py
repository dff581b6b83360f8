"""Bad input gets a clear message and an exit code: never a traceback, never a half-made deployment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import PGBRIDGE, Env

pytestmark = pytest.mark.integration


def test_broken_spec(scratch: Env) -> None:
    scratch.spec.write_text("name: Bad Name\nnetwork: {port: 80, allowed_cidrs: [10.0.0.1/8]}\nfoo: 1\n")
    r = scratch.run("validate", check=False)
    assert r.returncode == 2
    assert "name" in r.stderr and "network.port: 80" in r.stderr and "10.0.0.1/8" in r.stderr
    assert "foo: unknown field; allowed here:" in r.stderr
    scratch.spec.write_text("name: [unclosed\n")
    r = scratch.run("up", check=False)
    assert r.returncode == 2 and "not valid YAML at line" in r.stderr
    assert not scratch.home.exists()


def test_unknown_parameter_is_refused_before_anything_is_made(scratch: Env) -> None:
    scratch.write_spec("parameter_groups:\n  g:\n    shared_bufers: 1GB\nparameter_group: g\n")
    r = scratch.run("up", check=False)
    assert r.returncode == 2 and "shared_buffers" in r.stderr  # did you mean ...
    assert not scratch.home.exists()


def test_port_in_use(scratch: Env) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", scratch.port))
        s.listen(1)
        r = scratch.run("up", check=False)
    assert r.returncode == 3
    assert f"port {scratch.port}" in r.stderr and "in use" in r.stderr
    assert not scratch.home.exists()


def test_missing_binary_names_the_package(scratch: Env) -> None:
    scratch.extra_env["PGBRIDGE_PG_BINDIR"] = "/nonexistent/bin"
    r = scratch.run("up", check=False)
    assert r.returncode == 3 and "apt-get install -y postgresql-15" in r.stderr
    scratch.extra_env["PGBRIDGE_PG_BINDIR"] = "/usr/lib/postgresql/15/bin"
    scratch.extra_env["PGBRIDGE_ETCD"] = "/nonexistent/etcd"
    r = scratch.run("up", check=False)
    assert r.returncode == 3 and "etcd-server" in r.stderr
    assert not scratch.home.exists()


def test_wrong_master_key_and_foreign_home(scratch: Env) -> None:
    scratch.run("up")
    r = scratch.run("secrets", "get", "shop_app", env={**scratch.env(), "PGBRIDGE_MASTER_KEY": "wrong"}, check=False)
    assert r.returncode == 4 and "does not open" in r.stderr
    r = scratch.run("up", env={**scratch.env(), "PGBRIDGE_MASTER_KEY": "wrong"}, check=False)
    assert r.returncode == 4
    assert scratch.run("status").returncode == 0  # nothing was damaged
    os.chown(scratch.home, 65534, 65534)
    try:
        r = scratch.run("up", check=False)
        assert r.returncode == 3 and "owned by uid 65534" in r.stderr
    finally:
        os.chown(scratch.home, 0, 0)
    r = scratch.run("destroy", check=False)
    assert r.returncode == 2 and "--yes" in r.stderr


def test_interrupted_first_up_rolls_back(scratch: Env) -> None:
    proc = subprocess.Popen(
        [PGBRIDGE, "-f", str(scratch.spec), "up"],
        env=scratch.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as at a terminal: a run started in the background by a shell without job control (e.g.
        # `cmd &` in a script) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Wait until the processes are starting, then interrupt like Ctrl-C would.
    deadline = time.monotonic() + 60
    while not (scratch.home / "run" / "supervisord.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    # Seconds, not supervisord's two-minute stop timeout: a program stopped right after its spawn
    # may have lost the stop signal, and the rollback sends it again.
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not scratch.home.exists(), "a failed first up must leave nothing behind"
    # And a clean up afterwards works.
    scratch.run("up")
    scratch.run("check")


def test_killed_up_resumes(scratch: Env) -> None:
    proc = subprocess.Popen(
        [PGBRIDGE, "-f", str(scratch.spec), "up"], env=scratch.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not (scratch.home / "run" / "supervisord.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # no chance to clean up: the next up must resume
    proc.wait()
    r = scratch.run("up")
    assert "database shop" in r.stdout
    scratch.run("check")
