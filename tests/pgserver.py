"""A throwaway PostgreSQL 15 for tests that need a bare server (no Patroni): started as the
postgres OS user on a unix socket only, on a free port, stopped by its own pid at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from pgbridge.cdc.catalog import SourceTable, discover_tables
from pgbridge.cdc.typemap import PG_SESSION_OPTIONS
from pgbridge.platform.system import free_port
from pgbridge.types import LSN

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class Server:
    base: Path
    port: int

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def dsn(self) -> str:
        return f"host={self.base} port={self.port} dbname=postgres user=postgres"

    def sql(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True, options=PG_SESSION_OPTIONS) as conn:
            cur = conn.execute(query.encode(), params or None)  # no params: no placeholder parsing
            return cur.fetchall() if cur.description else []

    def tables(
        self,
        include: Sequence[str],
        exclude: Sequence[str] = (),
        exclude_columns: Mapping[str, Sequence[str]] | None = None,
    ) -> list[SourceTable]:
        with psycopg.connect(self.dsn) as conn:
            return discover_tables(conn, include, exclude, exclude_columns or {})

    def lsn(self) -> LSN:
        return LSN.parse(str(self.sql("SELECT pg_current_wal_lsn()::text")[0][0]))

    def stop(self) -> None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text().split()[0])
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop"]),
            capture_output=True,
            check=False,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            os.kill(pid, 9)  # pg_ctl could not stop it: the postmaster by its own pid, nothing else


@contextlib.contextmanager
def bare_server(prefix: str = "pg", settings: str = "") -> Iterator[Server]:
    """Yields a started server; `settings` adds `-c name=value` options for benchmarks."""
    base = Path(tempfile.mkdtemp(prefix=f"pgbridge-{prefix}-", dir="/tmp"))
    os.chmod(base, 0o755)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    server = Server(base, free_port())
    try:
        subprocess.run(
            _as_postgres([str(PG_BIN / "initdb"), "-D", str(server.data), "-U", "postgres", "--auth-local=trust"]),
            check=True,
            capture_output=True,
        )
        # A tiny logical_decoding_work_mem makes the server spill (and, with streaming on, stream)
        # transactions early, so the large-transaction paths are exercised with modest sizes.
        opts = (
            f"-c wal_level=logical -c listen_addresses='' -p {server.port} -k {base} "
            "-c logical_decoding_work_mem=64kB -c max_wal_senders=20 -c max_replication_slots=20 " + settings
        )
        subprocess.run(
            _as_postgres(
                [str(PG_BIN / "pg_ctl"), "-D", str(server.data), "-l", str(base / "log"), "-w", "-o", opts, "start"]
            ),
            check=True,
            capture_output=True,
        )
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def kill_home_processes(home: Path) -> None:
    """Last resort: kill the process trees of a deployment's pid files (never by process name)."""
    import psutil

    pids: list[int] = []
    for pidfile in [home / "run" / "supervisord.pid", *home.glob("data/*/postmaster.pid")]:
        with contextlib.suppress(Exception):
            pids.append(int(pidfile.read_text().split()[0]))
    with contextlib.suppress(Exception):  # supervisord's parent, which adopts orphans: only if it is still this one
        reaper = psutil.Process(int((home / "run" / "reaper.pid").read_text().split()[0]))
        if str(home / "etc" / "supervisord.conf") in reaper.cmdline():
            pids.append(reaper.pid)
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
