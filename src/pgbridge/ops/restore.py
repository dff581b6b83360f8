"""Point-in-time restore into a new deployment, and the restore drill.

Both start the same way: pgBackRest restores a backup set into an empty folder and a bare
PostgreSQL (own config file, unix socket only, archiving off so it never writes into the source's
repository) replays WAL up to the target and promotes. `restore` then stops it cleanly and lets
`up` build a full deployment around that data (Patroni takes an existing data folder over when
its cluster is new in etcd). `drill` checks the copy (pg_amcheck, row counts, the spec's check
queries), records the measured time and removes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgbridge.errors import CheckFailed, DeploymentError, NotFoundError, PgbridgeError, UsageError
from pgbridge.home import Home
from pgbridge.ops import backup as backup_ops
from pgbridge.ops import events
from pgbridge.ops.context import Deployment
from pgbridge.plan.backup import restorable, set_for_time
from pgbridge.platform import system
from pgbridge.platform.pgbackrest import PgBackRest, target_time
from pgbridge.settings import Settings
from pgbridge.spec.load import parse_spec
from pgbridge.spec.models import NAME_RE, Spec

Step = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    kind: Literal["time", "latest", "snapshot"]
    time: float | None = None
    snapshot: str | None = None


@dataclass(frozen=True)
class Resolved:
    set_label: str | None
    target: str | None  # recovery_target_time
    immediate: bool
    describe: str


def _iso(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds") if ts else "-"


def parse_time(text: str) -> float:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{text!r} is not a time", hint="use ISO 8601, e.g. 2025-01-31T12:00:00Z") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def resolve(pb: PgBackRest, home: Home, target: Target) -> Resolved:
    """Check the target against the repository; nothing is created before this passes."""
    sets, meta = backup_ops.backup_sets(pb, home)
    if target.kind == "snapshot":
        snaps = backup_ops.read_snapshots(home)
        if target.snapshot not in snaps:
            known = ", ".join(sorted(snaps)) or "none"
            raise NotFoundError(f"no snapshot named {target.snapshot!r}", hint=f"snapshots: {known}")
        label = str(snaps[str(target.snapshot)]["label"])
        return Resolved(label, None, True, f"snapshot {target.snapshot} ({label})")
    if not sets:
        raise NotFoundError("the repository holds no backup yet", hint="run `pgbridge backup create` first")
    if target.kind == "latest":
        return Resolved(None, None, False, "the latest restorable time")
    assert target.time is not None
    window = restorable(sets, backup_ops.latest_archived(pb, meta.get("archive", {})))
    if window.earliest is None or window.latest is None or not window.earliest <= target.time <= window.latest:
        raise UsageError(
            f"{_iso(target.time)} is outside the restorable window ({_iso(window.earliest)} to {_iso(window.latest)})",
            hint="`pgbridge backup list` shows the window",
        )
    base = set_for_time(sets, target.time)
    return Resolved(base.label if base else None, target_time(target.time), False, f"time {_iso(target.time)}")


# -- a bare PostgreSQL on restored data ------------------------------------------------------------


@dataclass
class Scratch:
    data: Path
    sock: Path
    port: int
    settings: Settings

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo(host=str(self.sock), port=self.port, user="postgres", dbname=dbname, connect_timeout=5)

    def pg(self, name: str, *args: str, timeout: float = 600, what: str = "") -> str:
        argv = self.settings.user.command([str(self.settings.binaries.pg(name)), *args])
        return system.run(argv, what=what or name, timeout=timeout)


def _write_scratch_config(base: Path, sock: Path, port: int, settings: Settings) -> Path:
    conf = base / "postgresql.conf"
    hba = base / "pg_hba.conf"
    ident = base / "pg_ident.conf"
    # Only the service user (and root) can enter the 0700 socket folder, so trust is confined to them.
    hba.write_text("local all all trust\n")
    ident.write_text("")
    conf.write_text(
        "\n".join(
            [
                f"port = {port}",
                "listen_addresses = ''",
                f"unix_socket_directories = '{sock}'",
                f"hba_file = '{hba}'",
                f"ident_file = '{ident}'",
                "archive_mode = off",  # never archive into the source's repository
                "hot_standby = off",  # no parameter checks against the source while replaying
                "logging_collector = off",
                "ssl = off",
                "shared_buffers = 128MB",
                "max_connections = 40",
                "max_wal_size = 2GB",
                "max_worker_processes = 8",
                "",
            ]
        )
    )
    for f in (conf, hba, ident):
        system.chown(f, settings.user)
    return conf


@contextlib.contextmanager
def recovered(
    pb: PgBackRest, settings: Settings, base: Path, resolved: Resolved, *, data: Path | None = None
) -> Iterator[Scratch]:
    """Restore into `data` (default base/data), replay to the target, promote; stop it on exit."""
    system.make_dir(base, 0o700, settings.user)
    sock = base / "sock"
    system.make_dir(sock, 0o700, settings.user)
    data = data or base / "data"
    system.make_dir(data, 0o700, settings.user)
    work = base / "pgbackrest"
    system.make_dir(work, 0o700, settings.user)
    pb.restore(data, work, target=resolved.target, set_label=resolved.set_label, immediate=resolved.immediate)
    port = system.free_port()
    conf = _write_scratch_config(base, sock, port, settings)
    scratch = Scratch(data, sock, port, settings)
    log = base / "postgresql.log"
    log.touch()
    system.chown(log, settings.user)
    try:
        try:
            scratch.pg(
                "pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "7200", "-o", f"-c config_file={conf}",
                "start", timeout=7300, what="replaying WAL to the target",
            )  # fmt: skip
        except PgbridgeError:
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-6:])
            raise DeploymentError(f"the restored copy did not start or recover:\n{tail}") from None
        _wait_promoted(scratch)
        yield scratch
    finally:
        _stop(scratch)


def _wait_promoted(s: Scratch, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error), psycopg.connect(s.dsn(), autocommit=True) as c:
            row = c.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                return
        time.sleep(0.3)
    raise DeploymentError(f"the restored copy did not finish recovery within {timeout:.0f}s")


def _stop(s: Scratch) -> None:
    pid = system.read_pid(s.data / "postmaster.pid")
    if pid is None or not system.pid_alive(pid):
        return
    with contextlib.suppress(PgbridgeError):
        s.pg("pg_ctl", "-D", str(s.data), "-m", "fast", "-w", "-t", "120", "stop", timeout=150)
    if system.pid_alive(pid):
        os.kill(pid, 9)  # the postmaster by its own pid, nothing else


_RECOVERY_KEY = re.compile(r"^\s*(restore_command|recovery_target\w*|archive_mode)\s*=")


def prepare_for_patroni(data: Path) -> None:
    """Remove what the copy carries from the source's configuration before the new Patroni starts.

    pgBackRest put the recovery target into postgresql.auto.conf; the source's Patroni left its
    configuration in patroni.dynamic.json, which a new Patroni would load instead of its own (with
    the source's archive_command: the copy's first WAL would go into the source's repository).
    """
    auto = data / "postgresql.auto.conf"
    if auto.exists():
        lines = [ln for ln in auto.read_text().splitlines() if not _RECOVERY_KEY.match(ln)]
        auto.write_text("\n".join(lines) + "\n")
    for f in ("recovery.signal", "standby.signal", "patroni.dynamic.json"):
        (data / f).unlink(missing_ok=True)


# -- restore into a new deployment -----------------------------------------------------------------


def new_spec(src: Spec, name: str) -> tuple[Spec, str]:
    """The source's spec under a new name, on free ports, without the CDC pipeline."""
    doc = src.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["name"] = name
    doc["network"]["port"] = system.free_port()
    doc.pop("pipeline", None)
    if "endpoints" in doc:
        for k in ("writer_port", "reader_port"):
            doc["endpoints"].pop(k, None)
        doc["endpoints"].get("pooler", {}).pop("port", None)
    text = "# restored by pgbridge from deployment " + src.name + "\n" + yaml.safe_dump(doc, sort_keys=False)
    return parse_spec(yaml.safe_load(text), "restored spec"), text


def restore(src: Deployment, name: str, target: Target, step: Step = lambda s: None) -> dict[str, Any]:
    from pgbridge.ops.up import deployment_lock, up

    pb = backup_ops.require_enabled(src)
    if not re.match(NAME_RE, name):
        raise UsageError(f"{name!r} is not a deployment name", hint="lower-case letters, digits and '-'")
    home = Home(src.home.root.parent / name)
    if home.root.exists() or name == src.spec.name:
        raise UsageError(f"the name {name!r} is already in use ({home.root})", hint="choose another --name")
    step("checking the target")
    if target.kind != "snapshot":
        # With the source alive, close the current WAL segment so `latest` includes every commit so far.
        with contextlib.suppress(PgbridgeError):
            pb.check()
    resolved = resolve(pb, src.home, target)
    spec, text = new_spec(src.spec, name)
    times: dict[str, float] = {}

    def seed(dep: Deployment) -> None:
        t0 = time.monotonic()
        base = backup_ops.layout(dep.home).scratch / "restore"
        with recovered(pb, src.settings, base, resolved, data=dep.home.pgdata(dep.primary_member)):
            times["recovered_s"] = time.monotonic() - t0
        prepare_for_patroni(dep.home.pgdata(dep.primary_member))
        shutil.rmtree(base, ignore_errors=True)

    t0 = time.monotonic()
    with deployment_lock(src.home):
        report = up(src.settings, spec, text, home, step=step, seed=seed)
    took = time.monotonic() - t0
    new = Deployment(src.settings, home)
    msg = f"restored {resolved.describe} into new deployment {name} in {took:.0f}s"
    events.record(src, "restore", msg, new=name, target=resolved.describe, set=resolved.set_label, seconds=took)
    events.record(new, "restore", f"created from {src.spec.name} at {resolved.describe}", source=src.spec.name)
    return {"name": name, "home": str(home.root), "port": spec.network.port, "target": resolved.describe,
            "set": resolved.set_label, "seconds": took, "recovery_seconds": times.get("recovered_s"),
            "report": report}  # fmt: skip


# -- the restore drill ----------------------------------------------------------------------------


def _counts(s: Scratch) -> dict[str, int]:
    out: dict[str, int] = {}
    with psycopg.connect(s.dsn(), autocommit=True) as c:
        dbs = [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")]
    for db in dbs:
        with psycopg.connect(s.dsn(db), autocommit=True) as c:
            tables = c.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                " AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2"
            ).fetchall()
            for schema, table in tables:
                row = c.execute(
                    sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
                ).fetchone()
                out[f"{db}.{schema}.{table}"] = int(row[0]) if row else 0
    return out


def _user_checks(s: Scratch, spec: Spec) -> list[dict[str, Any]]:
    results = []
    dsn = s.dsn(spec.database.name)
    for check in spec.backup.drill.checks:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                row = c.execute(check.sql.encode()).fetchone()
            ok = row is not None and row[0] is True
            results.append({"name": check.name, "ok": ok, "detail": "" if ok else f"returned {row!r}"})
        except psycopg.Error as e:
            results.append({"name": check.name, "ok": False, "detail": str(e).strip().splitlines()[0]})
    return results


def drill(settings: Settings, home: Home, *, scheduled: bool = False) -> dict[str, Any]:
    """Restore the latest backup to a scratch instance, check it, record the time, remove it."""
    dep = Deployment(settings, home)
    pb = backup_ops.require_enabled(dep)
    spec = dep.spec
    base = backup_ops.layout(home).scratch / f"drill-{int(time.time())}"
    result: dict[str, Any] = {"time": time.time(), "ok": False, "scheduled": scheduled}
    what = "scheduled restore drill" if scheduled else "restore drill"
    try:
        with contextlib.suppress(PgbridgeError):
            pb.check()  # close the current WAL segment, if the source runs
        resolved = resolve(pb, home, Target("latest"))
        t0 = time.monotonic()
        with recovered(pb, settings, base, resolved) as s:
            result["restore_seconds"] = time.monotonic() - t0
            t1 = time.monotonic()
            with psycopg.connect(s.dsn(), autocommit=True) as c:
                row = c.execute("SELECT now()").fetchone()
            try:
                s.pg("pg_amcheck", "-h", str(s.sock), "-p", str(s.port), "-U", "postgres", "--all",
                     "--install-missing", timeout=3600, what="pg_amcheck")  # fmt: skip
                result["amcheck"] = "ok"
            except PgbridgeError as e:
                result["amcheck"] = e.message
            result["row_counts"] = _counts(s)
            result["checks"] = _user_checks(s, spec)
            result["check_seconds"] = time.monotonic() - t1
            result["restored_at"] = row[0].timestamp() if row else None
        failed = [c["name"] for c in result["checks"] if not c["ok"]]
        if result["amcheck"] != "ok" or failed:
            why = ("pg_amcheck found damage; " if result["amcheck"] != "ok" else "") + (
                f"checks failed: {', '.join(failed)}" if failed else ""
            )
            raise CheckFailed(f"restore drill: {why.strip('; ')}")
        result["ok"] = True
        tables = len(result["row_counts"])
        events.record(dep, "drill-restore", f"{what} passed: restored in {result['restore_seconds']:.1f}s,"
                      f" {tables} tables counted, {len(result['checks'])} checks passed",
                      restore_seconds=result["restore_seconds"], tables=tables, scheduled=scheduled)  # fmt: skip
        return result
    except (PgbridgeError, psycopg.Error, OSError) as e:  # the scratch instance failing is a failed drill too
        message = e.message if isinstance(e, PgbridgeError) else str(e).strip()
        result["error"] = message
        events.record(dep, "drill-restore-failed", f"{what} FAILED: {message}", scheduled=scheduled)
        if isinstance(e, CheckFailed):
            raise
        raise CheckFailed(f"restore drill failed: {message}") from None
    finally:
        backup_ops.record_drill(home, settings, result)
        shutil.rmtree(base, ignore_errors=True)
