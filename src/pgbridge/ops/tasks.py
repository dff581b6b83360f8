"""Multi-step operations that undo themselves.

Each step that creates something registers how to take it back; if a later step fails (or the
user interrupts), the undo list runs in reverse so a failed first `up` leaves nothing behind.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Literal

log = logging.getLogger(__name__)

Action = Literal["created", "changed", "unchanged", "started", "stopped", "removed", "pending-reboot", "pending"]


@dataclass(frozen=True)
class Change:
    resource: str
    action: Action
    detail: str = ""


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)
    pending_reboot: list[str] = field(default_factory=list)

    def add(self, resource: str, action: Action, detail: str = "") -> None:
        self.changes.append(Change(resource, action, detail))

    @property
    def changed(self) -> bool:
        return any(c.action != "unchanged" for c in self.changes)


@dataclass
class Undo:
    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def push(self, name: str, fn: Callable[[], None]) -> None:
        self.steps.append((name, fn))

    def run(self) -> None:
        for name, fn in reversed(self.steps):
            try:
                fn()
            except Exception as e:  # keep undoing the rest; report what could not be undone
                self.failures.append(f"{name}: {e}")
                log.warning("undo of %s failed: %s", name, e)
        self.steps.clear()


class Interrupted(BaseException):
    """SIGTERM/SIGHUP during a multi-step operation: unwind like Ctrl-C does."""


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception so undo steps run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
