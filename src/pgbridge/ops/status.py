"""`pgbridge status` and `pgbridge params`: what is running and with which settings.

Returns plain data (dicts and dataclasses); the CLI renders it as a table or JSON.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

from pgbridge.errors import PgbridgeError, TransientError
from pgbridge.ops import endpoints
from pgbridge.ops.context import Deployment
from pgbridge.ops.parameters import desired_parameters
from pgbridge.ops.up import catalogue_for, pending_reboot
from pgbridge.plan.params import ParamValue, with_defaults
from pgbridge.platform import haproxy, pgbouncer
from pgbridge.platform.patroni import RUNNING_STATES
from pgbridge.platform.postgres import admin_connection
from pgbridge.platform.tls import cert_info


def _dir_size(path: Any) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def _members(dep: Deployment) -> list[dict[str, Any]]:
    """Every member with its role, state and replay lag, from Patroni's cluster view."""
    plans = {m.name: m for m in dep.members}
    try:
        view = dep.cluster_view()
    except TransientError as e:
        return [{"name": n, "state": "unreachable", "error": e.message} for n in dep.recorded_members()]
    rows = []
    for m in view.get("members", []):
        name = str(m.get("name"))
        role = {"leader": "primary", "sync_standby": "sync standby"}.get(str(m.get("role")), m.get("role"))
        lag = m.get("lag")
        plan = plans.get(name)
        rows.append(
            {
                "name": name,
                "role": role,
                "state": "running" if m.get("state") in RUNNING_STATES else m.get("state"),
                "port": m.get("port"),
                "timeline": m.get("timeline"),
                "lag_bytes": lag if isinstance(lag, int) else None,
                "kind": plan.kind if plan else "leaving",
                "region": plan.region if plan else None,
                "promotable": not plan.nofailover if plan else None,
            }
        )
    seen = {r["name"] for r in rows}
    rows += [{"name": n, "state": "stopped", "kind": p.kind} for n, p in plans.items() if n not in seen]
    return rows


def status(dep: Deployment) -> dict[str, Any]:
    dep.home.require()
    spec, state = dep.spec, dep.state
    out: dict[str, Any] = {
        "name": spec.name,
        "home": str(dep.home.root),
        "phase": state.get("phase"),
        "instance_class": spec.instance_class,
        "storage": {"type": spec.storage.type, "allocated_gb": spec.storage.size_gb},
        "ports": state.get("ports", {}),
        "endpoints": {"writer": dep.dsn(spec.database.users.app)},
        "processes": {},
        "members": [],
        "pending_reboot": [],
        "status": "stopped",
    }
    procs = dep.supervisor.processes()
    out["processes"] = {
        n: {
            "state": p["statename"],
            "pid": p["pid"] or None,
            "uptime_s": max(0, p["now"] - p["start"]) if p["pid"] else 0,
        }
        for n, p in procs.items()
    }
    if not procs:
        return out
    out["members"] = _members(dep)
    if endpoints.enabled(dep):
        u = spec.database.users
        out["endpoints"] = {
            "writer": endpoints.dsn(dep, u.app, "writer"),
            "reader": endpoints.dsn(dep, u.app, "reader"),
            "instance": dep.dsn(u.app),
        }
        with contextlib.suppress(PgbridgeError, OSError):
            hp = endpoints.haproxy_state(dep)
            out["endpoints"]["writer_reaches"] = list(hp.targets(haproxy.WRITER))
            out["endpoints"]["reader_reaches"] = list(hp.targets(haproxy.READER))
        try:
            out["endpoints"]["pools"] = [
                {
                    "database": p.database,
                    "user": p.user,
                    "clients_active": p.cl_active,
                    "clients_waiting": p.cl_waiting,
                    "servers_active": p.sv_active,
                    "servers_idle": p.sv_idle,
                    "longest_wait_s": round(p.maxwait_s, 3),
                }
                for p in endpoints.console(dep).show_pools()
                if p.database != pgbouncer.ADMIN_DATABASE
            ]
        except PgbridgeError as e:  # PgBouncer down or refusing: say so, not "no pools"
            out["endpoints"]["pools_error"] = e.message
    try:
        cat = catalogue_for(dep.settings)
        out["pending_reboot"] = pending_reboot(dep, desired_parameters(spec, dep.home, cat), cat)
        with admin_connection(dep.admin) as c:
            row = c.execute(
                "SELECT pg_database_size(%s), current_setting('data_checksums'), pg_postmaster_start_time()",
                (spec.database.name,),
            ).fetchone()
            if row:
                out["database_size_bytes"] = int(row[0])
                out["data_checksums"] = row[1]
                out["started_at"] = row[2].isoformat()
    except PgbridgeError as e:
        out["error"] = e.message
    running = any(m.get("role") == "primary" and m.get("state") == "running" for m in out["members"])
    healthy = running and all(m.get("state") == "running" for m in out["members"])
    out["status"] = ("pending-reboot" if out["pending_reboot"] else "available") if healthy else "degraded"
    data = dep.home.data
    out["storage"]["used_bytes"] = _dir_size(data)
    out["storage"]["filesystem_free_bytes"] = shutil.disk_usage(data).free
    try:
        ci = cert_info(dep.home.tls / "server.crt")
        out["tls"] = {
            "mode": spec.tls.mode,
            "server_cert_expires": ci.not_after.isoformat(),
            "days_left": int((ci.not_after.timestamp() - time.time()) // 86400),
        }
    except (OSError, PgbridgeError, ValueError):
        out["tls"] = {"mode": spec.tls.mode}
    return out


@dataclass(frozen=True)
class ParamRow:
    name: str
    value: str
    source: str
    running: str | None
    static: bool
    pending_reboot: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def params(dep: Deployment, *, diff: bool = False) -> list[ParamRow]:
    """Effective values and where each came from; `diff` keeps the ones not at the server default."""
    dep.home.require()
    cat = catalogue_for(dep.settings)
    desired = desired_parameters(dep.spec, dep.home, cat)
    running: dict[str, str] = {}
    try:
        with admin_connection(dep.admin) as c:
            running = {r[0]: str(r[1]) for r in c.execute("SELECT name, reset_val FROM pg_settings")}
    except TransientError:
        pass
    rows = []
    shown = desired if diff else with_defaults(desired, cat)
    for name, pv in sorted(shown.items()):
        cur = running.get(name)
        static = cat.is_static(name)
        pend = static and cur is not None and not cat.same_value(name, cur, pv.value)
        if diff:
            boot = cat.get(name).boot_val
            if boot is not None and cat.same_value(name, boot, pv.value):
                continue
        elif pv.source == "default" and cur is not None and not cat.same_value(name, cur, pv.value):
            # Not set by pgbridge but not at the boot value either: Patroni or initdb chose it.
            pv = ParamValue(name, cur, "engine")
        rows.append(ParamRow(name, pv.value, pv.source, cur, static, pend))
    return rows
