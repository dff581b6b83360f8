"""`pgbridge backup ...`, `pgbridge restore` and `pgbridge drill restore`.

Kept apart from main.py, which registers them with `register`; the error handling and context of
main.py are looked up when a command runs, so importing this module first causes no cycle.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import click
from rich.table import Table

from pgbridge.cli.render import err, handle_errors, out, print_json, report_table


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "-"


def _mib(n: int | None) -> str:
    return f"{(n or 0) / 1024**2:.1f} MiB"


@click.group("backup")
def backup_group() -> None:
    """Encrypted backups (pgBackRest), snapshots and the restorable window."""


@backup_group.command("create")
@click.option("--type", "kind", type=click.Choice(["full", "diff", "incr"]), help="default: full")
@click.option("--snapshot", metavar="NAME", help="keep this backup as a named snapshot until it is deleted")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handle_errors
def backup_create(c: Any, kind: str | None, snapshot: str | None, as_json: bool) -> None:
    """Take a backup now (a snapshot is a full backup kept outside the retention window)."""
    from pgbridge.ops import backup as ops

    with err.status("backing up"):
        r = ops.create(c.deployment(), kind, snapshot)  # type: ignore[arg-type]
    if as_json:
        print_json(r)
        return
    what = f"snapshot {r['snapshot']}: " if r["snapshot"] else ""
    out.print(
        f"{what}{r['type']} backup {r['label']} in {r['seconds']:.1f}s ({_mib(r['repo_size'])} in the repository)"
    )
    if r["note"]:
        out.print(r["note"], style="dim")


@backup_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handle_errors
def backup_list(c: Any, as_json: bool) -> None:
    """Backups and snapshots with sizes and times, and the earliest and latest restorable time."""
    from pgbridge.ops import backup as ops

    r = ops.catalog(c.deployment())
    if as_json:
        print_json(r)
        return
    t = Table(title=f"backups of {r['stanza']} (retention {r['retention_days']} days)", title_justify="left")
    for col in ("label", "type", "snapshot", "started", "took", "database", "repository"):
        t.add_column(col, justify="right" if col in ("took", "database", "repository") else "left")
    for b in r["backups"]:
        t.add_row(b["label"], b["type"], b["snapshot"] or "", _when(b["start"]), f"{b['stop'] - b['start']:.0f}s",
                  _mib(b["size"]), _mib(b["repo_size"]))  # fmt: skip
    out.print(t)
    out.print(f"restorable from {_when(r['earliest_restorable'])} to {_when(r['latest_restorable'])}")
    out.print(f"repository {'encrypted (aes-256-cbc)' if r['encrypted'] else 'NOT encrypted'}", style="dim")


@backup_group.command("delete-snapshot")
@click.argument("name")
@click.pass_obj
@handle_errors
def backup_delete_snapshot(c: Any, name: str) -> None:
    """Delete a named snapshot (the backup set it holds is expired)."""
    from pgbridge.ops import backup as ops

    r = ops.delete_snapshot(c.deployment(), name)
    out.print(f"snapshot {r['name']} ({r['label']}) deleted")


@click.command("restore")
@click.option("--to-time", "to_time", metavar="TIME", help="ISO 8601 (UTC unless a zone is given)")
@click.option("--latest", is_flag=True, help="the latest restorable time")
@click.option("--snapshot", metavar="NAME", help="a named snapshot")
@click.option("--name", "new_name", required=True, help="name of the NEW deployment (beside the source)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handle_errors
def restore(c: Any, to_time: str | None, latest: bool, snapshot: str | None, new_name: str, as_json: bool) -> None:
    """Restore into a new deployment with its own ports, and bring it up (the source is untouched)."""
    from pgbridge.errors import UsageError
    from pgbridge.ops.restore import Target, parse_time
    from pgbridge.ops.restore import restore as do_restore

    if sum(bool(x) for x in (to_time, latest, snapshot)) != 1:
        raise UsageError("give exactly one of --to-time, --latest, --snapshot")
    if to_time:
        target = Target("time", time=parse_time(to_time))
    elif snapshot:
        target = Target("snapshot", snapshot=snapshot)
    else:
        target = Target("latest")
    with err.status("restoring") as st:
        r = do_restore(c.deployment(), new_name, target, step=lambda s: st.update(s))
    if as_json:
        print_json({k: v for k, v in r.items() if k != "report"})
        return
    out.print(report_table(f"pgbridge restore: {new_name}", r["report"]))
    out.print(
        f"restored {r['target']} into {r['name']} (port {r['port']}) in {r['seconds']:.0f}s;"
        f" manage it with `pgbridge --name {r['name']} status`"
    )


@click.command("restore")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@handle_errors
def drill_restore(c: Any, as_json: bool) -> None:
    """Restore the latest backup to a scratch instance, check it, report the time, remove it."""
    from pgbridge.ops.restore import drill

    dep = c.deployment()
    with err.status("restore drill"):
        r = drill(dep.settings, dep.home)
    if as_json:
        print_json(r)
        return
    t = Table(title="restore drill", title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("restore time", f"{r['restore_seconds']:.1f} s (pgBackRest restore + WAL replay to the latest time)")
    t.add_row("pg_amcheck", r["amcheck"])
    t.add_row("tables counted", f"{len(r['row_counts'])} ({sum(r['row_counts'].values())} rows)")
    for ch in r["checks"]:
        t.add_row(f"check {ch['name']}", "pass" if ch["ok"] else f"FAIL {ch['detail']}")
    out.print(t)


def register(cli: click.Group, drill: click.Group) -> None:
    cli.add_command(backup_group)
    cli.add_command(restore)
    drill.add_command(drill_restore)
