"""`pgbridge up`: converge a deployment to its spec, idempotently, undoing a failed creation.

Pre-flight checks (binaries, user, ports, parameter catalogue) run before anything is written,
so most bad input fails with nothing to undo. A first `up` that fails later removes what it
made; an `up` killed outright leaves phase 'creating' and the next `up` resumes, every step
being idempotent.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import yaml

from pgbridge.errors import DeploymentError, HostError, PgbridgeError, TransientError
from pgbridge.home import Home, atomic_write, write_if_changed
from pgbridge.ops import backup as backup_ops
from pgbridge.ops import endpoints, ha
from pgbridge.ops import pipeline as pipeline_ops
from pgbridge.ops.context import (
    REST_SECRET,
    REST_USER,
    Deployment,
    member_listen_addresses,
    pooler_listen_addresses,
    secret_name_for_role,
)
from pgbridge.ops.parameters import desired_parameters, host_resources
from pgbridge.ops.pmwatch import PROGRAM as PMWATCH
from pgbridge.ops.tasks import Report, Undo, interruptible
from pgbridge.plan.hba import ADMIN_ROLE, REPLICATION_ROLE, REWIND_ROLE, HbaInput, render_hba, render_ident
from pgbridge.plan.instance_classes import resolve_class
from pgbridge.plan.params import ParamValue
from pgbridge.plan.topology import STAND_IN, member_name, members
from pgbridge.platform import etcd, system
from pgbridge.platform.catalogue import Catalogue, load_catalogue
from pgbridge.platform.patroni import (
    PROFILES,
    MemberConfig,
    PatroniAPI,
    leader_of,
    post_bootstrap_script,
    render_member,
)
from pgbridge.platform.postgres import CDC, LEAST, RoleSpec, admin_connection, ensure_database, ensure_role, wait_admin
from pgbridge.platform.supervisor import Program, render_config
from pgbridge.platform.tls import ensure_ca, ensure_server_cert
from pgbridge.secrets.store import MasterKey, SecretStore, generate_password
from pgbridge.settings import Settings
from pgbridge.spec.models import Spec

Step = Callable[[str], None]


@contextlib.contextmanager
def deployment_lock(home: Home) -> Iterator[None]:
    """One operation at a time per deployment (a second `up` waits for the first)."""
    home.root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = home.root.parent / f".{home.root.name}.lock"
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HostError(
                f"another pgbridge command is working on {home.root}", hint="wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def catalogue_for(settings: Settings) -> Catalogue:
    return load_catalogue(
        settings.binaries.pg_bindir,
        run_as=settings.user.name if settings.user.switch else None,
        cache_dir=settings.cache_dir,
    )


def check_python_for_service_user(settings: Settings) -> None:
    """Patroni runs as the service user, so that user must be able to run our interpreter."""
    if not settings.user.switch:
        return
    py = settings.binaries.python
    argv = settings.user.command([str(py), "-c", "import patroni, psycopg2"])
    try:
        system.run(argv, what="interpreter check", timeout=60)
    except PgbridgeError:
        raise HostError(
            f"OS user '{settings.user.name}' cannot run {py} with Patroni installed",
            hint="create the virtual environment with the system Python in a folder every user can read"
            " (the README's setup does: /opt/pgbridge/venv), not under /root or a pyenv install",
        ) from None


def _ports(state: dict[str, Any], spec: Spec, running: bool) -> dict[str, int]:
    """Recorded internal ports, reallocated if the deployment is down and one is now taken.

    Member 1's PostgreSQL port is the spec's; other members, their REST APIs, etcd and the
    endpoints get free ports once and keep them (endpoint ports the spec names win).
    """
    old: dict[str, int] = dict(state.get("ports", {}))
    first = member_name(spec.name)
    keys = ["etcd_client", "etcd_peer"]
    for m in members(spec):
        keys.append(f"patroni:{m.name}")
        if m.name != first:
            keys.append(f"postgres:{m.name}")
    ep = spec.effective_endpoints()
    fixed: dict[str, int] = {}
    if ep is not None:
        keys += list(endpoints.PORT_KEYS)
        for key, value in zip(endpoints.PORT_KEYS, (ep.writer_port, ep.reader_port, ep.pooler.port), strict=True):
            if value is not None:
                fixed[key] = value
    ports: dict[str, int] = {"postgres": spec.network.port}
    used = {spec.network.port, *fixed.values()}
    if len(used) != 1 + len(fixed):
        raise HostError(f"the spec uses one port twice: {sorted([spec.network.port, *fixed.values()])}")
    pooler = pooler_listen_addresses(spec)  # the other internal ports are on loopback

    def where(key: str) -> tuple[str, ...]:
        return pooler if key == endpoints.POOLER_PORT_KEY else ("127.0.0.1",)

    for key in keys:
        if key in fixed:
            if fixed[key] != old.get(key) or not running:
                system.check_port_free(fixed[key], where(key), key)
            ports[key] = fixed[key]
            continue
        port = old.get(key)
        if port is not None and not running:
            try:
                system.check_port_free(port, where(key), key)
            except HostError:
                port = None
        if port is None or port in used:
            port = system.free_port(used)
        ports[key] = port
        used.add(port)
    return ports


def _make_dirs(dep: Deployment) -> None:
    h, user = dep.home, dep.settings.user
    system.make_dir(h.root, 0o755)
    system.make_dir(h.etc, 0o755)
    system.make_dir(h.tls, 0o755)
    system.make_dir(h.run, 0o755, user)
    system.make_dir(h.logs, 0o750, user)
    system.make_dir(h.logs / "postgresql", 0o700, user)
    system.make_dir(h.data, 0o700, user)


def _open_secrets(home: Home, create: bool) -> tuple[SecretStore, bool]:
    key = MasterKey.resolve(home.key_file, create=create)
    if home.secrets_file.exists():
        return SecretStore.open(home.secrets_file, key), False
    return SecretStore.create(home.secrets_file, key), True


def _ensure_passwords(store: SecretStore, names: list[str]) -> bool:
    created = False
    for n in names:
        if n not in store:
            store.set(n, generate_password())
            created = True
    return created


def _tls(dep: Deployment, report: Report) -> None:
    spec, home, user = dep.spec, dep.home, dep.settings.user
    report.add("tls ca", ensure_ca(home.tls, f"pgbridge {spec.name} CA"))
    ips = {"127.0.0.1", "::1"} | {a for a in spec.network.listen_addresses if a not in ("*", "0.0.0.0", "::")}
    dns = ["localhost", socket.gethostname(), *spec.tls.hostnames]
    report.add(
        "tls server certificate",
        ensure_server_cert(
            home.tls, common_name=dep.client_host(), dns_names=sorted(set(dns)), ip_addresses=sorted(ips)
        ),
    )
    for f in ("server.crt", "server.key"):
        system.chown(home.tls / f, user)
    os.chmod(home.tls / "server.key", 0o600)
    os.chmod(home.tls / "ca.crt", 0o644)


def hba_input(spec: Spec) -> HbaInput:
    return HbaInput(
        allowed_cidrs=tuple(spec.network.allowed_cidrs),
        tls_required=spec.tls.mode == "required",
        cdc_loopback=(spec.database.name, spec.database.users.cdc) if spec.pipeline else None,
        endpoint_cidrs=("127.0.0.1/32",) if spec.effective_endpoints() else (),
    )


SYNC_MAX_LAG = 64 << 20  # bytes: Patroni's maximum_lag_on_syncnode while a stand-in may hold the role


def _has_stand_in(spec: Spec) -> bool:
    return bool(spec.multi_az) and any(m.sync_priority == STAND_IN for m in members(spec))


def _primary_start_timeout(spec: Spec) -> int:
    """How long Patroni restarts a crashed primary (postmaster dead, Patroni alive) in place
    before it fails over.

    - With a stand-in (a promotable replica besides the Multi-AZ pair): at once. The synchronous
      standby has every acknowledged commit and the stand-in becomes its synchronous standby, so
      commits go on within about 1 s whatever the crashed member's recovery takes.
    - Two members: in place first. With strict synchronous replication a new primary acknowledges
      nothing until the crashed member streams from it, i.e. has gone through the same crash
      recovery as a standby, and through pg_rewind too if it had WAL the standby never received:
      failing over measured 2.6-2.7 s, 6 s with the rewind, against 1.0-1.1 s in place. A member
      that is not running as primary again within 60 s (it cannot start) is failed over.
    - A lone instance (or asynchronous replicas only, which may lack commits): in place, Patroni's
      300 s.
    """
    if _has_stand_in(spec):
        return 0
    return 60 if spec.multi_az else 300


def _dcs(spec: Spec, params: dict[str, ParamValue], settings: Settings, sync_on: bool = True) -> dict[str, Any]:
    operator = "root" if os.geteuid() == 0 else settings.user.name
    # Patroni drops replication slots it does not know. The pipeline's slot is created by its
    # daemon (the initial load reads under the snapshot it exports). When another member may take
    # over, it is a permanent slot: Patroni copies it to those members and keeps the copies
    # advancing, so the pipeline resumes on a new primary. Patroni also creates a permanent slot
    # it finds missing; the daemon drops that one before its own load, and refuses (slot-lost) a
    # slot that starts beyond where it left off.
    slots: dict[str, Any] = {}
    ignore: list[dict[str, str]] = []
    if spec.pipeline:
        slot = {"type": "logical", "database": spec.database.name, "plugin": "pgoutput"}
        name = f"pgbridge_{spec.pipeline.name}"
        if any(not m.nofailover for m in members(spec)[1:]):
            slots[name] = slot
        else:
            ignore.append({"name": name, **slot})
    return {
        **PROFILES[spec.failover_profile],
        "primary_start_timeout": _primary_start_timeout(spec),
        "synchronous_mode": bool(spec.multi_az and sync_on),
        "synchronous_mode_strict": bool(spec.multi_az and sync_on),
        "synchronous_node_count": 1,
        "maximum_lag_on_failover": 1048576,
        # With a stand-in, a pair member back from a long outage is chosen synchronous standby only
        # once it is within this many bytes of the most advanced standby: commits would otherwise
        # wait for it to catch up although the stand-in keeps up. Patroni compares a lone standby
        # with the primary's WAL instead, where a bulk write can run ahead further; then it empties
        # /sync (no failover) until the standby is near again, so the value is far above a commit's
        # WAL. Without a stand-in there is nothing to prefer: off.
        "maximum_lag_on_syncnode": SYNC_MAX_LAG if _has_stand_in(spec) else -1,
        "slots": slots,
        "ignore_slots": ignore,
        "postgresql": {
            "use_pg_rewind": True,
            "use_slots": True,
            "parameters": {k: v.value for k, v in sorted(params.items())},
            "pg_hba": render_hba(hba_input(spec)),
            "pg_ident": render_ident(settings.user.name, operator),
        },
    }


@dataclass
class Rendered:
    members_changed: set[str]  # members whose Patroni file changed
    endpoints_changed: set[str]  # endpoint programs whose files changed
    backup_changed: bool = False  # pgbackrest.conf or the scheduler's config changed
    scheduler_changed: bool = False  # the scheduler's own config (read once at its start) changed


def _render(dep: Deployment, dcs: dict[str, Any], ports: dict[str, int], report: Report, first: bool) -> Rendered:
    """Write every config file and the supervisor config."""
    spec, home, settings, store = dep.spec, dep.home, dep.settings, dep.secrets
    b = settings.binaries
    write_if_changed(home.etc / "post_bootstrap.sh", post_bootstrap_script(b.pg_bindir, ADMIN_ROLE), mode=0o755)
    listen = member_listen_addresses(spec)
    changed: set[str] = set()
    programs = [
        Program(
            "etcd", etcd.etcd_command(b.etcd, home, spec.name, ports["etcd_client"], ports["etcd_peer"]), priority=10
        )
    ]
    for m in dep.members:
        cfg = MemberConfig(
            scope=spec.name,
            member=m.name,
            rest_port=ports[f"patroni:{m.name}"],
            pg_port=spec.network.port if m.name == dep.primary_member else ports[f"postgres:{m.name}"],
            listen_addresses=listen,
            connect_address=dep.client_host(),
            etcd_hosts=(f"127.0.0.1:{ports['etcd_client']}",),
            bindir=b.pg_bindir,
            rest_user=REST_USER,
            rest_password=store.get(REST_SECRET).reveal(),
            replication_password=store.get(secret_name_for_role(REPLICATION_ROLE)).reveal(),
            rewind_password=store.get(secret_name_for_role(REWIND_ROLE)).reveal(),
            dcs=dcs,
            tags=m.tags(),
        )
        conf = home.patroni_conf(m.name)
        if write_if_changed(conf, render_member(home, cfg), mode=0o600):
            changed.add(m.name)
        system.chown(conf, settings.user)
        programs.append(
            Program(
                ha.patroni_program(m.name),
                [str(b.patroni), str(conf)],
                priority=20,
                stop_wait=120,
                stop_signal="TERM",
                # Member 1 bootstraps the cluster; the others join once a leader exists (`up`
                # starts them), so none of them can win the race to initialize it.
                autostart=m.name == dep.primary_member,
            )
        )
    # Wakes a member's Patroni the moment its postmaster dies (see ops/pmwatch.py).
    programs.append(Program(PMWATCH, [str(b.python), "-m", "pgbridge.ops.pmwatch", str(home.root)], priority=25))
    endpoint_programs, endpoints_changed = endpoints.render(dep, ports)
    programs += endpoint_programs
    pipeline_program = pipeline_ops.program(dep)
    if pipeline_program is not None:
        programs.append(pipeline_program)
    backup_programs, backup_changed, scheduler_changed = backup_ops.render(dep)
    programs += backup_programs
    sup_changed = dep.supervisor.write_config(render_config(home, spec.name, settings.user, programs))
    if not (changed or sup_changed or endpoints_changed or backup_changed):
        report.add("process config", "unchanged")
    else:
        report.add("process config", "created" if first else "changed")
    return Rendered(changed, endpoints_changed, backup_changed, scheduler_changed)


def _normalized_params(raw: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (raw or {}).items()}


def _config_when_ready(api: PatroniAPI, timeout: float = 60) -> dict[str, Any]:
    """Right after bootstrap Patroni answers 502 until the config key is in etcd."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return api.config()
        except TransientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _reconcile_dcs(dep: Deployment, api: PatroniAPI, dcs: dict[str, Any], cat: Catalogue, report: Report) -> list[str]:
    """Patch Patroni's dynamic configuration to ``dcs``; the parameters changed, and "pg_hba" when
    the network rules did (:func:`wait_dynamic_applied` waits for both)."""
    current = _config_when_ready(api)
    cur_pg = current.get("postgresql", {})
    want_pg = dcs["postgresql"]
    patch_pg: dict[str, Any] = {}
    changed_params: list[str] = []
    cur_params = _normalized_params(cur_pg.get("parameters", {}))
    want_params: dict[str, str] = want_pg["parameters"]
    param_patch: dict[str, Any] = {}
    for name, value in want_params.items():
        old = cur_params.get(name)
        if old is None or not cat.same_value(name, old, value):
            param_patch[name] = value
            changed_params.append(name)
    for name in cur_params.keys() - want_params.keys():
        param_patch[name] = None
        changed_params.append(name)
    if param_patch:
        patch_pg["parameters"] = param_patch
    for key in ("pg_hba", "pg_ident", "use_pg_rewind", "use_slots"):
        if cur_pg.get(key) != want_pg[key]:
            patch_pg[key] = want_pg[key]
    current = {**current, "slots": current.get("slots") or {}, "ignore_slots": current.get("ignore_slots") or []}
    patch: dict[str, Any] = {k: v for k, v in dcs.items() if k != "postgresql" and current.get(k) != v}
    if "slots" in patch:  # Patroni merges a PATCH into its config: a slot no longer wanted is set to null
        patch["slots"] = {**dict.fromkeys(current["slots"]), **dcs["slots"]}
    if patch_pg:
        patch["postgresql"] = patch_pg
    if not patch:
        first = dep.state.get("phase") == "creating"
        report.add("parameters", "created" if first else "unchanged", f"{len(want_params)} set" if first else "")
        report.add("network rules (pg_hba)", "created" if first else "unchanged")
        return []
    api.patch_config(patch)
    report.add("parameters", "changed" if changed_params else "unchanged", ", ".join(sorted(changed_params)))
    hba_changed = "pg_hba" in patch_pg or "pg_ident" in patch_pg
    report.add("network rules (pg_hba)", "changed" if hba_changed else "unchanged")
    return changed_params + (["pg_hba"] if hba_changed else [])


def wait_dynamic_applied(dep: Deployment, params: dict[str, ParamValue], names: list[str], cat: Catalogue) -> None:
    """Wait until Patroni has reloaded PostgreSQL with the new dynamic values (one HA cycle)."""
    dynamic = [n for n in names if n in params and not cat.is_static(n)]
    static = [n for n in names if n in params and cat.is_static(n)]
    hba_file = dep.home.pgdata(dep.leader()) / "pg_hba.conf"
    want_hba = render_hba(hba_input(dep.spec))
    timeout = PROFILES["default"]["loop_wait"] * 2 + 20
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = []
        with admin_connection(dep.admin) as c:
            for n in dynamic:
                row = c.execute("SELECT reset_val FROM pg_settings WHERE name = %s", (n,)).fetchone()
                if row is None or not cat.same_value(n, str(row[0]), params[n].value):
                    pending.append(n)
            # A static change is "applied" once PostgreSQL has reloaded the file and flags it.
            for n in static:
                row = c.execute("SELECT reset_val, pending_restart FROM pg_settings WHERE name = %s", (n,)).fetchone()
                if row is not None and not row[1] and not cat.same_value(n, str(row[0]), params[n].value):
                    pending.append(n)
        try:
            hba_now = [ln for ln in hba_file.read_text().splitlines() if ln and not ln.startswith("#")]
        except OSError:
            hba_now = []
        if hba_now != want_hba:
            pending.append("pg_hba")
        if not pending:
            return
        time.sleep(0.5)
    raise DeploymentError(f"Patroni did not apply {', '.join(pending)} within {timeout}s; see {dep.home.logs}")


def pending_reboot(dep: Deployment, params: dict[str, ParamValue], cat: Catalogue) -> list[str]:
    """Static parameters whose running value differs from the desired one.

    ``listen_addresses`` is not among ``params`` (Patroni's member files carry it), but a change
    to it, such as the 127.0.0.1 a new pipeline needs, also waits for a restart.
    """
    out = []
    with admin_connection(dep.admin) as c:
        rows = c.execute("SELECT name, reset_val, pending_restart FROM pg_settings").fetchall()
    running = {r[0]: (str(r[1]), bool(r[2])) for r in rows}
    for name, pv in params.items():
        if name not in running or not cat.is_static(name):
            continue
        value, flagged = running[name]
        if flagged or not cat.same_value(name, value, pv.value):
            out.append(name)
    if running.get("listen_addresses", ("", False))[1]:
        out.append("listen_addresses")
    return sorted(out)


REWIND_FUNCTIONS = (
    "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    "pg_catalog.pg_stat_file(text, boolean)",
    "pg_catalog.pg_read_binary_file(text)",
    "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
)


def _bootstrap_sql(dep: Deployment, report: Report) -> None:
    spec, store = dep.spec, dep.secrets
    u = spec.database.users

    def pw(role: str) -> str:
        return store.get(secret_name_for_role(role)).reveal()

    roles = [
        RoleSpec(u.app, pw(u.app), LEAST),
        RoleSpec(u.readonly, pw(u.readonly), LEAST),
        RoleSpec(u.cdc, pw(u.cdc), CDC),
        RoleSpec(REPLICATION_ROLE, pw(REPLICATION_ROLE), CDC),
    ]
    with admin_connection(dep.admin) as conn:
        for r in roles:
            report.add(f"role {r.name}", ensure_role(conn, r))  # type: ignore[arg-type]
        # pg_rewind (and Patroni's copy of logical slots) read the leader's files as this role:
        # the four file functions pg_rewind documents, nothing else.
        report.add(f"role {REWIND_ROLE}", ensure_role(conn, RoleSpec(REWIND_ROLE, pw(REWIND_ROLE), LEAST)))  # type: ignore[arg-type]
        conn.execute(f"GRANT CONNECT ON DATABASE postgres TO {REWIND_ROLE}")
        for fn in REWIND_FUNCTIONS:
            conn.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {REWIND_ROLE}")
    for resource, action in ensure_database(
        dep.admin, db=spec.database.name, schema=spec.database.schema_, app=u.app, readonly=u.readonly, cdc=u.cdc
    ).items():
        report.add(resource, action)  # type: ignore[arg-type]


def stop_leftover_postgres(dep: Deployment) -> None:
    """After supervisord is gone, stop any PostgreSQL it left behind (by pid, never by name)."""
    data = dep.home.data
    folders = [f for f in data.iterdir() if f.is_dir()] if data.is_dir() else []
    pids = [pid for f in folders if (pid := system.read_pid(f / "postmaster.pid")) and system.pid_alive(pid)]
    for pid in pids:
        os.kill(pid, signal.SIGINT)  # fast shutdown
    for _ in range(300):
        if not any(system.pid_alive(pid) for pid in pids):
            break
        time.sleep(0.1)


def _wait_leader(dep: Deployment, *, first: bool, timeout: float = 300) -> str:
    """The member that is primary once PostgreSQL runs (member 1 when the cluster is new)."""
    if first:
        dep.patroni(dep.primary_member).wait_running(timeout=timeout, role="primary")
        return dep.primary_member
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            view = dep.cluster_view()
            leader = leader_of(view)
            if leader is not None:
                dep.patroni(leader).wait_running(timeout=max(1.0, deadline - time.monotonic()), role="primary")
                return leader
            last = ", ".join(f"{m.get('name')}: {m.get('role')}/{m.get('state')}" for m in view.get("members", []))
        except TransientError as e:
            last = e.message
        time.sleep(0.5)
    raise DeploymentError(f"no member became primary within {timeout:.0f}s ({last})", hint=f"see {dep.home.logs}")


def _before_removal(dep: Deployment, removed: list[str], report: Report) -> None:
    """Members about to leave hold no role the others need: not the leader, not the sync standby."""
    view = dep.cluster_view()
    standby = member_name(dep.spec.name, 2)
    if standby not in removed and dep.spec.multi_az:
        _refuse_removing_the_stand_in(dep, view, removed)  # before anything changes
    if leader_of(view) in removed:
        # In synchronous mode only the synchronous standby may take over, and a member back from a
        # failover gets that role on a later loop of Patroni's: member 1 when it is named in time,
        # else whichever staying member is.
        ha.wait_switchable(dep, dep.primary_member, timeout=30)
        named = [m for m in ha.sync_standbys(dep.cluster_view()) if m not in removed]
        candidate = dep.primary_member if dep.primary_member in named or not named else named[0]
        moved = ha.switchover(dep, candidate=candidate)
        report.add("primary", "changed", f"switched over from {moved.old} to {moved.new} before removing it")
    if standby in removed:
        # Strict synchronous replication with its standby gone would block every commit.
        api = dep.patroni(leader_of(dep.cluster_view()))
        api.patch_config({"synchronous_mode": False, "synchronous_mode_strict": False})
        ha.wait_sync(dep, False)
        report.add("multi-az (synchronous standby)", "removed")


def _refuse_removing_the_stand_in(dep: Deployment, view: dict[str, Any], removed: list[str]) -> None:
    """Members leave only if a member that may be promoted still streams from the primary afterwards.

    With strict synchronous replication a promotable replica stands in as the synchronous standby
    while the Multi-AZ pair is broken; removing it then would make every commit wait until the lost
    member is back. Whatever role Patroni shows (it clears `/sync` at times and then names nobody),
    the primary is asked who streams: a lost member's key stays in etcd, with its last state, until
    its lease runs out.
    """
    leader = leader_of(view)
    if leader is None or leader in removed:
        return  # no primary to keep writable; a leaving primary is switched over first
    able = {str(m["name"]) for m in view.get("members", []) if not m.get("tags", {}).get("nofailover")}
    try:
        with admin_connection(dep.member_admin(leader)) as c:
            rows = c.execute("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'").fetchall()
    except psycopg.Error as e:
        raise DeploymentError(f"cannot ask the primary {leader} which members stream: {str(e).strip()}") from None
    streaming = {str(r[0]) for r in rows} & able
    leaving = sorted(streaming & set(removed))
    if leaving and not streaming - set(removed):
        raise DeploymentError(
            f"{leaving[0]} is the only member that may be promoted streaming from the primary: with strict"
            " synchronous replication, removing it now would stop every commit",
            hint="bring the Multi-AZ member back first (see `pgbridge status`), then run `up` again",
        )


def up(
    settings: Settings,
    spec: Spec,
    spec_text: str,
    home: Home,
    step: Step = lambda s: None,
    seed: Callable[[Deployment], None] | None = None,
) -> Report:
    """`seed`, for a new deployment only, fills member 1's data folder before Patroni starts
    (a restore); Patroni then takes that data over instead of running initdb."""
    report = Report()
    home.check_owner()
    with deployment_lock(home), interruptible():
        state = home.read_state()
        if state and state.get("name") != spec.name:
            raise HostError(f"{home.root} holds deployment {state.get('name')!r}, not {spec.name!r}")
        fresh = not state
        dep = Deployment(settings, home, spec)
        # --- pre-flight: nothing is written before these pass -------------------------------
        step("pre-flight checks")
        system.check_reachable_by(home.root.parent, settings.user)
        cpus, mem = host_resources()
        cls = resolve_class(spec.instance_class, cpus, mem)
        if cls.memory_bytes > mem:
            raise HostError(
                f"instance class {spec.instance_class} needs {cls.memory_gib:.0f} GiB of memory;"
                f" this host has {mem / 1024**3:.1f} GiB",
                hint="choose a smaller instance_class, or `auto`",
            )
        running = home.exists() and dep.supervisor.running()
        if running and state.get("ports", {}).get("postgres") not in (None, spec.network.port):
            raise DeploymentError(
                f"the port of a running deployment cannot change ({state['ports']['postgres']} -> {spec.network.port})",
                hint="run `pgbridge down`, then `pgbridge up` with the new port",
            )
        if not running:
            system.check_port_free(spec.network.port, member_listen_addresses(spec), "PostgreSQL")
            check_python_for_service_user(settings)
        if spec.effective_endpoints() is not None:
            settings.binaries.endpoint_tools()  # a missing HAProxy or PgBouncer names its package
        if spec.backup.enabled:
            settings.binaries.backup_tool()
        cat = catalogue_for(settings)
        params = desired_parameters(spec, home, cat)
        ports = _ports(state, spec, running)
        old_members = [k.split(":", 1)[1] for k in state.get("ports", {}) if k.startswith("patroni:")]
        wanted = [m.name for m in dep.members]
        removed = [m for m in old_members if m not in wanted]
        if running and removed:
            step("handing over before members leave")
            _before_removal(dep, removed, report)

        undo = Undo()
        try:
            step("home folder")
            if fresh:
                undo.push("remove home", lambda: shutil.rmtree(home.root, ignore_errors=True))
            _make_dirs(dep)
            state = {**state, "name": spec.name, "ports": ports}
            if "pipeline_stopped" in state and not pipeline_ops.stop_holds(
                state["pipeline_stopped"], spec.pipeline.name if spec.pipeline else None
            ):
                del state["pipeline_stopped"]  # `pipeline stop` of a pipeline the spec no longer has
            state.setdefault("phase", "creating")
            state.setdefault("created_at", time.time())
            home.write_state(state)
            atomic_write(home.spec_file, spec_text, mode=0o644)
            report.add("home", "created" if fresh else "unchanged", str(home.root))

            step("secrets")
            store, created = _open_secrets(home, create=fresh)
            dep.__dict__["secrets"] = store
            u = spec.database.users
            roles = (u.app, u.readonly, u.cdc, REPLICATION_ROLE, REWIND_ROLE)
            names = [secret_name_for_role(r) for r in roles] + [REST_SECRET, *endpoints.secret_names(dep)]
            added = _ensure_passwords(store, names + backup_ops.secret_names(spec))
            added = backup_ops.store_s3_credentials(dep) or added
            report.add("secrets", "created" if created else ("changed" if added else "unchanged"))

            step("tls")
            _tls(dep, report)

            step("configuration")
            # Synchronous replication goes on only once the standby streams (strict mode with no
            # standby blocks every commit), so the bootstrap and a new standby start without it.
            standby = member_name(spec.name, 2)
            dcs = _dcs(spec, params, settings, sync_on=standby in old_members)
            rendered = _render(dep, _dcs(spec, params, settings, sync_on=False), ports, report, first=fresh)

            step("processes")
            sup = dep.supervisor
            if fresh:

                def stop_all() -> None:
                    sup.shutdown()
                    stop_leftover_postgres(dep)

                undo.push("stop processes", stop_all)
            programs_changed: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
            if fresh and seed is not None:
                step("restoring data")
                seed(dep)
            if sup.running():
                programs_changed = sup.reread(around=lambda names: ha.patroni_paused(dep, names))
                report.add("processes", "changed" if any(programs_changed.values()) else "unchanged")
            else:
                sup.start()
                report.add("processes", "started")
            etcd.wait_healthy(ports["etcd_client"], timeout=60)
            for m in removed:
                ha.remove_member(dep, m)
                report.add(f"member {m}", "removed")
            for m in rendered.members_changed:
                if running and m in old_members:
                    with contextlib.suppress(TransientError):
                        dep.patroni(m).reload()
            step("postgresql (Patroni bootstrap on first start)")
            leader = _wait_leader(dep, first=not old_members)
            api = dep.patroni(leader)
            wait_admin(dep.admin, timeout=120)

            step("parameters and network rules")
            changed = _reconcile_dcs(dep, api, dcs, cat, report)
            if changed or fresh:  # a new pg_hba too: the pipeline daemon, restarted below, logs in under it
                wait_dynamic_applied(dep, params, changed or list(params), cat)

            step("database, schema and users")
            _bootstrap_sql(dep, report)
            endpoints.ensure_auth(dep, report)

            joining = [m for m in wanted if m != leader]
            if joining:
                step("standbys and replicas")
                for m in joining:
                    sup.start_program(ha.patroni_program(m))
                for m in joining:
                    ha.wait_replica(dep.patroni(m), m, timeout=600)
                    if m not in old_members:
                        report.add(f"member {m}", "created")
            if spec.multi_az:
                step("synchronous replication (Multi-AZ)")
                _reconcile_dcs(dep, api, _dcs(spec, params, settings, sync_on=True), cat, Report())
                ha.wait_sync(dep, True)
                report.add("multi-az (synchronous standby)", "created" if standby not in old_members else "unchanged")

            if endpoints.enabled(dep):
                step("endpoints")
                fresh_programs = set(programs_changed["added"]) | set(programs_changed["changed"])
                # PgBouncer always re-reads its files (cheap; connected clients stay): an earlier
                # `up` that failed after writing a narrower hba file must not leave the old rules
                # in force while this run finds nothing changed on disk.
                reloads = rendered.endpoints_changed | {endpoints.PGBOUNCER}
                endpoints.reload(dep, reloads - fresh_programs)
                endpoints.wait_writer(dep, timeout=60)
                report.add("endpoints", "changed" if rendered.endpoints_changed else "unchanged")

            if spec.pipeline is not None:
                step("pipeline")
            pipeline_ops.ensure(dep, report)  # without a pipeline: removes what an earlier one left

            if spec.backup.enabled:
                step("backups (WAL archiving, stanza, scheduler)")
                backup_ops.ensure(dep, report, restart_scheduler=rendered.scheduler_changed and not fresh)

            if spec.multi_az and (spec.pipeline is not None or spec.backup.enabled):
                # The first backup and the pipeline's start write WAL; a standby that falls behind
                # for a moment is named synchronous again only once it caught up. `up` returns with
                # a synchronous standby in place.
                step("synchronous standby")
                ha.wait_sync(dep, True)

            report.pending_reboot = pending_reboot(dep, params, cat)
            if report.pending_reboot:
                report.add("instance", "pending-reboot", ", ".join(report.pending_reboot))
            state.update(phase="ready", applied_at=time.time(), pending_reboot=report.pending_reboot)
            home.write_state(state)
            final = _dcs(spec, params, settings, sync_on=True)
            write_if_changed(home.root / "applied-dcs.yaml", yaml.safe_dump(final, sort_keys=True), mode=0o600)
            return report
        except BaseException:
            if fresh and not os.environ.get("PGBRIDGE_KEEP_FAILED"):
                step("rolling back")
                undo.run()
            raise
