"""Stop, start again, reboot and destroy a deployment."""

from __future__ import annotations

import shutil
import time

from pgbridge.errors import DeploymentError, NotFoundError, UsageError
from pgbridge.ops.context import Deployment
from pgbridge.ops.parameters import desired_parameters
from pgbridge.ops.tasks import Report
from pgbridge.ops.up import catalogue_for, deployment_lock, pending_reboot, stop_leftover_postgres


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


def reboot(dep: Deployment) -> Report:
    """Restart PostgreSQL through Patroni so pending static parameters take effect."""
    dep.home.require()
    report = Report()
    with deployment_lock(dep.home):
        if not dep.supervisor.running():
            raise DeploymentError("the deployment is stopped", hint="run `pgbridge up` to start it")
        api = dep.patroni()
        cat = catalogue_for(dep.settings)
        params = desired_parameters(dep.spec, dep.home, cat)
        before = pending_reboot(dep, params, cat)
        t0 = time.monotonic()
        api.restart()
        api.wait_running(timeout=180)
        after = pending_reboot(dep, params, cat)
        report.add("instance", "changed", f"restarted in {time.monotonic() - t0:.1f}s")
        if before:
            report.add("parameters", "changed", "applied: " + ", ".join(before))
        report.pending_reboot = after
        state = dep.state
        state["pending_reboot"] = after
        dep.home.write_state(state)
    return report
