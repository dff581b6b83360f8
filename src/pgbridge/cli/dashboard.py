"""The demo's terminal dashboard: a `Snapshot` rendered for rich.Live, or as plain lines.

Pure rendering: the same snapshot makes the live screen (a TTY) and the periodic text a log or a
test reads (no TTY).
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table

from pgbridge.ops.demo import Snapshot
from pgbridge.workload.analytics import QueryResult

MAX_ROWS = 8


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def lag_text(p: dict[str, Any]) -> str:
    b, s = p.get("lag_bytes"), p.get("lag_seconds")
    if b is None and s is None:
        return "-"
    return f"{s or 0:.1f} s / {_bytes(b or 0)}"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _outcomes(totals: dict[str, Any]) -> str:
    o = totals.get("outcomes", {})
    return ", ".join(f"{o[k]} {k}" for k in ("committed", "rejected", "noop", "error") if o.get(k)) or "none yet"


def status_line(s: Snapshot) -> str:
    """One line per tick for logs and tests."""
    w, p = s.window, s.pipeline
    return (
        f"[{s.elapsed_s:5.0f}s] oltp {w.tps:.0f} tps p50 {_ms(w.p50_ms)} p99 {_ms(w.p99_ms)}"
        f" | cdc {p.get('state', '?')}/{p.get('phase') or '-'} lag {lag_text(p)}"
        f" | {s.totals.get('transactions', 0)} transactions ({_outcomes(s.totals)})"
    )


def result_table(r: QueryResult, with_title: bool = False) -> RenderableType:
    if r.error:
        return Panel(f"[yellow]{r.error}[/]", title=r.name, title_align="left")
    title = f"[bold]{r.name}[/]" + (f": {r.title}" if with_title else "") + f" [dim]({r.seconds * 1000:.0f} ms)[/]"
    t = Table(title=title, title_justify="left", expand=True)
    for c in r.columns:
        t.add_column(c, overflow="ellipsis", no_wrap=True)
    for row in r.rows[:MAX_ROWS]:
        t.add_row(*("" if v is None else str(v) for v in row))
    if len(r.rows) > MAX_ROWS:
        t.caption = f"{len(r.rows) - MAX_ROWS} more rows"
    return t


def dashboard(s: Snapshot, name: str) -> RenderableType:
    w, p = s.window, s.pipeline
    oltp = Table.grid(padding=(0, 2))
    oltp.add_row("transactions/s", f"[bold]{w.tps:.0f}[/]")
    oltp.add_row("latency p50 / p99", f"{_ms(w.p50_ms)} / [bold]{_ms(w.p99_ms)}[/]")
    oltp.add_row("since start", _outcomes(s.totals))
    for err, n in list(s.totals.get("errors", {}).items())[:2]:
        oltp.add_row("[yellow]error[/]", f"{n} x {err}")
    cdc = Table.grid(padding=(0, 2))
    cdc.add_row("state", f"{p.get('state', '?')} / {p.get('phase') or '-'}")
    cdc.add_row("lag", f"[bold]{lag_text(p)}[/]")
    cdc.add_row("apply rate", f"{p.get('changes_per_s') or 0:.0f} changes/s")
    if p.get("last_error"):
        cdc.add_row("[yellow]last error[/]", str(p["last_error"])[:120])
    top = Table.grid(expand=True)
    top.add_column(ratio=1)
    top.add_column(ratio=1)
    top.add_row(
        Panel(oltp, title=f"OLTP (PostgreSQL, last {w.seconds:.0f}s)", title_align="left"),
        Panel(cdc, title="CDC (pipeline)", title_align="left"),
    )
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(ratio=1)
    grid.add_column(ratio=1)
    tables = [result_table(r) for r in s.pack]
    for i in range(0, len(tables), 2):
        grid.add_row(*tables[i : i + 2], *([""] if i + 1 >= len(tables) else []))
    age = "" if s.pack_age_s is None else f" [dim](refreshed {s.pack_age_s:.0f}s ago)[/]"
    header = f"[bold]pgbridge demo[/]: {name}, {s.elapsed_s:.0f}s - Ctrl-C stops the workload (the deployment stays up)"
    return Group(header, top, f"[bold]analytics on the warehouse[/]{age}", grid)
