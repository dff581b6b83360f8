"""Planned switchover and the failover drill, both measured through the writer endpoint.

`switchover` pauses the writer database in PgBouncer (running transactions finish, new ones
queue), lets Patroni hand the leader role over, waits until HAProxy's writer reaches the new
primary and a standby streams from it (with strict synchronous replication nothing commits
before), and resumes: clients see a pause, not errors. It reports the pause and the write gap a
client sees: from the pause to the first commit acknowledged through the writer endpoint.

`failover_drill` runs a writer that commits numbered rows through the writer endpoint and
records each outcome: acknowledged, failed before anything was sent, or unknown (the connection
broke while a commit was in flight, so it may or may not have committed). It then injures the
primary — `kill`: SIGKILL its Patroni and PostgreSQL and keep them down (host loss); `hang`:
SIGSTOP them (a frozen host); `crash`: SIGKILL the postmaster only (Patroni lives) — and reports
RTO (the longest time without an acknowledged write after the fault) and RPO (acknowledged rows
missing afterwards). The injured member is brought back once the new primary has finished its
promotion, and must rejoin as a replica.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psutil
import psycopg

from pgbridge.errors import DeploymentError, PgbridgeError, UsageError
from pgbridge.ops import endpoints, events, ha
from pgbridge.ops.context import Deployment
from pgbridge.platform import system
from pgbridge.platform.patroni import leader_of
from pgbridge.platform.postgres import admin_connection

Mode = Literal["kill", "hang", "crash"]
DRILL_TABLE = "pgbridge_drill"  # in the app's schema: the writes of drills and switchovers, removed after
_DRILL_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DRILL_TABLE} (run text, n bigint, at timestamptz DEFAULT now(), PRIMARY KEY (run, n))"
)


def _client(dsn: str, connect_timeout: int = 5) -> psycopg.Connection[Any]:
    """A client of the writer endpoint, as an application connects through PgBouncer's transaction mode."""
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=connect_timeout)


@dataclass
class SwitchoverResult:
    old: str
    new: str
    seconds: float
    paused_s: float  # PgBouncer's pause: PAUSE issued to RESUME done
    write_gap_s: float | None  # PAUSE issued to the first commit acknowledged through the writer endpoint after
    warning: str | None = None  # the primary moved, but something after it did not go as it should


def switchover(dep: Deployment, to: str | None = None, pause_timeout: float = 30) -> SwitchoverResult:
    """`pgbridge failover [--to MEMBER]`: a planned switchover clients barely notice."""
    dep.home.require()
    if len(dep.recorded_members()) < 2:
        raise DeploymentError("a switchover needs a standby", hint="set multi_az: true (or add replicas) and run up")
    if to is not None and to not in dep.recorded_members():  # before any client is paused
        raise DeploymentError(f"no member {to!r}; members: {', '.join(dep.recorded_members())}")
    console = endpoints.console(dep) if endpoints.enabled(dep) else None
    db = dep.spec.database.name
    probe = _CommitProbe(endpoints.dsn(dep, dep.spec.database.users.app, "writer", password=True)) if console else None
    warning: str | None = None
    t0 = time.monotonic()
    try:
        ha.wait_switchable(dep)
        # The old primary's shutdown is part of the pause; most of its work can happen first.
        with admin_connection(dep.admin) as c:
            _archive_backlog(c)
            c.execute("CHECKPOINT")
        if probe is not None:
            probe.connect()  # a client already connected when the pause begins
        paused_at = time.monotonic()  # a write arriving now waits: PAUSE first lets running ones finish
        flowing = True
        try:
            if console is not None:
                console.pause(db, timeout=pause_timeout)
            moved = ha.switchover(dep, to)
            if console is not None:
                with contextlib.suppress(PgbridgeError):
                    endpoints.point_writer(dep, moved.new)
                endpoints.wait_writer(dep, timeout=30, member=moved.new)
                # Held until a commit would be acknowledged: a client's commit then never sits in the
                # synchronous-standby wait, where a statement timeout leaves it committed on one host.
                flowing = ha.wait_commits_flow(dep, moved.new, timeout=30)
        finally:
            if console is not None:
                console.resume(db)
        paused = time.monotonic() - paused_at
        gap: float | None = None
        if probe is not None and flowing:
            acked = probe.first_commit(timeout=30)
            gap = acked - paused_at if acked is not None else None
        if probe is not None and gap is None:
            warning = (
                f"{moved.new} is primary, but no commit was acknowledged through the writer endpoint within 30 s"
                f" ({probe.last_error}): a commit waits for a standby that streams from it; see `pgbridge status`"
            )
    finally:
        if probe is not None:
            probe.close()
    result = SwitchoverResult(
        moved.old,
        moved.new,
        round(time.monotonic() - t0, 2),
        round(paused, 2),
        None if gap is None else round(gap, 2),
        warning,
    )
    events.record(dep, "switchover", f"primary moved from {moved.old} to {moved.new}", **asdict(result))
    return result


def _archive_backlog(c: psycopg.Connection[Any], timeout: float = 5) -> None:
    """Close the current WAL segment and wait until no finished segment waits for archiving.

    A shutting-down primary archives every segment still waiting, and the one it closes, before
    the postmaster exits; Patroni looks once a second, and a postmaster still there when Patroni
    sees the shutdown checkpoint costs a further second before the leader key is handed over
    (``ha.py: demote``). Each segment is one ``archive-push`` (about 0.2 s here), and a promoted
    standby can have older ones waiting too. Done first, the shutdown archives one short segment.
    Without archiving (no backups) nothing waits; if the archive is slow the switchover goes ahead.
    """
    row = c.execute("SELECT pg_is_in_recovery()").fetchone()
    if row is None or row[0]:  # not the primary (a stale view): Patroni's answer will tell
        return
    c.execute("SELECT pg_switch_wal()")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = c.execute("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'").fetchone()
        if row is None or row[0] == 0:
            return
        time.sleep(0.05)


class _CommitProbe:
    """A client of the writer endpoint that times its first acknowledged commit after a switchover.

    It inserts a row into the drill's table (and removes it afterwards): only a transaction that
    wrote WAL waits for the synchronous standby, as a client's write does (a bare
    ``txid_current()`` commits without waiting). A commit still waiting when time is up is
    cancelled; PostgreSQL then keeps it with a warning, which does not count as acknowledged.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.run = f"switchover-{int(time.time() * 1000)}"
        self.conn: psycopg.Connection[Any] | None = None
        self.wrote = False
        self.last_error = "no attempt"
        self.notices: list[str] = []

    def connect(self) -> None:
        try:
            self.conn = _client(self.dsn)
            self.conn.add_notice_handler(lambda d: self.notices.append(str(d.message_primary)))
            self.conn.execute(_DRILL_DDL)
        except psycopg.Error as e:
            self.last_error = str(e).strip()
            self.close()

    def first_commit(self, timeout: float) -> float | None:
        """The monotonic time of the first acknowledged commit; None if none within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn is None or self.conn.closed:
                self.connect()
            conn = self.conn
            if conn is not None:
                timer = threading.Timer(max(0.1, deadline - time.monotonic()), conn.cancel)
                timer.start()
                self.notices.clear()
                try:
                    conn.execute(
                        f"INSERT INTO {DRILL_TABLE} (run, n) VALUES (%s, 1) ON CONFLICT DO NOTHING", (self.run,)
                    )
                    self.wrote = True
                    if not any("synchronous replication" in n for n in self.notices):
                        return time.monotonic()
                    self.last_error = "the commit was cancelled while it waited for the synchronous standby"
                    return None
                except psycopg.Error as e:
                    self.last_error = str(e).strip()
                    self.close()
                finally:
                    timer.cancel()
            time.sleep(0.05)
        return None

    def close(self) -> None:
        if self.conn is not None:
            timer = threading.Timer(5, self.conn.cancel)  # a DELETE waits for the standby too
            timer.start()
            with contextlib.suppress(psycopg.Error):
                if self.wrote:
                    self.conn.execute(f"DELETE FROM {DRILL_TABLE} WHERE run = %s", (self.run,))
                self.conn.close()
            timer.cancel()
            self.conn = None


# ------------------------------------------------------------------------------------------ drill


@dataclass
class _Write:
    n: int
    start: float
    end: float
    outcome: Literal["acked", "failed", "unknown"]


@dataclass
class _Writer:
    dsn: str
    run: str
    stop: threading.Event = field(default_factory=threading.Event)
    writes: list[_Write] = field(default_factory=list)
    interval: float = 0.01

    def loop(self) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            if conn is None or conn.closed:
                try:
                    conn = _client(self.dsn, connect_timeout=2)
                except psycopg.Error:
                    conn = None
                    time.sleep(0.05)
                    continue
            n += 1
            start = time.monotonic()
            try:
                conn.execute(f"INSERT INTO {DRILL_TABLE} (run, n) VALUES (%s, %s)", (self.run, n))
                self.writes.append(_Write(n, start, time.monotonic(), "acked"))
            except psycopg.Error:
                # The statement went out; whether it committed is unknown until checked.
                self.writes.append(_Write(n, start, time.monotonic(), "unknown"))
                with contextlib.suppress(psycopg.Error):
                    conn.close()
                conn = None
                time.sleep(0.05)
            time.sleep(self.interval)
        if conn is not None:
            conn.close()


@dataclass
class DrillResult:
    mode: str
    profile: str
    old_primary: str
    new_primary: str
    rto_s: float
    rpo_lost: int
    acked: int
    unknown: int
    unknown_committed: int
    rejoined_s: float | None
    rejoined: bool


def _member_pids(dep: Deployment, member: str) -> tuple[int | None, list[int]]:
    """(Patroni's pid, every PostgreSQL process of the member: postmaster first)."""
    info = dep.supervisor.processes().get(ha.patroni_program(member), {})
    patroni_pid = int(info["pid"]) if info.get("pid") else None
    postmaster = system.read_pid(dep.home.pgdata(member) / "postmaster.pid")
    pg: list[int] = []
    if postmaster and system.pid_alive(postmaster):
        pg.append(postmaster)
        with contextlib.suppress(psutil.Error):
            pg += [c.pid for c in psutil.Process(postmaster).children(recursive=True)]
    return patroni_pid, pg


def failover_drill(dep: Deployment, mode: Mode, *, yes: bool, timeout: float = 180) -> DrillResult:
    if not yes:
        raise UsageError("a drill injures the running primary; pass --yes to run it against this deployment")
    dep.home.require()
    if not endpoints.enabled(dep):
        raise DeploymentError("the drill writes through the writer endpoint", hint="set multi_az: true and run up")
    view = dep.cluster_view()
    old = leader_of(view)
    if old is None:
        raise DeploymentError("there is no running primary to injure")
    able = [m for m in view.get("members", []) if m.get("name") != old and not m.get("tags", {}).get("nofailover")]
    if not able:
        raise DeploymentError("no member could take over", hint="set multi_az: true and run up")
    app = dep.spec.database.users.app
    dsn = endpoints.dsn(dep, app, "writer", password=True)
    try:
        with _client(dsn) as c:
            c.execute(_DRILL_DDL)
    except psycopg.Error as e:
        raise DeploymentError(
            f"the drill cannot write through the writer endpoint: {str(e).strip()}",
            hint="check `pgbridge status`: the deployment must be healthy before a drill",
        ) from None
    run = f"{mode}-{int(time.time() * 1000)}"
    writer = _Writer(dsn, run)
    thread = threading.Thread(target=writer.loop, name="drill-writer", daemon=True)
    thread.start()
    stopped: list[int] = []
    try:
        time.sleep(2)  # a steady state before the fault
        if not any(w.outcome == "acked" for w in writer.writes):
            raise DeploymentError("the drill writer could not commit through the writer endpoint before the fault")
        patroni_pid, pg = _member_pids(dep, old)
        if not pg or (mode != "crash" and patroni_pid is None):
            raise DeploymentError(f"cannot find the processes of {old} to injure", hint="see `pgbridge status`")
        t0 = time.monotonic()
        if mode == "crash":
            os.kill(pg[0], signal.SIGKILL)
        elif mode == "kill":
            # The host is gone: nothing of it may run again until the drill brings it back. Its
            # Patroni file stays hidden until then, so each restart supervisord tries fails (a
            # restarted Patroni would find PostgreSQL dead and fail over at once, or shut down
            # cleanly and hand the leader key over: neither is a host loss).
            conf = dep.home.patroni_conf(old)
            os.replace(conf, conf.with_suffix(".drill"))
            for pid in [p for p in (patroni_pid, *pg) if p]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        else:
            stopped = [p for p in (patroni_pid, *pg) if p]
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):  # a backend may end meanwhile
                    os.kill(pid, signal.SIGSTOP)
        if mode == "crash":  # Patroni fails over or restarts in place; either way, writes resume
            rto = _wait_recovered(writer, t0, timeout)
            new = leader_of(dep.cluster_view()) or old
        else:
            new = _wait_new_leader(dep, old, timeout)
            # The lost host comes back (or is replaced) once the failover is complete: with strict
            # synchronous replication and no other standby the new primary accepts no commit until
            # one streams again. (A host back earlier than that costs its rejoin about 2 s more.)
            _wait_promoted(dep, new, timeout=30)
            _restore(dep, old, mode, stopped)
            stopped = []
            rto = _wait_recovered(writer, t0, timeout)
    finally:
        writer.stop.set()
        thread.join(timeout=30)
        _restore(dep, old, mode, stopped)
    t_back = time.monotonic()
    rejoined = True
    try:
        if new == old:  # a crash that Patroni repaired in place
            dep.patroni(old).wait_running(timeout=timeout, role="primary")
        else:
            ha.wait_replica(dep.patroni(old), old, timeout=timeout)
    except PgbridgeError:
        rejoined = False
    rejoined_s = round(time.monotonic() - t_back, 1) if rejoined else None
    acked = {w.n for w in writer.writes if w.outcome == "acked"}
    unknown = {w.n for w in writer.writes if w.outcome == "unknown"}
    present = _committed(dsn, run)
    result = DrillResult(
        mode=mode,
        profile=dep.spec.failover_profile,
        old_primary=old,
        new_primary=new,
        rto_s=round(rto, 2),
        rpo_lost=len(acked - present),
        acked=len(acked),
        unknown=len(unknown),
        unknown_committed=len(unknown & present),
        rejoined_s=rejoined_s,
        rejoined=rejoined,
    )
    events.record(
        dep,
        "drill-failover",
        f"{mode} drill: RTO {result.rto_s}s, {result.rpo_lost} acknowledged commits lost",
        **asdict(result),
    )
    return result


def _wait_recovered(writer: _Writer, t0: float, timeout: float) -> float:
    """RTO: the longest stretch after the fault in which no write was acknowledged.

    Through PgBouncer an outage can look like errors (a connection cut mid-commit) or like a
    stall (the query waits in the pooler until a primary is back), and processes of a killed
    postmaster may still acknowledge a write before they notice; the gap between consecutive
    acknowledgements covers all three. Returns once writes have flowed steadily again.
    """
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        acks = [w.end for w in list(writer.writes) if w.outcome == "acked" and w.end >= t0]
        if len(acks) >= 20 and acks[-1] - acks[-20] < 2:
            gaps = [acks[0] - t0] + [b - a for a, b in itertools.pairwise(acks)]
            return max(gaps)
        time.sleep(0.1)
    raise DeploymentError(f"writes did not resume within {timeout:.0f}s of the fault: the failover did not complete")


def _restore(dep: Deployment, member: str, mode: Mode, stopped: list[int]) -> None:
    """Undo the fault (idempotent): thaw frozen processes, start a killed member again."""
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    if mode == "kill":
        hidden = dep.home.patroni_conf(member).with_suffix(".drill")
        if hidden.exists():
            with contextlib.suppress(PgbridgeError):  # ends the failing restarts before the file is back
                dep.supervisor.stop_program(ha.patroni_program(member))
            os.replace(hidden, dep.home.patroni_conf(member))
        with contextlib.suppress(PgbridgeError):
            dep.supervisor.start_program(ha.patroni_program(member))


def _committed(dsn: str, run: str, timeout: float = 60) -> set[int]:
    """The drill's rows the primary has now (then removed); retried while the pooler recovers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _client(dsn) as c:
                present = {int(r[0]) for r in c.execute(f"SELECT n FROM {DRILL_TABLE} WHERE run = %s", (run,))}
                c.execute(f"DELETE FROM {DRILL_TABLE} WHERE run = %s", (run,))
                return present
        except psycopg.OperationalError as e:
            if time.monotonic() > deadline:
                raise DeploymentError(f"cannot read the drill's rows back through the writer endpoint: {e}") from None
            time.sleep(1)


def _wait_promoted(dep: Deployment, member: str, timeout: float) -> None:
    """Until `member` has published the end of its promotion (best effort: a slow one only costs time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(PgbridgeError):
            if ha.promoted(dep, member):
                return
        time.sleep(0.1)


def _wait_new_leader(dep: Deployment, old: str | None, timeout: float) -> str:
    """The primary after the fault: another member than `old` (any member when `old` is None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(PgbridgeError):
            leader = leader_of(dep.cluster_view([m for m in dep.recorded_members() if m != old]))
            if leader is not None and leader != old:
                return leader
        time.sleep(0.2)
    raise DeploymentError(f"no new primary within {timeout:.0f}s")
