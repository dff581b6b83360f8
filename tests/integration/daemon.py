"""The pipeline daemon in a thread of the test process, against a bare server (no deployment)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from pgbridge.cdc.pipeline import Pipeline, PipelineConfig
from tests.pgserver import Server


def pipeline_config(pg: Server, schema: str, folder: Path, name: str, **overrides: Any) -> PipelineConfig:
    """A pipeline over every table of ``schema`` (publication ``pub_<schema>``, slot ``slot_<schema>``)."""
    settings: dict[str, Any] = {
        "name": name,
        "dsn": pg.dsn,
        "slot": f"slot_{schema}",
        "publication": f"pub_{schema}",
        "warehouse": str(folder / "w.duckdb"),
        "status_file": str(folder / "status.json"),
        "socket": str(folder / "q.sock"),
        "include": (f"{schema}.*",),
        "max_wait_ms": 50,
    }
    return PipelineConfig(**{**settings, **overrides})


class Daemon:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.pipeline: Pipeline | None = None
        self.thread: threading.Thread | None = None

    @property
    def socket(self) -> Path:
        return Path(self.cfg.socket)

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.pipeline = Pipeline(self.cfg)
        self.thread = threading.Thread(target=self.pipeline.run)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        assert self.pipeline is not None and self.thread is not None
        self.pipeline.stop.set()
        self.thread.join(60)
        self.pipeline.close()


def drop_inactive_slots(pg: Server) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")
