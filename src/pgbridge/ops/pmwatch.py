"""The postmaster watch: `python -m pgbridge.ops.pmwatch HOME`, run by supervisord.

Patroni looks at PostgreSQL once per HA loop (``loop_wait``: 3 s in the default profile), so a
crashed postmaster can go unnoticed that long before Patroni fails over (Multi-AZ) or restarts
it in place. This daemon looks at every member's postmaster five times a second. A
``postmaster.pid`` whose process is gone means a crash: a clean or immediate shutdown removes the
file, only a killed postmaster leaves it. It then wakes that member's Patroni at once: Patroni runs
its HA loop after any ``PATCH /config``, also one that changes nothing, which is what it sends.
Waking Patroni is harmless, so a doubtful case wakes it too.

It runs as the service user and reads only the members' Patroni files (their REST port and
credentials, and data directory), which that user owns.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import yaml

from pgbridge.errors import PgbridgeError
from pgbridge.home import Home
from pgbridge.platform.patroni import PatroniAPI
from pgbridge.platform.system import read_pid

log = logging.getLogger("pgbridge.pmwatch")
PROGRAM = "pmwatch"
POLL_S = 0.2
RESCAN_S = 5.0  # members come and go with `up`


@dataclass(frozen=True)
class Member:
    name: str
    data_dir: Path
    api: PatroniAPI


def members(home: Home) -> list[Member]:
    """The members whose Patroni file is in the home."""
    found = []
    for conf in sorted(home.etc.glob("patroni-*.yml")):
        try:
            doc: Any = yaml.safe_load(conf.read_text())
            rest = doc["restapi"]
            auth = rest["authentication"]
            port = int(str(rest["listen"]).rsplit(":", 1)[1])
            api = PatroniAPI(port, auth["username"], auth["password"], timeout=3)
            found.append(Member(str(doc["name"]), Path(doc["postgresql"]["data_dir"]), api))
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, IndexError) as e:
            log.warning("skipping %s: %s", conf.name, e)
    return found


def dead_postmaster(data_dir: Path) -> tuple[int, str] | None:
    """A postmaster that died without shutting down, if the member has one: (pid, stage).

    The stage is "zombie" until init reaps the killed process (seconds, on some hosts), then
    "gone". Patroni counts a zombie as running, so only a wake after the reap makes it act; the
    earlier one costs nothing and helps where Patroni is already looking.
    """
    pid = read_pid(data_dir / "postmaster.pid")
    if pid is None or pid <= 0:  # a single-user backend (Patroni's crash recovery) writes -pid
        return None
    try:
        return (pid, "zombie") if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return (pid, "gone")
    except psutil.Error:
        return None


def wake(api: PatroniAPI) -> None:
    """Make Patroni run its HA loop now: a PATCH that sets a value to what it already is (`up`
    always sets ``use_slots``), so no GET first on the path where every second of RTO counts."""
    api.patch_config({"postgresql": {"use_slots": True}})


class Watch:
    def __init__(self, home: Path) -> None:
        self.home = Home(home)
        self.stopping = False
        self.reported: dict[str, tuple[int, str]] = {}  # member -> the dead postmaster already woken for

    def _stop(self, _sig: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        found: list[Member] = []
        scanned = 0.0
        while not self.stopping:
            if time.monotonic() - scanned > RESCAN_S:
                found, scanned = members(self.home), time.monotonic()
            for m in found:
                try:
                    self.check(m)
                except Exception:  # the watch must outlive any surprise; Patroni still loops
                    log.exception("checking %s failed", m.name)
            time.sleep(POLL_S)

    def check(self, m: Member) -> None:
        dead = dead_postmaster(m.data_dir)
        if dead is None or self.reported.get(m.name) == dead:
            return
        pid, stage = dead
        try:
            wake(m.api)
        except PgbridgeError as e:  # its Patroni is down too (a lost host): nothing to wake
            log.info("postmaster %d of %s is %s; Patroni did not answer (%s)", pid, m.name, stage, e)
        else:
            log.warning("postmaster %d of %s is %s; woke its Patroni", pid, m.name, stage)
        self.reported[m.name] = dead


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s", stream=sys.stdout)
    Watch(Path(sys.argv[1])).run()


if __name__ == "__main__":
    main()
