"""Backup benchmark (not a test): full backup vs pg_basebackup, incremental, PITR restore, freshness.

    python bench/backup.py [--gb 1.0]

On one real deployment (default spec: lz4, AES-256, archive_timeout 30 s) with a table of about
`--gb` GiB it measures, in the same run:

- a full pgBackRest backup (compressed, encrypted) against `pg_basebackup -Fp -X stream` of the
  same data;
- an incremental backup after 5% of the rows changed;
- a point-in-time restore into a new deployment (total, and the restore + WAL replay part);
- PITR freshness: a client commits numbered rows and notes when each was acknowledged; the
  primary's whole process tree is SIGKILLed (the host vanishes); `restore --latest` builds a new
  deployment, and the acknowledged rows missing from it give the lost window in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psycopg

from rig import Rig, deployment, say

ROW_BYTES = 128  # measured heap bytes per row of the bench table (tuple + header + page overhead)


def admin(rig: Rig, home: Path | None = None) -> psycopg.Connection:
    h = home or rig.home
    port = json.loads((h / "state.json").read_text())["ports"]["postgres"]
    return psycopg.connect(host=str(h / "run"), port=port, user="pgbridge_admin", dbname="shop", autocommit=True)


def timed(rig: Rig, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = rig.cli(*args, timeout=7200)
    return time.perf_counter() - t0, out


def load(rig: Rig, gib: float) -> int:
    rows = int(gib * 1024**3 / ROW_BYTES)
    with admin(rig) as c:
        c.execute("CREATE TABLE shop.big (id bigint PRIMARY KEY, v int NOT NULL, pad text NOT NULL)")
        step = 1_000_000
        for lo in range(0, rows, step):
            c.execute(
                "INSERT INTO shop.big SELECT g, g %% 1000, md5(g::text) || md5((g + 1)::text)"
                " FROM generate_series(%s, %s) g",
                (lo + 1, min(rows, lo + step)),
            )
        c.execute("CHECKPOINT")
        size = c.execute("SELECT pg_database_size('shop')").fetchone()
    assert size is not None
    return int(size[0])


def basebackup(rig: Rig) -> float:
    target = rig.base / "basebackup"
    target.mkdir()
    shutil.chown(target, "postgres")
    port = json.loads(rig.home.joinpath("state.json").read_text())["ports"]["postgres"]
    argv = ["pg_basebackup", "-h", str(rig.home / "run"), "-p", str(port), "-U", "postgres",
            "-D", str(target / "data"), "-Fp", "-X", "stream", "-c", "fast"]  # fmt: skip
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    took = time.perf_counter() - t0
    shutil.rmtree(target)
    return took


def kill_everything(rig: Rig) -> None:
    """The host vanishes: SIGKILL supervisord's tree and every postmaster of the home, by pid."""
    from tests.pgserver import kill_home_processes  # importable once rig put the repository root on sys.path

    kill_home_processes(rig.home)


def freshness(rig: Rig, seconds: float) -> dict[str, float]:
    with admin(rig) as c:
        c.execute("CREATE TABLE shop.acks (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())")
        c.execute("GRANT SELECT, INSERT ON shop.acks TO shop_app")
    acked: dict[int, float] = {}
    stop = threading.Event()

    def writer() -> None:
        dsn = rig.run("secrets", "get", "shop_app", "--dsn").stdout.strip()
        with psycopg.connect(dsn, autocommit=True) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    c.execute("INSERT INTO shop.acks (id) VALUES (%s)", (i,))
                except psycopg.Error:
                    return
                acked[i] = time.time()
                time.sleep(0.05)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(seconds)
    kill_everything(rig)
    stop.set()
    t.join(10)
    last_id = max(acked)
    say(f"  primary killed after {len(acked)} acknowledged commits")
    name = f"{rig.name}-fresh"
    took, _ = timed(rig, "restore", "--latest", "--name", name)
    home = rig.home.parent / name
    try:
        with admin(rig, home) as c:
            row = c.execute("SELECT coalesce(max(id), 0) FROM shop.acks").fetchone()
            have = int(row[0]) if row else 0
    finally:
        rig.run("--home", str(home), "destroy", "--yes", check=False)
    lost = last_id - have
    lost_s = acked[last_id] - acked[have] if have in acked and lost else 0.0
    return {"acked": float(last_id), "restored": float(have), "lost_rows": float(lost), "lost_s": lost_s,
            "restore_s": took}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0, help="size of the table to back up, GiB")
    ap.add_argument("--fresh-seconds", type=float, default=60.0, help="how long the writer runs before the kill")
    a = ap.parse_args()
    with deployment("", label="backup", instance_class="db.small", size_gb=20) as rig:
        t0 = time.perf_counter()
        size = load(rig, a.gb)
        say(f"loaded {size / 1024**3:.2f} GiB in {time.perf_counter() - t0:.0f}s")
        full_s, out = timed(rig, "backup", "create", "--type", "full", "--json")
        full = json.loads(out)
        base_s = basebackup(rig)
        say(f"full backup (pgBackRest, lz4, AES-256): {full_s:.1f}s, {full['repo_size'] / 1024**2:.0f} MiB stored")
        say(f"pg_basebackup -Fp -X stream, same data: {base_s:.1f}s  (ratio {full_s / base_s:.2f})")
        with admin(rig) as c:
            c.execute("UPDATE shop.big SET v = v + 1 WHERE id % 20 = 0")
            c.execute("CHECKPOINT")
        incr_s, out = timed(rig, "backup", "create", "--type", "incr", "--json")
        incr = json.loads(out)
        say(f"incremental after 5% of rows changed: {incr_s:.1f}s, {incr['repo_size'] / 1024**2:.0f} MiB stored")
        with admin(rig) as c:
            row = c.execute("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
            target = str(row.fetchone()[0])  # type: ignore[index]
            c.execute("INSERT INTO shop.big VALUES (0, 0, 'after the target')")
        name = f"{rig.name}-pitr"
        pitr_s, out = timed(rig, "restore", "--to-time", target, "--name", name, "--json")
        pitr = json.loads(out)
        rig.run("--name", name, "destroy", "--yes", check=False)
        rec = pitr["recovery_seconds"]
        say(f"PITR restore into a new deployment: {pitr_s:.1f}s total, {rec:.1f}s restore + replay")
        f = freshness(rig, a.fresh_seconds)
        say(
            f"PITR freshness after the primary vanished: {f['lost_rows']:.0f} of {f['acked']:.0f} acknowledged commits"
            f" missing = {f['lost_s']:.1f}s of commits (goal <= 60 s; archive_timeout 30 s);"
            f" restore --latest took {f['restore_s']:.1f}s"
        )


if __name__ == "__main__":
    main()
