"""Pure backup code: scheduling, retention (snapshots are never expired), PITR window, rendering."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pgbridge.errors import SpecError
from pgbridge.plan.backup import (
    DAY,
    ArchiveStatus,
    ArchiveVerdict,
    BackupSet,
    Policy,
    backup_type_for,
    decide,
    expire_plan,
    parse_window,
    restorable,
    set_for_time,
    watch_archive,
    window_start,
)
from pgbridge.platform.pgbackrest import Layout, PgHost, RepoSettings, archive_command, parse_info, render_conf
from pgbridge.spec.load import parse_spec


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def full(label: str, start: float, snapshot: str | None = None) -> BackupSet:
    return BackupSet(label, "full", start, start + 600, snapshot=snapshot)


def policy(**kw: object) -> Policy:
    base: dict[str, object] = {
        "retention_days": 7,
        "window": parse_window("03:00-04:00"),
        "full_days": frozenset({"sun"}),
        "other_days": "diff",
    }
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


# 2025-06-01 is a Sunday
SUN_0310 = ts("2025-06-01T03:10:00")
MON_0310 = ts("2025-06-02T03:10:00")


def test_window_start_plain_and_across_midnight() -> None:
    assert window_start(SUN_0310, (180, 240)) == ts("2025-06-01T03:00:00")
    assert window_start(ts("2025-06-01T04:00:00"), (180, 240)) is None
    assert window_start(ts("2025-06-01T02:59:59"), (180, 240)) is None
    w = parse_window("23:30-00:30")
    assert window_start(ts("2025-06-01T23:45:00"), w) == ts("2025-06-01T23:30:00")
    assert window_start(ts("2025-06-02T00:10:00"), w) == ts("2025-06-01T23:30:00")
    assert window_start(ts("2025-06-02T00:31:00"), w) is None


def test_first_full_backup_is_taken_at_once_even_outside_the_window() -> None:
    d = decide(ts("2025-06-01T12:00:00"), policy(), [], None)
    assert (d[0].action, d[0].type) == ("backup", "full")


def test_full_on_full_days_diff_on_others_once_per_window() -> None:
    sets = [full("F1", SUN_0310 - 7 * DAY)]
    assert decide(SUN_0310, policy(), sets, None)[0].type == "full"
    sets = [full("F1", SUN_0310)]
    d = decide(MON_0310, policy(), sets, None)
    assert (d[0].action, d[0].type) == ("backup", "diff")
    # already taken in this window: nothing
    sets.append(BackupSet("D1", "diff", MON_0310 - 300, MON_0310 - 200, prior="F1"))
    assert decide(MON_0310, policy(), sets, None)[0].action == "wait"
    # outside the window: nothing
    assert decide(MON_0310 + 3 * 3600, policy(), sets[:1], None)[0].action == "wait"
    # other_days none: only fulls
    assert decide(MON_0310, policy(other_days="none"), sets[:1], None)[0].action == "wait"


def test_a_full_is_forced_when_the_last_is_a_week_old() -> None:
    sets = [full("F1", MON_0310 - 8 * DAY)]
    assert decide(MON_0310, policy(full_days=frozenset({"sat"})), sets, None)[0].type == "full"


def test_hourly_incrementals_between_windows() -> None:
    sets = [full("F1", SUN_0310)]
    later = SUN_0310 + 5 * 3600
    assert decide(later, policy(incr_every_hours=4), sets, None)[0].type == "incr"
    assert decide(later, policy(incr_every_hours=6), sets, None)[0].action == "wait"


def test_a_wal_gap_asks_for_a_full_backup_at_once() -> None:
    sets = [full("F1", SUN_0310)]
    now = SUN_0310 + 2 * 3600  # outside the window, nothing else due
    assert decide(now, policy(), sets, None)[0].action == "wait"
    d = decide(now, policy(), sets, None, wal_gap=True)[0]
    assert (d.action, d.type) == ("backup", "full") and "WAL was dropped" in d.reason


SEG = "0000000100000000000000"


def archiver(last_ok: float | None, last_fail: float | None, ok_wal: str | None, repo: str | None) -> ArchiveStatus:
    return ArchiveStatus(5, 3, last_ok, last_fail, ok_wal, SEG + "0A", repo)


def test_archive_stall_after_its_period_then_resumed() -> None:
    now = 10_000.0
    failing = archiver(now - 30, now - 1, SEG + "09", SEG + "09")
    assert watch_archive(now, failing, "ok", 60).event is None  # failing, but not for long yet
    v = watch_archive(now, failing, "ok", 20)
    assert (v.state, v.event) == ("stalled", "archive-stalled")
    assert watch_archive(now, failing, "stalled", 20).event is None  # said once
    healthy = archiver(now - 1, now - 30, SEG + "0A", SEG + "0A")
    v = watch_archive(now, healthy, "stalled", 20)
    assert (v.state, v.event, v.gap) == ("ok", "archive-resumed", False)
    # an unreadable repository is not a recovery
    assert watch_archive(now, archiver(now - 1, now - 30, SEG + "0A", None), "stalled", 20).state == "stalled"


def test_dropped_wal_is_not_a_recovery() -> None:
    now = 10_000.0
    # pgBackRest told PostgreSQL that 0C was archived, but the repository ends at 09: it was dropped
    dropping = archiver(now - 1, now - 5, SEG + "0C", SEG + "09")
    assert dropping.dropped and not dropping.failing
    v = watch_archive(now, dropping, "stalled", 20)
    assert (v.state, v.event) == ("dropped", "archive-wal-dropped")
    assert watch_archive(now, dropping, "dropped", 20) == ArchiveVerdict("dropped")
    # failing again between drops: still the dropped state, no second event
    again = archiver(now - 60, now - 1, SEG + "0C", SEG + "09")
    assert watch_archive(now, again, "dropped", 20).state == "dropped"
    assert watch_archive(now, again, "dropped", 20).event is None
    # a segment really reached the repository: resumed, with a gap a full backup must close
    v = watch_archive(now, archiver(now - 1, now - 60, SEG + "0D", SEG + "0D"), "dropped", 20)
    assert (v.state, v.event, v.gap) == ("ok", "archive-resumed", True)
    # names that are not plain segments give no verdict on drops
    assert archiver(now, None, "00000002.history", SEG + "09").dropped is None
    assert archiver(now, None, SEG + "0C.partial", SEG + "09").dropped is None


def test_drill_is_due_by_its_interval() -> None:
    sets = [full("F1", SUN_0310)]
    now = SUN_0310 + 2 * 3600
    assert [x.action for x in decide(now, policy(drill_every_days=90), sets, None)] == ["drill"]
    assert decide(now, policy(drill_every_days=90), sets, now - 10 * DAY)[0].action == "wait"
    assert decide(now, policy(drill_every_days=90), sets, now - 91 * DAY)[0].action == "drill"


def test_nothing_depends_on_a_snapshot() -> None:
    sets = [full("F1", 1000), full("S1", 2000, snapshot="keep")]
    assert backup_type_for("diff", sets) == "full"
    assert backup_type_for("incr", sets) == "full"
    sets.append(full("F2", 3000))
    assert backup_type_for("diff", sets) == "diff"
    assert backup_type_for("incr", [*sets, BackupSet("I1", "incr", 4000, 4100, prior="F2")]) == "incr"
    assert backup_type_for("diff", []) == "full"


def test_retention_expires_old_fulls_keeps_the_base_of_the_window_and_every_snapshot() -> None:
    now = 100 * DAY
    sets = [
        full("F1", now - 30 * DAY),
        full("S1", now - 25 * DAY, snapshot="quarter-end"),
        full("F2", now - 20 * DAY),
        BackupSet("D2", "diff", now - 19 * DAY, now - 19 * DAY + 60, prior="F2"),
        full("F3", now - 9 * DAY),  # finished before the 7-day cutoff: the window's base, kept
        full("F4", now - 2 * DAY),
    ]
    plan = expire_plan(now, 7, sets)
    assert plan.expire == ["F1", "F2"]
    assert "S1" not in plan.expire
    assert plan.archive_retention == 2  # F3 and F4 keep their WAL; the older snapshot only its own
    # everything in the window: nothing expires
    assert expire_plan(now, 35, sets).expire == []
    # a newer snapshot counts toward the fulls whose WAL is kept
    plan = expire_plan(now, 7, [*sets, full("S2", now - DAY, snapshot="s2")])
    assert plan.archive_retention == 3
    # only snapshots: nothing to expire
    assert expire_plan(now, 1, [full("S", 0, snapshot="x")]).expire == []


def test_restorable_window_and_the_set_for_a_time() -> None:
    sets = [full("F1", 1000), full("S1", 5000, snapshot="s"), full("F2", 9000)]
    w = restorable(sets, latest_archived=12000)
    assert (w.earliest, w.latest) == (1600, 12000)
    assert restorable([], 5).earliest is None
    assert set_for_time(sets, 9599) is not None and set_for_time(sets, 9599).label == "S1"  # type: ignore[union-attr]
    assert set_for_time(sets, 9600).label == "F2"  # type: ignore[union-attr]
    assert set_for_time(sets, 100) is None


def layout() -> Layout:
    return Layout(Path("/h/backup"))


def repo(**kw: object) -> RepoSettings:
    base: dict[str, object] = {
        "kind": "local",
        "path": "/h/backup/repo",
        "cipher_pass": "s3cr3t",
        "compression": "lz4",
        "compression_level": None,
        "archive_queue_max_mb": 512,
    }
    base.update(kw)
    return RepoSettings(**base)  # type: ignore[arg-type]


def test_render_conf_local_encrypted_with_every_member() -> None:
    hosts = [PgHost(Path("/h/data/a-1"), 5433, Path("/h/run")), PgHost(Path("/h/data/a-2"), 6000, Path("/h/run"))]
    text = render_conf("a", layout(), repo(), hosts, "pgbridge_admin")
    lines = text.splitlines()
    for want in ("repo1-path=/h/backup/repo", "repo1-cipher-type=aes-256-cbc", "repo1-cipher-pass=s3cr3t",
                 "archive-async=y", "archive-push-queue-max=512MiB", "spool-path=/h/backup/spool",
                 "lock-path=/h/backup/lock", "log-path=/h/backup/log", "expire-auto=n", "[a]",
                 "pg1-path=/h/data/a-1", "pg2-port=6000", "pg2-user=pgbridge_admin"):  # fmt: skip
        assert want in lines, want
    plain = render_conf("a", layout(), repo(cipher_pass=None, compression="zst", compression_level=3), hosts[:1], "x")
    assert "cipher" not in plain and "compress-type=zst" in plain and "compress-level=3" in plain


def test_render_conf_s3() -> None:
    r = repo(kind="s3", path="/pgbridge/a", s3_bucket="bk", s3_endpoint="minio:9000", s3_uri_style="path",
             s3_verify_tls=False, s3_key="AK", s3_secret="SK")  # fmt: skip
    lines = render_conf("a", layout(), r, [], "x").splitlines()
    wanted = ["repo1-type=s3", "repo1-s3-bucket=bk", "repo1-s3-endpoint=minio:9000", "repo1-s3-uri-style=path",
              "repo1-s3-verify-tls=n", "repo1-s3-key=AK", "repo1-s3-key-secret=SK",
              "repo1-path=/pgbridge/a"]  # fmt: skip
    for want in wanted:
        assert want in lines, want


def test_archive_command_pushes_the_members_own_wal() -> None:
    cmd = archive_command("/usr/bin/pgbackrest", Path("/h/backup/pgbackrest.conf"), "a")
    assert cmd == '/usr/bin/pgbackrest --config=/h/backup/pgbackrest.conf --stanza=a --pg1-path="$PWD" archive-push %p'


def test_parse_info_marks_snapshots_and_skips_errored_sets() -> None:
    doc = [
        {
            "name": "a",
            "cipher": "aes-256-cbc",
            "archive": [{"id": "15-1", "min": "000000010000000000000002", "max": "000000010000000000000009"}],
            "backup": [
                {"label": "F1", "type": "full", "timestamp": {"start": 10, "stop": 20}, "prior": None,
                 "info": {"size": 100, "repository": {"delta": 30}}, "error": False},
                {"label": "F2", "type": "full", "timestamp": {"start": 30, "stop": 40}, "prior": None,
                 "info": {"size": 100, "repository": {"delta": 30}}, "error": True},
                {"label": "I1", "type": "incr", "timestamp": {"start": 50, "stop": 55}, "prior": "F1",
                 "info": {"size": 100, "repository": {"delta": 3}}, "error": False},
            ],
            "status": {"code": 0, "message": "ok"},
        }
    ]  # fmt: skip
    sets, meta = parse_info(doc, "a", {"keep": "F1"})
    assert [(s.label, s.type, s.snapshot) for s in sets] == [("F1", "full", "keep"), ("I1", "incr", None)]
    assert sets[1].prior == "F1" and sets[0].repo_size == 30 and meta["archive"]["id"] == "15-1"
    assert parse_info(doc, "other", {}) == ([], {})


@pytest.mark.parametrize(
    ("backup", "words"),
    [
        ({"retention_days": 0}, "greater than or equal to 1"),
        ({"retention_days": 36}, "less than or equal to 35"),
        ({"window": "3am"}, "HH:MM-HH:MM"),
        ({"window": "03:00-03:10"}, "shorter than 30 minutes"),
        ({"schedule": {"full_days": ["sunday"]}}, "sun"),
        ({"repository": {"type": "s3"}}, "needs s3_bucket and s3_endpoint"),
        ({"repository": {"path": "relative/repo"}}, "must be absolute"),
        ({"compression": "lz4", "compression_level": 15}, "too high for lz4"),
        ({"archive_timeout": 1}, "greater than or equal to 10"),
        ({"drill": {"checks": [{"name": "x"}]}}, "sql"),
    ],
)
def test_bad_backup_specs_are_refused(backup: dict[str, object], words: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "a", "backup": backup}, "t.yaml")
    assert words in str(e.value)


def test_backup_defaults() -> None:
    b = parse_spec({"name": "a"}, "t.yaml").backup
    assert b.enabled and b.encryption and b.retention_days == 7 and b.repository.type == "local"
