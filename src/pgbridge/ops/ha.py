"""Members beyond the first: standbys and replicas joining and leaving, switchover, sync state.

A new member is a Patroni process that clones the leader (pg_basebackup over TLS as the
replication role) and then streams. Turning Multi-AZ on adds the standby first and switches
strict synchronous replication on only once it streams (strict mode with no standby would block
every write); turning it off switches synchronous replication off first, then removes the
standby. A member that holds the leader key is never removed: `up` first hands the role over.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from pgbridge.errors import DeploymentError, TransientError
from pgbridge.ops.context import Deployment
from pgbridge.platform import etcd
from pgbridge.platform.patroni import NAMESPACE, RUNNING_STATES, PatroniAPI, leader_of
from pgbridge.platform.postgres import admin_connection


def patroni_program(member: str) -> str:
    return f"patroni-{member}"


@contextlib.contextmanager
def patroni_paused(dep: Deployment, programs: list[str], timeout: float = 60) -> Iterator[None]:
    """Keep PostgreSQL serving while the named programs restart, if any of them is a Patroni.

    Patroni stops PostgreSQL when it exits, which on the primary is an outage or a failover. In
    maintenance mode (``pause``) it leaves PostgreSQL running, neither fails over nor demotes on
    a DCS outage, and a restarted Patroni takes the running server over again; the pause ends
    once every restarted Patroni answers.
    """
    members = [m for m in dep.recorded_members() if patroni_program(m) in programs]
    view: dict[str, Any] = {}
    with contextlib.suppress(TransientError):
        view = dep.cluster_view()
    running = [str(m["name"]) for m in view.get("members", []) if m.get("state") in RUNNING_STATES]
    if not members or not running:
        yield  # nothing serves yet, so there is nothing to keep up
        return
    api = dep.patroni(running[0])
    api.patch_config({"pause": True})
    try:
        _wait_members(dep, running, lambda m: bool(m.get("pause")), "enter maintenance mode", timeout)
        yield
        up = {n for n, i in dep.supervisor.processes().items() if i.get("statename") == "RUNNING"}
        back = [m for m in members if m in running and patroni_program(m) in up]
        _wait_members(dep, back, lambda m: m.get("state") == "running", "take PostgreSQL over again", timeout)
    finally:
        for m in running:  # any member that answers can lift the pause
            with contextlib.suppress(TransientError, DeploymentError):
                dep.patroni(m).patch_config({"pause": None})
                break
        else:
            if sys.exc_info()[0] is None:  # an error already on its way says more
                raise DeploymentError(
                    "Patroni is still in maintenance mode: no automatic failover", hint="run `pgbridge up` again"
                )


def _wait_members(
    dep: Deployment, members: list[str], ok: Callable[[dict[str, Any]], bool], what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    pending = list(members)
    while pending and time.monotonic() < deadline:
        for m in list(pending):
            with contextlib.suppress(TransientError):
                if ok(dep.patroni(m, timeout=3).member()):
                    pending.remove(m)
        if pending:
            time.sleep(0.5)
    if pending:
        raise DeploymentError(f"Patroni on {', '.join(pending)} did not {what} within {timeout:.0f}s")


def wait_replica(api: PatroniAPI, member: str, timeout: float) -> None:
    """Until the member runs as a replica and its WAL receiver streams."""
    deadline = time.monotonic() + timeout
    last: Any = "no answer"
    while time.monotonic() < deadline:
        try:
            m = api.member()
            last = f"{m.get('role')}/{m.get('state')}/{m.get('replication_state')}"
            if m.get("state") == "running" and m.get("role") == "replica" and m.get("replication_state") == "streaming":
                return
        except TransientError as e:
            last = e.message
        time.sleep(0.5)
    raise DeploymentError(
        f"member {member} did not start streaming within {timeout:.0f}s (last: {last})",
        hint=f"see {patroni_program(member)}.log in the deployment's logs folder",
    )


def sync_standbys(view: dict[str, Any]) -> list[str]:
    """The members Patroni names synchronous standby (in ``/sync``) in a cluster view."""
    return [str(m.get("name")) for m in view.get("members", []) if m.get("role") == "sync_standby"]


def wait_sync(dep: Deployment, want: bool, timeout: float = 90, member: str | None = None) -> None:
    """Until the leader runs with (or without) a synchronous standby (`member`, when given)."""
    deadline = time.monotonic() + timeout
    last = "unknown"
    while time.monotonic() < deadline:
        try:
            view = dep.cluster_view()  # one answer for both: who leads, and whom Patroni names sync
            with admin_connection(dep.member_admin(leader_of(view) or dep.primary_member)) as c:
                row = c.execute(
                    "SELECT current_setting('synchronous_standby_names'),"
                    " (SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync')"
                ).fetchone()
            assert row is not None
            names, sync_count = str(row[0]), int(row[1])
            last = f"synchronous_standby_names={names!r}, {sync_count} sync standby"
            # Patroni 4.1.5 first sets '*' (any standby, even a read replica, may acknowledge);
            # only a named standby that Patroni lists in /sync can be promoted without loss.
            named = any(member in (None, m) for m in sync_standbys(view))
            if (want and names not in ("", "*") and sync_count > 0 and named) or (not want and not names):
                return
        except TransientError as e:
            last = e.message
        except psycopg.Error as e:  # e.g. the leader restarting under us
            last = str(e).strip()
        time.sleep(0.5)
    what = "on" if want else "off"
    raise DeploymentError(f"synchronous replication did not turn {what} within {timeout:.0f}s ({last})")


def wait_switchable(dep: Deployment, member: str | None = None, timeout: float = 15) -> None:
    """Before a switchover in synchronous mode: until Patroni names a synchronous standby again
    (`member`, when given).

    In synchronous mode Patroni switches over only to the synchronous standby. For a moment after
    a switchover, a failover or a standby's restart the leader runs with
    ``synchronous_standby_names = '*'`` and names nobody in ``/sync``, and a member back from an
    outage gets the role on a later loop; a request then is refused (412: the candidate is not
    the synchronous standby): a second `pgbridge failover` right after the first failed so. If it
    does not settle in time the request goes ahead, and Patroni's answer stands.
    """
    try:
        view = dep.cluster_view()
        config = dep.patroni(leader_of(view) or dep.primary_member).config()
    except TransientError:
        return
    if config.get("synchronous_mode"):
        with contextlib.suppress(DeploymentError):
            wait_sync(dep, True, timeout=timeout, member=member)


@dataclass(frozen=True)
class Switched:
    old: str
    new: str


def candidates(view: dict[str, Any], leader: str | None) -> list[dict[str, Any]]:
    """Members that may take over from `leader`: running and promotable, the synchronous standby first."""
    able = [
        m
        for m in view.get("members", [])
        if m.get("name") != leader and m.get("state") in RUNNING_STATES and not m.get("tags", {}).get("nofailover")
    ]
    return sorted(able, key=lambda m: m.get("role") != "sync_standby")


def named_candidate(view: dict[str, Any], candidate: str) -> str | None:
    """The candidate to name in Patroni's switchover request: None when it is the synchronous standby.

    Patroni 4.1.5 makes every other replica that sees the leaderless moment of a switchover *to a
    named candidate* sleep 2 s before it follows the new primary (``ha.py``,
    ``process_unhealthy_cluster``). A promotable replica standing in as the synchronous standby is
    then what the new primary waits for, so every commit waits too. Without a name, in synchronous
    mode only the synchronous standby may take the leader lock (and the former primary only when no
    other member is healthy), so the same member wins and the replicas follow it at once: the write
    gap falls from about 3.6 s to about 1.8 s. With more than one synchronous standby the winner
    would be Patroni's pick, so the candidate is named then.
    """
    if view.get("pause"):  # Patroni in maintenance mode switches over to a named candidate only
        return candidate
    return None if sync_standbys(view) == [candidate] else candidate


def switchover(dep: Deployment, candidate: str | None = None, timeout: float = 90) -> Switched:
    """Patroni's planned switchover, confirmed by the cluster view (its HTTP answer is advisory)."""
    view = dep.cluster_view()
    old = leader_of(view)
    if old is None:
        raise DeploymentError("there is no running primary to switch over from", hint="see `pgbridge status`")
    names = [str(m["name"]) for m in view.get("members", [])]
    if candidate is not None and candidate not in names:
        raise DeploymentError(f"no member {candidate!r}; members: {', '.join(names)}")
    if candidate == old:
        raise DeploymentError(f"{candidate} is already the primary")
    if candidate is None:
        pick = candidates(view, old)[:1]
        if not pick:
            raise DeploymentError("no member can take over", hint="add multi_az: true or a promotable replica")
        candidate = str(pick[0]["name"])
    named = named_candidate(view, candidate)
    # Patroni answers the POST only on a whole second after the switchover (it polls its DCS once a
    # second), so its answer comes in a thread while the candidate itself is asked every 50 ms.
    answer: list[tuple[int, Any]] = []

    def ask() -> None:
        try:
            answer.append(dep.patroni(old).switchover(old, named))
        except Exception as e:  # no answer is not a refusal: the candidate is asked below
            answer.append((0, str(e)))

    threading.Thread(target=ask, name="pgbridge-switchover", daemon=True).start()
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
    looked = time.monotonic()
    while time.monotonic() < deadline:
        if accepts_writes(dep, candidate):
            return Switched(old, candidate)
        if named is None and time.monotonic() - looked >= 1:
            # Unnamed, Patroni promotes whoever holds the synchronous role when it acts, which could
            # have moved since the view above: follow the member that took the leader lock.
            looked = time.monotonic()
            with contextlib.suppress(TransientError):
                leader = leader_of(dep.cluster_view())
                if leader not in (None, old):
                    candidate = str(leader)
        status = answer[0][0] if answer else None
        if status not in (None, 0, 200, 202, 503):
            raise DeploymentError(f"Patroni refused the switchover ({status}): {answer[0][1]}")
        if status == 503:  # "Switchover failed", though 4.1.5 may say so while it still completes
            failed_at = failed_at or time.monotonic()
            if time.monotonic() - failed_at > 10:
                raise DeploymentError(f"Patroni could not switch over to {candidate}: {answer[0][1]}")
        time.sleep(0.05)
    said = f" (Patroni said {answer[0][0]}: {answer[0][1]})" if answer else ""
    raise DeploymentError(f"{candidate} did not become primary within {timeout:.0f}s{said}")


def accepts_writes(dep: Deployment, member: str) -> bool:
    """Whether `member`'s PostgreSQL answers as a primary (promoted, out of recovery) right now."""
    try:
        with admin_connection(dep.member_admin(member)) as c:
            row = c.execute("SELECT pg_is_in_recovery()").fetchone()
    except (TransientError, psycopg.Error):
        return False
    return row is not None and row[0] is False


def wait_commits_flow(dep: Deployment, member: str, timeout: float) -> bool:
    """Until a commit on `member` (the primary) would be acknowledged: it needs no synchronous standby,
    or one is streaming. False if not within `timeout`.

    After a switchover with strict synchronous replication, the new primary acknowledges nothing
    until a standby streams from it: the former primary (Patroni restarts it 2 s after releasing
    the leader key) or a promotable replica once it follows the new leader.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with admin_connection(dep.member_admin(member)) as c:
                row = c.execute(
                    "SELECT current_setting('synchronous_standby_names') = ''"
                    " OR EXISTS (SELECT FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum'))"
                ).fetchone()
            if row is not None and row[0]:
                return True
        except (TransientError, psycopg.Error):
            pass
        time.sleep(0.05)
    return False


def member_key(dep: Deployment, member: str) -> str:
    """The etcd key where a member's Patroni publishes its state (role, timeline, ...)."""
    return f"{NAMESPACE}{dep.spec.name}/members/{member}"


def promoted(dep: Deployment, member: str) -> bool:
    """Whether `member` has finished a promotion as Patroni's other members see it.

    A new primary publishes `role: primary` on its next HA loop and marks
    `checkpoint_after_promote: false` until its first checkpoint on the new timeline; a former
    primary starting meanwhile reads the old role, starts as a replica on the old timeline and
    has to be stopped again for pg_rewind (about 2 s more before it streams).
    """
    data = etcd.get_json(dep.port("etcd_client"), member_key(dep, member))
    return isinstance(data, dict) and data.get("role") == "primary" and "checkpoint_after_promote" not in data


def remove_member(dep: Deployment, member: str) -> None:
    """Delete a member's data once supervisord dropped its program (it is no longer in the spec).

    Patroni leaves a stopped member's key in etcd until its lease runs out; the member is gone for
    good, so its key goes now and the cluster view stops listing it.
    """
    if patroni_program(member) in dep.supervisor.processes():
        dep.supervisor.stop_program(patroni_program(member))
    etcd.delete_key(dep.port("etcd_client"), member_key(dep, member))
    shutil.rmtree(dep.home.pgdata(member), ignore_errors=True)
    (dep.home.patroni_conf(member)).unlink(missing_ok=True)
