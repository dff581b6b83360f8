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
from typing import Any

import yaml

from pgbridge.errors import DeploymentError, HostError, PgbridgeError, TransientError
from pgbridge.home import Home, atomic_write, write_if_changed
from pgbridge.ops import pipeline as pipeline_ops
from pgbridge.ops.context import (
    REST_SECRET,
    REST_USER,
    Deployment,
    member_name,
    secret_name_for_role,
)
from pgbridge.ops.parameters import desired_parameters, host_resources
from pgbridge.ops.tasks import Report, Undo, interruptible
from pgbridge.plan.hba import ADMIN_ROLE, REPLICATION_ROLE, HbaInput, render_hba, render_ident
from pgbridge.plan.instance_classes import resolve_class
from pgbridge.plan.params import ParamValue
from pgbridge.platform import etcd, system
from pgbridge.platform.catalogue import Catalogue, load_catalogue
from pgbridge.platform.patroni import PROFILES, MemberConfig, PatroniAPI, post_bootstrap_script, render_member
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
    """Recorded internal ports, reallocated if the deployment is down and one is now taken."""
    ports: dict[str, int] = dict(state.get("ports", {}))
    member = member_name(spec.name)
    ports["postgres"] = spec.network.port
    used = {spec.network.port}
    for key in ("etcd_client", "etcd_peer", f"patroni:{member}"):
        port = ports.get(key)
        if port is not None and not running:
            try:
                system.check_port_free(port, ["127.0.0.1"], key)
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
        cdc_local=(spec.database.name, spec.database.users.cdc) if spec.pipeline else None,
    )


def _dcs(spec: Spec, params: dict[str, ParamValue], settings: Settings) -> dict[str, Any]:
    operator = "root" if os.geteuid() == 0 else settings.user.name
    # Patroni drops replication slots it does not know; the pipeline's slot is created by its
    # daemon (it needs the exported snapshot), so Patroni is told to leave it alone.
    ignore = (
        [
            {
                "name": f"pgbridge_{spec.pipeline.name}",
                "type": "logical",
                "database": spec.database.name,
                "plugin": "pgoutput",
            }
        ]
        if spec.pipeline
        else []
    )
    return {
        **PROFILES["default"],
        "maximum_lag_on_failover": 1048576,
        "ignore_slots": ignore,
        "postgresql": {
            "use_pg_rewind": True,
            "use_slots": True,
            "parameters": {k: v.value for k, v in sorted(params.items())},
            "pg_hba": render_hba(hba_input(spec)),
            "pg_ident": render_ident(settings.user.name, operator, spec.database.users.cdc if spec.pipeline else None),
        },
    }


def _render(dep: Deployment, dcs: dict[str, Any], ports: dict[str, int], report: Report) -> bool:
    """Write the configs; returns True when Patroni's local file changed."""
    spec, home, settings, store = dep.spec, dep.home, dep.settings, dep.secrets
    member = member_name(spec.name)
    b = settings.binaries
    write_if_changed(home.etc / "post_bootstrap.sh", post_bootstrap_script(b.pg_bindir, ADMIN_ROLE), mode=0o755)
    cfg = MemberConfig(
        scope=spec.name,
        member=member,
        rest_port=ports[f"patroni:{member}"],
        pg_port=spec.network.port,
        listen_addresses=tuple(spec.network.listen_addresses),
        connect_address=dep.client_host(),
        etcd_hosts=(f"127.0.0.1:{ports['etcd_client']}",),
        bindir=b.pg_bindir,
        rest_user=REST_USER,
        rest_password=store.get(REST_SECRET).reveal(),
        replication_password=store.get(secret_name_for_role(REPLICATION_ROLE)).reveal(),
        dcs=dcs,
    )
    conf = home.patroni_conf(member)
    patroni_changed = write_if_changed(conf, render_member(home, cfg), mode=0o600)
    system.chown(conf, settings.user)
    programs = [
        Program(
            "etcd", etcd.etcd_command(b.etcd, home, spec.name, ports["etcd_client"], ports["etcd_peer"]), priority=10
        ),
        Program(f"patroni-{member}", [str(b.patroni), str(conf)], priority=20, stop_wait=120, stop_signal="TERM"),
    ]
    pipeline_program = pipeline_ops.program(dep)
    if pipeline_program is not None:
        programs.append(pipeline_program)
    sup_changed = dep.supervisor.write_config(render_config(home, spec.name, settings.user, programs))
    changed = patroni_changed or sup_changed
    if not changed:
        report.add("process config", "unchanged")
    else:
        report.add("process config", "created" if dep.state.get("phase") == "creating" else "changed")
    return patroni_changed


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
    """PATCH Patroni's dynamic config where it differs; returns names of changed parameters."""
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
    patch: dict[str, Any] = {k: v for k, v in dcs.items() if k != "postgresql" and current.get(k) != v}
    if patch_pg:
        patch["postgresql"] = patch_pg
    if not patch:
        first = dep.state.get("phase") == "creating"
        report.add("parameters", "created" if first else "unchanged", f"{len(want_params)} set" if first else "")
        report.add("network rules (pg_hba)", "created" if first else "unchanged")
        return []
    api.patch_config(patch)
    report.add("parameters", "changed" if changed_params else "unchanged", ", ".join(sorted(changed_params)))
    report.add("network rules (pg_hba)", "changed" if "pg_hba" in patch_pg or "pg_ident" in patch_pg else "unchanged")
    return changed_params


def wait_dynamic_applied(dep: Deployment, params: dict[str, ParamValue], names: list[str], cat: Catalogue) -> None:
    """Wait until Patroni has reloaded PostgreSQL with the new dynamic values (one HA cycle)."""
    dynamic = [n for n in names if n in params and not cat.is_static(n)]
    static = [n for n in names if n in params and cat.is_static(n)]
    hba_file = dep.home.pgdata(dep.primary_member) / "pg_hba.conf"
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
    """Static parameters whose running value differs from the desired one."""
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
    return sorted(out)


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
    for resource, action in ensure_database(
        dep.admin, db=spec.database.name, schema=spec.database.schema_, app=u.app, readonly=u.readonly, cdc=u.cdc
    ).items():
        report.add(resource, action)  # type: ignore[arg-type]


def stop_leftover_postgres(dep: Deployment) -> None:
    """After supervisord is gone, stop any PostgreSQL it left behind (by pid, never by name)."""
    pidfile = dep.home.pgdata(member_name(dep.spec.name)) / "postmaster.pid"
    pid = system.read_pid(pidfile)
    if pid and system.pid_alive(pid):
        os.kill(pid, signal.SIGINT)  # fast shutdown
        for _ in range(300):
            if not system.pid_alive(pid):
                break
            time.sleep(0.1)


def up(settings: Settings, spec: Spec, spec_text: str, home: Home, step: Step = lambda s: None) -> Report:
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
            system.check_port_free(spec.network.port, spec.network.listen_addresses, "PostgreSQL")
            check_python_for_service_user(settings)
        cat = catalogue_for(settings)
        params = desired_parameters(spec, home, cat)
        ports = _ports(state, spec, running)

        undo = Undo()
        try:
            step("home folder")
            if fresh:
                undo.push("remove home", lambda: shutil.rmtree(home.root, ignore_errors=True))
            _make_dirs(dep)
            state = {**state, "name": spec.name, "ports": ports}
            state.setdefault("phase", "creating")
            state.setdefault("created_at", time.time())
            home.write_state(state)
            atomic_write(home.spec_file, spec_text, mode=0o644)
            report.add("home", "created" if fresh else "unchanged", str(home.root))

            step("secrets")
            store, created = _open_secrets(home, create=fresh)
            dep.__dict__["secrets"] = store
            u = spec.database.users
            names = [secret_name_for_role(r) for r in (u.app, u.readonly, u.cdc, REPLICATION_ROLE)] + [REST_SECRET]
            added = _ensure_passwords(store, names)
            report.add("secrets", "created" if created else ("changed" if added else "unchanged"))

            step("tls")
            _tls(dep, report)

            step("configuration")
            dcs = _dcs(spec, params, settings)
            patroni_changed = _render(dep, dcs, ports, report)

            step("processes")
            sup = dep.supervisor
            if fresh:

                def stop_all() -> None:
                    sup.shutdown()
                    stop_leftover_postgres(dep)

                undo.push("stop processes", stop_all)
            if sup.running():
                changes = sup.reread()
                report.add("processes", "changed" if any(changes.values()) else "unchanged")
            else:
                sup.start()
                report.add("processes", "started")
            etcd.wait_healthy(ports["etcd_client"], timeout=60)
            api = dep.patroni()
            if patroni_changed and running:
                api.reload()
            step("postgresql (Patroni bootstrap on first start)")
            api.wait_running(timeout=300, role="primary")
            wait_admin(dep.admin, timeout=120)

            step("parameters and network rules")
            changed = _reconcile_dcs(dep, api, dcs, cat, report)
            if changed or fresh:
                wait_dynamic_applied(dep, params, changed or list(params), cat)

            step("database, schema and users")
            _bootstrap_sql(dep, report)

            if spec.pipeline is not None:
                step("pipeline")
                pipeline_ops.ensure(dep, report)

            report.pending_reboot = pending_reboot(dep, params, cat)
            if report.pending_reboot:
                report.add("instance", "pending-reboot", ", ".join(report.pending_reboot))
            state.update(phase="ready", applied_at=time.time(), pending_reboot=report.pending_reboot)
            home.write_state(state)
            write_if_changed(home.root / "applied-dcs.yaml", yaml.safe_dump(dcs, sort_keys=True), mode=0o600)
            return report
        except BaseException:
            if fresh and not os.environ.get("PGBRIDGE_KEEP_FAILED"):
                step("rolling back")
                undo.run()
            raise
