"""The backup scheduler daemon: `python -m pgbridge.ops.backup_scheduler HOME`, run by supervisord.

Each cycle reads the repository and the spec, asks `plan.backup.decide` what is due (a backup in
the window, retention, a restore drill) and does it; it also watches WAL archiving and records an
event when the archive stalls (and when it recovers). It runs as the service user, so it reads
only files that user owns: the spec, pgbackrest.conf, its own config and the snapshot catalog.
A failing cycle is logged, counted and retried; the loop never dies of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from pgbridge.home import Home, atomic_write
from pgbridge.ops import backup as backup_ops
from pgbridge.ops import events
from pgbridge.ops.context import Deployment
from pgbridge.plan.backup import decide
from pgbridge.plan.hba import ADMIN_ROLE
from pgbridge.settings import load_settings
from pgbridge.spec.load import load_spec

log = logging.getLogger("pgbridge.backup-scheduler")
CYCLE_S = 20.0


@dataclass
class ArchiveHealth:
    archived: int
    failed: int
    last_archived: float | None
    last_failed: float | None
    last_failed_wal: str | None

    def stalled(self, now: float, threshold: float) -> bool:
        failing = self.last_failed is not None and (self.last_archived is None or self.last_failed > self.last_archived)
        return failing and (self.last_archived is None or now - self.last_archived > threshold)


def archive_health(hosts: list[dict[str, Any]]) -> ArchiveHealth | None:
    """pg_stat_archiver of the member that is primary (None when no member answers as primary)."""
    for h in hosts:
        dsn = f"host={h['socket_dir']} port={h['port']} user={ADMIN_ROLE} dbname=postgres connect_timeout=3"
        with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT pg_is_in_recovery(), archived_count, failed_count,"
                " extract(epoch FROM last_archived_time), extract(epoch FROM last_failed_time), last_failed_wal"
                " FROM pg_stat_archiver"
            ).fetchone()
            if row is None or row[0]:
                continue
            return ArchiveHealth(
                int(row[1]),
                int(row[2]),
                float(row[3]) if row[3] is not None else None,
                float(row[4]) if row[4] is not None else None,
                row[5],
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
        pb = backup_ops.tool(self.settings, self.home, spec.name)
        said = [self._watch_archive(spec.backup.archive_timeout)]
        sets, _ = backup_ops.backup_sets(pb, self.home)
        now = time.time()
        last_drill = backup_ops.last_drill(self.home)
        for d in decide(now, backup_ops.policy(spec), sets, last_drill):
            if d.action == "backup" and d.type is not None:
                t0 = time.monotonic()
                new, kind = backup_ops.run_backup(pb, self.home, d.type)
                took = time.monotonic() - t0
                events.record(self.dep, "backup", f"scheduled {kind} backup {new.label} ({d.reason})",
                              label=new.label, type=kind, seconds=round(took, 2))  # fmt: skip
                said.append(f"{kind} backup {new.label} in {took:.1f}s")
            elif d.action == "expire":
                gone = backup_ops.expire(pb, self.home, spec.backup.retention_days, now)
                if gone:
                    events.record(self.dep, "backup-expired", f"expired {', '.join(gone)} ({d.reason})", labels=gone)
                said.append(f"expired {len(gone)}")
            elif d.action == "drill":
                from pgbridge.ops.restore import drill

                try:
                    r = drill(self.settings, self.home)
                    said.append(f"drill ok in {r['restore_seconds']:.0f}s")
                except Exception as e:
                    said.append(f"drill FAILED: {e}")
            else:
                said.append("nothing due")
        return "; ".join(s for s in said if s)

    def _watch_archive(self, archive_timeout: int) -> str:
        health = archive_health(self.conf["hosts"])
        if health is None:
            return "no primary answered"
        now = time.time()
        threshold = max(120.0, 4.0 * archive_timeout)
        was = bool(self.state.get("archive_stalled"))
        if health.stalled(now, threshold) and not was:
            since = health.last_archived
            when = dt.datetime.fromtimestamp(since, dt.UTC).isoformat(timespec="seconds") if since else "never"
            events.record(
                self.dep,
                "archive-stalled",
                f"WAL archiving is failing (last success {when}, failing on {health.last_failed_wal}); PITR freshness"
                f" is falling behind, and past backup.archive_queue_max_mb WAL will be dropped",
                failed_count=health.failed,
                last_archived=since,
            )
            self.state["archive_stalled"] = True
            self._save_state()
        elif was and not health.stalled(now, threshold):
            events.record(self.dep, "archive-resumed", "WAL archiving works again", archived_count=health.archived)
            self.state["archive_stalled"] = False
            self._save_state()
        age = f"{now - health.last_archived:.0f}s ago" if health.last_archived else "none yet"
        return f"archive: last {age}" + (", STALLED" if self.state.get("archive_stalled") else "")

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
            deadline = time.monotonic() + CYCLE_S
            while not self.stop and time.monotonic() < deadline:
                time.sleep(0.5)
        log.info("backup scheduler stopped")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s", stream=sys.stdout)
    Scheduler(Path(sys.argv[1])).run()


if __name__ == "__main__":
    main()
