"""The `pgbridge` command line: parses arguments, calls services, renders results.

Every PgbridgeError becomes a message and its exit code; no traceback reaches the user unless
PGBRIDGE_DEBUG=1 is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.table import Table

from pgbridge import __version__
from pgbridge.cli.render import err, handle_errors, out, print_json, report_table, rows_table, styled
from pgbridge.errors import CheckFailed, NotFoundError, PgbridgeError, UsageError
from pgbridge.settings import Settings, load_settings
from pgbridge.spec.load import json_schema, load_spec
from pgbridge.spec.models import Spec

F = TypeVar("F", bound=Callable[..., Any])


class Ctx:
    def __init__(self, spec_path: Path, home: Path | None, name: str | None) -> None:
        self.spec_path = spec_path
        self.home_opt = home
        self.name = name
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    def spec(self) -> Spec:
        return load_spec(self.spec_path)

    def deployment(self) -> Any:
        from pgbridge.ops.context import Deployment, resolve_home

        if self.home_opt is None and self.name is None:
            if not self.spec_path.exists():
                raise NotFoundError(
                    f"which deployment? {self.spec_path} does not exist",
                    hint="pass -f SPEC, --home DIR or --name NAME",
                )
            home = resolve_home(self.settings, home=None, spec=self.spec())
        else:
            home = resolve_home(self.settings, home=self.home_opt, spec=None, name=self.name)
        return Deployment(self.settings, home)


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-f", "--spec", "spec_path", type=click.Path(path_type=Path), default="pgbridge.yaml", show_default=True,
    help="deployment spec file",
)  # fmt: skip
@click.option("--home", type=click.Path(path_type=Path), help="deployment home folder (overrides the default)")
@click.option("--name", help="deployment name (its home is found under the default home base)")
@click.version_option(__version__, prog_name="pgbridge")
@click.pass_context
def cli(ctx: click.Context, spec_path: Path, home: Path | None, name: str | None) -> None:
    """pgbridge: a production-grade PostgreSQL from one spec, with CDC into an analytics warehouse."""
    ctx.obj = Ctx(spec_path, home, name)


@cli.command()
@click.option("--name", "dep_name", default="shop", show_default=True, help="deployment name")
@click.option("--port", default=5433, show_default=True, type=int, help="PostgreSQL port")
@click.option("--force", is_flag=True, help="overwrite an existing file")
@pass_ctx
@handle_errors
def init(c: Ctx, dep_name: str, port: int, force: bool) -> None:
    """Write a commented example spec."""
    from pgbridge.spec.example import example_spec
    from pgbridge.spec.load import parse_spec

    text = example_spec(dep_name, port)
    import yaml

    parse_spec(yaml.safe_load(text), "example")  # the example is always valid
    if c.spec_path.exists() and not force:
        raise UsageError(f"{c.spec_path} exists", hint="pass --force to overwrite, or -f another file")
    c.spec_path.write_text(text)
    out.print(f"wrote {c.spec_path}; edit it, then run `pgbridge validate` and `pgbridge up`")


@cli.command()
@pass_ctx
@handle_errors
def validate(c: Ctx) -> None:
    """Check a spec: fields, and parameter names and values against the server's catalogue."""
    spec = c.spec()
    from pgbridge.ops.context import resolve_home
    from pgbridge.ops.parameters import desired_parameters
    from pgbridge.ops.up import catalogue_for

    home = resolve_home(c.settings, home=c.home_opt, spec=spec)
    params = desired_parameters(spec, home, catalogue_for(c.settings))
    out.print(f"{c.spec_path}: valid ({len(params)} parameters set, {len(spec.parameter_group)} group(s) applied)")


@cli.command()
@handle_errors
def schema() -> None:
    """Print the JSON Schema of the spec."""
    print_json(json_schema())


@cli.command()
@pass_ctx
@handle_errors
def up(c: Ctx) -> None:
    """Create or update the deployment to match the spec (idempotent)."""
    from pgbridge.ops.context import resolve_home
    from pgbridge.ops.up import up as do_up

    spec = c.spec()
    text = c.spec_path.read_text()
    home = resolve_home(c.settings, home=c.home_opt, spec=spec)
    with err.status("starting") as st:
        report = do_up(c.settings, spec, text, home, step=lambda s: st.update(s))
    out.print(report_table(f"pgbridge up: {spec.name}", report))
    if report.pending_reboot:
        out.print(f"[magenta]pending-reboot[/]: {', '.join(report.pending_reboot)} take effect after `pgbridge reboot`")
    out.print("no changes" if not report.changed else "done", style="dim")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
@handle_errors
def status(c: Ctx, as_json: bool) -> None:
    """Show the deployment's state, processes, endpoints and pending changes."""
    from pgbridge.ops.status import status as get_status

    s = get_status(c.deployment())
    if as_json:
        print_json(s)
        return
    t = Table(title=f"{s['name']}: {styled(s['status'])}", title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("home", s["home"])
    t.add_row("class", s["instance_class"])
    st = s["storage"]
    used = st.get("used_bytes")
    t.add_row(
        "storage",
        f"{st['type']}, {st['allocated_gb']} GiB allocated"
        + (f", {used / 1024**2:.0f} MiB used" if used is not None else ""),
    )
    for m in s["members"]:
        detail = f"{m.get('role')} / {m.get('state')}"
        if m.get("timeline") is not None:
            detail += f" (timeline {m['timeline']})"
        if m.get("lag_bytes") is not None and m.get("role") != "primary":
            detail += f", replay lag {m['lag_bytes']} bytes"
        if m.get("kind") == "replica":
            detail += f", region {m.get('region')}" + ("" if m.get("promotable") else ", never promoted")
        t.add_row(f"member {m['name']}", detail)
    for name, p in s["processes"].items():
        t.add_row(f"process {name}", f"{p['state']} pid {p['pid']}")
    for kind in ("writer", "reader"):
        if kind in s["endpoints"]:
            reaches = s["endpoints"].get(f"{kind}_reaches")
            suffix = f"  (now: {', '.join(reaches) or 'none'})" if reaches is not None else ""
            t.add_row(f"{kind} endpoint", s["endpoints"][kind] + suffix)
    if s["endpoints"].get("pools_error"):
        t.add_row("pools", f"unavailable: {s['endpoints']['pools_error']}")
    for pool in s["endpoints"].get("pools", ()):
        t.add_row(
            f"pool {pool['database']}/{pool['user']}",
            f"{pool['clients_active']} clients active, {pool['clients_waiting']} waiting"
            f" (longest {pool['longest_wait_s']:g} s); {pool['servers_active']} server connections active,"
            f" {pool['servers_idle']} idle",
        )
    if "instance" in s["endpoints"]:
        t.add_row("instance endpoint", s["endpoints"]["instance"])
    if "tls" in s:
        t.add_row("tls", f"{s['tls'].get('mode')}, certificate expires in {s['tls'].get('days_left', '?')} days")
    t.add_row("pending-reboot", ", ".join(s["pending_reboot"]) or "none")
    if s.get("error"):
        t.add_row("error", s["error"])
    out.print(t)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--user", "-U", "user", help="role to connect as (default: the application user)")
@click.option(
    "--endpoint",
    type=click.Choice(["writer", "reader", "instance"]),
    default="writer",
    show_default=True,
    help="writer/reader: through the pooler (when the deployment has endpoints); instance: member 1 directly",
)
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
@handle_errors
def connect(c: Ctx, user: str | None, endpoint: str, psql_args: tuple[str, ...]) -> None:
    """Open psql with the right DSN (TLS verify-full); the password goes through the environment."""
    from pgbridge.ops.context import secret_name_for_role

    dep = c.deployment()
    dep.home.require()
    role = user or dep.spec.database.users.app
    password = dep.secrets.get(secret_name_for_role(role)).reveal()
    psql = shutil.which("psql") or str(dep.settings.binaries.pg("psql"))
    env = {**os.environ, "PGPASSWORD": password}
    from pgbridge.ops import endpoints

    if endpoint == "instance" or (endpoint == "writer" and not endpoints.enabled(dep)):
        dsn = dep.dsn(role)
    else:
        dsn = endpoints.dsn(dep, role, "reader" if endpoint == "reader" else "writer")
    os.execvpe(psql, [psql, dsn, *psql_args], env)


@cli.command()
@pass_ctx
@handle_errors
def check(c: Ctx) -> None:
    """Validate the running deployment from a client's point of view (pass/fail table)."""
    from pgbridge.ops.check import run_checks

    dep = c.deployment()
    results, version = run_checks(dep)
    if version:
        out.print(f"SELECT version(): {version}")
    t = Table(title=f"pgbridge check: {dep.spec.name}", title_justify="left")
    t.add_column("check")
    t.add_column("result")
    t.add_column("detail", overflow="fold")
    for r in results:
        t.add_row(r.name, styled(r.outcome), r.detail)
    out.print(t)
    failed = [r for r in results if r.outcome == "fail"]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(results)} checks failed")
    out.print(f"all {len(results)} checks passed" if results else "no checks ran")


@cli.command()
@click.option(
    "--failover", is_flag=True, help="switch the primary over to the synchronous standby, not restart it in place"
)
@pass_ctx
@handle_errors
def reboot(c: Ctx, failover: bool) -> None:
    """Restart PostgreSQL so pending static parameters take effect (standbys first, one at a time)."""
    from pgbridge.ops.lifecycle import reboot as do_reboot

    with err.status("restarting"):
        report = do_reboot(c.deployment(), failover=failover)
    out.print(report_table("pgbridge reboot", report))
    if report.pending_reboot:
        raise PgbridgeError("still pending after the restart: " + ", ".join(report.pending_reboot))


@cli.command()
@pass_ctx
@handle_errors
def down(c: Ctx) -> None:
    """Stop the deployment cleanly; data is kept and `up` starts it again."""
    from pgbridge.ops.lifecycle import down as do_down

    out.print(report_table("pgbridge down", do_down(c.deployment())))


@cli.command()
@click.option("--yes", is_flag=True, help="confirm: delete the deployment and all its data")
@pass_ctx
@handle_errors
def destroy(c: Ctx, yes: bool) -> None:
    """Stop the deployment and delete its home folder with all data."""
    from pgbridge.ops.lifecycle import destroy as do_destroy

    out.print(report_table("pgbridge destroy", do_destroy(c.deployment(), yes=yes)))


@cli.command()
@click.option("--diff", is_flag=True, help="only parameters that differ from the server default")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def params(c: Ctx, diff: bool, as_json: bool) -> None:
    """Effective parameter values and where each came from (default, platform, class, group)."""
    from pgbridge.ops.status import params as get_params

    rows = get_params(c.deployment(), diff=diff)
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    t = Table(title="parameters" + (" (differences from defaults)" if diff else ""), title_justify="left")
    for col in ("name", "value", "source", "running", "restart"):
        t.add_column(col, overflow="fold")
    for r in rows:
        restart = "[magenta]pending-reboot[/]" if r.pending_reboot else ("static" if r.static else "")
        t.add_row(r.name, r.value, r.source, r.running if r.running is not None else "-", restart)
    out.print(t)


@cli.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), help="write the CA certificate to this file")
@pass_ctx
@handle_errors
def ca(c: Ctx, output: Path | None) -> None:
    """Export the deployment's CA certificate (for sslmode=verify-full clients)."""
    dep = c.deployment()
    dep.home.require()
    pem = (dep.home.tls / "ca.crt").read_text()
    if output:
        output.write_text(pem)
        out.print(f"wrote {output}; clients use sslmode=verify-full sslrootcert={output}")
    else:
        sys.stdout.write(pem)


@cli.group()
def secrets() -> None:
    """Credentials kept in the deployment's encrypted store."""


@secrets.command("get")
@click.argument("user")
@click.option("--dsn", is_flag=True, help="print a full connection string instead of the password")
@pass_ctx
@handle_errors
def secrets_get(c: Ctx, user: str, dsn: bool) -> None:
    """Show the password of USER (only when asked)."""
    from pgbridge.ops.context import secret_name_for_role

    dep = c.deployment()
    dep.home.require()
    name = secret_name_for_role(user)
    if name not in dep.secrets:
        known = [n.removeprefix("role:") for n in dep.secrets.names() if n.startswith("role:")]
        raise NotFoundError(f"no credentials for user {user!r}", hint="known users: " + ", ".join(sorted(known)))
    print(dep.dsn(user, password=True) if dsn else dep.secrets.get(name).reveal())


@secrets.command("list")
@pass_ctx
@handle_errors
def secrets_list(c: Ctx) -> None:
    """List the users that have credentials (names only)."""
    dep = c.deployment()
    dep.home.require()
    for n in sorted(dep.secrets.names()):
        if n.startswith("role:"):
            print(n.removeprefix("role:"))


@cli.group()
def pipeline() -> None:
    """Change-data-capture into the analytics warehouse."""


@pipeline.command("status")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def pipeline_status(c: Ctx, as_json: bool) -> None:
    """State, phase, last applied LSN, lag, throughput, per-table rows, last error."""
    from pgbridge.ops import pipeline as ops

    s = ops.status(c.deployment())
    if as_json:
        print_json(s)
        return
    t = Table(
        title=f"pipeline {s.get('pipeline')}: {styled(str(s.get('state')))}", title_justify="left", show_header=False
    )
    t.add_column("key", style="bold")
    t.add_column("value", overflow="fold")
    slot = s.get("slot", {})
    rows = [
        ("phase", s.get("phase")),
        ("process", f"{s['process'].get('state')} pid {s['process'].get('pid')}"),
        ("last applied LSN", s.get("last_applied_lsn")),
        ("lag", f"{s.get('lag_bytes') or 0} bytes, {s.get('lag_seconds') or 0:.1f} s"),
        ("throughput", f"{s.get('changes_per_s', 0):.0f} changes/s"),
        ("transactions / changes", f"{s.get('transactions', 0)} / {s.get('changes', 0)}"),
        ("slot", f"{slot.get('name')} {'active' if slot.get('active') else 'inactive'}, "
                 f"WAL retained {slot.get('retained_bytes')} bytes, {slot.get('wal_status')}"),
    ]  # fmt: skip
    for table, n in sorted((s.get("rows_by_table") or {}).items()):
        rows.append((f"changes {table}", str(n)))
    for table, info in sorted((s.get("load") or {}).items()):
        rows.append((f"load {table}", f"{info.get('rows')} / ~{info.get('estimate')} rows"))
    if s.get("last_error"):
        rows.append(("last error", s["last_error"]))
    for k, v in rows:
        t.add_row(k, str(v) if v is not None else "-")
    out.print(t)


@pipeline.command("stop")
@pass_ctx
@handle_errors
def pipeline_stop(c: Ctx) -> None:
    """Stop the pipeline (its slot keeps the position; `up` leaves it stopped)."""
    from pgbridge.ops import pipeline as ops

    out.print(report_table("pipeline stop", ops.stop(c.deployment())))


@pipeline.command("start")
@pass_ctx
@handle_errors
def pipeline_start(c: Ctx) -> None:
    """Start the pipeline again; it resumes from the warehouse's checkpoint."""
    from pgbridge.ops import pipeline as ops

    out.print(report_table("pipeline start", ops.start(c.deployment())))


@pipeline.command("validate")
@click.argument("tables", nargs=-1)
@click.option("--repair", is_flag=True, help="re-copy the ranges that differ from the source, then check again")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def pipeline_validate(c: Ctx, tables: tuple[str, ...], repair: bool, as_json: bool) -> None:
    """Compare replicated tables (all, or TABLES as schema.table) between source and warehouse.

    Row counts and row checksums per primary-key range, exactly as of a source snapshot; a range
    that differs is checked again before it is reported. Exits 7 when a difference remains.
    """
    from pgbridge.ops import pipeline as ops

    dep = c.deployment()
    results = ops.validate(dep, list(tables), repair=repair)
    if repair and any(r.get("repaired") for r in results):
        after = {r["table"]: r for r in ops.validate(dep, [r["table"] for r in results if r.get("repaired")])}
        results = [{**after[r["table"]], "repaired": True} if r["table"] in after else r for r in results]
    if as_json:
        print_json(results)
    else:
        t = Table(title="pipeline validate", title_justify="left")
        for col in ("table", "source rows", "warehouse rows", "ranges", "result"):
            t.add_column(col, justify="right" if "rows" in col or col == "ranges" else "left")
        for r in results:
            word = "pass" if r.get("ok") else "fail"
            result = styled(word) + (" (repaired)" if r.get("repaired") else "")
            t.add_row(r["table"], str(r.get("source_rows", "-")), str(r.get("warehouse_rows", "-")),
                      str(r.get("ranges", "-")), result)  # fmt: skip
        out.print(t)
        for r in results:
            if r.get("error"):
                out.print(f"{r['table']}: {r['error']}")
            for d in r.get("differences") or ():
                high = "end" if d["high"] is None else repr(d["high"])
                low = "start" if d["low"] is None else repr(d["low"])
                out.print(
                    f"{r['table']}: key range [{low}, {high}): source {d['source_rows']} rows,"
                    f" warehouse {d['warehouse_rows']} rows, contents differ"
                )
    bad = [r["table"] for r in results if not r.get("ok")]
    if bad:
        raise CheckFailed(
            f"{len(bad)} table(s) differ from the source: {', '.join(bad)}",
            hint="`pgbridge pipeline validate --repair` re-copies the differing ranges",
        )


@pipeline.command("resync")
@click.argument("tables", nargs=-1)
@pass_ctx
@handle_errors
def pipeline_resync(c: Ctx, tables: tuple[str, ...]) -> None:
    """Re-copy TABLES (schema.table) from the source; without TABLES, start over from a new slot.

    The full resync is how a pipeline whose slot was lost comes back: the warehouse is emptied and
    every table is loaded again.
    """
    from pgbridge.ops import pipeline as ops

    out.print(report_table("pipeline resync", ops.resync(c.deployment(), list(tables))))


@cli.command("query")
@click.argument("sql", required=False)
@click.option("--pack", metavar="NAME", help="run an analytics pack (SQL files shipped with pgbridge) instead of SQL")
@click.option("--source", is_flag=True, help="with --pack: run it on the OLTP PostgreSQL (read-only user) instead")
@click.option("--json", "fmt", flag_value="json", help="rows as JSON objects")
@click.option("--csv", "fmt", flag_value="csv", help="CSV with a header")
@pass_ctx
@handle_errors
def query_cmd(c: Ctx, sql: str | None, pack: str | None, source: bool, fmt: str | None) -> None:
    """Run read-only SQL on the warehouse (served by the pipeline, so it never meets a lock).

    With --pack NAME, run every query of an analytics pack (`--pack list` names them).
    """
    import csv

    from pgbridge.ops import pipeline as ops

    if pack is not None:
        if sql is not None:
            raise UsageError("pass either SQL or --pack NAME, not both")
        _query_pack(c, pack, source, fmt)
        return
    if source:
        raise UsageError("--source goes with --pack; for ad-hoc SQL on PostgreSQL use `pgbridge connect`")
    if sql is None:
        raise UsageError("no SQL given", hint='pgbridge query "SELECT ..." or pgbridge query --pack NAME')
    r = ops.query(c.deployment(), sql)
    cols, rows = r["columns"], r["rows"]
    if fmt == "json":
        print_json([dict(zip(cols, row, strict=True)) for row in rows])
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    else:
        out.print(rows_table(cols, rows))
        out.print(f"{len(rows)} row{'s' if len(rows) != 1 else ''}" + (" (truncated)" if r.get("truncated") else ""))


def _query_pack(c: Ctx, pack: str, source: bool, fmt: str | None) -> None:
    from pgbridge.ops import workload as wl
    from pgbridge.workload.analytics import load_pack, pack_names

    if pack == "list":
        for name in pack_names():
            out.print(f"{name}: " + ", ".join(q.name for q in load_pack(name)))
        return
    if fmt == "csv":
        raise UsageError("--csv is for one result; a pack has several (use --json)")
    results = wl.run_pack(c.deployment(), pack, on="source" if source else "warehouse")
    where = "PostgreSQL (source)" if source else "warehouse"
    if fmt == "json":
        print_json(
            [{**r.as_dict(), "rows": [dict(zip(r.columns, row, strict=True)) for row in r.rows]} for r in results]
        )
    else:
        for r in results:
            out.print(f"[bold]{r.name}[/]: {r.title} [dim]({where}, {r.seconds * 1000:.0f} ms)[/]")
            out.print(f"  [red]failed:[/] {r.error}" if r.error else rows_table(r.columns, r.rows))
    failed = [r.name for r in results if r.error]
    if failed:
        raise PgbridgeError(f"{len(failed)} of {len(results)} queries failed: {', '.join(failed)}")


@cli.group()
def workload() -> None:
    """The e-commerce workload: schema, catalogue, and a concurrent transaction generator."""


@workload.command("load")
@click.option("--scale", type=float, default=1.0, show_default=True, help="1 = 100k orders of history")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
@handle_errors
def workload_load(c: Ctx, scale: float, as_json: bool) -> None:
    """Create the shop's schema and load its catalogue and order history (once)."""
    from dataclasses import asdict

    from pgbridge.ops import workload as wl

    with err.status(f"loading scale {scale:g}"):
        r = wl.load_catalogue(c.deployment(), scale)
    if as_json:
        print_json(asdict(r))
    elif not r.loaded:
        out.print("the catalogue is already loaded; nothing to do")
    else:
        counts = ", ".join(f"{n} {t}" for t, n in r.rows.items())
        out.print(f"loaded scale {scale:g} in {r.seconds:.1f}s: {counts}")


@workload.command("run")
@click.option("--rate", type=float, default=100, show_default=True, help="transactions per second offered")
@click.option("--duration", type=float, default=60, show_default=True, help="seconds to run")
@click.option("--scale", type=float, help="load this scale first if the shop has no catalogue yet")
@click.option("--workers", type=int, default=4, show_default=True, help="concurrent connections")
@click.option("--seed", type=int, help="random seed (for repeatable runs)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable summary")
@pass_ctx
@handle_errors
def workload_run(
    c: Ctx, rate: float, duration: float, scale: float | None, workers: int, seed: int | None, as_json: bool
) -> None:
    """Drive the shop's transaction mix through the writer endpoint; print tps and latency."""
    from pgbridge.ops import workload as wl
    from pgbridge.workload.load import sizes
    from pgbridge.workload.mix import check_rate

    check_rate(rate, duration, workers)
    if scale is not None:
        sizes(scale)
    dep = c.deployment()
    if scale is not None and not wl.is_loaded(dep):
        with err.status(f"loading scale {scale:g}"):
            r = wl.load_catalogue(dep, scale)
        err.print(f"loaded scale {scale:g} in {r.seconds:.1f}s")
    run = wl.workload(dep, rate, duration, workers=workers, seed=seed)
    with err.status("running") as st:

        def tick() -> None:
            w = run.recorder.window(5)
            st.update(f"running: {w.tps:.0f} tps, p50 {w.p50_ms or 0:.1f} ms, p99 {w.p99_ms or 0:.1f} ms")

        with contextlib.suppress(KeyboardInterrupt):  # run() closes the workload on its way out
            run.run(on_tick=tick)
    if run.fatal:
        raise UsageError(run.fatal)
    s = run.recorder.summary()
    if as_json:
        print_json(s.as_dict())
        return
    t = Table(title=f"workload: {s.transactions} transactions in {s.seconds:.0f}s", title_justify="left")
    for col in ("transaction", "count", "p50 ms", "p99 ms"):
        t.add_column(col, justify="left" if col == "transaction" else "right")
    for kind, k in s.by_kind.items():
        t.add_row(kind, str(k["count"]), f"{k['p50_ms']:.2f}", f"{k['p99_ms']:.2f}")
    out.print(t)
    outcomes = ", ".join(f"{n} {o}" for o, n in sorted(s.outcomes.items()))
    out.print(f"{s.tps:.1f} tps, p50 {s.p50_ms or 0:.2f} ms, p99 {s.p99_ms or 0:.2f} ms ({outcomes})")
    for e, n in s.errors.items():
        out.print(f"  [yellow]{n} x[/] {e}")


@cli.command()
@click.option("--scale", type=float, default=1.0, show_default=True, help="shop size to load (1 = 100k orders)")
@click.option("--rate", type=float, default=100, show_default=True, help="workload transactions per second")
@click.option("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
@click.option("--workers", type=int, default=4, show_default=True, help="workload connections")
@click.option("--pack", default="shop", show_default=True, help="analytics pack shown from the warehouse")
@click.option(
    "--headless",
    is_flag=True,
    help="plain periodic lines instead of the live dashboard (the default without a terminal)",
)
@click.option("--every", type=float, default=1.0, show_default=True, help="seconds between refreshes")
@pass_ctx
@handle_errors
def demo(
    c: Ctx, scale: float, rate: float, duration: float | None, workers: int, pack: str, headless: bool, every: float
) -> None:
    """Up a deployment with a pipeline, load the shop, run the workload, show OLTP, CDC and analytics live.

    Without a spec file, writes the example spec with a pipeline first. Ctrl-C (or --duration)
    stops the workload; the deployment keeps running for exploring.
    """
    import time

    from pgbridge.cli.dashboard import dashboard, result_table, status_line
    from pgbridge.ops import demo as demo_ops
    from pgbridge.ops import workload as wl
    from pgbridge.workload.analytics import load_pack
    from pgbridge.workload.load import sizes
    from pgbridge.workload.mix import check_rate

    check_rate(rate, duration, workers)
    sizes(scale)
    load_pack(pack)
    if not 0.1 <= every <= 60:
        raise UsageError(f"--every must be between 0.1 and 60 seconds, got {every:g}")
    if not c.spec_path.exists():
        demo_ops.write_default_spec(c.spec_path)
        out.print(f"wrote {c.spec_path} (the example spec with a pipeline)")
    with err.status("starting") as st:
        prepared = demo_ops.prepare(c.settings, c.spec_path, c.home_opt, scale, pack, lambda s: st.update(s))
    dep = prepared.dep
    changed = sum(1 for ch in prepared.up.changes if ch.action != "unchanged")
    loaded = (
        f"loaded scale {scale:g} in {prepared.load.seconds:.1f}s" if prepared.load.loaded else "shop already loaded"
    )
    out.print(f"deployment {dep.spec.name} is up ({changed} changes); {loaded}")
    d = demo_ops.Demo(dep, wl.workload(dep, rate, None, workers=workers), pack)
    live_screen = out.is_terminal and not headless
    d.start()
    deadline = None if duration is None else time.monotonic() + duration
    tick = 0
    try:
        if live_screen:
            from rich.live import Live

            with Live(console=out, auto_refresh=False, vertical_overflow="crop") as live:
                while deadline is None or time.monotonic() < deadline:
                    live.update(dashboard(d.snapshot(), dep.spec.name), refresh=True)
                    if d.run.stop.wait(every):
                        break
        else:
            while deadline is None or time.monotonic() < deadline:
                snap = d.snapshot(refresh_pack=tick % 10 == 0)
                out.print(status_line(snap))
                tick += 1
                if d.run.stop.wait(every):
                    break
    except KeyboardInterrupt:
        pass
    finally:
        d.stop()
    if d.run.fatal:
        raise UsageError(d.run.fatal)
    final = d.snapshot()
    if not live_screen:
        for r in final.pack:
            out.print(result_table(r, with_title=True))
        out.print(status_line(final))
    s = d.run.recorder.summary()
    out.print(
        f"workload stopped: {s.transactions} transactions in {s.seconds:.0f}s, {s.tps:.1f} tps,"
        f" p50 {s.p50_ms or 0:.2f} ms, p99 {s.p99_ms or 0:.2f} ms"
    )
    f = f"-f {c.spec_path} " if c.spec_path.name != "pgbridge.yaml" or c.spec_path.parent != Path() else ""
    out.print(
        f"the deployment keeps running: `pgbridge {f}status`, `pgbridge {f}query --pack {pack}`,"
        f" `pgbridge {f}connect`, `pgbridge {f}workload run`; `pgbridge {f}destroy --yes` removes it"
    )


@cli.command()
@click.option("--to", "to", metavar="MEMBER", help="the member to promote (default: the synchronous standby)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
@handle_errors
def failover(c: Ctx, to: str | None, as_json: bool) -> None:
    """Planned switchover: pause the pooler, move the primary, resume (clients see a pause)."""
    from dataclasses import asdict

    from pgbridge.ops.drills import switchover

    r = switchover(c.deployment(), to)
    if as_json:
        print_json(asdict(r))
        return
    gap = f", first commit after {r.write_gap_s:.1f}s" if r.write_gap_s is not None else ""
    out.print(f"primary moved from {r.old} to {r.new} in {r.seconds:.1f}s; writes paused for {r.paused_s:.1f}s{gap}")
    if r.warning:
        err.print(f"warning: {r.warning}")


@cli.group()
def drill() -> None:
    """Measured fault drills (they injure the running deployment: --yes is required)."""


@drill.command("failover")
@click.option("--mode", type=click.Choice(["kill", "hang", "crash"]), default="kill", show_default=True,
              help="kill: the primary's host dies; hang: it freezes; crash: only PostgreSQL dies")  # fmt: skip
@click.option("--yes", is_flag=True, help="confirm: the primary will be injured")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
@handle_errors
def drill_failover(c: Ctx, mode: str, yes: bool, as_json: bool) -> None:
    """Write through the writer endpoint, injure the primary, report RTO and RPO."""
    from dataclasses import asdict

    from pgbridge.ops.drills import failover_drill

    r = failover_drill(c.deployment(), mode, yes=yes)  # type: ignore[arg-type]
    if as_json:
        print_json(asdict(r))
        return
    t = Table(title=f"failover drill ({r.mode}, profile {r.profile})", title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("primary", f"{r.old_primary} -> {r.new_primary}")
    t.add_row("RTO", f"{r.rto_s:.2f} s (longest time without an acknowledged write after the fault)")
    t.add_row("RPO", f"{r.rpo_lost} acknowledged commits lost (of {r.acked})")
    t.add_row("unknown outcome", f"{r.unknown} writes cut mid-commit, {r.unknown_committed} of them committed")
    t.add_row("rejoin", f"{r.old_primary} back in {r.rejoined_s}s" if r.rejoined else f"{r.old_primary} NOT back")
    out.print(t)
    if r.rpo_lost or not r.rejoined:
        raise CheckFailed("the drill lost acknowledged commits" if r.rpo_lost else "the old primary did not rejoin")


@cli.command("events")
@click.option("--kind", help="only events of this kind (e.g. drill-failover, switchover)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
@handle_errors
def events_cmd(c: Ctx, kind: str | None, as_json: bool) -> None:
    """The deployment's event log (drills, switchovers)."""
    import datetime

    from pgbridge.ops.events import read

    rows = read(c.deployment(), kind)
    if as_json:
        print_json(rows)
        return
    t = Table(title="events", title_justify="left")
    for col in ("time", "kind", "message"):
        t.add_column(col)
    for e in rows:
        when = datetime.datetime.fromtimestamp(e["time"]).isoformat(timespec="seconds")
        t.add_row(when, e["kind"], e["message"])
    out.print(t)


from pgbridge.cli.backup import register as _register_backup  # noqa: E402  (needs `drill` above)

_register_backup(cli, drill)


def main() -> None:
    cli(standalone_mode=True)


if __name__ == "__main__":  # last: every command above must be registered first
    main()
