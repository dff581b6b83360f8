"""The backup scheduler daemon: `python -m pgbridge.ops.backup_scheduler HOME`, run by supervisord.

Each cycle reads the repository and the spec, asks `plan.backup.decide` what is due (a backup in
the window, retention, a restore drill) and does it; it also watches WAL archiving and records an
event when the archive stalls or drops WAL (and when it recovers). It runs as the service user,
so it reads only files that user owns: the spec, pgbackrest.conf, its own config and the snapshot
catalog.
A failing cycle is logged, counted and retried; the loop never dies of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from pgbridge.errors import PgbridgeError
from pgbridge.home import Home, atomic_write
from pgbridge.ops import backup as backup_ops
from pgbridge.ops import events
from pgbridge.ops.context import Deployment
from pgbridge.plan.backup import ArchiveState, ArchiveStatus, decide, watch_archive
from pgbridge.plan.hba import ADMIN_ROLE
from pgbridge.settings import load_settings
from pgbridge.spec.load import load_spec

log = logging.getLogger("pgbridge.backup-scheduler")
CYCLE_S = 20.0  # at most; shorter when archive_stalled_after asks for a quicker alarm
MIN_CYCLE_S = 5.0


def archive_status(hosts: list[dict[str, Any]]) -> ArchiveStatus | None:
    """pg_stat_archiver of the member that is primary (None when no member answers as primary)."""
    for h in hosts:
        dsn = f"host={h['socket_dir']} port={h['port']} user={ADMIN_ROLE} dbname=postgres connect_timeout=3"
        with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT pg_is_in_recovery(), archived_count, failed_count, extract(epoch FROM last_archived_time),"
                " extract(epoch FROM last_failed_time), last_archived_wal, last_failed_wal FROM pg_stat_archiver"
            ).fetchone()
            if row is None or row[0]:
                continue
            return ArchiveStatus(
                archived_count=int(row[1]),
                failed_count=int(row[2]),
                last_archived=float(row[3]) if row[3] is not None else None,
                last_failed=float(row[4]) if row[4] is not None else None,
                last_archived_wal=row[5],
                last_failed_wal=row[6],
                repo_max=None,
            )
    return None


class Scheduler:
    def __init__(self, home: Path) -> None:
        self.home = Home(home)
        self.lay = backup_ops.layout(self.home)
        self.settings = load_settings()
        self.conf: dict[str, Any] = json.loads(self.lay.scheduler_conf.read_text())
        self.dep = Deployment(self.settings, self.home)
        self.state = self._load_state()
        self.errors = 0
        self.stop = False
        self.cycle_s = CYCLE_S

    def _load_state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.lay.scheduler_state.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        atomic_write(self.lay.scheduler_state, json.dumps(self.state, indent=2) + "\n", mode=0o640)

    def cycle(self) -> str:
        spec = load_spec(self.home.spec_file)
        self.dep._spec = spec
        # Look at the archive at least twice per alarm period, so the alarm is not late by a cycle.
        self.cycle_s = min(CYCLE_S, max(MIN_CYCLE_S, spec.backup.archive_stalled_after / 2))
        pb = backup_ops.tool(self.settings, self.home, spec.name)
        # PostgreSQL first, then the repository: a segment PostgreSQL calls archived must be there by then.
        status = archive_status(self.conf["hosts"])
        try:
            sets, meta = backup_ops.backup_sets(pb, self.home)
        except PgbridgeError:
            self._watch_archive(status, None, spec.backup.archive_stalled_after)  # it may be the repository failing
            raise
        said = [self._watch_archive(status, meta.get("archive", {}).get("max"), spec.backup.archive_stalled_after)]
        now = time.time()
        last_drill = backup_ops.last_drill(self.home)
        gap = bool(self.state.get("wal_gap"))
        for d in decide(now, backup_ops.policy(spec), sets, last_drill, wal_gap=gap):
            if d.action == "backup" and d.type is not None:
                t0 = time.monotonic()
                new, kind = backup_ops.run_backup(pb, self.home, d.type)
                took = time.monotonic() - t0
                events.record(self.dep, "backup", f"scheduled {kind} backup {new.label} ({d.reason})",
                              label=new.label, type=kind, seconds=round(took, 2))  # fmt: skip
                said.append(f"{kind} backup {new.label} in {took:.1f}s")
                if gap and kind == "full":
                    self.state["wal_gap"] = False
                    self._save_state()
            elif d.action == "expire":
                gone = backup_ops.expire(pb, self.home, spec.backup.retention_days, now)
                if gone:
                    events.record(self.dep, "backup-expired", f"expired {', '.join(gone)} ({d.reason})", labels=gone)
                said.append(f"expired {len(gone)}")
            elif d.action == "drill":
                from pgbridge.ops.restore import drill

                try:
                    r = drill(self.settings, self.home, scheduled=True)
                    said.append(f"drill ok in {r['restore_seconds']:.0f}s")
                except Exception as e:
                    said.append(f"drill FAILED: {e}")
            else:
                said.append("nothing due")
        return "; ".join(s for s in said if s)

    def _watch_archive(self, status: ArchiveStatus | None, repo_max: str | None, stalled_after: int) -> str:
        """Record archive-stalled / archive-wal-dropped / archive-resumed when the archive's state changes."""
        if status is None:
            return "no primary answered"
        status = dataclasses.replace(status, repo_max=repo_max)
        now = time.time()
        was: ArchiveState = self.state.get("archive", "ok")
        v = watch_archive(now, status, was, stalled_after)
        since = status.last_archived
        when = dt.datetime.fromtimestamp(since, dt.UTC).isoformat(timespec="seconds") if since else "never"
        if v.event == "archive-stalled":
            events.record(
                self.dep,
                "archive-stalled",
                f"WAL archiving is failing (last success {when}, failing on {status.last_failed_wal}); PITR freshness"
                f" is falling behind, and past backup.archive_queue_max_mb WAL will be dropped",
                failed_count=status.failed_count,
                last_archived=since,
            )
        elif v.event == "archive-wal-dropped":
            events.record(
                self.dep,
                "archive-wal-dropped",
                f"WAL was dropped: PostgreSQL counts {status.last_archived_wal} as archived but the repository ends at"
                f" {repo_max} (the stalled archive passed backup.archive_queue_max_mb); point-in-time restore"
                " cannot cross this gap, and a full backup is taken once archiving works again",
                last_archived_wal=status.last_archived_wal,
                repo_max=repo_max,
            )
        elif v.event == "archive-resumed":
            gap = " after a gap: taking a full backup" if v.gap else ""
            events.record(self.dep, "archive-resumed", f"WAL archiving works again{gap}",
                          archived_count=status.archived_count, repo_max=repo_max, gap=v.gap)  # fmt: skip
        if v.state != was:
            self.state["archive"] = v.state
            if v.gap:
                self.state["wal_gap"] = True
            self._save_state()
        age = f"{now - since:.0f}s ago" if since else "none yet"
        return f"archive: last {age}" + ("" if v.state == "ok" else f", {v.state.upper()}")

    def run(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        log.info("backup scheduler for %s started", self.conf["stanza"])
        while not self.stop:
            try:
                log.info("%s", self.cycle())
            except Exception as e:  # a bad cycle is counted and retried, never fatal
                self.errors += 1
                log.warning("cycle failed (%d so far): %s", self.errors, e)
            deadline = time.monotonic() + self.cycle_s
            while not self.stop and time.monotonic() < deadline:
                time.sleep(0.5)
        log.info("backup scheduler stopped")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s", stream=sys.stdout)
    Scheduler(Path(sys.argv[1])).run()


if __name__ == "__main__":
    main()
