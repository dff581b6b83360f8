"""Services behind `pgbridge backup ...`, and the backup part of `up`.

`up` renders pgbackrest.conf (with the cipher pass from the secrets store), turns WAL archiving on
through Patroni's parameters, creates the stanza and starts the scheduler daemon. `create`,
`catalog` and `delete_snapshot` are what the CLI calls. Snapshots are full backups whose labels
pgbridge records in a catalog the scheduler can read (and as a pgBackRest annotation); retention
(plan/backup.py) never expires them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pgbridge.errors import DeploymentError, HostError, NotFoundError, UsageError
from pgbridge.home import Home, atomic_write, write_if_changed
from pgbridge.ops import events
from pgbridge.ops.context import Deployment
from pgbridge.ops.tasks import Report
from pgbridge.plan.backup import BackupSet, BackupType, Policy, backup_type_for, expire_plan, parse_window, restorable
from pgbridge.plan.hba import ADMIN_ROLE
from pgbridge.platform import system
from pgbridge.platform.pgbackrest import (
    ANNOTATION,
    Layout,
    PgBackRest,
    PgHost,
    RepoSettings,
    archive_command,
    parse_info,
    render_conf,
)
from pgbridge.platform.postgres import admin_connection
from pgbridge.platform.supervisor import Program
from pgbridge.settings import Settings, pgbackrest_path
from pgbridge.spec.models import Spec

CIPHER_SECRET = "backup:cipher-pass"
S3_KEY_SECRET = "backup:s3-key"
S3_SECRET_SECRET = "backup:s3-key-secret"
PROGRAM = "backup-scheduler"
FLOCK = "pgbridge-backup.flock"
SNAPSHOT_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def layout(home: Home) -> Layout:
    return Layout(home.root / "backup")


def default_binary() -> Path:
    """Where archive_command finds pgBackRest (the parameters are computed without Settings)."""
    return pgbackrest_path() or Path("/usr/bin/pgbackrest")


def archive_parameters(spec: Spec, home: Home) -> dict[str, str]:
    """PostgreSQL's archiving settings: on with pgBackRest, or off when backups are disabled."""
    if not spec.backup.enabled:
        return {"archive_mode": "off"}
    return {
        "archive_mode": "on",
        "archive_command": archive_command(default_binary(), layout(home).conf, spec.name),
        "archive_timeout": f"{spec.backup.archive_timeout}s",
    }


def tool(settings: Settings, home: Home, stanza: str) -> PgBackRest:
    return PgBackRest(settings.binaries.backup_tool(), layout(home).conf, stanza, settings.user)


def policy(spec: Spec) -> Policy:
    b = spec.backup
    return Policy(
        retention_days=b.retention_days,
        window=parse_window(b.window),
        full_days=frozenset(b.schedule.full_days),
        other_days=b.schedule.other_days,
        incr_every_hours=b.schedule.incr_every_hours,
        drill_every_days=b.drill.every_days,
    )


# -- up -------------------------------------------------------------------------------------------


def secret_names(spec: Spec) -> list[str]:
    """Generated secrets `up` keeps in the store (the repository's cipher pass)."""
    return [CIPHER_SECRET] if spec.backup.enabled and spec.backup.encryption else []


def store_s3_credentials(dep: Deployment) -> bool:
    """S3 keys come from the environment once and are kept in the secrets store, never in the spec."""
    repo = dep.spec.backup.repository
    if not dep.spec.backup.enabled or repo.type != "s3":
        return False
    changed = False
    for env, name in ((repo.s3_key_env, S3_KEY_SECRET), (repo.s3_secret_env, S3_SECRET_SECRET)):
        value = os.environ.get(env)
        if value and (name not in dep.secrets or dep.secrets.get(name).reveal() != value):
            dep.secrets.set(name, value)
            changed = True
        elif name not in dep.secrets:
            raise HostError(f"the S3 repository needs credentials: {env} is not set", hint=f"export {env}=...")
    return changed


def _repo_settings(dep: Deployment) -> RepoSettings:
    b, store = dep.spec.backup, dep.secrets
    r = b.repository

    def secret(name: str) -> str | None:
        return store.get(name).reveal() if name in store else None

    return RepoSettings(
        kind=r.type,
        path=r.path or (str(layout(dep.home).repo) if r.type == "local" else "/pgbridge/" + dep.spec.name),
        cipher_pass=secret(CIPHER_SECRET) if b.encryption else None,
        compression=b.compression,
        compression_level=b.compression_level,
        archive_queue_max_mb=b.archive_queue_max_mb,
        s3_bucket=r.s3_bucket,
        s3_endpoint=r.s3_endpoint,
        s3_region=r.s3_region,
        s3_uri_style=r.s3_uri_style,
        s3_verify_tls=r.s3_verify_tls,
        s3_key=secret(S3_KEY_SECRET),
        s3_secret=secret(S3_SECRET_SECRET),
    )


def render(dep: Deployment) -> tuple[list[Program], bool, bool]:
    """Folders, pgbackrest.conf and the scheduler's config.

    Returns the scheduler's program, whether any file changed, and whether the scheduler's own
    config changed: only that one needs a restart (pgBackRest reads its file on every run, the
    scheduler the spec on every cycle, and a restart would cut a running backup or drill short).
    """
    spec = dep.spec
    if not spec.backup.enabled:
        return [], False, False
    lay, user = layout(dep.home), dep.settings.user
    system.make_dir(lay.root, 0o750, user)
    for d in (lay.lock, lay.spool, lay.log, lay.scratch):
        system.make_dir(d, 0o750, user)
    flock = lay.lock / FLOCK
    flock.touch(mode=0o640)
    system.chown(flock, user)  # the CLI (root) and the scheduler (service user) both lock it
    repo = _repo_settings(dep)
    if spec.backup.repository.type == "local":
        system.make_dir(Path(repo.path), 0o750, user)
    hosts = [PgHost(dep.home.pgdata(m.name), dep.member_port(m.name), dep.home.socket_dir) for m in dep.members]
    conf_changed = write_if_changed(lay.conf, render_conf(spec.name, lay, repo, hosts, ADMIN_ROLE), mode=0o600)
    system.chown(lay.conf, user)
    sched = {
        "stanza": spec.name,
        "hosts": [{"socket_dir": str(h.socket_dir), "port": h.port} for h in hosts],
    }
    sched_changed = write_if_changed(lay.scheduler_conf, json.dumps(sched, indent=2) + "\n", mode=0o640)
    system.chown(lay.scheduler_conf, user)
    argv = [str(dep.settings.binaries.python), "-m", "pgbridge.ops.backup_scheduler", str(dep.home.root)]
    # Started by `up` once the stanza exists; supervisord restarts it if it dies.
    return (
        [Program(PROGRAM, argv, priority=40, stop_wait=30, autostart=False)],
        conf_changed or sched_changed,
        sched_changed,
    )


def ensure(dep: Deployment, report: Report, restart_scheduler: bool = False) -> None:
    """The backup part of `up` (the primary runs): stanza, a checked archive, the scheduler running."""
    if not dep.spec.backup.enabled:
        return
    user = dep.settings.user
    ev = dep.home.events_file
    if not ev.exists():
        ev.touch(mode=0o640)
    system.chown(ev, user)  # the scheduler (the service user) appends to it
    pb = tool(dep.settings, dep.home, dep.spec.name)
    marker = layout(dep.home).root / "stanza-created"  # not in state.json: `up` rewrites its own copy
    with admin_connection(dep.admin) as c:
        row = c.execute("SELECT current_setting('archive_mode')").fetchone()
    archiving = row is not None and row[0] == "on"
    if not archiving:
        report.add("wal archiving", "pending-reboot", "archive_mode takes effect after `pgbridge reboot`")
    fresh = not marker.exists()
    if fresh:
        # Under the lock the scheduler takes too: stanza-create and a running backup exclude each other.
        with backup_lock(dep.home):
            pb.stanza_create()
            if archiving:
                pb.check()  # a WAL switch that must reach the repository: archiving works end to end
        atomic_write(marker, f"{dep.spec.name} {time.time():.0f}\n", mode=0o640)
    report.add("wal archiving", "created" if fresh else "unchanged", f"stanza {dep.spec.name}")
    sup = dep.supervisor
    running = sup.processes().get(PROGRAM, {}).get("statename") == "RUNNING"
    if running and restart_scheduler:
        sup.stop_program(PROGRAM)
        running = False
    if not running:
        sup.start_program(PROGRAM)
        report.add("backup scheduler", "started")
    else:
        report.add("backup scheduler", "unchanged")


# -- snapshots catalog ----------------------------------------------------------------------------


def read_snapshots(home: Home) -> dict[str, dict[str, Any]]:
    try:
        data: dict[str, dict[str, Any]] = json.loads(layout(home).snapshots.read_text())
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise HostError(f"the snapshot catalog {layout(home).snapshots} is unreadable: {e}") from None


def _write_snapshots(dep: Deployment, data: dict[str, dict[str, Any]]) -> None:
    path = layout(dep.home).snapshots
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o640)
    system.chown(path, dep.settings.user)


def snapshot_labels(home: Home) -> dict[str, str]:
    return {name: str(v["label"]) for name, v in read_snapshots(home).items()}


# -- services -------------------------------------------------------------------------------------


def require_enabled(dep: Deployment) -> PgBackRest:
    """The deployment's pgBackRest, once the home exists and backups are on (else a clear error)."""
    dep.home.require()
    if not dep.spec.backup.enabled:
        raise UsageError(f"deployment {dep.spec.name} has backups disabled", hint="set backup.enabled: true and run up")
    return tool(dep.settings, dep.home, dep.spec.name)


@contextlib.contextmanager
def backup_lock(home: Home, timeout: float = 3600) -> Iterator[None]:
    """One backup or expire at a time, between the CLI and the scheduler (pgBackRest would refuse)."""
    path = layout(home).lock / FLOCK
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DeploymentError(f"another backup has been running for over {timeout:.0f}s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def backup_sets(pb: PgBackRest, home: Home) -> tuple[list[BackupSet], dict[str, Any]]:
    return parse_info(pb.info(), pb.stanza, snapshot_labels(home))


def run_backup(
    pb: PgBackRest, home: Home, wanted: BackupType, snapshot: str | None = None
) -> tuple[BackupSet, BackupType]:
    """Take a backup (under the lock); returns the new set and the type really taken."""
    with backup_lock(home):
        before, _ = backup_sets(pb, home)
        kind = backup_type_for(wanted, before)
        pb.backup(kind, {ANNOTATION: snapshot} if snapshot else None)
        after, _ = backup_sets(pb, home)
    new = [s for s in after if s.label not in {b.label for b in before}]
    if not new:
        raise DeploymentError("pgBackRest reported success but no new backup set is in the repository")
    return new[-1], kind


def create(dep: Deployment, wanted: BackupType | None, snapshot: str | None) -> dict[str, Any]:
    pb = require_enabled(dep)
    if snapshot is not None:
        if not SNAPSHOT_RE.match(snapshot):
            raise UsageError(
                f"snapshot name {snapshot!r} is not allowed", hint="use a-z, 0-9 and '-', starting with a letter"
            )
        if snapshot in read_snapshots(dep.home):
            raise UsageError(f"snapshot {snapshot!r} exists", hint="choose another name or delete it first")
        if wanted not in (None, "full"):
            raise UsageError("a snapshot is always a full backup (it must not depend on backups that expire)")
    t0 = time.monotonic()
    new, kind = run_backup(pb, dep.home, wanted or "full", snapshot)
    took = time.monotonic() - t0
    if snapshot is not None:
        catalog = read_snapshots(dep.home)
        catalog[snapshot] = {"label": new.label, "created_at": time.time()}
        _write_snapshots(dep, catalog)
    note = "" if wanted in (None, kind) else f" ({wanted} asked; its base would be a snapshot)"
    msg = f"{kind} backup {new.label}" + (f" kept as snapshot {snapshot}" if snapshot else "") + note
    events.record(dep, "backup", msg, label=new.label, type=kind, seconds=round(took, 2), snapshot=snapshot)
    return {"label": new.label, "type": kind, "snapshot": snapshot, "seconds": took, "size": new.size,
            "repo_size": new.repo_size, "note": note.strip()}  # fmt: skip


def latest_archived(pb: PgBackRest, archive: dict[str, Any]) -> float | None:
    archive_id = archive.get("id")
    if not archive_id:
        return None
    return pb.archived_wal_times(str(archive_id))


def catalog(dep: Deployment) -> dict[str, Any]:
    """Backups, snapshots and the restorable window (what `backup list` shows)."""
    pb = require_enabled(dep)
    sets, meta = backup_sets(pb, dep.home)
    window = restorable(sets, latest_archived(pb, meta.get("archive", {})))
    snaps = read_snapshots(dep.home)
    return {
        "stanza": dep.spec.name,
        "encrypted": meta.get("cipher") not in (None, "none"),
        "backups": [
            {
                "label": s.label,
                "type": s.type,
                "start": s.start,
                "stop": s.stop,
                "size": s.size,
                "repo_size": s.repo_size,
                "prior": s.prior,
                "snapshot": s.snapshot,
            }
            for s in sorted(sets, key=lambda s: s.start)
        ],
        "snapshots": [{"name": n, **v} for n, v in sorted(snaps.items())],
        "earliest_restorable": window.earliest,
        "latest_restorable": window.latest,
        "archive": {"min": meta.get("archive", {}).get("min"), "max": meta.get("archive", {}).get("max")},
        "retention_days": dep.spec.backup.retention_days,
    }


def delete_snapshot(dep: Deployment, name: str) -> dict[str, Any]:
    pb = require_enabled(dep)
    snaps = read_snapshots(dep.home)
    if name not in snaps:
        known = ", ".join(sorted(snaps)) or "none"
        raise NotFoundError(f"no snapshot named {name!r}", hint=f"snapshots: {known}")
    label = str(snaps[name]["label"])
    with backup_lock(dep.home):
        sets, _ = backup_sets(pb, dep.home)
        if any(s.label == label for s in sets):
            pb.expire(label)
    del snaps[name]
    _write_snapshots(dep, snaps)
    events.record(dep, "snapshot-deleted", f"snapshot {name} ({label}) deleted", label=label)
    return {"name": name, "label": label}


def expire(pb: PgBackRest, home: Home, retention_days: int, now: float | None = None) -> list[str]:
    """Apply retention (under the lock): expire fulls out of the window, never a snapshot."""
    with backup_lock(home):
        sets, _ = backup_sets(pb, home)
        plan = expire_plan(now or time.time(), retention_days, sets)
        for label in plan.expire:
            pb.expire(label, archive_retention=plan.archive_retention)
        if not plan.expire:
            pb.expire(archive_retention=plan.archive_retention)
    return plan.expire


def last_drill(home: Home) -> float | None:
    try:
        return float(json.loads((layout(home).root / "last-drill.json").read_text())["time"])
    except (OSError, ValueError, KeyError):
        return None


def record_drill(home: Home, settings: Settings, result: dict[str, Any]) -> None:
    path = layout(home).root / "last-drill.json"
    atomic_write(path, json.dumps(result, indent=2, default=str) + "\n", mode=0o640)
    system.chown(path, settings.user)
