"""Stop, start again, reboot and destroy a deployment."""

from __future__ import annotations

import contextlib
import shutil
import time

import psycopg

from pgbridge.errors import DeploymentError, NotFoundError, PgbridgeError, TransientError, UsageError
from pgbridge.ops import ha
from pgbridge.ops.context import Deployment
from pgbridge.ops.parameters import desired_parameters
from pgbridge.ops.tasks import Report
from pgbridge.ops.up import catalogue_for, deployment_lock, pending_reboot, stop_leftover_postgres
from pgbridge.plan.topology import PAIR
from pgbridge.platform.patroni import RUNNING_STATES, leader_of
from pgbridge.platform.postgres import admin_connection


def down(dep: Deployment) -> Report:
    """Clean stop: Patroni shuts PostgreSQL down (a checkpoint, no crash recovery), data kept."""
    dep.home.require()
    report = Report()
    with deployment_lock(dep.home):
        sup = dep.supervisor
        if sup.pid() is None:
            report.add("processes", "unchanged", "already stopped")
        else:
            sup.shutdown()
            report.add("processes", "stopped")
        stop_leftover_postgres(dep)
        state = dep.state
        state["phase"] = "stopped"
        dep.home.write_state(state)
    return report


def destroy(dep: Deployment, *, yes: bool) -> Report:
    if not yes:
        raise UsageError("destroy deletes the deployment and all its data; pass --yes to confirm")
    root = dep.home.root
    if not root.exists():
        raise NotFoundError(f"no deployment at {root}")
    if not dep.home.exists() and not (root / "spec.yaml").exists() and any(root.iterdir()):
        raise UsageError(f"{root} does not look like a pgbridge deployment home; refusing to delete it")
    dep.home.check_owner()
    report = Report()
    with deployment_lock(dep.home):
        if dep.supervisor.pid() is not None:
            dep.supervisor.shutdown()
            report.add("processes", "stopped")
        if dep.home.spec_file.exists():
            stop_leftover_postgres(dep)
        shutil.rmtree(root)
        report.add("home", "removed", str(root))
    lock = root.parent / f".{root.name}.lock"
    lock.unlink(missing_ok=True)
    return report


def reboot(dep: Deployment, *, failover: bool = False) -> Report:
    """Restart PostgreSQL through Patroni so pending static parameters take effect.

    With standbys it is a rolling restart, one member at a time: every running standby first (each
    streams again before the next step), then the primary, in place (writes wait for its restart)
    or, with `failover`, after a switchover to the synchronous standby (clients see the
    switchover's pause) and then the former primary as a standby. Restarting the synchronous
    standby holds commits on the primary until it streams again (strict synchronous replication).
    """
    dep.home.require()
    report = Report()
    with deployment_lock(dep.home):
        if not dep.supervisor.running():
            raise DeploymentError("the deployment is stopped", hint="run `pgbridge up` to start it")
        cat = catalogue_for(dep.settings)
        params = desired_parameters(dep.spec, dep.home, cat)
        before = pending_reboot(dep, params, cat)
        members = dep.recorded_members()
        view = dep.cluster_view() if len(members) > 1 else {}
        leader = leader_of(view) if view else dep.primary_member
        if leader is None:
            raise DeploymentError("no member runs as primary", hint="see `pgbridge status`")
        running = {str(m["name"]) for m in view.get("members", []) if m.get("state") in RUNNING_STATES}
        promotable = {str(m["name"]) for m in ha.candidates(view, leader)} if view else set()
        standbys = [m for m in members if m != leader]
        if failover and not promotable:
            raise UsageError("--failover needs a running standby that may be promoted",
                             hint="set multi_az: true (or add a promotable replica) and run `pgbridge up`")  # fmt: skip
        pair = next((p.name for p in dep.members if p.sync_priority == PAIR and p.name != leader), None)
        if dep.spec.multi_az and pair is not None and pair not in running and not promotable:
            raise DeploymentError(f"the synchronous standby {pair} is not running and no promotable replica stands"
                                  " in: commits wait for it already", hint="run `pgbridge up` to start it")  # fmt: skip
        for m in standbys:
            if m not in running:
                report.add(f"member {m}", "unchanged", "not running: it starts with the new settings")
                continue
            report.add(f"member {m}", "changed", f"standby restarted in {_restart(dep, m, 'replica'):.1f}s")
        target = pair if pair in running else None  # the Multi-AZ pair, not a replica standing in
        if dep.spec.multi_az and promotable:
            ha.wait_sync(dep, True, member=target)  # Patroni names the restarted standby again on its next loop
        if failover:
            from pgbridge.ops.drills import switchover

            moved = switchover(dep, target)
            gap = f", first commit after {moved.write_gap_s:.1f}s" if moved.write_gap_s is not None else ""
            report.add("primary", "changed", f"moved from {moved.old} to {moved.new}; writes paused"
                       f" {moved.paused_s:.1f}s{gap}")  # fmt: skip
            if moved.warning:
                raise DeploymentError(f"{moved.warning}; the former primary {moved.old} was not restarted",
                                      hint="once commits go through, run `pgbridge reboot` again")  # fmt: skip
            ha.wait_replica(dep.patroni(moved.old), moved.old, timeout=180)  # Patroni's demote ends first
            took = _restart(dep, moved.old, "replica")
            report.add(f"member {moved.old}", "changed", f"former primary restarted as a standby in {took:.1f}s")
            leader = moved.new
        else:
            report.add(f"member {leader}", "changed", f"primary restarted in {_restart(dep, leader, 'primary'):.1f}s")
            # A standby needs some parameters (max_connections, max_locks_per_transaction, ...) at
            # least as high as its primary runs them; lowered, Patroni starts it with the primary's
            # old value and flags it. Now that the primary runs the new value (replayed), again.
            # (After a switchover the new primary itself still runs the old value: nothing to gain.)
            for m in _flagged_standbys(dep, leader, set(params)):
                _replayed(dep, leader, m, timeout=60)
                report.add(f"member {m}", "changed", f"standby restarted again in {_restart(dep, m, 'replica'):.1f}s"
                           " (a lowered parameter it needs at least as high as the primary)")  # fmt: skip
        on_leader = pending_reboot(dep, params, cat)
        still = _flagged_standbys(dep, leader, set(params)) if standbys else {}
        after = set(on_leader).union(*still.values())
        hint = " (lowered with --failover: `pgbridge reboot` restarts the primary in place)" if failover else ""
        for m in [*still, *([leader] if on_leader else [])]:
            report.add(f"member {m}", "pending-reboot", f"still runs an old value{hint}")
        after_list = sorted(after)
        if before:
            report.add("parameters", "changed", "applied: " + ", ".join(before))
        report.pending_reboot = after_list
        state = dep.state
        state["pending_reboot"] = after_list
        dep.home.write_state(state)
    return report


def _flagged_standbys(dep: Deployment, leader: str, managed: set[str]) -> dict[str, set[str]]:
    """Running standbys that Patroni flags `pending_restart` for parameters pgbridge sets, and those.

    Patroni also flags parameters it manages itself (`recovery_target*` after a crash recovery);
    a restart changes nothing about those.
    """
    out: dict[str, set[str]] = {}
    for m in dep.cluster_view().get("members", []):
        name = str(m.get("name"))
        if name == leader or not m.get("pending_restart") or m.get("state") not in RUNNING_STATES:
            continue
        with contextlib.suppress(PgbridgeError):
            reasons = managed.intersection(dep.patroni(name, timeout=3).member().get("pending_restart_reason") or {})
            if reasons:
                out[name] = reasons
    return out


def _replayed(dep: Deployment, leader: str, member: str, timeout: float) -> None:
    """Until `member` has replayed the primary's WAL as of now (its parameter values included)."""
    try:
        with admin_connection(dep.member_admin(leader)) as c:
            row = c.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    except psycopg.Error as e:
        raise DeploymentError(f"cannot read the primary {leader}'s WAL position: {e}") from None
    lsn = str(row[0]) if row else "0/0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(TransientError, psycopg.Error), admin_connection(dep.member_admin(member)) as c:
            done = c.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()
            if done is not None and done[0]:
                return
        time.sleep(0.2)
    raise DeploymentError(f"standby {member} did not replay the primary's WAL up to {lsn} within {timeout:.0f}s")


def _restart(dep: Deployment, member: str, role: str) -> float:
    """Restart one member's PostgreSQL through its Patroni; until it runs in `role` (a standby: streams).

    A primary with a synchronous standby is back only when a commit would be acknowledged again.
    """
    t0 = time.monotonic()
    api = dep.patroni(member, timeout=330)  # Patroni answers /restart once PostgreSQL is back (start: 300 s)
    api.restart()
    if role == "replica":
        ha.wait_replica(api, member, timeout=180)
    else:
        api.wait_running(timeout=180, role=role)
        if len(dep.recorded_members()) > 1 and not ha.wait_commits_flow(dep, member, timeout=120):
            raise DeploymentError(f"{member} restarted, but no standby streams from it within 120s",
                                  hint="commits wait for the synchronous standby; see `pgbridge status`")  # fmt: skip
    return time.monotonic() - t0
