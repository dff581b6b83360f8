"""Backup decisions as pure code: what to run now, what to expire, which set restores a time.

The scheduler daemon and the CLI feed these functions a snapshot of the repository (the backup
sets pgBackRest reports, the snapshot labels pgbridge keeps) and the clock; they return what to
do. Nothing here touches a process, a file or the network, so every rule is unit tested.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

BackupType = Literal["full", "diff", "incr"]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY = 86400.0


@dataclass(frozen=True)
class BackupSet:
    """One backup in the repository, as pgBackRest's `info` reports it."""

    label: str
    type: BackupType
    start: float  # epoch seconds
    stop: float
    prior: str | None = None  # the set a diff/incr depends on
    size: int = 0  # database size
    repo_size: int = 0  # bytes in the repository (compressed, encrypted)
    snapshot: str | None = None  # the snapshot name when this set is a manual snapshot


@dataclass(frozen=True)
class Policy:
    retention_days: int
    window: tuple[int, int]  # minutes after midnight UTC: start, end (end may be < start: wraps)
    full_days: frozenset[str]
    other_days: Literal["diff", "incr", "full", "none"]
    incr_every_hours: int = 0
    drill_every_days: int = 0


def parse_window(text: str) -> tuple[int, int]:
    a, b = text.split("-")
    return int(a[:2]) * 60 + int(a[3:]), int(b[:2]) * 60 + int(b[3:])


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def window_start(now: float, window: tuple[int, int]) -> float | None:
    """The start of the window `now` falls in (epoch seconds), or None outside the window."""
    t = _utc(now)
    minute = t.hour * 60 + t.minute
    start, end = window
    midnight = t.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    if start < end:
        return midnight + start * 60 if start <= minute < end else None
    if minute >= start:  # a window across midnight, evening part
        return midnight + start * 60
    if minute < end:  # its morning part: it opened yesterday
        return midnight - DAY + start * 60
    return None


def auto_sets(sets: Sequence[BackupSet]) -> list[BackupSet]:
    return [s for s in sets if s.snapshot is None]


def backup_type_for(wanted: BackupType, sets: Sequence[BackupSet]) -> BackupType:
    """The type to really take: a diff/incr whose base would be a snapshot (or missing) becomes a full.

    pgBackRest bases a diff on the newest full and an incr on the newest backup of any type. A
    snapshot must carry nothing (deleting it would take its dependants with it), so when that base
    is a snapshot, a full is taken instead.
    """
    if wanted == "full":
        return "full"
    ordered = sorted(sets, key=lambda s: s.start)
    fulls = [s for s in ordered if s.type == "full"]
    if not fulls:
        return "full"
    base = fulls[-1] if wanted == "diff" else ordered[-1]
    return "full" if base.snapshot is not None else wanted


@dataclass(frozen=True)
class Decision:
    action: Literal["backup", "expire", "drill", "wait"]
    type: BackupType | None = None
    reason: str = ""


def decide(
    now: float, policy: Policy, sets: Sequence[BackupSet], last_drill: float | None, wal_gap: bool = False
) -> list[Decision]:
    """What the scheduler should do in this cycle (in order); `wait` when nothing is due.

    `wal_gap`: WAL was dropped since the newest backup; no backup before the gap restores past it.
    """
    out: list[Decision] = []
    autos = sorted(auto_sets(sets), key=lambda s: s.start)
    opened = window_start(now, policy.window)
    if not any(s.type == "full" for s in autos):
        out.append(Decision("backup", "full", "no automated full backup yet: the first one is taken at once"))
    elif wal_gap:
        out.append(Decision("backup", "full", "WAL was dropped: a new full backup makes point-in-time restore whole"))
    elif opened is not None and autos[-1].start < opened and not any(s.start >= opened for s in autos):
        weekday = WEEKDAYS[_utc(now).weekday()]
        newest_full = max(s.start for s in autos if s.type == "full")
        if weekday in policy.full_days or now - newest_full > 7 * DAY:
            out.append(Decision("backup", "full", f"window opened; {weekday} is a full-backup day"))
        elif policy.other_days != "none":
            t = backup_type_for(policy.other_days, sets)
            out.append(Decision("backup", t, f"window opened; daily {policy.other_days}"))
    elif policy.incr_every_hours and now - autos[-1].start >= policy.incr_every_hours * 3600:
        out.append(Decision("backup", backup_type_for("incr", sets), f"{policy.incr_every_hours} h since the last"))
    if out or expire_plan(now, policy.retention_days, sets).expire:
        out.append(Decision("expire", reason=f"retention {policy.retention_days} days"))
    if policy.drill_every_days and autos and (last_drill is None or now - last_drill >= policy.drill_every_days * DAY):
        out.append(Decision("drill", reason=f"a restore drill is due every {policy.drill_every_days} days"))
    return out or [Decision("wait")]


@dataclass(frozen=True)
class ExpirePlan:
    expire: list[str]  # labels of full backups to expire (their diff/incr go with them)
    archive_retention: int  # full backups (snapshots included) whose WAL stays for PITR


def expire_plan(now: float, retention_days: int, sets: Sequence[BackupSet]) -> ExpirePlan:
    """Which automated full backups fall out of the retention window; snapshots never do.

    Every point of the last `retention_days` must stay restorable, so the newest full backup that
    finished before the window opened stays too (it is the base for its first hours). WAL is kept
    from the oldest kept automated full backup on; snapshots older than that keep only the WAL
    that makes them consistent.
    """
    cutoff = now - retention_days * DAY
    fulls = sorted((s for s in auto_sets(sets) if s.type == "full"), key=lambda s: s.start)
    keep_from = 0
    for i, s in enumerate(fulls):
        if s.stop <= cutoff:
            keep_from = i  # the newest full finished before the cutoff: the window's base
    expire = [s.label for s in fulls[:keep_from]]
    all_fulls = [s for s in sets if s.type == "full" and s.label not in expire]
    if fulls[keep_from:]:
        oldest_kept = fulls[keep_from].start
        retention = sum(1 for s in all_fulls if s.start >= oldest_kept)
    else:
        retention = max(1, len(all_fulls))
    return ExpirePlan(expire, max(1, retention))


@dataclass(frozen=True)
class Window:
    earliest: float | None  # the first restorable moment (the oldest backup's end)
    latest: float | None  # the last archived WAL


def restorable(sets: Sequence[BackupSet], latest_archived: float | None) -> Window:
    """The point-in-time restore window: from the oldest automated backup's end to the newest WAL."""
    autos = auto_sets(sets)
    if not autos:
        return Window(None, None)
    earliest = min(s.stop for s in autos)
    newest_stop = max(s.stop for s in autos)
    latest = max(newest_stop, latest_archived or 0.0)
    return Window(earliest, latest)


def set_for_time(sets: Sequence[BackupSet], target: float) -> BackupSet | None:
    """The newest backup that finished at or before `target` (the one PITR to `target` starts from)."""
    before = [s for s in sets if s.stop <= target]
    return max(before, key=lambda s: s.stop) if before else None


# -- watching WAL archiving -------------------------------------------------------------------------

ArchiveState = Literal["ok", "stalled", "dropped"]


@dataclass(frozen=True)
class ArchiveStatus:
    """pg_stat_archiver of the primary, read before the repository, and the newest segment there."""

    archived_count: int
    failed_count: int
    last_archived: float | None  # epoch seconds
    last_failed: float | None
    last_archived_wal: str | None
    last_failed_wal: str | None
    repo_max: str | None  # the newest WAL segment in the repository; None when it could not be read

    @property
    def failing(self) -> bool:
        """PostgreSQL's last attempt failed (the archiver retries the same segment until it works)."""
        return self.last_failed is not None and (self.last_archived is None or self.last_failed > self.last_archived)

    @property
    def dropped(self) -> bool | None:
        """PostgreSQL counts a segment as archived that the repository does not hold (None: unknown).

        pgBackRest reports success for the WAL it drops past archive-push-queue-max, so
        pg_stat_archiver alone looks healthy exactly when WAL is being lost. A segment is only
        marked done after it reached the repository, and the repository is read after PostgreSQL,
        so in normal operation the repository is never behind. Only plain segment names are
        compared (a .partial, .backup or .history file is the newest one for a moment only).
        """
        wal = self.last_archived_wal
        if self.repo_max is None or wal is None or len(wal) != 24 or any(c not in "0123456789ABCDEF" for c in wal):
            return None
        return wal > self.repo_max


@dataclass(frozen=True)
class ArchiveVerdict:
    state: ArchiveState
    event: Literal["archive-stalled", "archive-wal-dropped", "archive-resumed"] | None = None
    gap: bool = False  # archiving works again after WAL was dropped: PITR needs a new full backup


def watch_archive(now: float, status: ArchiveStatus, was: ArchiveState, stalled_after: float) -> ArchiveVerdict:
    """The archive's state after this look, and the event to record when it changed.

    Dropped WAL outranks a stall and stays the state until segments reach the repository again
    (between drops pgBackRest's successes would otherwise read as a recovery).
    """
    if status.dropped:
        return ArchiveVerdict("dropped", None if was == "dropped" else "archive-wal-dropped")
    since = status.last_archived
    if status.failing and (since is None or now - since > stalled_after):
        return ArchiveVerdict(was if was == "dropped" else "stalled", "archive-stalled" if was == "ok" else None)
    if was != "ok" and not status.failing and status.dropped is False:
        return ArchiveVerdict("ok", "archive-resumed", gap=was == "dropped")
    return ArchiveVerdict(was)
