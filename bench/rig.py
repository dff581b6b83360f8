"""What the benchmarks share: one real deployment in a scratch folder, driven through the CLI.

A `Rig` is the tests' `Env`: a fresh folder every user can enter (the servers run as the service
user), its own PGBRIDGE_HOME_BASE and a free port. `deployment()` brings it up with `pgbridge up`
and destroys it at the end, also after a failure or Ctrl-C (`pgbridge destroy --yes`, then the
process trees of its pid files; never by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.*

from tests.conftest import Env, spec_text

from pgbridge.platform.system import free_port


def say(text: str = "") -> None:
    print(text, flush=True)


def pgbridge_argv() -> list[str]:
    entry = Path(sys.executable).parent / "pgbridge"
    return [str(entry)] if entry.exists() else [sys.executable, "-c", "from pgbridge.cli.main import main; main()"]


class Rig(Env):
    """One deployment in a scratch folder, driven through the CLI (the tests' `Env`, failing loudly)."""

    def cli(self, *args: str, timeout: float = 600) -> str:
        proc = self.run(*args, check=False, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pgbridge {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("status", "--json", timeout=60))
        return result


R = TypeVar("R", bound=Rig)


@contextlib.contextmanager
def deployment(
    extra: str, *, rig_class: type[R] = Rig, label: str = "", instance_class: str = "db.micro", size_gb: int = 5
) -> Iterator[R]:
    """`pgbridge up` of the test spec plus `extra`; destroyed on the way out, whatever happens."""
    base = Path(tempfile.mkdtemp(prefix="pgbridge-bench-", dir="/tmp"))
    os.chmod(base, 0o755)  # the service user must be able to enter it
    rig = rig_class(base, f"bench-{uuid.uuid4().hex[:6]}", free_port())
    if "backup:" not in extra:  # the product's default (the tests' spec turns backups off)
        extra = "backup: {enabled: true}\n" + extra
    rig.spec.write_text(spec_text(rig.name, rig.port, extra, instance_class=instance_class, size_gb=size_gb))
    prefix = f"[{label}] " if label else ""
    try:
        started = time.perf_counter()
        rig.cli("up", timeout=900)
        took = time.perf_counter() - started
        say(f"{prefix}deployment {rig.name} up in {took:.0f}s (port {rig.port}, home {rig.home})")
        yield rig
    finally:
        # A second Ctrl-C (or SIGTERM) must not leave servers behind.
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        say(f"{prefix}destroying {rig.name} ...")
        rig.cleanup()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
