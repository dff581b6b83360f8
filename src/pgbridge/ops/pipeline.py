"""Services behind `pgbridge pipeline ...` and `pgbridge query`, and the pipeline's part of `up`.

`up` creates the publication (as admin: FOR TABLES IN SCHEMA needs a superuser on PostgreSQL 15),
writes the daemon's config and password file and starts it under supervisord as the service user.
The daemon logs in as the CDC role over TCP on the loopback with SCRAM (see plan/hba.py for why
not over the local socket). It creates the slot itself, because the initial load must read under
the snapshot the slot exports.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgbridge.cdc import ddl
from pgbridge.cdc.pipeline import PipelineConfig
from pgbridge.cdc.pipeline import request as socket_request
from pgbridge.cdc.source import drop_slot, slot_status
from pgbridge.errors import DeploymentError, NotFoundError, PgbridgeError, UsageError
from pgbridge.home import Home, write_if_changed
from pgbridge.ops.context import Deployment, secret_name_for_role
from pgbridge.ops.tasks import Action, Report
from pgbridge.platform import system
from pgbridge.platform.patroni import RUNNING_STATES, leader_of
from pgbridge.platform.postgres import admin_connection
from pgbridge.platform.supervisor import Program

LOOPBACK = "127.0.0.1"  # where the daemon reaches the members (plan/hba.py lets the CDC role in there only)


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def passfile_text(database: str, role: str, password: str) -> str:
    """One pgpass line: the CDC role's password on the loopback, for the pipeline's database."""
    if any(ch in password for ch in "\r\n\0"):
        raise DeploymentError(
            f"the password of role {role} holds a line break or NUL, which a password file cannot carry",
            hint=f"replace the password of {role} in the secret store (pgbridge generates only letters and digits)",
        )
    return ":".join([LOOPBACK, "*", _pgpass_field(database), _pgpass_field(role), _pgpass_field(password)]) + "\n"


@dataclass(frozen=True)
class PipelinePaths:
    config: Path
    passfile: Path  # the CDC role's password for libpq (and the replication connection), 0600
    warehouse: Path
    status: Path
    socket: Path
    resync: Path
    program: str
    slot: str
    publication: str


def paths(dep: Deployment) -> PipelinePaths:
    p = dep.spec.pipeline
    if p is None:
        raise NotFoundError(
            f"deployment {dep.spec.name} has no pipeline", hint="add a `pipeline:` section to the spec and run up"
        )
    return _paths(dep.home, p.name)


def _paths(h: Home, name: str) -> PipelinePaths:
    return PipelinePaths(
        config=h.etc / f"pipeline-{name}.json",
        passfile=h.etc / f"pipeline-{name}.pgpass",
        warehouse=h.root / "warehouse" / f"{name}.duckdb",
        status=h.run / f"pipeline-{name}.status.json",
        socket=h.run / f"pipeline-{name}.sock",
        resync=h.run / f"pipeline-{name}.resync",
        program=f"pipeline-{name}",
        slot=f"pgbridge_{name}",
        publication=f"pgbridge_{name}",
    )


_ETC_FILES = ("pipeline-*.json", "pipeline-*.pgpass")
_RUN_FILES = ("pipeline-*.status.json", "pipeline-*.status.tmp", "pipeline-*.sock", "pipeline-*.resync")


def stop_holds(recorded: object, name: str | None) -> bool:
    """Whether a recorded `pipeline stop` (the state's ``pipeline_stopped``) holds for pipeline ``name``.

    It names the pipeline it stopped (True: recorded before it did), so it neither outlives that
    pipeline nor keeps a renamed one from starting.
    """
    return name is not None and recorded in (True, name)


def former(h: Home, name: str | None) -> list[str]:
    """The pipelines other than ``name`` whose config is still in ``h`` (taken out of the spec, or renamed)."""
    names = (f.name.removeprefix("pipeline-").removesuffix(".json") for f in h.etc.glob("pipeline-*.json"))
    return sorted(n for n in names if n != name)


def prune(h: Home, keep: Collection[str]) -> list[Path]:
    """Remove the files of every pipeline not in ``keep``; returns what was removed.

    Their config, their password file (the CDC role's password), status (and a status write that
    was cut short), socket and resync request go; their warehouses stay (they are the user's data).
    Call it once supervisord has stopped their daemons.
    """
    kept: set[Path] = set()
    for name in keep:
        pp = _paths(h, name)
        kept |= {f for f in asdict(pp).values() if isinstance(f, Path)} | {pp.status.with_suffix(".tmp")}
    gone = []
    for folder, patterns in ((h.etc, _ETC_FILES), (h.run, _RUN_FILES)):
        for pattern in patterns:
            for f in sorted(folder.glob(pattern)):
                if f not in kept:
                    f.unlink(missing_ok=True)
                    gone.append(f)
    return gone


def _retire(dep: Deployment, name: str | None, report: Report) -> bool:
    """Take down the pipelines other than ``name`` that `up` left behind: slot, publication, files.

    The slot matters most: left in place it holds WAL back for good (Patroni drops slots it does not
    manage only when it starts). It is dropped on every member, as members that may be promoted hold
    copies. A pipeline whose slot cannot be dropped now (a member is down) keeps its config file, so
    the next `up` tries again. Warehouses stay.
    """
    keep = {name} if name is not None else set()
    db = dep.spec.database.name
    for old in former(dep.home, name):
        ident = f"pgbridge_{old}"
        try:
            for m in dep.members:
                drop_slot(dep.member_admin(m.name).conninfo(db), ident)
            with admin_connection(dep.admin, db) as c:
                c.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(ident)))
        except (PgbridgeError, psycopg.Error) as e:
            keep.add(old)
            why = e.message if isinstance(e, PgbridgeError) else str(e).strip()
            report.add(f"old pipeline {old}", "pending", f"its slot {ident} stays until the next `up`: {why}")
            continue
        report.add(f"old pipeline {old}", "removed", f"slot and publication {ident}, config; its warehouse stays")
    prune(dep.home, keep)
    return keep == ({name} if name is not None else set())


def remove_source_functions(c: psycopg.Connection[Any]) -> bool:
    """Remove what `up` installs for a pipeline in the source database (``c``: a superuser, autocommit):
    the DDL capture's event triggers (which would otherwise write every DDL into the WAL), their
    functions, the standby probe, and the schema ``_pgbridge`` unless something else lives there.
    False when there was none of it."""
    schema = sql.Identifier(ddl.SCHEMA)
    found = c.execute(
        "SELECT (SELECT count(*) FROM pg_event_trigger WHERE evtname = ANY(%s))"
        " + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        "    WHERE n.nspname = %s AND p.proname = ANY(%s))",
        (list(ddl.TRIGGERS), ddl.SCHEMA, [*ddl.FUNCTIONS, "sync_standby_flush_lsn"]),
    ).fetchone()
    if not found or not found[0]:
        return False
    with c.transaction():
        for statement in ddl.uninstall_sql():
            c.execute(statement.encode())  # rendered by us, not user input
        c.execute(sql.SQL("DROP FUNCTION IF EXISTS {}.sync_standby_flush_lsn()").format(schema))
    with contextlib.suppress(psycopg.errors.DependentObjectsStillExist):
        c.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(schema))  # not if something else lives there
    return True


def program(dep: Deployment) -> Program | None:
    if dep.spec.pipeline is None:
        return None
    pp = paths(dep)
    argv = [str(dep.settings.binaries.python), "-m", "pgbridge.cdc.pipeline", str(pp.config)]
    # Started by `up` once its publication exists; supervisord restarts it if it dies.
    return Program(pp.program, argv, priority=30, stop_wait=60, autostart=False)


def config(dep: Deployment) -> PipelineConfig:
    spec, p, pp = dep.spec, dep.spec.pipeline, paths(dep)
    assert p is not None
    # Every member that may become primary, and libpq picks the one that is: after a failover
    # the daemon reconnects to the new primary by itself. libpq reads the password file at each
    # connection, so a new password applies from the next one.
    able = [m.name for m in dep.members if not m.nofailover]
    dsn = make_conninfo(
        "",
        host=",".join(LOOPBACK for _ in able),
        port=",".join(str(dep.member_port(m)) for m in able),
        dbname=spec.database.name,
        user=spec.database.users.cdc,
        passfile=str(pp.passfile),
        # Only SCRAM: whatever else answers on a member's port (it is free while that member is
        # down) gets neither the password nor the chance to feed the pipeline.
        require_auth="scram-sha-256",
        sslmode="disable",
        application_name=f"pgbridge-{pp.program}",
    )
    if len(able) > 1:
        dsn += " target_session_attrs=primary"
    return PipelineConfig(
        name=p.name,
        dsn=dsn,
        slot=pp.slot,
        publication=pp.publication,
        warehouse=str(pp.warehouse),
        status_file=str(pp.status),
        socket=str(pp.socket),
        resync_file=str(pp.resync),
        include=tuple(spec.pipeline_include()),
        exclude=tuple(p.tables.exclude),
        exclude_columns={k: tuple(v) for k, v in p.tables.exclude_columns.items()},
        max_rows=p.batch.max_rows,
        max_wait_ms=p.batch.max_wait_ms,
        load_workers=p.load_workers,
        sync_standby=spec.multi_az,
    )


def _ensure_publication(dep: Deployment, name: str, schemas: list[str]) -> str:
    with admin_connection(dep.admin, dep.spec.database.name) as c:
        row = c.execute("SELECT oid FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
        targets = sql.SQL(", ").join(sql.Identifier(s) for s in schemas)
        for s in schemas:
            c.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(s)))
        if row is None:
            c.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}").format(sql.Identifier(name), targets))
            return "created"
        have = {
            r[0]
            for r in c.execute(
                "SELECT n.nspname FROM pg_publication_namespace pn JOIN pg_namespace n ON n.oid = pn.pnnspid"
                " WHERE pn.pnpubid = %s",
                (row[0],),
            ).fetchall()
        }
        if have == set(schemas):
            return "unchanged"
        c.execute(sql.SQL("ALTER PUBLICATION {} SET TABLES IN SCHEMA {}").format(sql.Identifier(name), targets))
        return "changed"


def _ensure_ddl_capture(dep: Deployment) -> Action:
    """The event triggers that put DDL into the WAL (see pgbridge.cdc.ddl); functions are refreshed."""
    with admin_connection(dep.admin, dep.spec.database.name) as c:
        have = c.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgbridge\\_%%'").fetchone()
        for statement in ddl.install_sql():
            c.execute(statement.encode())  # rendered by us, not user input
    return "unchanged" if have and have[0] == 3 else "created"


def _ensure_standby_probe(dep: Deployment) -> Action:
    """The function the daemon asks how far the synchronous standby has flushed (see SyncStandbyWait).

    ``pg_stat_replication`` shows positions only to superusers and pg_read_all_stats, so the CDC
    role gets this one answer through a SECURITY DEFINER function instead of a monitoring role.
    """
    cdc = sql.Identifier(dep.spec.database.users.cdc)
    with admin_connection(dep.admin, dep.spec.database.name) as c:
        have = c.execute(
            "SELECT 1 FROM pg_proc WHERE proname = 'sync_standby_flush_lsn' AND pronamespace = %s::regnamespace",
            (ddl.SCHEMA,),
        ).fetchone()
        c.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {}.sync_standby_flush_lsn() RETURNS pg_lsn"
                " LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$"
                " SELECT CASE WHEN current_setting('synchronous_standby_names') = '' THEN NULL"
                " ELSE coalesce((SELECT max(flush_lsn) FROM pg_stat_replication"
                " WHERE sync_state IN ('sync', 'quorum')), '0/0') END $$"
            ).format(sql.Identifier(ddl.SCHEMA))
        )
        c.execute(
            sql.SQL("REVOKE ALL ON FUNCTION {}.sync_standby_flush_lsn() FROM PUBLIC").format(sql.Identifier(ddl.SCHEMA))
        )
        c.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(ddl.SCHEMA), cdc))
        c.execute(
            sql.SQL("GRANT EXECUTE ON FUNCTION {}.sync_standby_flush_lsn() TO {}").format(
                sql.Identifier(ddl.SCHEMA), cdc
            )
        )
    return "unchanged" if have else "created"


def _write_passfile(dep: Deployment, path: Path) -> Action | None:
    """Write the daemon's password file; what was done to it ("created", "changed"), if anything.

    A file libpq would skip (open to others, someone else's) counts as changed, like a wrong one.
    """
    user, role = dep.settings.user, dep.spec.database.users.cdc
    try:
        before: os.stat_result | None = path.stat()
    except FileNotFoundError:
        before = None
    password = dep.secrets.get(secret_name_for_role(role)).reveal()
    rewritten = write_if_changed(path, passfile_text(dep.spec.database.name, role, password), mode=0o600)
    system.chown(path, user)
    if before is None:
        return "created"
    unusable = before.st_mode & 0o777 != 0o600 or (user.switch and before.st_uid != user.uid)
    return "changed" if rewritten or unusable else None


def ensure(dep: Deployment, report: Report) -> None:
    """The pipeline's part of `up`: publication, folders, config, and the daemon running.

    A pipeline no longer in the spec is taken down (:func:`_retire`).
    """
    p = dep.spec.pipeline
    retired = _retire(dep, p.name if p is not None else None, report)
    if p is None:
        if retired:  # not while an old pipeline's slot is still to be dropped: it would miss DDL
            try:
                with admin_connection(dep.admin, dep.spec.database.name) as c:
                    removed = remove_source_functions(c)
            except (PgbridgeError, psycopg.Error) as e:
                why = e.message if isinstance(e, PgbridgeError) else str(e).strip()
                report.add("ddl capture", "pending", f"not checked for a removed pipeline's event triggers: {why}")
            else:
                if removed:
                    report.add("ddl capture", "removed", "event triggers and functions of the removed pipeline")
        return
    pp, user = paths(dep), dep.settings.user
    schemas = sorted({g.split(".", 1)[0] for g in dep.spec.pipeline_include()})
    report.add(f"publication {pp.publication}", _ensure_publication(dep, pp.publication, schemas))  # type: ignore[arg-type]
    report.add("ddl capture", _ensure_ddl_capture(dep))
    report.add("standby probe", _ensure_standby_probe(dep))
    system.make_dir(pp.warehouse.parent, 0o750, user)
    mended = _write_passfile(dep, pp.passfile)
    if mended:
        report.add("pipeline password file", mended, str(pp.passfile))
    changed = write_if_changed(pp.config, config(dep).dump(), mode=0o640)
    system.chown(pp.config, user)
    sup = dep.supervisor
    state = sup.processes().get(pp.program, {}).get("statename")
    if stop_holds(dep.state.get("pipeline_stopped"), p.name):
        report.add(f"pipeline {p.name}", "unchanged", "stopped by `pipeline stop`")
        return
    # A running daemon reads a new password file at its next connection; one that supervisord
    # is waiting to start again (it failed to log in) is started at once rather than after the wait.
    if (state == "RUNNING" and changed) or (state == "BACKOFF" and mended):
        sup.stop_program(pp.program)
        state = "STOPPED"
    if state != "RUNNING":
        sup.start_program(pp.program)
        report.add(f"pipeline {p.name}", "started")
    else:
        report.add(f"pipeline {p.name}", "unchanged")
    if not wait_slot_copies(dep):
        report.add("pipeline slot copies", "pending", "a member that may be promoted has no copy of the slot yet")


def wait_slot_copies(dep: Deployment, timeout: float = 90) -> bool:
    """Until every other member that may become primary holds a usable copy of the pipeline's slot, running.

    Patroni copies a permanent logical slot to a replica by stopping its PostgreSQL, copying the
    slot's files and starting it again. It may first copy the slot Patroni itself created before the
    daemon replaced it with its own; advancing that copy can later fail (its WAL recycled) and
    Patroni copies again, with another restart. So a copy counts once it has been advanced to where
    the daemon's slot stood after its load (or was copied from it): `up` then returns with every
    member running, and a failover from then on keeps the slot.
    """
    pp, deadline = paths(dep), time.monotonic() + timeout
    if all(m.nofailover for m in dep.members[1:]):
        return True  # no other member may become primary: the slot is not a permanent one
    mark: int | None = None  # the primary slot's confirmed position once the daemon streams from it
    while True:
        try:
            view = dep.cluster_view()
            leader = leader_of(view) or dep.primary_member
            if mark is None and json.loads(pp.status.read_text()).get("phase") == "streaming":
                mark = _slot_confirmed(dep, leader, pp.slot)
            if mark is not None:
                able = [m.name for m in dep.members if not m.nofailover and m.name != leader]
                states = {m.get("name"): m.get("state") for m in view.get("members", [])}
                if all(
                    states.get(m) in RUNNING_STATES and (_slot_confirmed(dep, m, pp.slot) or -1) >= mark for m in able
                ):
                    return True
        except (PgbridgeError, OSError, ValueError):
            pass  # the daemon starting, or a member restarting to load the copy
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _slot_confirmed(dep: Deployment, member: str, slot: str) -> int | None:
    """The slot's confirmed_flush_lsn on `member` (as a number), None when it has no such slot."""
    s = slot_status(dep.member_admin(member).conninfo(), slot)
    return s.confirmed_flush_lsn.value if s.exists and s.confirmed_flush_lsn is not None else None


def status(dep: Deployment) -> dict[str, Any]:
    dep.home.require()
    pp = paths(dep)
    out: dict[str, Any] = {"pipeline": dep.spec.pipeline.name if dep.spec.pipeline else None}
    try:
        out.update(json.loads(pp.status.read_text()))
    except (OSError, ValueError):
        out.update(state="not started", phase=None)
    proc = dep.supervisor.processes().get(pp.program)
    out["process"] = {"state": proc["statename"], "pid": proc["pid"] or None} if proc else {"state": "absent"}
    if out["process"]["state"] != "RUNNING" and out.get("state") == "running":
        out["state"] = "stopped"
    admin_dsn = dep.admin.conninfo(dep.spec.database.name)
    try:
        s = slot_status(admin_dsn, pp.slot)
        out["slot"] = {
            "name": pp.slot,
            "exists": s.exists,
            "active": s.active,
            "wal_status": s.wal_status,
            "retained_bytes": s.retained_bytes,
            "confirmed_flush_lsn": str(s.confirmed_flush_lsn) if s.confirmed_flush_lsn else None,
        }
        if not s.exists and out.get("phase") == "streaming":
            out["state"], out["phase"] = "error", "slot-lost"
    except PgbridgeError as e:
        out["slot"] = {"name": pp.slot, "error": e.message}
    return out


def stop(dep: Deployment) -> Report:
    pp, report = paths(dep), Report()
    dep.supervisor.stop_program(pp.program)
    state = dep.state
    state["pipeline_stopped"] = dep.spec.pipeline.name if dep.spec.pipeline else True
    dep.home.write_state(state)
    report.add(pp.program, "stopped")
    return report


def start(dep: Deployment) -> Report:
    pp, report = paths(dep), Report()
    if not dep.supervisor.running():
        raise DeploymentError("the deployment is stopped", hint="run `pgbridge up` first")
    state = dep.state
    state.pop("pipeline_stopped", None)
    dep.home.write_state(state)
    dep.supervisor.start_program(pp.program)
    report.add(pp.program, "started")
    return report


def _ask(dep: Deployment, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the running pipeline daemon over its socket."""
    pp = paths(dep)
    deadline = time.monotonic() + 10
    while not pp.socket.exists():
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"pipeline {dep.spec.pipeline.name if dep.spec.pipeline else ''} is not serving queries",
                hint="`pgbridge pipeline status` says why; `pgbridge pipeline start` starts it",
            )
        time.sleep(0.2)
    try:
        return socket_request(pp.socket, payload, timeout=timeout)
    except (OSError, ValueError) as e:
        raise DeploymentError(f"the pipeline did not answer: {e}") from None


def query(dep: Deployment, text: str, timeout: float = 120) -> dict[str, Any]:
    if not text.strip():
        raise UsageError("empty query")
    result = _ask(dep, {"sql": text}, timeout)
    if "error" in result:
        raise UsageError(f"query failed: {result['error']}")
    return result


def validate(dep: Deployment, tables: list[str], repair: bool = False) -> list[dict[str, Any]]:
    """`pipeline validate`: per-table results from the daemon (see pgbridge.cdc.validate)."""
    result = _ask(dep, {"op": "validate", "tables": tables, "repair": repair, "timeout": 3600}, 3700)
    if "error" in result:
        raise DeploymentError(f"validation could not run: {result['error']}")
    tables_out: list[dict[str, Any]] = result["tables"]
    return tables_out


def resync(dep: Deployment, tables: list[str]) -> Report:
    """`pipeline resync [TABLE...]`: re-copy tables in the running daemon, or everything from a new slot."""
    pp, report = paths(dep), Report()
    if tables:
        result = _ask(dep, {"op": "resync", "tables": tables, "timeout": 3600}, 3700)
        if "error" in result:
            raise DeploymentError(f"resync failed: {result['error']}")
        for t in result["tables"]:
            report.add(t["table"], "changed", f"re-copied {t['rows']} rows")
        return report
    if not dep.supervisor.running():
        raise DeploymentError("the deployment is stopped", hint="run `pgbridge up` first")
    # The daemon does it at start: drop the old slot (if any), clear the warehouse, load afresh.
    dep.supervisor.stop_program(pp.program)
    pp.resync.write_text("requested\n")
    system.chown(pp.resync, dep.settings.user)
    state = dep.state
    state.pop("pipeline_stopped", None)
    dep.home.write_state(state)
    dep.supervisor.start_program(pp.program)
    report.add(pp.program, "started", "full resync: new slot, initial load of every table")
    return report
