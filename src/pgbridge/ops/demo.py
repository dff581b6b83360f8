"""`pgbridge demo`: the whole platform in one command, as data for a dashboard.

Brings up the deployment of a spec (writing the example spec with a pipeline when there is none),
loads the shop, runs the workload and, every second, takes a `Snapshot`: OLTP throughput and
latency from the workload's recorder, CDC lag from the pipeline's status, and the analytics pack's
answers from the warehouse. The front end decides how to show it; nothing here prints. Stopping
the demo stops the workload only: the deployment stays up for exploring.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgbridge.errors import PgbridgeError, UsageError
from pgbridge.ops import pipeline as pipeline_ops
from pgbridge.ops import workload as wl
from pgbridge.ops.context import Deployment, resolve_home
from pgbridge.ops.tasks import Report
from pgbridge.settings import Settings
from pgbridge.spec.example import example_spec
from pgbridge.spec.load import load_spec
from pgbridge.workload.analytics import QueryResult, load_pack
from pgbridge.workload.generator import Workload
from pgbridge.workload.load import LoadResult
from pgbridge.workload.stats import Summary

DEMO_PIPELINE = """
# Change-data-capture of the application schema into the analytics warehouse (DuckDB).
pipeline:
  name: analytics
  batch: {max_wait_ms: 200}
"""


def write_default_spec(path: Path, name: str = "shop", port: int = 5433) -> None:
    """The example spec of `pgbridge init`, with a pipeline, where the demo finds no spec."""
    path.write_text(example_spec(name, port) + DEMO_PIPELINE)


@dataclass
class Prepared:
    dep: Deployment
    up: Report
    load: LoadResult


def prepare(
    settings: Settings, spec_path: Path, home: Path | None, scale: float, pack: str, step: Callable[[str], None]
) -> Prepared:
    """Up the deployment (idempotent) and load the shop; fails before `up` on bad input."""
    from pgbridge.ops.up import up
    from pgbridge.workload.load import sizes

    sizes(scale)
    load_pack(pack)
    spec = load_spec(spec_path)
    if spec.pipeline is None:
        raise UsageError(
            f"{spec_path} has no pipeline: the demo shows CDC into the warehouse",
            hint="add a `pipeline:` section (e.g. `pipeline: {name: analytics}`), or run the demo with a new -f file",
        )
    dep_home = resolve_home(settings, home=home, spec=spec)
    report = up(settings, spec, spec_path.read_text(), dep_home, step=step)
    dep = Deployment(settings, dep_home, spec)
    step(f"loading the shop (scale {scale:g})")
    loaded = wl.load_catalogue(dep, scale)
    return Prepared(dep, report, loaded)


@dataclass
class Snapshot:
    elapsed_s: float
    window: Summary  # the last few seconds
    totals: dict[str, Any]  # counts since the start
    pipeline: dict[str, Any]
    pack: list[QueryResult] = field(default_factory=list)
    pack_age_s: float | None = None


class Demo:
    """The running part: the workload in threads, and snapshots on request."""

    def __init__(self, dep: Deployment, run: Workload, pack: str, window_s: float = 5) -> None:
        self.dep = dep
        self.run = run
        self.pack = pack
        self.window_s = window_s
        self.started = time.monotonic()
        self._pack: list[QueryResult] = []
        self._pack_at: float | None = None

    def start(self) -> None:
        self.run.start()

    def stop(self) -> None:
        self.run.close()

    def snapshot(self, refresh_pack: bool = True) -> Snapshot:
        try:
            status = pipeline_ops.status(self.dep)
        except PgbridgeError as e:
            status = {"state": "unknown", "last_error": e.message}
        if refresh_pack:
            with contextlib.suppress(PgbridgeError):  # the pipeline restarting: keep the last results
                self._pack = wl.run_pack(self.dep, self.pack)
                self._pack_at = time.monotonic()
        rec = self.run.recorder
        return Snapshot(
            elapsed_s=time.monotonic() - self.started,
            window=rec.window(self.window_s),
            totals=rec.totals(),
            pipeline=status,
            pack=self._pack,
            pack_age_s=None if self._pack_at is None else time.monotonic() - self._pack_at,
        )
