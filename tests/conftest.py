"""Shared test helpers: a real deployment driven through the real CLI, cleaned up by pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pgbridge.platform.system import free_port
from tests.pgserver import kill_home_processes

BIN = Path(sys.executable).parent
PGBRIDGE = str(BIN / "pgbridge")


def spec_text(name: str, port: int, extra: str = "", *, instance_class: str = "db.micro", size_gb: int = 5) -> str:
    # Backups are on by default; a test pays for a repository, WAL archiving and a first full
    # backup only when its spec names a backup section (the backup and Multi-AZ tests do).
    backup = "" if "backup:" in extra else "backup: {enabled: false}\n"
    return f"""\
name: {name}
instance_class: {instance_class}
storage: {{type: ssd, size_gb: {size_gb}}}
network:
  port: {port}
  listen_addresses: [127.0.0.1]
  allowed_cidrs: [127.0.0.1/32]
tls: {{mode: required}}
database:
  name: shop
  schema: shop
  users: {{app: shop_app, readonly: shop_ro, cdc: shop_cdc}}
{backup}{extra}"""


@dataclass
class Env:
    """A scratch folder every user can enter, with a spec and the CLI wired to it."""

    base: Path
    name: str
    port: int
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def spec(self) -> Path:
        return self.base / "pgbridge.yaml"

    @property
    def home(self) -> Path:
        return self.base / "homes" / self.name

    def write_spec(self, extra: str = "", *, port: int | None = None) -> None:
        self.spec.write_text(spec_text(self.name, port or self.port, extra))

    def env(self) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("PGBRIDGE_")}
        e["PGBRIDGE_HOME_BASE"] = str(self.base / "homes")
        e["COLUMNS"] = "200"
        e.update(self.extra_env)
        return e

    def run(self, *args: str, check: bool = True, timeout: float = 400, env: dict[str, str] | None = None):
        proc = subprocess.run(
            [PGBRIDGE, "-f", str(self.spec), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env(),
            check=False,
        )
        if check and proc.returncode != 0:
            cmd = " ".join(args)
            raise AssertionError(
                f"pgbridge {cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def secret(self, user: str) -> str:
        return self.run("secrets", "get", user).stdout.strip()

    def dsn(self, user: str = "shop_app") -> str:
        return self.run("secrets", "get", user, "--dsn").stdout.strip()

    def cleanup(self) -> None:
        if self.home.exists():
            proc = subprocess.run(
                [PGBRIDGE, "--home", str(self.home), "destroy", "--yes"],
                capture_output=True,
                text=True,
                env=self.env(),
                timeout=300,
                check=False,
            )
            if proc.returncode != 0:
                kill_home_processes(self.home)
        shutil.rmtree(self.base, ignore_errors=True)


def make_env(prefix: str = "it") -> Env:
    base = Path(tempfile.mkdtemp(prefix=f"pgbridge-{prefix}-", dir="/tmp"))
    os.chmod(base, 0o755)
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    e = Env(base=base, name=name, port=free_port())
    e.write_spec()
    return e


@contextlib.contextmanager
def deployed(prefix: str, extra: str = "", timeout: float = 400) -> Iterator[Env]:
    """A deployment of ``spec_text`` + ``extra`` brought up through the CLI, destroyed afterwards."""
    e = make_env(prefix)
    e.write_spec(extra)
    try:
        e.run("up", timeout=timeout)
        yield e
    finally:
        e.cleanup()


@pytest.fixture
def scratch() -> Iterator[Env]:
    """A fresh folder and spec; whatever gets deployed there is destroyed afterwards."""
    e = make_env("t")
    try:
        yield e
    finally:
        e.cleanup()
