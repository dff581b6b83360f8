"""Multi-AZ through the CLI: a synchronous standby, a read replica, both endpoints, switchover, drills."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import psutil
import psycopg
import pytest
import yaml

from pgbridge.ops.up import SYNC_MAX_LAG
from tests.conftest import Env, deployed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which("haproxy") and shutil.which("pgbouncer")), reason="needs haproxy, pgbouncer"),
]

SPEC = """\
multi_az: true
failover_profile: fast
replicas:
  - {name: r1, region: zone-c}
endpoints: {max_reader_lag_mb: 1}
backup: {enabled: true}  # the default, with every member archiving its own WAL
pipeline:
  name: wh
  batch: {max_wait_ms: 100}
"""
SLOT = "pgbridge_wh"


@pytest.fixture(scope="module")
def dep() -> Iterator[Env]:
    with deployed("maz", SPEC, timeout=900) as e:
        yield e


def status(e: Env) -> dict:
    return json.loads(e.run("status", "--json").stdout)  # type: ignore[no-any-return]


def endpoint(e: Env, kind: str) -> str:
    s = status(e)
    return f"{s['endpoints'][kind]} password={e.secret('shop_app')}"


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=5)


def role_of(dsn: str) -> bool:
    for _ in range(20):  # the pooler may still be retrying a server login after a change
        try:
            with connect(dsn) as c:
                row = c.execute("SELECT pg_is_in_recovery()").fetchone()
                assert row is not None
                return bool(row[0])
        except psycopg.OperationalError:
            time.sleep(0.5)
    raise AssertionError(f"cannot connect to {dsn.split(' password')[0]}")


def roles(e: Env) -> dict[str, str]:
    return {m["name"]: m["role"] for m in status(e)["members"]}


def member_sql(e: Env, member: str, query: str, db: str = "postgres") -> str:
    """A query on one member's own PostgreSQL, as the admin role over the socket (as the service user)."""
    port = next(m["port"] for m in status(e)["members"] if m["name"] == member)
    argv = ["psql", "-h", str(e.home / "run"), "-p", str(port), "-U", "pgbridge_admin", "-d", db, "-XAtc", query]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def wait_for(what: str, check: Callable[[], object], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1)


def pipeline_status(e: Env) -> dict:
    return json.loads(e.run("pipeline", "status", "--json").stdout)  # type: ignore[no-any-return]


@contextlib.contextmanager
def writing(dsn: str) -> Iterator[tuple[list[int], list[str]]]:
    """One pooled client committing numbered rows into `sw` every 10 ms while the block runs.

    Yields the acknowledged numbers and the errors (the writer stops at its first); numbering goes
    on from the table's highest row.
    """
    with connect(dsn) as c:
        c.execute("CREATE TABLE IF NOT EXISTS sw (n int PRIMARY KEY)")
        row = c.execute("SELECT coalesce(max(n), 0) FROM sw").fetchone()
    start = int(row[0]) if row else 0
    written: list[int] = []
    errors: list[str] = []
    done = threading.Event()

    def write() -> None:
        n = start
        with connect(dsn) as c:
            while not done.is_set():
                n += 1
                try:
                    c.execute("INSERT INTO sw VALUES (%s)", (n,))
                    written.append(n)
                except psycopg.Error as e:
                    errors.append(str(e))
                    return
                time.sleep(0.01)

    t = threading.Thread(target=write)
    t.start()
    try:
        yield written, errors
    finally:
        done.set()
        t.join()


def test_members_sync_standby_and_both_endpoints(dep: Env) -> None:
    s = status(dep)
    by_role = sorted(m["role"] for m in s["members"])
    assert by_role == ["primary", "replica", "sync standby"], s["members"]
    replica = next(m for m in s["members"] if m["name"].endswith("-r1"))
    assert replica["region"] == "zone-c" and replica["promotable"] is False and replica["lag_bytes"] is not None
    assert role_of(endpoint(dep, "writer")) is False
    assert role_of(endpoint(dep, "reader")) is True
    # `connect --endpoint reader` reaches a replica through the pooler
    r = dep.run("connect", "--endpoint", "reader", "--", "-Atc", "SELECT pg_is_in_recovery()")
    assert r.stdout.strip() == "t"
    # RPO 0: the primary waits for its standby (strict synchronous mode)
    with connect(endpoint(dep, "writer")) as c:
        row = c.execute("SELECT current_setting('synchronous_standby_names')").fetchone()
        assert row is not None and row[0] not in ("", "*")
    # status shows the pooler's pools: the writer and reader databases just used, no admin pool
    pools = {(p["database"], p["user"]) for p in status(dep)["endpoints"]["pools"]}
    assert pools >= {("shop", "shop_app"), ("shop_ro", "shop_app")}, pools
    assert "pgbouncer" not in {d for d, _ in pools}, pools
    assert "pool shop_ro/shop_app" in dep.run("status").stdout
    assert dep.run("up").stdout.strip().endswith("no changes")


def test_the_pooler_admits_only_the_allowed_networks(dep: Env) -> None:
    """PostgreSQL sees pooled clients as the pooler's loopback address, so PgBouncer enforces
    allowed_cidrs itself: narrowed to a network without 127.0.0.1, `up` reloads the running pooler
    and the same client is turned away; widened again, it gets in."""
    writer = endpoint(dep, "writer")
    spec = dep.spec.read_text()
    assert "allowed_cidrs: [127.0.0.1/32]" in spec
    dep.spec.write_text(spec.replace("allowed_cidrs: [127.0.0.1/32]", "allowed_cidrs: [10.0.0.0/8]"))
    try:
        out = dep.run("up").stdout
        assert any("endpoints" in line and re.search(r"\bchanged\b", line) for line in out.splitlines()), out

        def refused() -> bool:  # PgBouncer applies the SIGHUP a moment after `up` sent it
            try:
                connect(writer).close()
            except psycopg.OperationalError as e:
                assert "login rejected" in str(e), e
                return True
            return False

        wait_for("the pooler to refuse a client from 127.0.0.1 with allowed_cidrs [10.0.0.0/8]", refused, timeout=10)
    finally:
        dep.spec.write_text(spec)
        dep.run("up")
    assert role_of(writer) is False


def test_a_replica_over_the_lag_limit_leaves_the_reader_pool(dep: Env) -> None:
    """Patroni's /replica?lag= compares what a replica has *received* with the leader's position, so
    the replica's WAL receiver is stopped (a replay pause alone would not count as lag)."""
    r1 = next(n for n in roles(dep) if n.endswith("-r1"))

    def reaches() -> list[str]:
        return list(status(dep)["endpoints"]["reader_reaches"])

    wait_for("r1 in the reader pool", lambda: r1 in reaches())
    receiver = int(member_sql(dep, r1, "SELECT pid FROM pg_stat_wal_receiver"))
    os.kill(receiver, signal.SIGSTOP)
    try:
        with connect(endpoint(dep, "writer")) as c:
            c.execute("CREATE TABLE IF NOT EXISTS lag_fill (id bigint PRIMARY KEY, pad text)")
            c.execute("INSERT INTO lag_fill SELECT g, repeat('x', 500) FROM generate_series(1, 10000) g")
        wait_for("r1 to leave the reader pool", lambda: r1 not in reaches(), timeout=60)
        assert reaches(), "the reader still has the standby"
    finally:
        os.kill(receiver, signal.SIGCONT)
    wait_for("r1 back in the reader pool", lambda: r1 in reaches(), timeout=60)


def test_switchover_pauses_writers_without_errors(dep: Env) -> None:
    writer = endpoint(dep, "writer")
    before = {n for n, r in roles(dep).items() if r == "primary"}
    with writing(writer) as (written, errors):
        time.sleep(1)
        out = json.loads(dep.run("failover", "--json").stdout)
        # at once again: Patroni has not named the synchronous standby yet (it refused with 412 then)
        back = json.loads(dep.run("failover", "--json").stdout)
        time.sleep(1)
    assert not errors, errors  # one pooled connection kept working across both switchovers
    assert back["old"] == out["new"] and back["warning"] is None, back
    assert out["old"] in before and out["new"] not in before
    assert roles(dep)[back["new"]] == "primary"
    # the pooler held clients until a commit would be acknowledged, and the probe's commit went through
    assert out["warning"] is None and out["write_gap_s"] >= out["paused_s"], out
    with connect(writer) as c:
        row = c.execute("SELECT count(*) FROM sw").fetchone()
        assert row is not None and row[0] == len(written)
    bad = dep.run("failover", "--to", "nobody", check=False)
    assert bad.returncode != 0 and "nobody" in bad.stderr


def test_failover_drill_keeps_every_write_the_old_primary_rejoins_and_the_warehouse_equals_the_source(
    dep: Env,
) -> None:
    """The kill drill loses no acknowledged commit, and the pipeline resumes on the new primary from
    the standby's copy of its slot (a Patroni permanent slot), losing and doubling nothing."""
    refused = dep.run("drill", "failover", check=False)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    wait_for("the pipeline to stream", lambda: pipeline_status(dep).get("phase") == "streaming")
    # after the switchover test the former primary may still be catching up to become sync standby
    wait_for("a synchronous standby", lambda: "sync standby" in roles(dep).values())
    old = next(n for n, r in roles(dep).items() if r == "primary")
    standby = next(n for n, r in roles(dep).items() if r == "sync standby")
    wait_for(
        "the standby's copy of the pipeline's slot",
        lambda: (
            member_sql(dep, standby, f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SLOT}'") == "1"
        ),
    )
    with connect(endpoint(dep, "writer")) as c:
        c.execute("CREATE TABLE orders_cdc (id bigint PRIMARY KEY, note text)")
        c.execute("INSERT INTO orders_cdc SELECT g, 'before' FROM generate_series(1, 2000) g")

    r = json.loads(dep.run("drill", "failover", "--mode", "kill", "--yes", "--json", timeout=600).stdout)
    assert r["old_primary"] == old and r["new_primary"] == standby
    assert r["rpo_lost"] == 0 and r["acked"] > 0
    assert r["rejoined"], r
    assert 0 < r["rto_s"] < 60
    assert roles(dep)[old] in ("replica", "sync standby")
    kinds = [e["kind"] for e in json.loads(dep.run("events", "--json").stdout)]
    assert "drill-failover" in kinds and "switchover" in kinds

    check = "SELECT count(*), sum(id), count(*) FILTER (WHERE note = 'moved') FROM {}orders_cdc"
    with connect(endpoint(dep, "writer")) as c:
        c.execute("INSERT INTO orders_cdc SELECT g, 'after' FROM generate_series(2001, 3000) g")
        c.execute("UPDATE orders_cdc SET note = 'moved' WHERE id % 7 = 0")
        want = [list(c.execute(check.format("")).fetchone() or ())]
        drill = c.execute("SELECT count(*) FROM pgbridge_drill").fetchone()

    def same() -> bool:
        got = dep.run("query", check.format("shop."), "--json", check=False)
        return got.returncode == 0 and [list(d.values()) for d in json.loads(got.stdout)] == want

    wait_for("the warehouse to catch up after the failover", same)
    assert pipeline_status(dep)["phase"] == "streaming"
    rows = json.loads(dep.run("query", "SELECT count(*) AS n FROM shop.pgbridge_drill", "--json").stdout)
    assert drill is not None and rows == [{"n": drill[0]}]
    assert dep.run("pipeline", "validate").returncode == 0


def test_a_crashed_postmaster_restarts_in_place_with_two_members(dep: Env) -> None:
    """Only the postmaster dies: its backends must not keep the member from starting again (one
    waiting for the synchronous standby used to block on supervisord's stdin pipe, holding the
    shared memory), and pmwatch wakes Patroni at once instead of after its loop_wait. With no
    promotable member besides the pair, Patroni restarts it in place (a new primary would wait
    for it anyway); with a stand-in it fails over (test_replicas_follow_the_spec)."""
    wait_for("a synchronous standby", lambda: "sync standby" in roles(dep).values())
    old = next(n for n, r in roles(dep).items() if r == "primary")
    r = json.loads(dep.run("drill", "failover", "--mode", "crash", "--yes", "--json", timeout=600).stdout)
    assert r["old_primary"] == old and r["new_primary"] == old, r
    assert r["rpo_lost"] == 0 and r["rejoined"], r
    woke = (dep.home / "logs" / "pmwatch.log").read_text()
    assert f"of {old} is gone; woke its Patroni" in woke
    checked = dep.run("check", check=False).stdout
    assert f"{old}: primary, running" in checked, checked
    wait_for("the synchronous standby back", lambda: "sync standby" in roles(dep).values())


def test_reboot_restarts_every_member_standbys_first(dep: Env) -> None:
    """A static parameter reaches every member: `reboot --failover` restarts the standbys, moves the
    primary (the pooler holds writers, none fails) and restarts the former one; plain `reboot`
    restarts the primary in place, whichever member that is now."""
    wait_for("a synchronous standby", lambda: "sync standby" in roles(dep).values())
    old = next(n for n, r in roles(dep).items() if r == "primary")

    def everywhere(value: str) -> bool:
        return all(member_sql(dep, m, "SHOW max_locks_per_transaction") == value for m in roles(dep))

    dep.write_spec(SPEC + "parameter_groups:\n  tune:\n    max_locks_per_transaction: 128\nparameter_group: tune\n")
    assert "pending-reboot" in dep.run("up", timeout=900).stdout
    assert everywhere("64")
    with writing(endpoint(dep, "writer")) as (_, errors):
        out = dep.run("reboot", "--failover", timeout=900).stdout
    assert not errors, errors
    assert everywhere("128") and status(dep)["pending_reboot"] == []
    assert roles(dep)[old] in ("replica", "sync standby") and "former primary restarted" in out, out
    assert out.count("standby restarted in") == 2 and out.rindex("standby restarted in") < out.index("moved from"), out
    new = next(n for n, r in roles(dep).items() if r == "primary")
    # Lowered again: the standbys first start with the primary's value (Patroni flags them), so
    # they are restarted once more after the primary.
    dep.write_spec(SPEC + "parameter_groups:\n  tune:\n    max_locks_per_transaction: 64\nparameter_group: tune\n")
    assert "pending-reboot" in dep.run("up", timeout=900).stdout
    out = dep.run("reboot", timeout=900).stdout
    assert f"member {new}" in out and "primary restarted" in out and "restarted again" in out, out
    assert roles(dep)[new] == "primary" and everywhere("64") and status(dep)["pending_reboot"] == []
    wait_for("a synchronous standby", lambda: "sync standby" in roles(dep).values())


def test_replicas_follow_the_spec(dep: Env) -> None:
    with_r2 = SPEC.replace("  - {name: r1, region: zone-c}", "  - {name: r2, region: zone-d, promotable: true}")
    dep.write_spec(with_r2)
    report = dep.run("up", timeout=900).stdout
    assert "-r2" in report and "removed" in report
    names = set(roles(dep))
    assert any(n.endswith("-r2") for n in names) and not any(n.endswith("-r1") for n in names)
    assert not (dep.home / "data" / f"{dep.name}-r1").exists()
    without = with_r2.replace("replicas:\n  - {name: r2, region: zone-d, promotable: true}\n", "")
    assert "r2" not in without
    stand_in_keeps_commits_going(dep, next(n for n in names if n.endswith("-r2")), without, with_r2)
    # with a stand-in a crashed primary is failed over at once: the stand-in keeps commits going
    old = next(n for n, r in roles(dep).items() if r == "primary")
    standby = next(n for n, r in roles(dep).items() if r == "sync standby")
    r = json.loads(dep.run("drill", "failover", "--mode", "crash", "--yes", "--json", timeout=600).stdout)
    assert r["old_primary"] == old and r["new_primary"] == standby, r
    assert r["rpo_lost"] == 0 and r["rejoined"], r
    # Multi-AZ off: synchronous replication goes first, then the standby
    dep.write_spec(with_r2.replace("multi_az: true", "multi_az: false"))
    dep.run("up", timeout=900)
    assert "sync standby" not in roles(dep).values()
    with connect(endpoint(dep, "writer")) as c:
        row = c.execute("SELECT current_setting('synchronous_standby_names')").fetchone()
        assert row is not None and row[0] == ""
        c.execute("INSERT INTO sw VALUES (-1)")  # writes are not blocked


def stand_in_keeps_commits_going(dep: Env, replica: str, spec_without: str, spec_with: str) -> None:
    """The Multi-AZ standby's host is lost (Patroni and PostgreSQL SIGKILLed, kept down): the
    promotable replica becomes the synchronous standby Patroni may promote, and commits go on; `up`
    refuses to remove it meanwhile; when the standby is back it takes the role back (higher
    sync_priority)."""
    wait_for("a synchronous standby", lambda: "sync standby" in roles(dep).values())
    standby = next(n for n, r in roles(dep).items() if r == "sync standby")
    assert standby != replica  # the pair outranks the stand-in
    with connect(endpoint(dep, "writer")) as c:
        c.execute("CREATE TABLE IF NOT EXISTS sw (n int PRIMARY KEY)")
    rest = yaml.safe_load((dep.home / "etc" / f"patroni-{replica}.yml").read_text())["restapi"]["listen"]
    with urllib.request.urlopen(f"http://{rest}/config", timeout=10) as r:  # a lagging pair member is not chosen
        assert json.load(r)["maximum_lag_on_syncnode"] == SYNC_MAX_LAG
    conf = dep.home / "etc" / "supervisord.conf"
    ctl = [os.path.join(os.path.dirname(sys.executable), "supervisorctl"), "-c", str(conf)]
    program, patroni_conf = f"patroni-{standby}", dep.home / "etc" / f"patroni-{standby}.yml"
    patroni_pid = int(subprocess.run([*ctl, "pid", program], capture_output=True, text=True, timeout=30).stdout)
    postmaster = int((dep.home / "data" / standby / "postmaster.pid").read_text().split()[0])
    victims = [patroni_pid, postmaster, *(c.pid for c in psutil.Process(postmaster).children(recursive=True))]
    os.replace(patroni_conf, patroni_conf.with_suffix(".lost"))  # supervisord's restarts fail: the host is gone
    try:
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for("the replica to stand in", lambda: roles(dep).get(replica) == "sync standby", timeout=90)
        committed = threading.Event()

        def commit() -> None:
            with connect(endpoint(dep, "writer")) as c:
                c.execute("INSERT INTO sw VALUES (-2)")
            committed.set()

        threading.Thread(target=commit, daemon=True).start()
        assert committed.wait(30), "a commit waited for the lost standby"
        dep.write_spec(spec_without)
        refused = dep.run("up", check=False, timeout=300)
        assert (
            refused.returncode != 0
            and "the only member that may be promoted streaming" in refused.stdout + refused.stderr
        )
        assert roles(dep).get(replica) == "sync standby"  # nothing was touched
        dep.write_spec(spec_with)
    finally:
        subprocess.run([*ctl, "stop", program], capture_output=True, timeout=120)
        os.replace(patroni_conf.with_suffix(".lost"), patroni_conf)
        subprocess.run([*ctl, "start", program], check=True, capture_output=True, timeout=120)
    wait_for("the standby to take its role back", lambda: roles(dep).get(standby) == "sync standby", timeout=180)
    assert roles(dep)[replica] == "replica"
