"""The deployment's event log (RDS-like): one JSON object per line, appended, never rewritten."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from pgbridge.ops.context import Deployment


def record(dep: Deployment, kind: str, message: str, **data: Any) -> dict[str, Any]:
    event = {"time": time.time(), "kind": kind, "message": message, **data}
    path = dep.home.events_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(event, default=str) + "\n")
    return event


def read(dep: Deployment, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    path = dep.home.events_file
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if kind is None or e.get("kind") == kind:
            out.append(e)
    return out[-limit:]
