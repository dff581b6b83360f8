"""Renderers: turn service results into tables or JSON. Services never print."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from pgbridge.errors import PgbridgeError
from pgbridge.ops.tasks import Report

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_STYLE = {
    "created": "green",
    "started": "green",
    "changed": "yellow",
    "pending-reboot": "magenta",
    "pending": "yellow",
    "unchanged": "dim",
    "stopped": "cyan",
    "removed": "red",
    "pass": "green",
    "fail": "bold red",
    "skip": "yellow",
}


def styled(word: str) -> str:
    style = _STYLE.get(word)
    return f"[{style}]{word}[/]" if style else word


def report_table(title: str, report: Report) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("resource")
    t.add_column("result")
    t.add_column("detail", overflow="fold")
    for c in report.changes:
        t.add_row(c.resource, styled(c.action), c.detail)
    return t


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def rows_table(columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table()
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*("NULL" if v is None else str(v) for v in row))
    return t


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PgbridgeError as e:
            err.print(f"[bold red]error:[/] {e.message}", markup=True)
            if e.hint:
                err.print(f"  [dim]hint:[/] {e.hint}")
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # the last line of defence: a message, never a traceback
            if os.environ.get("PGBRIDGE_DEBUG"):
                raise
            err.print(f"[bold red]internal error:[/] {type(e).__name__}: {e}")
            err.print("  [dim]hint:[/] run again with PGBRIDGE_DEBUG=1 for details and report it")
            sys.exit(70)

    return wrapper  # type: ignore[return-value]
