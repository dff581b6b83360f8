"""How pgbridge runs on this host, kept apart from the spec (what the user wants).

Binaries, the OS user the servers run as, and where deployments live are host facts; they come
from the environment (PGBRIDGE_* variables) with defaults that fit a Debian machine.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pgbridge.errors import HostError, MissingBinaryError

PG_MAJOR = "15"


@dataclass(frozen=True)
class Binaries:
    pg_bindir: Path
    etcd: Path
    patroni: Path
    supervisord: Path
    python: Path
    haproxy: Path | None = None  # needed only by deployments with endpoints
    pgbouncer: Path | None = None
    pgbackrest: Path | None = None  # needed only by deployments with backups

    def pg(self, name: str) -> Path:
        return self.pg_bindir / name

    def endpoint_tools(self) -> tuple[Path, Path]:
        """HAProxy and PgBouncer, or an error naming the Debian package that is missing."""
        if self.haproxy is None:
            raise MissingBinaryError("haproxy", "haproxy")
        if self.pgbouncer is None:
            raise MissingBinaryError("pgbouncer", "pgbouncer")
        return self.haproxy, self.pgbouncer

    def backup_tool(self) -> Path:
        """pgBackRest, or an error naming its Debian package."""
        if self.pgbackrest is None:
            raise MissingBinaryError("pgbackrest", "pgbackrest")
        return self.pgbackrest


@dataclass(frozen=True)
class ServiceUser:
    """The unprivileged OS user that owns data and runs the servers."""

    name: str
    uid: int
    gid: int
    switch: bool  # True when pgbridge runs as root and must drop to this user

    def command(self, argv: list[str]) -> list[str]:
        """Prefix argv so it runs as the service user."""
        return ["runuser", "-u", self.name, "--", *argv] if self.switch else argv


@dataclass(frozen=True)
class Settings:
    binaries: Binaries
    user: ServiceUser
    default_home_base: Path
    cache_dir: Path


def _which(env: str, default: Path, program: str, package: str) -> Path:
    raw = os.environ.get(env)
    path = Path(raw) if raw else default
    if not (path.is_file() and os.access(path, os.X_OK)):
        found = shutil.which(program) if not raw else None
        if found:
            return Path(found)
        raise MissingBinaryError(program, package, path=str(path))
    return path


def _optional(env: str, default: Path, program: str) -> Path | None:
    try:
        return _which(env, default, program, program)
    except MissingBinaryError:
        return None


def pgbackrest_path() -> Path | None:
    """pgBackRest, as `find_binaries` and the rendered archive_command both name it."""
    return _optional("PGBRIDGE_PGBACKREST", Path("/usr/bin/pgbackrest"), "pgbackrest")


def find_binaries() -> Binaries:
    bindir = Path(os.environ.get("PGBRIDGE_PG_BINDIR", f"/usr/lib/postgresql/{PG_MAJOR}/bin"))
    for prog in ("postgres", "initdb", "pg_ctl", "pg_rewind"):
        p = bindir / prog
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise MissingBinaryError(prog, f"postgresql-{PG_MAJOR}", path=str(p))
    if not (bindir / "psql").exists() and not shutil.which("psql"):
        raise MissingBinaryError("psql", f"postgresql-client-{PG_MAJOR}")
    venv_bin = Path(sys.executable).parent
    return Binaries(
        pg_bindir=bindir,
        etcd=_which("PGBRIDGE_ETCD", Path("/usr/bin/etcd"), "etcd", "etcd-server"),
        patroni=_which("PGBRIDGE_PATRONI", venv_bin / "patroni", "patroni", "patroni (pip: patroni[etcd3])"),
        supervisord=_which("PGBRIDGE_SUPERVISORD", venv_bin / "supervisord", "supervisord", "supervisor (pip)"),
        python=Path(sys.executable),
        haproxy=_optional("PGBRIDGE_HAPROXY", Path("/usr/sbin/haproxy"), "haproxy"),
        pgbouncer=_optional("PGBRIDGE_PGBOUNCER", Path("/usr/sbin/pgbouncer"), "pgbouncer"),
        pgbackrest=pgbackrest_path(),
    )


def service_user() -> ServiceUser:
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.geteuid())
        return ServiceUser(pw.pw_name, pw.pw_uid, pw.pw_gid, switch=False)
    name = os.environ.get("PGBRIDGE_OS_USER", "postgres")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise HostError(
            f"OS user {name!r} does not exist; PostgreSQL refuses to run as root",
            hint=f"apt-get install -y postgresql-{PG_MAJOR} creates 'postgres', or set PGBRIDGE_OS_USER",
        ) from None
    if pw.pw_uid == 0:
        raise HostError(f"PGBRIDGE_OS_USER={name} is root; choose an unprivileged user")
    return ServiceUser(pw.pw_name, pw.pw_uid, pw.pw_gid, switch=True)


def load_settings() -> Settings:
    root = os.geteuid() == 0
    cache = Path(
        os.environ.get(
            "PGBRIDGE_CACHE_DIR",
            "/var/cache/pgbridge" if root else str(Path.home() / ".cache" / "pgbridge"),
        )
    )
    base = os.environ.get("PGBRIDGE_HOME_BASE")
    return Settings(
        binaries=find_binaries(),
        user=service_user(),
        # As root the servers run as another user, who cannot reach into e.g. /root; a system
        # folder always works. Unprivileged users get a folder beside their spec.
        default_home_base=Path(base) if base else (Path("/var/lib/pgbridge") if root else Path.cwd() / ".pgbridge"),
        cache_dir=cache,
    )
