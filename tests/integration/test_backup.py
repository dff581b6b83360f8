"""Backups through the CLI on one real deployment: archiving, encryption, PITR, snapshots, drills,
scheduled drills, and a stalled archive that drops WAL past its queue limit.

The tests share one deployment and run in file order (the last one damages the repository).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgbridge.errors import DeploymentError
from pgbridge.home import Home
from pgbridge.ops import backup as backup_ops
from pgbridge.platform import system
from pgbridge.platform.pgbackrest import PgBackRest
from pgbridge.settings import load_settings
from tests.conftest import PGBRIDGE, Env, make_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="needs pgbackrest"),
]

SPEC = """\
backup:
  archive_timeout: 10
  archive_stalled_after: 10
  drill:
    checks:
      - {name: rows present, sql: "SELECT count(*) > 0 FROM shop.t"}
"""
MARKER = "PLAINTEXT-MARKER-7f3a9c"


@pytest.fixture(scope="module")
def dep() -> Iterator[Env]:
    e = make_env("bk")
    e.write_spec(SPEC)
    try:
        e.run("up", timeout=600)
        yield e
    finally:
        for extra in (e.base / "homes").glob("*"):
            if extra.name != e.name:
                subprocess.run([*pgbridge(e), "--home", str(extra), "destroy", "--yes"], env=e.env(), check=False,
                               capture_output=True, timeout=300)  # fmt: skip
        e.cleanup()


def pgbridge(e: Env) -> list[str]:
    """The CLI without the fixture's -f (commands that name another deployment with --name)."""
    return [PGBRIDGE]


def sql(e: Env, query: str, home: Path | None = None) -> list[tuple[object, ...]]:
    """As the admin role over the deployment's socket (root is mapped to it by pg_ident)."""
    h = home or e.home
    port = json.loads((h / "state.json").read_text())["ports"]["postgres"]
    with psycopg.connect(host=str(h / "run"), port=port, user="pgbridge_admin", dbname="shop", autocommit=True) as c:
        cur = c.execute(query.encode())
        return cur.fetchall() if cur.description else []


def listing(e: Env) -> dict:
    return json.loads(e.run("backup", "list", "--json").stdout)  # type: ignore[no-any-return]


def test_archiving_on_and_first_full_backup_by_the_scheduler(dep: Env) -> None:
    assert sql(dep, "SHOW archive_mode") == [("on",)]
    deadline = time.monotonic() + 90
    while not (backups := listing(dep)["backups"]):
        assert time.monotonic() < deadline, (dep.home / "logs" / "backup-scheduler.log").read_text()
        time.sleep(2)
    assert backups[0]["type"] == "full" and backups[0]["snapshot"] is None
    events = json.loads(dep.run("events", "--kind", "backup", "--json").stdout)
    assert any("scheduled full backup" in ev["message"] for ev in events)
    # the repository and pgBackRest's working files are the service user's, inside the home
    conf = dep.home / "backup" / "pgbackrest.conf"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    assert all(str(dep.home) in line for line in conf.read_text().splitlines() if line.split("=")[0].endswith("path"))


def test_repository_is_unreadable_without_the_key(dep: Env) -> None:
    sql(dep, "CREATE TABLE shop.t (id int PRIMARY KEY, note text)")
    sql(dep, f"INSERT INTO shop.t SELECT g, '{MARKER}' FROM generate_series(1, 2000) g")
    r = dep.run("backup", "create", "--type", "incr", "--json")
    assert json.loads(r.stdout)["type"] == "incr"
    assert listing(dep)["encrypted"] is True
    repo = dep.home / "backup" / "repo"
    files = [p for p in repo.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert not any(MARKER.encode() in p.read_bytes() for p in files)
    # pgBackRest with a wrong cipher pass, and with none, cannot read the repository
    conf = (dep.home / "backup" / "pgbackrest.conf").read_text()
    good = next(ln for ln in conf.splitlines() if ln.startswith("repo1-cipher-pass="))
    for bad in (conf.replace(good, "repo1-cipher-pass=wrong-key-0123456789"),
                conf.replace(good, "").replace("repo1-cipher-type=aes-256-cbc", "")):  # fmt: skip
        tmp = dep.base / "wrong.conf"
        tmp.write_text(bad)
        os.chmod(tmp, 0o644)
        pb = PgBackRest(Path(shutil.which("pgbackrest") or ""), tmp, dep.name, load_settings().user)
        proc = subprocess.run(pb.argv("info", "--output=json"), capture_output=True, check=False)
        stdout = proc.stdout.decode(errors="replace")  # a wrong key decrypts to garbage
        # pgBackRest reports the stanza in error (code 99) and lists no backup set
        assert proc.returncode != 0 or '"message":"ok"}}]' not in stdout, stdout
        assert '"label"' not in stdout, "backups listed without the key"


def test_pitr_between_two_commits_into_a_new_deployment(dep: Env) -> None:
    sql(dep, "CREATE TABLE shop.pitr (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
    sql(dep, "INSERT INTO shop.pitr (id) VALUES (1)")
    time.sleep(1.0)
    target = sql(dep, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0][0]
    time.sleep(1.0)
    sql(dep, "INSERT INTO shop.pitr (id) VALUES (2)")
    new = f"{dep.name}-pitr"
    dep.run("restore", "--to-time", str(target), "--name", new, timeout=600)
    new_home = dep.home.parent / new
    # The copy fetched WAL with its own lock: the source's archiving goes on at once (with the
    # source's archive lock taken, its next push waited pgBackRest's 60 s archive-timeout).
    seg, deadline = wal_segment(dep), time.monotonic() + 20
    while (archiver(dep)["last_archived_wal"] or "") < seg:
        assert time.monotonic() < deadline, f"{seg} not archived 20 s after the restore: {archiver(dep)}"
        time.sleep(0.5)
    assert sql(dep, "SELECT id FROM shop.pitr ORDER BY id", home=new_home) == [(1,)]
    assert sql(dep, "SELECT count(*) FROM shop.t", home=new_home) == [(2000,)]
    # a full pgbridge deployment: status, connect and destroy work on it
    proc = subprocess.run([*pgbridge(dep), "--name", new, "status", "--json"], env=dep.env(), capture_output=True,
                          text=True, check=True)  # fmt: skip
    st = json.loads(proc.stdout)
    assert st["status"] == "available" and st["ports"]["postgres"] != dep.port
    assert "backup-scheduler" in st["processes"]
    query = "SELECT count(*) FROM pg_class WHERE relname = 'pitr'"
    proc = subprocess.run([*pgbridge(dep), "--name", new, "connect", "--", "-Atc", query],
                          env=dep.env(), capture_output=True, text=True, check=True)  # fmt: skip
    assert proc.stdout.strip() == "1"
    # the source is untouched: both rows, still timeline 1, and nothing from the copy in its archive
    assert sql(dep, "SELECT id FROM shop.pitr ORDER BY id") == [(1,), (2,)]
    members = json.loads(dep.run("status", "--json").stdout)["members"]
    assert [(m["role"], m["timeline"]) for m in members] == [("primary", 1)]
    archive = dep.home / "backup" / "repo" / "archive" / dep.name
    assert not [p.name for p in archive.rglob("*") if p.is_file() and not p.name.startswith(("00000001", "archive"))]
    subprocess.run([*pgbridge(dep), "--name", new, "destroy", "--yes"], env=dep.env(), capture_output=True, check=True)
    assert not new_home.exists()


def test_stanza_create_waits_for_an_archiver_holding_the_lock(dep: Env) -> None:
    """A new deployment's PostgreSQL starts archive-push at once, and its asynchronous archiver
    holds the archive lock while stanza-create wants it (a restore failed on this in CI)."""
    pb = backup_ops.tool(load_settings(), Home(dep.home), dep.name)
    lock = dep.home / "backup" / "lock" / f"{dep.name}-archive.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
    system.chown(lock, load_settings().user)  # pgBackRest (the service user) opens it to lock it
    release = threading.Timer(2.0, fcntl.flock, (fd, fcntl.LOCK_UN))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # without a wait, pgBackRest gives up on the lock at once: the lock is the one it takes
        with pytest.raises(DeploymentError, match="unable to acquire lock"):
            pb.run("stanza-create", what="creating the backup stanza")
        release.start()
        t0 = time.monotonic()
        pb.stanza_create()  # an existing stanza that matches: a no-op once it has the lock
        assert time.monotonic() - t0 >= 1.9
    finally:
        release.cancel()
        if release.is_alive():
            release.join()
        os.close(fd)  # closing lets go of the lock too


def test_snapshots_survive_retention_and_restore(dep: Env) -> None:
    dep.run("backup", "create", "--snapshot", "keep1")
    sql(dep, "INSERT INTO shop.pitr (id) VALUES (3)")
    r = json.loads(dep.run("backup", "create", "--type", "diff", "--json").stdout)
    assert r["type"] == "full", "a diff on top of a snapshot must become a full"
    before = listing(dep)
    autos = [b["label"] for b in before["backups"] if b["snapshot"] is None and b["type"] == "full"]
    assert len(autos) >= 2
    # retention as seen three days from now with 1 day kept: every automated full but the newest goes
    pb = backup_ops.tool(load_settings(), Home(dep.home), dep.name)
    gone = backup_ops.expire(pb, Home(dep.home), 1, now=time.time() + 3 * 86400)
    assert sorted(gone) == sorted(autos[:-1])
    after = listing(dep)
    labels = {b["label"]: b for b in after["backups"]}
    assert autos[-1] in labels and not set(autos[:-1]) & set(labels)
    assert any(b["snapshot"] == "keep1" for b in after["backups"]), "retention expired a snapshot"
    # a snapshot restores to its own moment: row 3 came later
    new = f"{dep.name}-snap"
    dep.run("restore", "--snapshot", "keep1", "--name", new, timeout=600)
    assert sql(dep, "SELECT id FROM shop.pitr ORDER BY id", home=dep.home.parent / new) == [(1,), (2,)]
    subprocess.run([*pgbridge(dep), "--name", new, "destroy", "--yes"], env=dep.env(), capture_output=True, check=True)
    dep.run("backup", "delete-snapshot", "keep1")
    assert not listing(dep)["snapshots"]
    assert not any(b["snapshot"] for b in listing(dep)["backups"])


def test_bad_input_is_refused_cleanly(dep: Env) -> None:
    cases = [
        (["restore", "--to-time", "2001-01-01T00:00:00Z", "--name", "x1"], "outside the restorable window"),
        (["restore", "--to-time", "next tuesday", "--name", "x1"], "is not a time"),
        (["restore", "--snapshot", "nope", "--name", "x1"], "no snapshot named 'nope'"),
        (["restore", "--latest", "--name", dep.name], "already in use"),
        (["restore", "--latest", "--snapshot", "a", "--name", "x1"], "exactly one of"),
        (["backup", "delete-snapshot", "nope"], "no snapshot named"),
        (["backup", "create", "--type", "incr", "--snapshot", "s1"], "always a full backup"),
        (["backup", "create", "--snapshot", "Bad_Name"], "is not allowed"),
    ]
    for args, words in cases:
        r = dep.run(*args, check=False)
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)
    env = {**dep.env(), "PGBRIDGE_PGBACKREST": "/nonexistent/pgbackrest"}
    r = dep.run("backup", "list", check=False, env=env)
    assert r.returncode == 3 and "apt-get install -y pgbackrest" in r.stderr
    assert sorted(p.name for p in dep.home.parent.iterdir() if not p.name.startswith(".")) == [dep.name]


def events_of(e: Env, kind: str) -> list[dict]:
    return json.loads(e.run("events", "--kind", kind, "--json").stdout)  # type: ignore[no-any-return]


def wait_event(e: Env, kind: str, since: float, timeout: float = 60) -> dict:
    """The first event of `kind` recorded after `since` (archive_stalled_after 10: a 5 s scheduler cycle)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [ev for ev in events_of(e, kind) if ev["time"] > since]
        if found:
            return found[0]
        log = (e.home / "logs" / "backup-scheduler.log").read_text()
        assert time.monotonic() < deadline, f"no {kind} event within {timeout:.0f}s\n" + "\n".join(
            log.splitlines()[-8:]
        )
        time.sleep(1)


def scheduler_pid(e: Env) -> int:
    return int(json.loads(e.run("status", "--json").stdout)["processes"]["backup-scheduler"]["pid"])


def processes_using(path: Path) -> list[str]:
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmd:
            out.append(f"{proc.name}: {cmd}")
    return out


def test_scheduled_drill_runs_when_due_and_up_keeps_the_scheduler(dep: Env) -> None:
    # Quarterly drills, and a smaller archive queue (the next test needs it): `up` rewrites
    # pgbackrest.conf, which pgBackRest reads on every run, so the scheduler keeps running.
    pid = scheduler_pid(dep)
    conf = dep.home / "backup" / "pgbackrest.conf"
    assert "archive-push-queue-max=1024MiB" in conf.read_text()
    dep.write_spec(SPEC.replace("  drill:\n", "  archive_queue_max_mb: 64\n  drill:\n    every_days: 90\n"))
    t0 = time.time()
    dep.run("up", timeout=600)
    assert "archive-push-queue-max=64MiB" in conf.read_text()
    assert scheduler_pid(dep) == pid, "the scheduler was restarted though its own config did not change"
    # No drill has run yet, so one is due at once: the scheduler runs it on its next cycle.
    ev = wait_event(dep, "drill-restore", t0, timeout=120)
    assert ev["scheduled"] is True and ev["message"].startswith("scheduled restore drill passed"), ev
    assert 0 < ev["restore_seconds"] < 120 and ev["tables"] >= 1
    assert not events_of(dep, "drill-restore-failed")
    # the scratch copy is gone (files and processes), and the drill is recorded where the
    # scheduler (the service user) reads it, so the next one is 90 days away
    scratch = dep.home / "backup" / "scratch"
    assert not list(scratch.iterdir()), "the scheduled drill left its copy behind"
    assert not processes_using(scratch), processes_using(scratch)
    last = dep.home / "backup" / "last-drill.json"
    assert last.stat().st_uid == load_settings().user.uid
    done = json.loads(last.read_text())
    assert done["ok"] and done["scheduled"] and done["time"] == pytest.approx(ev["time"], abs=600)
    assert done["checks"] == [{"name": "rows present", "ok": True, "detail": ""}]
    assert "drill ok in" in (dep.home / "logs" / "backup-scheduler.log").read_text()


def wal_segment(e: Env) -> str:
    """Write a little and close the current WAL segment: one more segment for the archiver."""
    sql(e, "CREATE TABLE IF NOT EXISTS shop.wal (at timestamptz DEFAULT now()); INSERT INTO shop.wal DEFAULT VALUES")
    return str(sql(e, "SELECT pg_walfile_name(pg_switch_wal())")[0][0])


def archiver(e: Env) -> dict:
    cols = "archived_count, failed_count, last_archived_wal, last_failed_wal"
    return dict(zip(cols.split(", "), sql(e, f"SELECT {cols} FROM pg_stat_archiver")[0], strict=True))


def ready_files(e: Env) -> list[str]:
    """WAL segments PostgreSQL keeps in pg_wal until they are archived."""
    rows = sql(e, "SELECT name FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready' ORDER BY 1")
    return [str(r[0]).removesuffix(".ready") for r in rows]


def test_a_stalled_archive_is_reported_drops_wal_past_the_queue_limit_and_recovers(dep: Env) -> None:
    conf = (dep.home / "backup" / "pgbackrest.conf").read_text()
    assert "archive-push-queue-max=64MiB" in conf, "the test before sets a 64 MiB queue"
    assert not ready_files(dep)
    archive = dep.home / "backup" / "repo" / "archive" / dep.name
    folders = [p for p in archive.rglob("*") if p.is_dir()]
    modes = {p: p.stat().st_mode & 0o777 for p in folders}
    t0 = time.time()
    # The repository turns read-only for the service user (a full or read-only volume): pushes fail.
    for p in folders:
        os.chmod(p, 0o550)
    try:
        first = wal_segment(dep)
        stalled = wait_event(dep, "archive-stalled", t0)
        assert stalled["last_archived"] is None or stalled["last_archived"] < stalled["time"] - 10
        assert first in stalled["message"] and archiver(dep)["last_failed_wal"] == first
        assert ready_files(dep), "a stalled segment stays in pg_wal while under the queue limit"
        # Past 64 MiB of waiting WAL (five 16 MiB segments) pgBackRest drops it and tells PostgreSQL
        # it was archived: pg_wal does not fill up, and pg_stat_archiver alone looks healthy again.
        t1 = time.time()
        for _ in range(5):
            wal_segment(dep)
        dropped = wait_event(dep, "archive-wal-dropped", t1)
        assert dropped["repo_max"] < first <= dropped["last_archived_wal"], dropped
        assert not events_of(dep, "archive-resumed"), "WAL being dropped was reported as archiving resumed"
        assert first not in ready_files(dep)
        logs = "".join(p.read_text() for p in (dep.home / "backup" / "log").glob("*archive-push*"))
        assert f"dropped WAL file '{first}' because archive queue exceeded 64MB" in logs
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    # Repaired: the next segment reaches the repository, the scheduler says so and, because WAL
    # was lost, takes a full backup at once (PITR cannot cross the gap; it can from this backup on).
    t2 = time.time()
    after = wal_segment(dep)
    resumed = wait_event(dep, "archive-resumed", t2)
    assert resumed["gap"] is True and resumed["repo_max"] > dropped["last_archived_wal"], resumed
    backup = wait_event(dep, "backup", t2, timeout=90)
    assert backup["type"] == "full" and "WAL was dropped" in backup["message"], backup
    # The backup's end switches WAL: the archiver takes its history file and that segment moments later.
    deadline = time.monotonic() + 30
    while (waiting := ready_files(dep)) and time.monotonic() < deadline:
        time.sleep(0.2)
    a = archiver(dep)
    assert a["last_archived_wal"] >= after and not waiting, (a, waiting)
    assert listing(dep)["archive"]["max"] >= a["last_archived_wal"][:24]  # it may be the backup's .backup file


def test_drill_passes_and_fails_loudly_on_a_damaged_backup(dep: Env) -> None:
    r = json.loads(dep.run("drill", "restore", "--json", timeout=600).stdout)
    assert r["ok"] and r["amcheck"] == "ok"
    assert r["row_counts"]["shop.shop.t"] == 2000 and r["row_counts"]["shop.shop.pitr"] == 3
    assert r["checks"] == [{"name": "rows present", "ok": True, "detail": ""}]
    assert not list((dep.home / "backup" / "scratch").iterdir()), "the drill left its copy behind"
    # damage every backup set: flip bytes in the middle of its largest file
    for label_dir in (dep.home / "backup" / "repo" / "backup" / dep.name).glob("2*"):
        biggest = max((p for p in label_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data = bytearray(biggest.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        biggest.write_bytes(bytes(data))
    r2 = dep.run("drill", "restore", check=False, timeout=600)
    assert r2.returncode == 7 and "restore drill failed" in r2.stderr, r2.stderr
    events = json.loads(dep.run("events", "--json").stdout)
    assert [e["kind"] for e in events if e["kind"].startswith("drill-restore")][-2:] == [
        "drill-restore",
        "drill-restore-failed",
    ]
    # a restore that fails half-way leaves no new deployment behind
    r3 = dep.run("restore", "--latest", "--name", f"{dep.name}-bad", check=False, timeout=600)
    assert r3.returncode != 0
    assert not (dep.home.parent / f"{dep.name}-bad").exists()
